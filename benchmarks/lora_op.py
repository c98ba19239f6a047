"""The plugin's CPU LoRA op alone, on SmolLM2-135M's shapes, with and without leaving a
step's zero-weighted bundle columns out (benchmarks/harness.py: balanced order, warm-up
shown, ≥ 5 rounds, paired ratios). No vLLM: `plan_groups` and `grouped_lora_linear` as
the CPU wrapper calls them, on random factors.

One step is the op's 120 calls (30 layers × qkv, o, gate/up, down) over the rank-48
bundle of six rank-8 blocks in one slot (the plan made once per step, as the wrapper
makes it), for

* `decode`   16 tokens, one per request;
* `prefill`  16 requests × 40 prompt tokens;

with the requests' weights as

* `routed`   each request its own task's block alone, the six tasks interleaved;
* `one-task` every request the same block alone;
* `mixture`  a distinct weighting of all six blocks per request;

and each with every column computed (`:all-columns`). Metric: steps/s (one step's
calls, repeated `--steps` times per round). Torch threads: `--threads` (the engine's
worker uses every core it is bound to: 2 here).

    python benchmarks/lora_op.py [--rounds 5] [--threads 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from harness import command_line, run_arms

from mergeserve import vllm_plugin as vp

HIDDEN, INTER, LAYERS, BLOCKS, BLOCK_RANK, SLOT_RANK = 576, 1536, 30, 6, 8, 64
MODULES = {  # name: (in, output slices)
    "qkv": (HIDDEN, (576, 192, 192)),
    "o": (HIDDEN, (576,)),
    "gate_up": (HIDDEN, (INTER, INTER)),
    "down": (INTER, (HIDDEN,)),
}
SHAPES = {"decode": (16, 1), "prefill": (16, 40)}  # requests, tokens each
KINDS = ("routed", "one-task", "mixture")


def scale_rows(kind: str, requests: int, tokens: int, g: torch.Generator) -> torch.Tensor:
    rank = BLOCKS * BLOCK_RANK
    rows = torch.zeros(requests * tokens, SLOT_RANK)
    for q in range(requests):
        at = slice(q * tokens, (q + 1) * tokens)
        if kind == "mixture":
            w = torch.rand(BLOCKS, generator=g) + 0.05
            rows[at, :rank] = w.repeat_interleave(BLOCK_RANK)
        else:
            block = q % BLOCKS if kind == "routed" else 1
            rows[at, block * BLOCK_RANK : (block + 1) * BLOCK_RANK] = 1.0
    return rows


def make_step(kind: str, shape: str, skip: bool) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    requests, tokens = SHAPES[shape]
    n = requests * tokens
    rank = BLOCKS * BLOCK_RANK
    factors = {}
    for name, (inp, outs) in MODULES.items():
        a = [torch.zeros(2, 1, SLOT_RANK, inp) for _ in outs]
        b = [torch.zeros(2, 1, o, SLOT_RANK) for o in outs]
        for t in a:  # vLLM's set_lora: the adapter's rank rows, zeros after
            t[0, 0, :rank] = torch.randn(rank, inp, generator=g) * 0.02
        for t in b:
            t[0, 0, :, :rank] = torch.randn(t.shape[2], rank, generator=g) * 0.02
        x = torch.randn(n, inp, generator=g)
        y = torch.zeros(n, sum(outs))
        factors[name] = (a, b, outs, x, y)
    scale = scale_rows(kind, requests, tokens, g)
    groups = [vp.Group(0, slice(0, n))]
    ranks = {0: rank}
    cache: dict[Any, Any] = {}

    def step() -> None:
        plan = vp.plan_groups(groups, scale, ranks, SLOT_RANK) if skip else groups
        for _ in range(LAYERS):
            for a, b, outs, x, y in factors.values():
                vp.grouped_lora_linear(y, x, a, b, outs, plan, ranks, scale, 1.0, cache)

    step()  # the factor cache filled, as after a slot's first step
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="decode steps per round (prefill: /8)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    def arm(kind: str, shape: str, skip: bool) -> Any:
        step = make_step(kind, shape, skip)
        reps = args.steps if shape == "decode" else max(1, args.steps // 8)

        async def run(_r: int) -> dict[str, float]:
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            wall = time.perf_counter() - t0
            return {"steps_per_s": reps / wall, "ms_per_step": 1e3 * wall / reps}

        return run

    arms = {}
    ratios = {}
    for shape in SHAPES:
        for kind in KINDS:
            name = f"{shape}:{kind}"
            arms[name] = arm(kind, shape, True)
            arms[f"{name}:all-columns"] = arm(kind, shape, False)
            ratios[f"{shape}_{kind}_over_all_columns"] = (name, f"{name}:all-columns")
    res = asyncio.run(run_arms(arms, min_rounds=args.rounds, metric="ms_per_step"))
    print(
        json.dumps(
            {
                "benchmark": "lora_op",
                "model": "SmolLM2-135M-Instruct's shapes, random factors (no vLLM)",
                "bundle": f"{BLOCKS} blocks of rank {BLOCK_RANK} in a rank-{SLOT_RANK} slot",
                "threads": args.threads,
                **res.summary("steps_per_s", ratios),
                "command": command_line("lora_op.py", args),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
