"""The offline demo model: a small GPT-2 trained from scratch on the Python docs that ship with CPython.

`python -m app.finetune.demo --output DIR` builds it in about a minute on two CPU cores, with no network, so
`textgen serve` has something real to serve out of the box. With `--progress FILE` it keeps FILE
updated with a JSON object `{"phase", "step", "total_steps", "training_s"}` that the server reads
while it waits (phase: preparing, training, saving).
"""

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch
from transformers import TrainerCallback

from app.finetune.config import FinetuneConfig
from app.finetune.examples import Example
from app.finetune.run import finetune, setup_logging
from app.finetune.tokenizer import python_docs_corpus

# Sized so that a fresh clone's first `make run` answers within two minutes on two quiet CPU cores
# (issue 14), while the model still writes Python-doc prose. Training is most of the build, and its
# cost is the number of tokens the model processes, so this build sees 40% of the tokens of the
# earlier 650-step, batch-8 build, in smaller batches (more updates per token). The context stays
# 256, the served model's limit. A higher learning rate did not buy fewer steps: in the same steps
# 5e-3 learned worse than 2.5e-3, and at batch 4, 1.2e-3 better than 2e-3 (held-out perplexity 93
# against 98; 120 for 260 steps of batch 8).
DEMO_SETTINGS: dict[str, object] = {
    "from_scratch": "small",
    "vocab_size": 2048,
    "block_size": 256,
    "batch_size": 4,
    "max_steps": 520,
    "learning_rate": 1.2e-3,
    "warmup_ratio": 0.05,
    "eval_split": 0.05,
    "seed": 1234,
    "logging_steps": 25,
    "save_steps": 10_000,  # a one-minute build is cheaper to redo than to checkpoint
}
SAMPLE_PROMPT = "The list"
UNDERLINE = re.compile(r"^[*=\-+~^]{3,}$")
EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")


def demo_corpus() -> list[str]:
    """The docs as prose: hard-wrapped paragraphs joined into one line each, heading underlines and
    *emphasis* markers dropped. Left in, newlines and asterisks are so frequent that a model this small
    decodes greedily into runs of them."""
    return [_reflow(text) for text in python_docs_corpus()]


def _reflow(text: str) -> str:
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line for line in paragraph.split("\n") if line.strip() and not UNDERLINE.match(line.strip())]
        if not lines:
            continue
        indented = any(line[:1].isspace() for line in lines)  # code and grammar keep their layout
        if indented:
            paragraphs.append("\n".join(lines))
        else:
            paragraphs.append(EMPHASIS.sub(r"\1", " ".join(line.strip() for line in lines)))
    return "\n\n".join(paragraphs) + "\n"


class ProgressFile(TrainerCallback):
    """Keeps `path` holding the build's progress as one JSON object, replaced atomically so a reader
    never sees half of it."""

    def __init__(self, path: Path | None, total_steps: int) -> None:
        self.path = path
        self.total_steps = total_steps
        self.training_started: float | None = None
        self.write("preparing", 0)

    def write(self, phase: str, step: int) -> None:
        if self.path is None:
            return
        training_s = 0.0 if self.training_started is None else time.monotonic() - self.training_started
        body = {"phase": phase, "step": step, "total_steps": self.total_steps, "training_s": round(training_s, 2)}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(body), encoding="utf-8")
        os.replace(tmp, self.path)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training_started = time.monotonic()
        self.write("training", 0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.write("training", state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.write("saving", state.global_step)


def build_demo_model(output: Path, *, max_steps: int | None = None, progress: Path | None = None) -> Path:
    """Builds into a temporary folder beside `output` and renames it into place, so a crash never
    leaves a folder at `output` that looks complete. `max_steps` shortens the build for tests;
    `progress` is a file kept updated as the build goes (see the module docstring)."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(output)
    tmp = output.parent / f".{output.name}.building-{os.getpid()}"
    settings = {**DEMO_SETTINGS, **({"max_steps": max_steps} if max_steps is not None else {})}
    try:
        config = FinetuneConfig(data="python-docs (pydoc_data.topics)", output=tmp, **settings)
        reporter = ProgressFile(progress, config.max_steps or 0)
        finetune(config, [Example(text) for text in demo_corpus()], callbacks=[reporter])
        try:
            os.rename(tmp, output)
        except OSError:
            if not (output / "config.json").exists():
                raise
            # A concurrent build finished first; its model is as good as ours.
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _remove_abandoned_builds(output: Path) -> None:
    """Temporary folders of builds that were killed (their process is gone); live ones are left alone."""
    for leftover in output.parent.glob(f".{output.name}.building-*"):
        pid = leftover.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def generate_samples(model_dir: Path, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 40) -> dict[str, str]:
    """Greedy and one seeded sampled continuation, as `model.generate` gives them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    out: dict[str, str] = {}
    settings: dict[str, dict[str, Any]] = {
        "greedy": {"do_sample": False},
        "sampled (temperature 0.8, top_k 40, seed 0)": {"do_sample": True, "temperature": 0.8, "top_k": 40},
    }
    for name, kwargs in settings.items():
        torch.manual_seed(0)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        out[name] = cast(str, tokenizer.decode(ids[0], skip_special_tokens=True))  # one sequence: one str
    return out


def write_sample(path: Path, samples: dict[str, str]) -> None:
    lines = [
        "# Offline demo model: sample output",
        "",
        "From `python -m app.finetune.demo --output DIR --sample-to docs/demo-sample.md` (a 4-layer GPT-2 "
        f"trained from scratch on the Python docs in {DEMO_SETTINGS['max_steps']} steps of "
        f"{DEMO_SETTINGS['batch_size']} blocks, about a minute on two quiet CPU cores).",
        "",
        f'Prompt `"{SAMPLE_PROMPT}"`, 40 new tokens, `model.generate`:',
        "",
    ]
    for name, text in samples.items():
        lines += [f"- {name}:", "", "  ```text", *("  " + line for line in text.splitlines()), "  ```", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.finetune.demo", description=__doc__)
    parser.add_argument("--output", type=Path, required=True, help="Folder to create with the model.")
    parser.add_argument(
        "--sample-to", type=Path, help="Also write greedy and sampled outputs to this Markdown file (also when built)."
    )
    parser.add_argument("--progress", type=Path, help="Keep this file updated with the build's progress (JSON).")
    args = parser.parse_args(argv)
    if (args.output / "config.json").exists():
        print(f"The demo model is already built at {args.output}; delete that folder to rebuild it.")
    else:
        setup_logging()
        print(
            "Building the offline demo model (first run only, about a minute): a small GPT-2 trained from scratch "
            f"on the Python docs that ship with CPython, into {args.output}",
            flush=True,
        )
        started = time.monotonic()
        build_demo_model(args.output, progress=args.progress)
        print(f"Demo model built in {time.monotonic() - started:.0f} s: {args.output}", flush=True)
    if args.sample_to:
        samples = generate_samples(args.output)
        print(f"Sample (greedy): {samples['greedy']!r}", flush=True)
        write_sample(args.sample_to, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
