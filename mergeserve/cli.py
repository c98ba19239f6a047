"""`mergeserve` command line.

    mergeserve serve [--model DIR] [--experts-dir DIR] [--host H] [--port P]
    mergeserve prepare-model     convert the embedded GGUF base model once, print its dir

With no arguments `serve` serves the embedded SmolLM2-135M-Instruct with the demo experts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mergeserve.config import Settings
from mergeserve.errors import MergeserveError

# Nothing is ever fetched from a model hub; set before transformers/vLLM are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the command line's explicit options on top."""
    settings = Settings()
    if args.model is not None:
        settings.model = args.model
    if args.experts_dir is not None:
        settings.experts_dir = None if str(args.experts_dir) == "none" else args.experts_dir
    if args.host is not None:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port
    if args.engine is not None:
        settings.engine.kind = args.engine
    return settings


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from mergeserve.server.app import create_app

    settings = settings_from_args(args)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
    )


def _prepare_model(args: argparse.Namespace) -> None:
    from mergeserve.runtime.base_model import ensure_embedded_model

    print(ensure_embedded_model(Settings().cache))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergeserve", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve", help="serve the OpenAI API (default: embedded model + demo experts)"
    )
    s.add_argument("--model", type=Path, help="local Hugging Face model dir (default: embedded)")
    s.add_argument(
        "--experts-dir",
        type=Path,
        help="dir of PEFT LoRA dirs, one per expert ('none': no experts)",
    )
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--engine", choices=["vllm", "fake"], help="engine (default vllm)")
    s.set_defaults(func=_serve)

    m = sub.add_parser("prepare-model", help="convert the embedded base model once; print its dir")
    m.set_defaults(func=_prepare_model)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except MergeserveError as e:
        print(f"mergeserve: error: {e.message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
