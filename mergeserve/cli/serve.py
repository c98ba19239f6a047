"""`mergeserve serve` and `prepare-model`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mergeserve.cli.common import Commands, no_args
from mergeserve.config import Settings


def register(commands: Commands) -> None:
    commands.add(
        "serve",
        "serve the OpenAI API (default: embedded model + demo experts)",
        _serve_args,
        _serve,
    )
    commands.add(
        "prepare-model",
        "convert the embedded base model once; print its dir",
        no_args,
        _prepare_model,
    )


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="local Hugging Face model dir (default: embedded)")
    p.add_argument(
        "--experts-dir",
        type=Path,
        help="dir of PEFT LoRA dirs, one per expert ('none': no experts)",
    )
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument(
        "--engine",
        choices=["vllm", "remote", "fake"],
        help="engine (default vllm; remote: MERGESERVE_ENGINE__REMOTE__URL)",
    )


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
        timeout_keep_alive=settings.server.keep_alive_s,
    )


def _prepare_model(args: argparse.Namespace) -> None:
    from mergeserve.runtime.base_model import ensure_embedded_model

    print(ensure_embedded_model(Settings().cache))
