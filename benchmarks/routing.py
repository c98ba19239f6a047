"""Routing accuracy and latency: each router × embedder on the demo expert set.

Accuracy: top-1 over the experts on the task split (default `test`, which includes the
held-out templates no expert and no router saw), with the confusion matrix and the
accuracy on the held-out templates alone. The routers see only what they would see in
production: each expert's 20 `examples.jsonl` prompts (prototypes, and the MLP's training
data); Arrow sees only the adapter weights.

Leave-one-out (`--loo`): for each expert, the MLP is trained without it and the expert is
added back with its 20 examples (routed by prototypes until retrained); accuracy on the
left-out expert's prompts and on all prompts.

Latency: one request at a time (embedding + router + policy, as `route()` does in the
server), p50/p99 over `--latency-n` prompts; and batches of `--batch` prompts.

    python benchmarks/routing.py [--split test] [--n 100] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from harness import command_line, machine_facts

from mergeserve.router.arrow import ArrowRouter
from mergeserve.router.base import Router, experts_examples, route
from mergeserve.router.embedders import Embedder, HiddenStateEmbedder, SentenceEmbedder
from mergeserve.router.mlp import MLPRouter, train_mlp_router
from mergeserve.router.policy import RoutingPolicy
from mergeserve.router.prototype import PrototypeRouter
from mergeserve.tasks.base import Sample
from mergeserve.tasks.generators import generate

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXPERTS = ROOT / "examples/experts"


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def accuracy(router: Router, samples: Sequence[Sample]) -> dict[str, Any]:
    logits = router.logits([s.prompt for s in samples])
    experts = router.experts
    preds = [experts[i] for i in logits.argmax(dim=1).tolist()]
    confusion: dict[str, dict[str, int]] = {}
    for s, p in zip(samples, preds, strict=True):
        row = confusion.setdefault(s.task, {})
        row[p] = row.get(p, 0) + 1
    held = [(s, p) for s, p in zip(samples, preds, strict=True) if s.held_out]
    return {
        "top1": sum(s.task == p for s, p in zip(samples, preds, strict=True)) / len(samples),
        "top1_held_out_templates": (
            sum(s.task == p for s, p in held) / len(held) if held else None
        ),
        "confusion": confusion,
    }


def latency(
    router: Router, policy: RoutingPolicy, prompts: Sequence[str], batch: int
) -> dict[str, float]:
    for p in prompts[:10]:  # warm-up
        route(router, policy, [p])
    single = []
    for p in prompts:
        t0 = time.perf_counter()
        route(router, policy, [p])
        single.append((time.perf_counter() - t0) * 1e3)
    batched = []
    for i in range(0, len(prompts) - batch + 1, batch):
        t0 = time.perf_counter()
        route(router, policy, prompts[i : i + batch])
        batched.append((time.perf_counter() - t0) * 1e3)
    return {
        "single_p50_ms": round(statistics.median(single), 3),
        "single_p99_ms": round(percentile(single, 99), 3),
        f"batch{batch}_p50_ms": round(statistics.median(batched), 3) if batched else float("nan"),
        f"batch{batch}_per_request_ms": (
            round(statistics.median(batched) / batch, 3) if batched else float("nan")
        ),
    }


def leave_one_out(
    embedder: Embedder, examples: dict[str, list[str]], samples: Sequence[Sample]
) -> dict[str, Any]:
    out = {}
    for left in examples:
        proto = PrototypeRouter.from_examples(
            embedder, {e: p for e, p in examples.items() if e != left}
        )
        mlp = train_mlp_router(
            embedder, {e: p for e, p in examples.items() if e != left}, fallback=proto
        )
        proto.add_expert(left, examples[left])  # added back: 20 prompts, no retraining
        mine = [s for s in samples if s.task == left]
        out[left] = {
            "mlp+prototype_fallback": {
                "top1_left_out": accuracy(mlp, mine)["top1"],
                "top1_all": accuracy(mlp, samples)["top1"],
            },
            "prototype": {
                "top1_left_out": accuracy(proto, mine)["top1"],
                "top1_all": accuracy(proto, samples)["top1"],
            },
        }
    return out


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    head = "| router | embedder | top-1 | top-1 held-out templates | single p50 ms | p99 ms |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        held = r["top1_held_out_templates"]
        lines.append(
            f"| {r['router']} | {r['embedder']} | {r['top1']:.3f} | "
            f"{'n/a' if held is None else f'{held:.3f}'} | {r['single_p50_ms']:.2f} | "
            f"{r['single_p99_ms']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts-dir", type=Path, default=DEFAULT_EXPERTS)
    ap.add_argument("--split", default="test", choices=["dev", "test"])
    ap.add_argument("--n", type=int, default=100, help="prompts per task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden-layers", default="4,8", help="base-model layers to embed at")
    ap.add_argument("--no-arrow", action="store_true")
    ap.add_argument("--loo", action="store_true", help="leave-one-out add-back test")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    examples = experts_examples(args.experts_dir)
    experts = sorted(examples)
    samples = [s for e in experts for s in generate(e, args.split, args.n)]
    prompts = [s.prompt for s in samples]
    lat_prompts = [prompts[i * len(prompts) // args.latency_n] for i in range(args.latency_n)]
    policy = RoutingPolicy()

    from mergeserve.config import Settings
    from mergeserve.runtime.base_model import resolve_base_model

    base_dir = resolve_base_model(None, Settings().cache)
    embedders: dict[str, Callable[[], Embedder]] = {
        "minilm-int8": partial(SentenceEmbedder, quantize=True),  # the default
        "minilm": SentenceEmbedder,
        "minilm-eager": partial(SentenceEmbedder, trace=False),
    }
    for layer in [int(x) for x in args.hidden_layers.split(",") if x]:
        embedders[f"hidden@{layer}"] = partial(HiddenStateEmbedder, base_dir, layer=layer)

    rows = []
    loo = {}
    for emb_name, make in embedders.items():
        embedder = make()
        routers: dict[str, Router] = {
            "prototype-mean": PrototypeRouter.from_examples(embedder, examples),
            "prototype-max": PrototypeRouter.from_examples(embedder, examples, aggregate="max"),
        }
        t0 = time.perf_counter()
        mlp: MLPRouter = train_mlp_router(embedder, examples)
        train_s = time.perf_counter() - t0
        routers["mlp"] = mlp
        for r_name, router in routers.items():
            row = {"router": r_name, "embedder": emb_name, **accuracy(router, samples)}
            row.update(latency(router, policy, lat_prompts, args.batch))
            if r_name == "mlp":
                row["train_s"] = round(train_s, 2)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "confusion"}), file=sys.stderr)
        if args.loo and emb_name == "minilm-int8":  # the default embedder
            loo = leave_one_out(embedder, examples, samples)
    if not args.no_arrow:
        runner = HiddenStateEmbedder(base_dir, layer=None)
        arrow = ArrowRouter.from_experts_dir(runner, args.experts_dir)
        row = {"router": "arrow", "embedder": "base-model module inputs"}
        row.update(accuracy(arrow, samples))
        row.update(latency(arrow, policy, lat_prompts[: max(20, args.latency_n // 4)], args.batch))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "confusion"}), file=sys.stderr)

    best = max(rows, key=lambda r: (r["top1"], -r["single_p50_ms"]))
    result = {
        "benchmark": "routing",
        "split": args.split,
        "n_per_task": args.n,
        "experts": experts,
        "threads": args.threads,
        "machine": machine_facts(threads=args.threads),
        "command": command_line(
            "routing.py",
            args,
            skip=("out", *(["experts_dir"] if args.experts_dir == DEFAULT_EXPERTS else [])),
        ),
        "rows": rows,
        "best": {k: best[k] for k in ("router", "embedder", "top1", "single_p50_ms")},
        "leave_one_out": loo,
    }
    result["table"] = markdown(rows)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
