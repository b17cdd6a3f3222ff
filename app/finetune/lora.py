"""LoRA adapters via peft, with the target modules chosen from the architecture."""

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from app.finetune.config import ConfigError, FinetuneConfig

# The attention projections per model_type; unknown types fall back to the common q/k/v/o names.
TARGETS_BY_MODEL_TYPE: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
}
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def target_modules(model: PreTrainedModel) -> list[str]:
    wanted = TARGETS_BY_MODEL_TYPE.get(model.config.model_type, DEFAULT_TARGETS)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [name for name in wanted if name in present]
    if not found:
        raise ConfigError(
            f"cannot choose LoRA target modules for model type '{model.config.model_type}'; "
            "name them with --lora-targets"
        )
    return found


def add_lora(model: PreTrainedModel, config: FinetuneConfig) -> PeftModel:
    targets = config.lora_targets or target_modules(model)
    suffixes = tuple(targets)
    chosen = [m for name, m in model.named_modules() if name.endswith(suffixes)]
    if not chosen:
        raise ConfigError(f"--lora-targets {' '.join(targets)} match no module of this model")
    # GPT-2's Conv1D stores weights transposed relative to nn.Linear; peft must be told.
    fan_in_fan_out = all(isinstance(m, Conv1D) for m in chosen)
    if not fan_in_fan_out and not all(isinstance(m, nn.Linear) for m in chosen):
        raise ConfigError("LoRA targets must all be Linear or all be GPT-2 Conv1D layers")
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft says int; scaling is alpha / r, floats work
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)
