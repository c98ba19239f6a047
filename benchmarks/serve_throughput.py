"""Serving throughput of `dynamic` by the in-engine mixture vs by materialized adapters vs
one static LoRA vs one expert vs `base` with LoRA off, side by side in one run
(benchmarks/harness.py: balanced order, warm-up shown, ≥ 5 rounds, paired ratios).

Starts, all at once, on the embedded SmolLM2-135M-Instruct with the six demo experts:

* server M: `mergeserve serve` with the mixture on (the default; the vLLM plugin);
* server P: `mergeserve serve` with `engine.mixture=false` (every merge materialized);
* server O: vLLM's own OpenAI server with LoRA off.

Both mergeserve servers have rank-64 slots, so no merge is truncated: M 8 of them (it
serves at most three adapters at once), P one per request in flight, its fairest setting
(materializing gives each request its own adapter and vLLM runs at most as many adapters
at once as it has slots: benchmarks/lora_slots.py). Arms (C concurrent
streaming clients, mixed test-split prompts, `ignore_eos`, exactly max_tokens each):

* `dynamic:mixture`       M, `dynamic:exact` with pinned `merge_weights`: a different
                          weighting of all six experts for every request (rank 48);
* `dynamic:routed`        M, `dynamic` routed by the MiniLM router (the production path);
* `static`                M, `static:linear`: one static LoRA of the same rank (48);
* `expert`                M, `expert:add` alone: one rank-8 LoRA for every request;
* `dynamic:routed one-task`, `expert one-task`  the same two on test-split prompts of `add`
                          alone: traffic whose routed merge is one expert;
* `dynamic:pinned one-task`  M, `dynamic:exact` with `merge_weights` {add: 1} on those
                          prompts: the routed arm's merge without the router;
* `materialized:distinct` P, the mixture arm's requests: each weighting built and loaded
                          (the worst case: no two requests share a merge);
* `materialized:routed`   P, routed `dynamic`: cache hits as routed traffic gives them;
* `base:lora-off`         O.

Prints one JSON object: tokens/s per arm (median, min, max), the paired ratios

* `mixture_over_static`    ≥ 0.95 wanted: a per-request mixture costs what one LoRA costs;
* `routed_over_expert`     ≥ 0.95 wanted: routing and merging cost what one expert costs
                           (`…_one_task`: where the merge is that one expert);
* `mixture_over_materialized_*`  the mixture against materializing, worst case and routed;

each materializing arm's merge-cache hit rate, and for the routed arms what routing cost
(`router_busy_share`: the share of a round's wall time the router's worker was busy;
`router_wait_mean_s`: a request's mean wait for its routing), from the server's metrics.

    python benchmarks/serve_throughput.py [--concurrency 16] [--requests 32]
        [--max-tokens 32] [--rounds 5] [--profile deployed|make-serve] [--arms A,B,…]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import httpx
from harness import add_workload_args, command_line, run_arms
from profiles import PROFILES, mergeserve_env
from prometheus_client.parser import text_string_to_metric_families
from stream_clients import bench_client, mixed_prompts, run_round

from mergeserve.config import Settings, default_experts_dir
from mergeserve.runtime.base_model import ensure_embedded_model
from mergeserve.runtime.engine import CPU_BIND_ENV, cpu_binding
from mergeserve.tasks import generate
from mergeserve.testing import ServerProcess, server_process, vllm_server_process

EXPERTS = ("add", "capital", "reverse_words", "sentiment", "sort_numbers", "to_json")


def distinct_weights(n: int, rng: random.Random) -> list[dict[str, float]]:
    """n weightings of all six experts, pairwise distinct after the server's 0.001 grid."""
    out: list[dict[str, float]] = []
    seen: set[tuple[float, ...]] = set()
    while len(out) < n:
        raw = [rng.uniform(0.05, 1.0) for _ in EXPERTS]
        w = tuple(round(x / sum(raw), 3) for x in raw)
        if w not in seen:
            seen.add(w)
            out.append(dict(zip(EXPERTS, w, strict=True)))
    return out


class RoundWeights:
    """Fresh distinct weightings for each round (made on first use), the same for every
    arm of that round, so the arms compared in a round serve the same mixtures."""

    def __init__(self, n: int, rng: random.Random) -> None:
        self.n, self.rng = n, rng
        self.per_round: dict[int, list[dict[str, float]]] = {}

    def __call__(self, r: int) -> list[dict[str, float]]:
        if r not in self.per_round:
            self.per_round[r] = distinct_weights(self.n, self.rng)
        return self.per_round[r]


def scrape(base_url: str) -> dict[str, float]:
    """mergeserve metrics this benchmark reads, summed over their labels."""
    want = {
        "mergeserve_materialized_adapters",
        "mergeserve_router_compute_seconds_total",
        "mergeserve_router_latency_seconds_sum",
        "mergeserve_router_latency_seconds_count",
    }
    out: dict[str, float] = {}
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in want:
                out[s.name] = out.get(s.name, 0.0) + s.value
            if s.name == "mergeserve_merge_latency_seconds_count":
                key = f"merge_{s.labels['cache']}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def router_cost(d: dict[str, float], wall_s: float) -> dict[str, float]:
    """From a round's change in the metrics: the share of its wall time the router's worker
    was busy (embedding and routing, CPU taken from generation on these cores) and the
    mean seconds a request waited for its routing (queue + batch)."""
    n = d.get("mergeserve_router_latency_seconds_count", 0.0)
    return {
        "router_busy_share": d.get("mergeserve_router_compute_seconds_total", 0.0) / wall_s,
        "router_wait_mean_s": d.get("mergeserve_router_latency_seconds_sum", 0.0) / n if n else 0.0,
    }


ARMS: dict[str, tuple[str, str, bool, bool]] = {
    # arm: (server, model, pinned weights, prompts of one task (add) rather than mixed)
    "dynamic:mixture": ("M", "dynamic:exact", True, False),
    "dynamic:routed": ("M", "dynamic", False, False),
    "static": ("M", "static:linear", False, False),
    "expert": ("M", "expert:add", False, False),
    "dynamic:routed one-task": ("M", "dynamic", False, True),
    "expert one-task": ("M", "expert:add", False, True),
    "dynamic:pinned one-task": ("M", "dynamic:exact", True, True),
    "materialized:distinct": ("P", "dynamic:exact", True, False),
    "materialized:routed": ("P", "dynamic", False, False),
    "base:lora-off": ("O", "base", False, False),
}
RATIOS = {
    "mixture_over_static": ("dynamic:mixture", "static"),
    "routed_over_expert": ("dynamic:routed", "expert"),
    "routed_over_expert_one_task": ("dynamic:routed one-task", "expert one-task"),
    "pinned_over_expert_one_task": ("dynamic:pinned one-task", "expert one-task"),
    "routed_over_pinned_one_task": ("dynamic:routed one-task", "dynamic:pinned one-task"),
    "routed_over_static": ("dynamic:routed", "static"),
    "mixture_over_materialized_distinct": ("dynamic:mixture", "materialized:distinct"),
    "routed_over_materialized_routed": ("dynamic:routed", "materialized:routed"),
    "mixture_over_lora_off": ("dynamic:mixture", "base:lora-off"),
    "expert_over_lora_off": ("expert", "base:lora-off"),
}


async def bench(urls: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    clients = {k: bench_client(u) for k, u in urls.items()}
    prompts = mixed_prompts(args.requests)
    one_task = [s.prompt for s in generate("add", "test", args.requests)]
    weights = RoundWeights(len(prompts), random.Random(0))

    hits: dict[str, list[float]] = {}

    def arm(name: str, server: str, model: str, pinned: bool, one: bool) -> Any:
        async def run(r: int) -> dict[str, float]:
            if pinned and one:  # `add` alone, as the router weights these prompts
                bodies: list[dict[str, Any]] | None = [{"merge_weights": {"add": 1.0}}] * len(
                    one_task
                )
            else:
                bodies = [{"merge_weights": w} for w in weights(r)] if pinned else None
            before = scrape(urls[server]) if server != "O" else {}
            got = await run_round(
                clients[server],
                model,
                one_task if one else prompts,
                args.concurrency,
                args.max_tokens,
                bodies,
            )
            if server != "O":
                after = scrape(urls[server])
                d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                n = d.get("merge_hit", 0.0) + d.get("merge_miss", 0.0)
                if n and r >= 0:
                    hits.setdefault(name, []).append(d.get("merge_hit", 0.0) / n)
                if model == "dynamic":  # what routing cost this round
                    got.update(router_cost(d, got["wall_s"]))
            return got

        return run

    arms = {a: arm(a, *spec) for a, spec in ARMS.items() if a in args.arms}
    res = await run_arms(arms, min_rounds=args.rounds, metric="tokens_per_s")
    return {
        "benchmark": "serve_throughput",
        "model": "SmolLM2-135M-Instruct (fp32)",
        "experts": "examples/experts (six rank-8 demo experts; bundle rank 48)",
        "workload": "mixed: test-split prompts of the six tasks, interleaved; `one-task` "
        "arms: test-split prompts of `add` alone",
        "concurrency": args.concurrency,
        "requests_per_round": args.requests,
        "max_tokens": args.max_tokens,
        "cache_hit_rate": {a: round(statistics.median(v), 3) for a, v in hits.items()},
        **res.summary(
            "tokens_per_s", {k: v for k, v in RATIOS.items() if set(v) <= set(args.arms)}
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(p)
    p.add_argument(
        "--max-loras",
        type=int,
        default=None,
        help="LoRA slots of the materializing server (default: the concurrency, at least "
        "8: it gives every request in flight its own adapter, and vLLM batches only as many "
        "adapters as it has slots)",
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="deployed")
    p.add_argument("--logs", type=Path, default=None, help="keep the servers' logs here")
    p.add_argument(
        "--arms",
        type=lambda v: [a.strip() for a in v.split(",")],
        default=list(ARMS),
        help=f"comma-separated arms to run (default: all; {', '.join(ARMS)}); only their "
        "servers are started",
    )
    args = p.parse_args()
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        p.error(f"unknown arms {unknown}; arms: {', '.join(ARMS)}")
    need = {ARMS[a][0] for a in args.arms}

    experts = default_experts_dir()
    if experts is None:
        raise SystemExit("run from a checkout: the demo experts are in examples/experts")
    model = ensure_embedded_model(Settings().cache)
    seqs = str(max(16, args.concurrency))
    env = mergeserve_env(args.profile, args.concurrency, 8)
    off_args = ["--dtype", "float32", "--max-model-len", "2048", "--served-model-name", "base"]
    off_args += ["--max-num-seqs", seqs]
    # vLLM's own server: the thread binding mergeserve's engine uses by default
    bind = {CPU_BIND_ENV: b} if (b := cpu_binding(None)) else {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        t = Path(tmp)
        if args.logs is not None:
            t = args.logs
            t.mkdir(parents=True, exist_ok=True)
        serve = ["--experts-dir", str(experts)]
        materialize_env = {
            **env,
            "MERGESERVE_ENGINE__MIXTURE": "false",
            "MERGESERVE_ENGINE__MAX_LORAS": str(args.max_loras or max(8, args.concurrency)),
        }
        starts: dict[str, Callable[[], AbstractContextManager[ServerProcess]]] = {
            "M": lambda: server_process(serve, t / "mixture.log", env),
            "P": lambda: server_process(serve, t / "materialize.log", materialize_env),
            "O": lambda: vllm_server_process(
                model,
                t / "lora-off.log",
                off_args,
                {**bind, "MERGESERVE_MIXTURE_PLUGIN": "0"},
                timeout_s=900,
            ),
        }
        urls = {k: stack.enter_context(go()).base_url for k, go in starts.items() if k in need}
        result = asyncio.run(bench(urls, args))
    result["profile"] = args.profile
    result["command"] = command_line("serve_throughput.py", args, skip=("logs", "arms"))
    if set(args.arms) != set(ARMS):  # the default (every arm) goes without the flag
        result["command"] += ' --arms "' + ",".join(args.arms) + '"'
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
