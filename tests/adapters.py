"""Build real PEFT LoRA adapters (random, non-zero weights) and their merged models, offline."""

from pathlib import Path


def build_adapter(
    base: Path, out: Path, targets: list[str], rank: int, seed: int, alpha: float = 16.0, std: float = 0.3
) -> Path:
    """Save a LoRA adapter for the model at `base` to `out`. Both lora_A and lora_B are random
    (peft's default B = 0 would make the adapter a no-op), with standard deviation `std`: large
    enough that outputs change, small enough that attention does not saturate (which would
    amplify float rounding: 0.3 suits the tiny fixtures, wide models need less)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(base)
    fan_in_fan_out = any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.endswith(tuple(targets)))
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # a float works: scaling = alpha / r
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    peft_model.save_pretrained(out)
    return out


def build_merged(base: Path, adapter: Path, out: Path) -> Path:
    """The base model at `base` with `adapter` merged in (peft's merge_and_unload), saved to `out`
    with the base's tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out
