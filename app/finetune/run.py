"""One fine-tuning run, start to finish: read and check data, train, evaluate, export."""

import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import transformers
from peft import PeftModel
from transformers import (
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    default_data_collator,
    set_seed,
)

from app.finetune.config import FinetuneConfig
from app.finetune.data import DataError, LoadedData, examples_sha256, load_data
from app.finetune.examples import Example
from app.finetune.export import write_outputs
from app.finetune.lora import add_lora
from app.finetune.modeling import (
    choose_block_size,
    context_length,
    ensure_generation_eos,
    load_base,
    load_tokenizer,
    new_model,
)
from app.finetune.output_dir import TOKENIZER, check_output, checkpoints, remember_run
from app.finetune.packing import PackedBlocks, pack
from app.finetune.trainer import FinetuneTrainer, distributed_state, latest_checkpoint, training_arguments

log = logging.getLogger("app.finetune")

DEFAULT_LEARNING_RATE = {"full": 5e-5, "lora": 2e-4, "scratch": 1e-3}


def setup_logging() -> None:
    """Progress goes to stderr from the main process only; other ranks speak up for warnings."""
    main = distributed_state().is_main_process
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    transformers.logging.set_verbosity(logging.WARNING if main else logging.ERROR)


@dataclass
class Splits:
    train: PackedBlocks
    eval: PackedBlocks | None


def split_blocks(blocks: PackedBlocks, share: float, seed: int) -> Splits:
    if share == 0:
        return Splits(blocks, None)
    n_eval = max(1, round(len(blocks) * share))
    if len(blocks) - n_eval < 1:
        raise DataError(
            f"too little data for an eval split: {len(blocks)} block(s); add data, lower --block-size, "
            "pass --eval-file, or --eval-split 0"
        )
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return Splits(blocks.subset(order[n_eval:].sort().values), blocks.subset(order[:n_eval].sort().values))


def learning_rate(config: FinetuneConfig) -> float:
    if config.learning_rate is not None:
        return config.learning_rate
    mode = "scratch" if config.from_scratch else "lora" if config.lora else "full"
    return DEFAULT_LEARNING_RATE[mode]


class StepCounter(TrainerCallback):
    """Optimizer steps taken by this process, which a resumed run's restored state cannot tell."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.steps += 1


@dataclass
class Prepared:
    model: PreTrainedModel | PeftModel
    tokenizer: PreTrainedTokenizerBase
    block_size: int


def prepare_model(config: FinetuneConfig, data: LoadedData, checkpoint_dir: Path) -> Prepared:
    # New weights and LoRA adapters are initialised before the Trainer would seed anything.
    set_seed(config.seed)
    tokenizer = load_tokenizer(config, data.examples, saved=checkpoint_dir / TOKENIZER)
    if config.from_scratch:
        block_size = choose_block_size(config, None)
        model = new_model(config, tokenizer, block_size)
    else:
        model = load_base(config)
        block_size = choose_block_size(config, context_length(model))
    ensure_generation_eos(model, tokenizer)
    if config.gradient_checkpointing:
        model.config.use_cache = False
        if config.lora:
            model.enable_input_require_grads()  # frozen embeddings would otherwise cut the graph
    if not config.lora:
        return Prepared(model, tokenizer, block_size)
    adapted = add_lora(model, config)
    trainable, total = adapted.get_nb_trainable_parameters()
    log.info("LoRA: training %s of %s parameters", f"{trainable:,}", f"{total:,}")
    return Prepared(adapted, tokenizer, block_size)


def make_splits(config: FinetuneConfig, data: LoadedData, eval_data: LoadedData | None, prepared: Prepared) -> Splits:
    blocks = pack(data.examples, prepared.tokenizer, prepared.block_size, what="train data")
    if eval_data is not None:
        return Splits(blocks, pack(eval_data.examples, prepared.tokenizer, prepared.block_size, what="eval data"))
    return split_blocks(blocks, config.eval_split, config.seed)


def hand_over(config: FinetuneConfig) -> None:
    """The adapter to a running server (--serve-to), or the one-line curl that loads it."""
    from app.finetune.serve_to import curl_command, serve_to

    if config.serve_to is None:
        print(f"load it into a running textgen server:\n{curl_command(config.adapter_name, config.output)}")
        return
    answer = serve_to(config.serve_to, config.adapter_name, config.output)
    log.info("%s: %s (query it with model=%r)", config.serve_to, answer, config.adapter_name)


def finetune(
    config: FinetuneConfig,
    examples: Sequence[Example] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, Any]:
    """Returns the metrics also written to OUTPUT/metrics.json. `examples` replaces reading
    `config.data` (then only a label) for callers that build their corpus in memory; `callbacks`
    are added to the Trainer's (e.g. to report progress)."""
    if config.task == "decisions":
        from app.finetune.decisions import finetune_decisions

        decision_metrics = finetune_decisions(config)
        if config.no_merge:
            hand_over(config)
        return decision_metrics
    state = distributed_state()
    check_output(config)
    checkpoint_dir = checkpoints(config)
    # All input is read and checked before anything slow, so bad data fails in seconds.
    if examples is None:
        data = load_data(config.data, split=config.dataset_split)
    else:
        data = LoadedData(list(examples), examples_sha256(examples))
    eval_data = load_data(config.eval_file, split=config.dataset_split) if config.eval_file else None

    resume_from = latest_checkpoint(checkpoint_dir) if config.resume else None
    if config.resume:
        log.info("resuming from %s", resume_from or "nothing: no checkpoint yet, starting fresh")
    prepared = prepare_model(config, data, checkpoint_dir)
    splits = make_splits(config, data, eval_data, prepared)
    log.info(
        "training on %d blocks (%s tokens), evaluating on %d blocks (%s tokens), %d process(es)",
        len(splits.train),
        f"{splits.train.tokens:,}",
        len(splits.eval) if splits.eval else 0,
        f"{splits.eval.tokens:,}" if splits.eval else 0,
        state.num_processes,
    )
    if state.is_main_process:
        remember_run(config, prepared.tokenizer)
    state.wait_for_everyone()

    counter = StepCounter()
    all_callbacks: list[TrainerCallback] = [counter, *callbacks]
    if config.early_stopping_patience:
        all_callbacks.append(EarlyStoppingCallback(config.early_stopping_patience))
    trainer = FinetuneTrainer(
        model=prepared.model,
        args=training_arguments(config, checkpoint_dir, learning_rate(config)),
        train_dataset=splits.train,
        eval_dataset=splits.eval,
        processing_class=prepared.tokenizer,
        data_collator=default_data_collator,  # blocks are already equal length
        callbacks=all_callbacks,
    )
    before = trainer.evaluate() if splits.eval else {}
    result = trainer.train(resume_from_checkpoint=resume_from)
    after = trainer.evaluate() if splits.eval else {}

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics: dict[str, Any] = {
        "eval_perplexity_before": before.get("eval_perplexity"),
        "eval_perplexity_after": after.get("eval_perplexity"),
        "eval_nll_before": before.get("eval_nll"),
        "eval_nll_after": after.get("eval_nll"),
        "train_tokens": splits.train.tokens,
        "train_target_tokens": splits.train.target_tokens,
        "train_blocks": len(splits.train),
        "eval_tokens": splits.eval.tokens if splits.eval else 0,
        "eval_blocks": len(splits.eval) if splits.eval else 0,
        "block_size": prepared.block_size,
        "global_step": trainer.state.global_step,
        "steps_this_run": counter.steps,
        "world_size": state.num_processes,
        "final_train_loss": losses[-1] if losses else None,
        "mean_train_loss": result.training_loss,
        "resumed_from": resume_from,
    }
    if splits.eval:
        log.info(
            "held-out perplexity: %.3f before, %.3f after (%s tokens)",
            metrics["eval_perplexity_before"],
            metrics["eval_perplexity_after"],
            f"{splits.eval.target_tokens:,}",
        )
    if state.is_main_process:
        model = cast("PreTrainedModel | PeftModel", trainer.model)  # the one given to the Trainer
        write_outputs(config, model, prepared.tokenizer, data.sha256, metrics)
        if not config.keep_checkpoints:
            shutil.rmtree(checkpoint_dir)
        log.info("wrote %s", config.output)
        if config.no_merge:
            hand_over(config)
    state.wait_for_everyone()
    return metrics
