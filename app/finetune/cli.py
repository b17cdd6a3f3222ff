"""`textgen finetune` / `python -m app.finetune`: flags and YAML keys both come from FinetuneConfig."""

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from app.finetune.config import ConfigError, FinetuneConfig, build_config, flag, load_yaml
from app.finetune.data import DataError

DESCRIPTION = """\
Fine-tune a Hugging Face causal language model on your text, then serve it:

  textgen finetune --model BASE --data notes.txt --output out/
  textgen serve --model out/

Every option can also be set in a YAML file (--config ft.yaml) under its flag name, with
dashes or underscores (block-size: 256); flags on the command line win over the file."""

EPILOG = """\
Output: OUTPUT holds the model (or, with --lora --no-merge, the peft adapter), its tokenizer and
generation config, metrics.json (held-out perplexity before/after) and manifest.json. Checkpoints go
to OUTPUT/checkpoints while training. Exit status: 0 done, 2 bad options or data, 130 interrupted.
Several GPUs or machines: run it unchanged under `accelerate launch` or `torchrun`."""


def _unwrap(annotation: Any) -> Any:
    """`int | None` -> int; argparse only needs the concrete type."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return inner[0]
    return annotation


METAVARS = {int: "N", float: "X", str: "TEXT", Path: "DIR"}
NAMED_METAVARS = {"task": "TASK", "model": "MODEL", "data": "DATA", "eval_file": "DATA", "dataset_split": "SPLIT"}


def _add(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    kind = _unwrap(field.annotation)
    help_text = field.description or ""
    if field.is_required():
        help_text += " (required)"
    elif field.default not in (None, False):
        help_text += f" (default: {field.default})"
    # Every default is None so that "not given" can be told apart and a YAML value kept.
    if kind is bool:
        parser.add_argument(flag(name), action="store_true", default=None, help=help_text)
    elif typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        help_text += f" Choices: {', '.join(choices)}."
        parser.add_argument(flag(name), choices=choices, metavar=NAMED_METAVARS.get(name, "SIZE"), help=help_text)
    elif typing.get_origin(kind) is list:
        parser.add_argument(flag(name), nargs="+", metavar="MODULE", help=help_text)
    else:
        # Values stay strings here; pydantic converts and reports errors for flags and YAML alike.
        metavar = NAMED_METAVARS.get(name) or METAVARS.get(kind, "VALUE")
        parser.add_argument(flag(name), metavar=metavar, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textgen finetune",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, metavar="FT.YAML", help="Read options from this YAML file.")
    for name, field in FinetuneConfig.model_fields.items():
        _add(parser, name, field)
    return parser


def parse_config(argv: list[str] | None) -> FinetuneConfig:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    values = load_yaml(config_file) if config_file else {}
    values.update({key: value for key, value in args.items() if value is not None})
    return build_config(values, source=f"options (flags and {config_file})" if config_file else "options")


def main(argv: list[str] | None = None) -> int:
    from app.finetune.run import finetune, setup_logging  # keeps `--help` fast: no torch import

    try:
        config = parse_config(argv)
        setup_logging()
        finetune(config)
    except (ConfigError, DataError) as exc:
        print(f"textgen finetune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "textgen finetune: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr
        )
        return 130
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    # Under torchrun, a rank that exits with gloo's threads still running can abort in teardown
    # ("terminate called without an active exception") after the work is done.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
