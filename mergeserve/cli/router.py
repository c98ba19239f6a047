"""`mergeserve train-router` and `route`: the router, offline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mergeserve.cli.common import Commands
from mergeserve.config import Settings
from mergeserve.errors import MergeserveError


def register(commands: Commands) -> None:
    commands.add(
        "train-router",
        "train the MLP router on the experts' examples",
        _train_router_args,
        _train_router,
    )
    commands.add(
        "route", 'route JSON lines {"prompt": ...} from stdin to weights', _route_args, _route
    )


def _train_router_args(p: argparse.ArgumentParser) -> None:
    _router_args(p)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output dir (default: <experts-dir>/_router)")


def _route_args(p: argparse.ArgumentParser) -> None:
    from mergeserve.router.factory import ROUTERS

    _router_args(p)
    p.add_argument("--router", default="prototype", choices=ROUTERS)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, help="keep the k most likely experts (default all)")
    p.add_argument("--floor", type=float, default=0.0, help="drop weights below this")
    p.add_argument("--grid", type=float, default=0.05, help="round weights to this (0: no)")
    p.add_argument(
        "--open-world",
        default="centroid",
        choices=["off", "centroid", "threshold", "knn"],
        help="the gate that routes requests of no expert to none (base); off: closed world",
    )


def _router_args(p: argparse.ArgumentParser) -> None:
    from mergeserve.router.embedders import EMBEDDERS

    p.add_argument("--experts-dir", type=Path, help="dir of expert dirs (default: the demo set)")
    p.add_argument(
        "--embedder", default="minilm-int8", choices=EMBEDDERS, help="default minilm-int8"
    )
    p.add_argument("--layer", type=int, default=8, help="hidden embedder: base-model layer")
    p.add_argument("--base", type=Path, help="base model dir (default: the embedded SmolLM2)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")


def _router_parts(args: argparse.Namespace) -> tuple[Path, Any, Path | None]:
    """(experts dir, embedder or None, base model dir or None) for the router commands."""
    from mergeserve.router.embedders import make_embedder, set_threads
    from mergeserve.runtime.base_model import resolve_base_model

    settings = Settings()
    experts_dir = args.experts_dir or settings.experts_dir
    if experts_dir is None:
        raise MergeserveError("no experts dir: pass --experts-dir")
    needs_base = args.embedder == "hidden" or getattr(args, "router", None) == "arrow"
    base_dir = resolve_base_model(args.base, settings.cache) if needs_base else None
    embedder = None
    if getattr(args, "router", None) != "arrow":
        embedder = make_embedder(
            args.embedder, base_dir=base_dir, layer=args.layer, threads=args.threads
        )
    else:
        set_threads(args.threads)
    return Path(experts_dir), embedder, base_dir


def _train_router(args: argparse.Namespace) -> None:
    from mergeserve.router.base import experts_examples
    from mergeserve.router.mlp import MLPTrainConfig, mlp_router_dir, train_mlp_router

    experts_dir, embedder, _ = _router_parts(args)
    examples = experts_examples(experts_dir)
    try:
        config = MLPTrainConfig(hidden=args.hidden, epochs=args.epochs, lr=args.lr, seed=args.seed)
        router = train_mlp_router(embedder, examples, config)
    except ValueError as e:
        raise MergeserveError(str(e)) from e
    out = args.out or mlp_router_dir(experts_dir)
    router.save(out)
    print(json.dumps({"out": str(out), "experts": list(examples), "embedder": embedder.name}))


def _route(args: argparse.Namespace) -> None:
    from mergeserve.router.base import prompt_of, route
    from mergeserve.router.factory import load_router
    from mergeserve.router.policy import RoutingPolicy

    try:
        policy = RoutingPolicy(
            temperature=args.temperature,
            top_k=args.top_k,
            floor=args.floor,
            grid=args.grid or None,
        )
    except ValueError as e:
        raise MergeserveError(str(e)) from e
    from mergeserve.router.open_world import GateConfig, make_gate

    experts_dir, embedder, base_dir = _router_parts(args)
    gate = None
    if embedder is not None:
        gate = make_gate(GateConfig(args.open_world), embedder)
    router = load_router(args.router, experts_dir, embedder=embedder, base_dir=base_dir, gate=gate)
    failed = 0
    for lineno, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            prompt = prompt_of(line)
        except ValueError as e:
            failed += 1
            out: dict[str, Any] = {"line": lineno, "error": str(e)}
        else:
            (r,) = route(router, policy, [prompt])
            out = {
                "weights": r.key.as_dict(),
                "top": r.key.top,
                "route": r.outcome,
                "in_domain": round(r.in_domain, 4),
                "entropy": round(r.entropy, 4),
            }
        print(json.dumps(out), flush=True)
    if failed:
        raise MergeserveError(f"{failed} input line(s) were not routed (see their error lines)")
