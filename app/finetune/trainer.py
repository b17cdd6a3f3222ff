"""The HF Trainer as this tool uses it: token-weighted perplexity and crash-safe checkpoints."""

import math
import os
import shutil
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from transformers import EvalPrediction, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from app.finetune.config import FinetuneConfig
from app.finetune.packing import IGNORE_INDEX

STAGING = ".staging"  # checkpoints are written here, then renamed into place when complete


def token_nll(logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """Per block: summed next-token NLL and target count, `[n, 2]`. Returned instead of the logits so the
    eval loop gathers two numbers per block, not a vocabulary-sized tensor."""
    if isinstance(logits, tuple):
        logits = logits[0]
    shifted = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none")
    return torch.stack([nll.sum(dim=1), (shifted != IGNORE_INDEX).sum(dim=1).float()], dim=1)


def perplexity_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Weighted by tokens, unlike Trainer's eval_loss, which averages per-batch means."""
    sums = np.asarray(prediction.predictions, dtype=np.float64).reshape(-1, 2).sum(axis=0)
    nll = float(sums[0] / sums[1])
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": float(sums[1])}


def cpu_only() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6 knows every device type
    return not (accelerator.is_available() if accelerator else torch.cuda.is_available())


def distributed_state() -> PartialState:
    """The process group as the Trainer will see it. accelerate only sets up CPU (gloo) DDP under
    torchrun when told `cpu=True`, and the state is a singleton, so every caller must agree."""
    return PartialState(cpu=cpu_only())


class MixedPrecision(TypedDict, total=False):
    bf16: bool
    fp16: bool


def mixed_precision() -> MixedPrecision:
    """bf16 where the GPU has it, else fp16 on GPU; CPUs train in fp32."""
    if not torch.cuda.is_available():
        return {}
    return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}


def training_arguments(config: FinetuneConfig, checkpoint_dir: Path, learning_rate: float) -> TrainingArguments:
    evaluating = config.early_stopping_patience is not None
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,
        activation_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=config.eval_steps or config.save_steps,
        load_best_model_at_end=evaluating,
        metric_for_best_model="nll" if evaluating else None,
        greater_is_better=False if evaluating else None,
        report_to="none",
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=cpu_only(),
        **mixed_precision(),
    )


class FinetuneTrainer(Trainer):
    """Writes each checkpoint under STAGING and renames it into place once every rank has finished, so
    a crash mid-save leaves a staging leftover, never a `checkpoint-N` that looks complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("compute_metrics", perplexity_metrics)
        kwargs.setdefault("preprocess_logits_for_metrics", token_nll)
        super().__init__(*args, **kwargs)
        self._staging_save = False

    def _get_output_dir(self, trial: Any) -> str:
        root = super()._get_output_dir(trial)
        return os.path.join(root, STAGING) if self._staging_save else root

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        root = Path(super()._get_output_dir(trial))
        staging = root / STAGING
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)  # leftovers of a save that crashed
        self.accelerator.wait_for_everyone()
        self._staging_save = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_save = False
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        best = self.state.best_model_checkpoint
        best_in_staging = best is not None and Path(best).parent == staging
        if best is not None and best_in_staging:
            # Saved state must name where the checkpoint will live, not where it was written.
            self.state.best_model_checkpoint = str(root / Path(best).name)
        if self.args.should_save:
            if best_in_staging:
                self.state.save_to_json(str(staging / name / "trainer_state.json"))
            _fsync_tree(staging / name)
            if (root / name).exists():
                shutil.rmtree(root / name)
            os.rename(staging / name, root / name)
            _fsync_dir(root)
            rotate_checkpoints(
                output_dir=str(root),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


def latest_checkpoint(checkpoint_dir: Path) -> str | None:
    """Only renamed (complete) checkpoints match `checkpoint-N`; staging leftovers are ignored."""
    if not checkpoint_dir.is_dir():
        return None
    return get_last_checkpoint(str(checkpoint_dir))


def _fsync_tree(path: Path) -> None:
    """A rename is only crash-safe once the files it publishes have reached the disk."""
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
