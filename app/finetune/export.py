"""Write the trained model where `textgen serve --model DIR` (or `--adapter DIR`) can load it."""

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import app
from app.finetune.config import FinetuneConfig

# Moved into the output last: a loader needs these, so a crash mid-publish leaves nothing loadable.
LAST = ("config.json", "adapter_config.json")


def export_model(
    model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, output: Path, *, merge: bool
) -> None:
    """Weights, tokenizer and generation config; a LoRA model is merged into its (fp32) base unless
    `merge` is false, in which case the adapter is saved alone in the standard peft layout."""
    staging = output / ".export"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    if isinstance(model, PeftModel) and merge:
        model = model.merge_and_unload()
    model.save_pretrained(str(staging))
    if isinstance(model, PeftModel):
        # peft writes no generation config; keeping the base's lets an adapter dir stand on its own.
        base = cast(PreTrainedModel, model.get_base_model())  # peft types it as a bare Module
        base.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    publish(staging, output)
    staging.rmdir()


def publish(staging: Path, output: Path) -> None:
    files = sorted((p for p in staging.iterdir() if p.is_file()), key=lambda p: p.name in LAST)
    umask = os.umask(0)
    os.umask(umask)
    for file in files:
        # Some savers write through private temp files (mode 0600); a server run by another user must read them.
        os.chmod(file, 0o666 & ~umask)
        os.replace(file, output / file.name)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Readers never see a half-written file: write beside it, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def manifest(
    *,
    base_model: str | None,
    from_scratch: str | None,
    adapter: bool,
    data: str,
    data_sha256: str,
    metrics: dict[str, Any],
    config: dict[str, Any],
) -> dict[str, Any]:
    return {
        "base_model": base_model,
        "from_scratch": from_scratch,
        "adapter_only": adapter,
        "data": data,
        "data_sha256": data_sha256,
        "metrics": metrics,
        "textgen_version": app.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config,
    }


def write_outputs(
    config: FinetuneConfig,
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    data_sha256: str,
    metrics: dict[str, Any],
) -> None:
    """Everything a finished run leaves in OUTPUT."""
    export_model(model, tokenizer, config.output, merge=not config.no_merge)
    write_json(config.output / "metrics.json", metrics)
    # Written last: a folder with a manifest holds a finished run.
    write_json(
        config.output / "manifest.json",
        manifest(
            base_model=config.model,
            from_scratch=config.from_scratch,
            adapter=config.no_merge,
            data=config.data,
            data_sha256=data_sha256,
            metrics=metrics,
            config=config.model_dump(mode="json"),
        ),
    )
