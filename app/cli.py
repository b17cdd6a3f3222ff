"""`textgen` command line: `serve` (the HTTP server) and `finetune` (the offline trainer)."""

import argparse
import logging
import signal
import sys
import threading
import types
import typing
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from app import __version__
from app.config import Settings
from app.malloc import fix_mmap_threshold
from app.service import Service


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, so flags and TEXTGEN_* variables never drift apart."""
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        args = typing.get_args(annotation)
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            annotation = next(a for a in args if a is not type(None))
        env = f"TEXTGEN_{name.upper()}"
        default = "unset" if field.default is None else field.default
        help_text = f"{field.description} [env {env}; default: {default}]"
        kwargs: dict[str, typing.Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = typing.get_args(annotation)
        elif annotation in (int, float):
            kwargs["type"] = annotation
            kwargs["metavar"] = "N"
        else:
            kwargs["metavar"] = "PATH" if annotation is Path else "TEXT"
        parser.add_argument(_flag(name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textgen",
        description="Serve a Hugging Face causal language model over HTTP, or fine-tune one.",
    )
    parser.add_argument("--version", action="version", version=f"textgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the HTTP server. Every flag is also a TEXTGEN_* environment variable; a flag wins. "
        "Without --model, the offline demo model is built once (about a minute; the server listens meanwhile, "
        "/health reports the progress) and served.",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_settings_flags(serve)
    sub.add_parser(
        "finetune",
        help="fine-tune a model on your text (see `textgen finetune --help`)",
        add_help=False,
    )
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("textgen.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))  # one JSON object per line
    access.addHandler(handler)
    access.propagate = False


def serve(args: argparse.Namespace) -> int:
    from app.main import create_app

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "settings"
        print(
            f"textgen: error: invalid {field} (flag {_flag(field)} / TEXTGEN_{field.upper()}): {first['msg']}",
            file=sys.stderr,
        )
        return 2
    configure_logging(args.log_level)
    # Before the model loads: blocks of 8 MiB and more from mmap, so the heaps do not fragment and
    # keep peak memory resident (app/malloc.py; docs/performance.md, "Memory").
    threshold = fix_mmap_threshold()
    if threshold is not None:
        logging.getLogger("textgen").info(
            "malloc: blocks >= %d MiB from mmap (MALLOC_MMAP_THRESHOLD_)", threshold >> 20
        )
    fatal: list[str] = []
    server_box: list[uvicorn.Server] = []

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        if server_box:
            server_box[0].should_exit = True

    try:
        app = create_app(settings, on_fatal=on_fatal)
    except OSError as exc:  # e.g. an unreadable TEXTGEN_API_KEY_FILE
        print(f"textgen: error: {exc}", file=sys.stderr)
        return 2
    # Our JSON access log replaces uvicorn's.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False)
    server = DrainingServer(config, app.state.service)
    server_box.append(server)
    server.run()
    if fatal:
        print(f"textgen: error: {fatal[0]}", file=sys.stderr)
        return 1
    return 0


class DrainingServer(uvicorn.Server):
    """On SIGTERM: /ready turns 503 at once, requests are still admitted for TEXTGEN_DRAIN_DELAY
    seconds (the lame duck, while balancers notice), then admission stops (new requests 503) and
    admitted requests finish (up to TEXTGEN_SHUTDOWN_TIMEOUT) before the exit. SIGINT (Ctrl-C)
    skips the lame duck: nobody routes to an interactive server. A second signal exits now."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self.draining = False

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        # uvicorn's own handler records the signal and re-raises it after shutdown, so the process
        # would die by SIGTERM; a drained shutdown is a clean exit, so only flags are set here.
        if self.draining:  # a second signal: stop waiting
            self.service.hurry()
            self.force_exit = True
            self.should_exit = True
            return
        self.draining = True
        if self.service.engine is None:
            self.service.lame_duck = self.service.draining = True
            self.should_exit = True
            return
        lame_duck_s = self.service.settings.drain_delay if sig == signal.SIGTERM else 0.0

        def retire() -> None:
            self.service.retire(lame_duck_s)
            self.service.shutdown()  # past the timeout, leftovers are cancelled (503), not left running
            self.should_exit = True

        threading.Thread(target=retire, name="textgen-drain", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "finetune":
        from app.finetune.cli import main as finetune_main

        return finetune_main(argv[1:])
    args = build_parser().parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
