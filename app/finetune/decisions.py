"""`textgen finetune --task decisions`: train a causal LM (or a LoRA adapter) to answer one kind
of Decisions question, then calibrate it.

Data: JSONL, one example a line: {"input": <a Decisions input: string or items>, "question": <one
Decisions question object>, "answer": <a choice value (typed), true/false for a predicate, or a
level's label for a score>}. Each example is encoded with the server's own prompt format
(app/decisions/prompt.py, the tokenizer's chat template if it has one), and the loss is the
cross-entropy of the right option's tokens only (the prompt's labels are -100).

A share of the examples (--eval-split, at least 1) is held out. On it the run measures accuracy
and expected calibration error (app/decisions/calibration.py) before training, after training,
and after fitting a temperature; the temperature goes to OUTPUT/decisions.json, which the server
reads when it answers decisions with this adapter.
"""

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, set_seed

from app.decisions.calibration import (
    accuracy,
    bound_advice,
    expected_calibration_error,
    fit_temperature,
    write_calibration,
)
from app.decisions.prompt import Encoded, encode
from app.decisions.questions import DecisionInputError, parse_input, parse_question
from app.finetune.config import ConfigError, FinetuneConfig
from app.finetune.data import DataError
from app.finetune.export import write_outputs
from app.finetune.lora import add_lora
from app.finetune.modeling import load_base
from app.finetune.output_dir import check_output

log = logging.getLogger("app.finetune")

MAX_OPTIONS = 255  # OpenAI's own bound per question; the server's cap is TEXTGEN_DECISIONS_MAX_OPTIONS
DEFAULT_LEARNING_RATE = {"lora": 1e-3, "full": 1e-4}


@dataclass(frozen=True)
class Example:
    encoded: Encoded
    label: int  # the right option's index


def read_examples(path: str, tokenizer: PreTrainedTokenizerBase, template: str | None) -> list[Example]:
    """Every line of the JSONL file, checked and encoded; DataError naming the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc})") from None
        if not isinstance(record, dict) or set(record) != {"input", "question", "answer"}:
            raise DataError(f'{where}: each line must be an object with exactly "input", "question" and "answer"')
        try:
            question = parse_question(record["question"], "question", MAX_OPTIONS)
            value = parse_input(record["input"])
            label = question.option_for(record["answer"])
            encoded = encode(tokenizer, template, value, question)
        except DecisionInputError as exc:
            raise DataError(f"{where}: {exc.message}") from None
        except ValueError as exc:
            raise DataError(f"{where}: `answer` {exc}") from None
        examples.append(Example(encoded, label))
    if len(examples) < 2:
        raise DataError(f"{path}: needs at least 2 examples (one to train on, one to hold out); found {len(examples)}")
    return examples


def split(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(examples) * share)) if share > 0 else 0
    if len(examples) - held < 1:
        raise DataError(f"too few examples ({len(examples)}) for --eval-split {share}")
    return [examples[i] for i in order[held:]], [examples[i] for i in order[:held]]


def _batch(rows: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 but on each row's last `n` tokens)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (row, n) in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
        labels[r, len(row) - n : len(row)] = torch.tensor(row[len(row) - n :])
    return ids, mask, labels


@torch.no_grad()
def option_sums(model: Any, examples: list[Example], pad: int) -> list[list[float]]:
    """Each example's options' logprob sums (the server's numbers, from the training forward)."""
    model.eval()
    out = []
    for e in examples:
        rows = [(e.encoded.prompt + o, len(o)) for o in e.encoded.options]
        ids, mask, labels = _batch(rows, pad)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        logprobs = torch.log_softmax(logits, dim=-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
        out.append((logprobs * (targets != -100)).sum(dim=1).tolist())
    return out


def evaluate(model: Any, examples: list[Example], pad: int, temperature: float = 1.0) -> dict[str, float]:
    sums = option_sums(model, examples, pad)
    labels = [e.label for e in examples]
    return {
        "accuracy": accuracy(sums, labels),
        "ece": expected_calibration_error(sums, labels, temperature),
    }


def _steps(config: FinetuneConfig, examples: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * examples / config.batch_size))


def finetune_decisions(config: FinetuneConfig) -> dict[str, Any]:
    """Train, calibrate and export; returns the metrics written to OUTPUT/metrics.json."""
    if config.from_scratch or config.model is None:
        raise ConfigError("--task decisions fine-tunes a pretrained --model (not --from-scratch)")
    check_output(config)
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    template = _template(config, tokenizer)
    examples = read_examples(config.data, tokenizer, template)
    train, held = split(examples, config.eval_split, config.seed)
    model: Any = load_base(config)
    if config.lora:
        model = add_lora(model, config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    log.info(
        "decisions: %d training examples, %d held out; prompt format: %s",
        len(train),
        len(held),
        "chat template" if template else "completion style",
    )
    before = evaluate(model, held, pad) if held else {}
    if held:
        log.info("before: validation accuracy %.3f, ECE %.3f", before["accuracy"], before["ece"])
    steps = _steps(config, len(train))
    rate = config.learning_rate or DEFAULT_LEARNING_RATE["lora" if config.lora else "full"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rate, weight_decay=0.0)
    warmup = max(1, int(steps * config.warmup_ratio))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / max(1, steps - warmup + 1))
    )
    rng = random.Random(config.seed)
    order: list[int] = []
    started = time.monotonic()
    losses: list[float] = []
    for step in range(1, steps + 1):
        model.train()
        if len(order) < config.batch_size:
            fresh = list(range(len(train)))
            rng.shuffle(fresh)
            order += fresh
        picked, order = order[: config.batch_size], order[config.batch_size :]
        answers = [(train[i].encoded, train[i].encoded.options[train[i].label]) for i in picked]
        rows = [(e.prompt + answer, len(answer)) for e, answer in answers]
        ids, mask, labels = _batch(rows, pad)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % config.logging_steps == 0 or step == steps:
            recent = losses[-config.logging_steps :]
            log.info(
                "step %d/%d: answer loss %.4f (%.0f s)",
                step,
                steps,
                sum(recent) / len(recent),
                time.monotonic() - started,
            )
    metrics: dict[str, Any] = {"task": "decisions", "train_examples": len(train), "eval_examples": len(held)}
    temperature = 1.0
    if held:
        after = evaluate(model, held, pad)
        sums = option_sums(model, held, pad)
        temperature = fit_temperature(sums, [e.label for e in held])
        calibrated = expected_calibration_error(sums, [e.label for e in held], temperature)
        log.info("after: validation accuracy %.3f, ECE %.3f", after["accuracy"], after["ece"])
        log.info("calibrated: temperature %.3f, ECE %.3f (accuracy unchanged)", temperature, calibrated)
        advice = bound_advice(temperature)
        if advice:
            log.warning("%s", advice)
        metrics.update(
            eval_accuracy_before=before["accuracy"],
            eval_ece_before=before["ece"],
            eval_accuracy_after=after["accuracy"],
            eval_ece_after=after["ece"],
            eval_ece_calibrated=calibrated,
        )
    metrics.update(temperature=temperature, global_step=steps, final_train_loss=losses[-1])
    model.eval()
    write_outputs(config, model, tokenizer, _sha256(config.data), metrics)
    evals = {k: v for k, v in metrics.items() if k.startswith("eval_")}
    write_calibration(config.output, temperature, evals, template)
    log.info("wrote %s", config.output)
    return metrics


def _template(config: FinetuneConfig, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The chat template that renders the prompts: --chat-template's file (read as the server reads
    TEXTGEN_CHAT_TEMPLATE), else the tokenizer's own, else None (completion style)."""
    if config.chat_template is None:
        return getattr(tokenizer, "chat_template", None)
    try:
        return config.chat_template.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --chat-template {config.chat_template}: {exc}") from exc


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
