"""Serving throughput of `dynamic` by the in-engine mixture vs by materialized adapters vs
one static LoRA vs `base` on an engine with LoRA off, side by side in one run.

Starts, all at once, on the embedded SmolLM2-135M-Instruct with the six demo experts:

* server M: `mergeserve serve` with the mixture on (the default; the vLLM plugin);
* server P: `mergeserve serve` with `engine.mixture=false` (every merge materialized);
* server O: vLLM's own OpenAI server with LoRA off.

Both mergeserve servers have rank-64 slots, so no merge is truncated. Then runs rounds of
C concurrent streaming clients (mixed test-split prompts, `ignore_eos`, exactly max_tokens
each), arms in rotating order:

* `dynamic:mixture`       M, `dynamic:exact` with pinned `merge_weights`: a different
                          weighting of all six experts for every request (rank 48);
* `dynamic:materialized`  P, the same requests: each one's merge is built and loaded;
* `dynamic:routed`        M, `dynamic` routed by the MiniLM router (the production path);
* `static`                M, `static:linear`: one static LoRA of the same rank (48);
* `expert`                M, `expert:add`: one rank-8 LoRA;
* `base:lora-off`         O.

Prints one JSON object: tokens/s per arm (median over rounds) and the ratios

* `mixture_over_static`   ≥ 0.95 wanted: a per-request mixture costs what one LoRA costs;
* `mixture_over_materialized`  ≥ 3 wanted;
* `*_over_lora_off`       the price of LoRA on this engine.

    python benchmarks/serve_throughput.py [--concurrency 16] [--requests 48]
        [--max-tokens 64] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families
from stream_clients import machine_facts, mixed_prompts, run_round

from mergeserve.config import Settings, default_experts_dir
from mergeserve.runtime.base_model import ensure_embedded_model
from mergeserve.testing import server_process, vllm_server_process

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


def scrape(base_url: str) -> dict[str, float]:
    """mergeserve metrics this benchmark reads, summed over their labels."""
    want = {"mergeserve_materialized_adapters"}
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


async def bench(urls: dict[str, str], args: argparse.Namespace) -> dict[str, object]:
    clients = {
        k: openai.AsyncOpenAI(base_url=f"{u}/v1", api_key="-", max_retries=0, timeout=1800)
        for k, u in urls.items()
    }
    prompts = mixed_prompts(args.requests)
    rng = random.Random(0)
    arms: dict[str, tuple[str, str, bool]] = {  # arm: (server, model, pinned weights)
        "dynamic:mixture": ("M", "dynamic:exact", True),
        "dynamic:materialized": ("P", "dynamic:exact", True),
        "dynamic:routed": ("M", "dynamic", False),
        "static": ("M", "static:linear", False),
        "expert": ("M", f"expert:{args.expert}", False),
        "base:lora-off": ("O", "base", False),
    }
    for server, model, pinned in arms.values():  # warm up: loads, first batches
        w = [{"merge_weights": x} for x in distinct_weights(2, rng)] if pinned else None
        await run_round(clients[server], model, prompts[:2], 2, 4, w)
    before = {k: scrape(urls[k]) for k in ("M", "P")}
    names = list(arms)
    rounds: dict[str, list[dict[str, float]]] = {a: [] for a in names}
    for r in range(args.rounds):
        # Every round: fresh weightings, the same ones for the mixture and materialized
        # arms (each server sees each weighting once).
        weights = distinct_weights(len(prompts), rng)
        k = r % len(names)
        for arm in names[k:] + names[:k]:
            server, model, pinned = arms[arm]
            bodies = [{"merge_weights": w} for w in weights] if pinned else None
            res = await run_round(
                clients[server], model, prompts, args.concurrency, args.max_tokens, bodies
            )
            rounds[arm].append(res)
            print(f"round {r} {arm}: {res['tokens_per_s']:.1f} tok/s", flush=True)
    after = {k: scrape(urls[k]) for k in ("M", "P")}
    tps = {a: statistics.median(x["tokens_per_s"] for x in v) for a, v in rounds.items()}
    off = tps["base:lora-off"]

    def hits(server: str) -> float | None:
        d = {k: after[server].get(k, 0.0) - before[server].get(k, 0.0) for k in after[server]}
        n = d.get("merge_hit", 0.0) + d.get("merge_miss", 0.0)
        return round(d.get("merge_hit", 0.0) / n, 3) if n else None

    return {
        "benchmark": "serve_throughput",
        "model": "SmolLM2-135M-Instruct (fp32)",
        "experts": "examples/experts (six rank-8 demo experts; bundle rank 48)",
        "workload": "mixed: test-split prompts of the six tasks, interleaved",
        "concurrency": args.concurrency,
        "requests_per_round": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "tokens_per_s": {a: round(v, 2) for a, v in tps.items()},
        "mixture_over_static": round(tps["dynamic:mixture"] / tps["static"], 3),
        "mixture_over_materialized": round(tps["dynamic:mixture"] / tps["dynamic:materialized"], 3),
        "routed_over_static": round(tps["dynamic:routed"] / tps["static"], 3),
        "over_lora_off": {a: round(v / off, 3) for a, v in tps.items() if a != "base:lora-off"},
        "cache_hit_rate": {"mixture_server": hits("M"), "materializing_server": hits("P")},
        "materialized_adapters_after": {
            k: int(after[k].get("mergeserve_materialized_adapters", 0.0)) for k in ("M", "P")
        },
        "ttft_p50_s": {
            a: round(statistics.median(x["ttft_p50_s"] for x in v), 3) for a, v in rounds.items()
        },
        "per_round": rounds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=48, help="requests per round and arm")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--expert", default="add", help="the single-LoRA arm (expert:<name>)")
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads of each engine (set explicitly: runs are compared)",
    )
    args = p.parse_args()

    experts = default_experts_dir()
    if experts is None:
        raise SystemExit("run from a checkout: the demo experts are in examples/experts")
    model = ensure_embedded_model(Settings().cache)
    seqs = str(max(16, args.concurrency))
    env = {
        "MERGESERVE_ENGINE__CPU_THREADS": str(args.threads),
        "MERGESERVE_ENGINE__COMPILE": "true",  # the plugin's fast path, as deployed
        # Throughput at a fixed concurrency: admission control would cap it (load.py
        # measures that).
        "MERGESERVE_SERVER__QUEUE_BUDGET_S": "0",
        "MERGESERVE_ENGINE__MAX_NUM_SEQS": seqs,
        "MERGESERVE_ENGINE__MAX_LORA_RANK": "64",
        "MERGESERVE_ENGINE__MAX_LORAS": str(args.max_loras),
        "MERGESERVE_MERGE__DEFAULT_MODE": "exact",
        "MERGESERVE_MERGE__STATIC_METHODS": '["linear"]',
        "MERGESERVE_ROUTER__GRID": "0.001",
        # Materialized merges live until evicted: room for every distinct weighting.
        "MERGESERVE_MERGE__CACHE_MAX_ENTRIES": "512",
    }
    off_args = ["--dtype", "float32", "--max-model-len", "2048", "--served-model-name", "base"]
    off_args += ["--max-num-seqs", seqs]
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        t = Path(tmp)
        serve = ["--experts-dir", str(experts)]
        m = stack.enter_context(server_process(serve, t / "mixture.log", env))
        pm = stack.enter_context(
            server_process(
                serve, t / "materialize.log", {**env, "MERGESERVE_ENGINE__MIXTURE": "false"}
            )
        )
        o = stack.enter_context(
            vllm_server_process(
                model,
                t / "lora-off.log",
                off_args,
                {"OMP_NUM_THREADS": str(args.threads), "MERGESERVE_MIXTURE_PLUGIN": "0"},
                timeout_s=900,
            )
        )
        result = asyncio.run(bench({"M": m.base_url, "P": pm.base_url, "O": o.base_url}, args))
    result["machine"] = machine_facts(args.threads)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
