"""The rules of the --output folder: what may be there before a run, and what --resume may change."""

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from app.finetune.config import ConfigError, FinetuneConfig, flag
from app.finetune.export import write_json

RUN_CONFIG = "run-config.json"
TOKENIZER = "tokenizer"
# Options a resumed run may change; any other change would make the checkpoint describe other training.
CHANGEABLE_ON_RESUME = {
    "resume", "epochs", "max_steps", "save_steps", "eval_steps", "logging_steps", "save_total_limit",
    "keep_checkpoints", "early_stopping_patience",
}  # fmt: skip


def checkpoints(config: FinetuneConfig) -> Path:
    return config.output / "checkpoints"


def check_output(config: FinetuneConfig) -> None:
    output = config.output
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file, not a folder")
    if not config.resume and output.is_dir() and any(output.iterdir()):
        raise ConfigError(f"--output {output} is not empty; pass --resume to continue a run there, or pick a new one")
    if config.resume and (output / "manifest.json").exists():
        raise ConfigError(f"--output {output} holds a finished run (manifest.json); there is nothing to resume")
    saved = checkpoints(config) / RUN_CONFIG
    if config.resume and saved.exists():
        before = json.loads(saved.read_text(encoding="utf-8"))
        now = config.model_dump(mode="json")
        changed = sorted(k for k in now if k not in CHANGEABLE_ON_RESUME and before.get(k) != now[k])
        if changed:
            raise ConfigError(
                "--resume needs the options of the interrupted run; changed: "
                + ", ".join(f"{flag(k)} (was {before.get(k)!r})" for k in changed)
            )


def remember_run(config: FinetuneConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """A resumed run must tokenise identically and train what the checkpoints describe."""
    directory = checkpoints(config)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory / TOKENIZER)
    if not (directory / RUN_CONFIG).exists():
        write_json(directory / RUN_CONFIG, config.model_dump(mode="json"))
