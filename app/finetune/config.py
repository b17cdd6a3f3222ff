"""Every fine-tuning option, validated in one place; the CLI flags and YAML keys are generated from it."""

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.finetune.sizes import SCRATCH_SIZES

# A Literal built from the size table at runtime, which mypy cannot evaluate.
ScratchSizeName = Literal[tuple(SCRATCH_SIZES)]  # type: ignore[valid-type]


class ConfigError(Exception):
    """A bad option or config file; reported as one message and exit code 2."""


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, description="Base model: a Hugging Face hub id or a local directory.")
    task: Literal["text", "decisions"] = Field(
        "text",
        description="text: language modelling on --data. decisions: a classifier for /v1/decisions from JSONL "
        'lines {"input", "question", "answer"} (see docs/finetune.md, "Decisions classifiers").',
    )
    data: str = Field(
        description="Training data: a .txt file, a folder of .txt/.jsonl files, a .jsonl file with a 'text' "
        "field or 'prompt'/'completion' fields, a saved `datasets` dir, or a `datasets` hub name."
    )
    output: Path = Field(description="Where the fine-tuned model, metrics.json and manifest.json go.")
    chat_template: Path | None = Field(
        None,
        description="With --task decisions: a Jinja chat template file (as TEXTGEN_CHAT_TEMPLATE) that renders the "
        "training prompts instead of the model's own. Serve the adapter with the same template: its hash is "
        "recorded in decisions.json and a server rendering with another refuses the adapter.",
    )
    epochs: float = Field(3.0, gt=0, description="Passes over the training data (ignored with --max-steps).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    block_size: int | None = Field(
        None, gt=1, description="Tokens per training block. Default: min(512, the model's context); 256 from scratch."
    )
    learning_rate: float | None = Field(
        None, gt=0, description="Peak learning rate. Default: 5e-5 full fine-tune, 2e-4 LoRA, 1e-3 from scratch."
    )
    batch_size: int = Field(8, gt=0, description="Blocks per device per step.")
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps per optimizer step.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with a linear learning-rate warmup.")
    eval_split: float = Field(0.05, ge=0, lt=1, description="Share of blocks held out for evaluation.")
    eval_file: str | None = Field(None, description="Evaluate on this data instead of a split of --data.")
    lora: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    lora_rank: int = Field(8, gt=0, description="LoRA rank r.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    lora_targets: list[str] | None = Field(
        None, description="Module names to adapt. Default: chosen per architecture (GPT-2 c_attn, Llama q/k/v/o)."
    )
    no_merge: bool = Field(False, description="With --lora: export the adapter alone instead of a merged model.")
    serve_to: str | None = Field(
        None,
        description="With --lora --no-merge: load the adapter into the textgen server at this URL "
        "(http://host:port) when training ends; its key, if any, from TEXTGEN_API_KEY.",
    )
    name: str | None = Field(None, description="The adapter's name on the server. Default: OUTPUT's directory name.")
    resume: bool = Field(False, description="Continue from the latest checkpoint in OUTPUT/checkpoints.")
    from_scratch: ScratchSizeName | None = Field(  # type: ignore[valid-type]  # see ScratchSizeName
        None,
        description="Train a new GPT-2-architecture model of this size. Uses --model's tokenizer if given, "
        "else trains a BPE tokenizer on the data.",
    )
    vocab_size: int = Field(4096, ge=256, description="Vocabulary of the tokenizer trained for --from-scratch.")
    seed: int = Field(42, description="Random seed for initialisation, data order and the eval split.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without a better eval loss; exports the best."
    )
    save_steps: int = Field(200, gt=0, description="Write a checkpoint every this many steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every this many steps. Default: --save-steps.")
    logging_steps: int = Field(10, gt=0, description="Log the training loss every this many steps.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept on disk while training.")
    keep_checkpoints: bool = Field(False, description="Keep OUTPUT/checkpoints after a successful export.")
    dataset_split: str = Field("train", description="Split to read when --data is a `datasets` name or dir.")

    @model_validator(mode="after")
    def _consistent(self) -> "FinetuneConfig":
        if self.model is None and self.from_scratch is None:
            raise ValueError("give --model (a base model) or --from-scratch SIZE")
        if self.lora and self.from_scratch:
            raise ValueError("--lora adapts a pretrained model; it cannot be combined with --from-scratch")
        if self.no_merge and not self.lora:
            raise ValueError("--no-merge only applies with --lora")
        if self.serve_to is not None and not self.no_merge:
            raise ValueError("--serve-to loads an unmerged adapter: it needs --lora --no-merge")
        if self.serve_to is not None and not self.serve_to.startswith(("http://", "https://")):
            raise ValueError(f"--serve-to takes the server's http(s):// URL; got {self.serve_to!r}")
        if self.task == "decisions" and self.from_scratch:
            raise ValueError(
                "--task decisions fine-tunes a pretrained --model; it cannot be combined with --from-scratch"
            )
        if self.chat_template is not None and self.task != "decisions":
            raise ValueError("--chat-template renders decisions prompts: it needs --task decisions")
        if self.early_stopping_patience and not (self.eval_file or self.eval_split > 0):
            raise ValueError("--early-stopping-patience needs evaluation data (--eval-split > 0 or --eval-file)")
        return self

    @property
    def adapter_name(self) -> str:
        """The adapter's name on a server: --name, else the output directory's name."""
        return self.name or self.output.resolve().name

    @property
    def has_eval(self) -> bool:
        return self.eval_file is not None or self.eval_split > 0


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{flag(where)}: {message}" if where else message)
    return "; ".join(lines)


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(raw).__name__}")
    # YAML keys may be spelled like the flags (block-size) or like Python (block_size).
    values = {str(key).replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(values) - set(FinetuneConfig.model_fields))
    if unknown:
        raise ConfigError(f"{path}: unknown option(s): {', '.join(unknown)}")
    return values


def build_config(values: dict[str, Any], *, source: str = "options") -> FinetuneConfig:
    try:
        return FinetuneConfig(**values)
    except ValidationError as exc:
        raise ConfigError(f"invalid {source}: {_describe(exc)}") from None
