"""Generation throughput of `dynamic` vs one LoRA expert vs `base`, on one engine.

Starts `mergeserve serve` on the embedded SmolLM2-135M-Instruct with the demo experts
(examples/experts), then runs rounds of C concurrent streaming clients on a mixed-task
workload (test-split prompts of all six demo tasks, interleaved), each round timing
`dynamic`, `expert:<one>` and `base` back to back (order rotating), with `ignore_eos` so
every request generates exactly max_tokens. Prints one JSON object. The figures:

* `dynamic_over_lora`: tokens/s of `dynamic` / tokens/s of one static LoRA, side by side;
* `lora_over_base`: the price of LoRA itself on this engine;
* `cache_hit_rate`: merged-adapter cache hits / dynamic requests (server metrics);
* `router_ms_per_request` and `distinct_keys`: routing cost and how many merged adapters
  the policy made (each distinct key takes a LoRA slot while it runs).

    python benchmarks/serve_throughput.py [--concurrency 16] [--requests 48] [--max-tokens 64]
        [--max-lora-rank 16] [--max-loras 8] [--top-k 2] [--grid 0.05] [--mode exact]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from mergeserve.config import default_experts_dir
from mergeserve.tasks import TASKS, generate
from mergeserve.testing import server_process


def mixed_prompts(n: int) -> list[str]:
    """n test-split prompts, the six tasks interleaved (a fixed, reproducible mix)."""
    per_task = [[s.prompt for s in generate(t, "test", n // len(TASKS) + 1)] for t in TASKS]
    mixed = [p for group in zip(*per_task, strict=True) for p in group]
    return mixed[:n]


async def run_round(
    client: openai.AsyncOpenAI, model: str, concurrency: int, prompts: list[str], max_tokens: int
) -> dict[str, float]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    tokens = 0
    ttfts: list[float] = []

    async def worker() -> None:
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            t0 = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
            ttfts.append(first or 0.0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "tokens_per_s": tokens / wall,
        "wall_s": wall,
        "completion_tokens": tokens,
        "ttft_p50_s": statistics.median(ttfts),
    }


def scrape(base_url: str) -> dict[str, float]:
    """The server metrics this benchmark reads, summed over their labels."""
    want = {
        "mergeserve_merge_latency_seconds_count",
        "mergeserve_router_latency_seconds_count",
        "mergeserve_router_latency_seconds_sum",
        "mergeserve_materialized_adapters",
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


async def bench(base_url: str, args: argparse.Namespace) -> dict[str, object]:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="-", max_retries=0, timeout=900)
    arms = ["dynamic", f"expert:{args.expert}", "base"]
    prompts = mixed_prompts(args.requests)
    # Warm up every path (a LoRA's first use loads it into a slot; MiniLM's first batch).
    for model in arms:
        await run_round(client, model, 2, prompts[:2], 8)
    before = scrape(base_url)
    rounds: dict[str, list[dict[str, float]]] = {m: [] for m in arms}
    for r in range(args.rounds):
        order = arms[r % 3 :] + arms[: r % 3]
        for model in order:
            rounds[model].append(
                await run_round(client, model, args.concurrency, prompts, args.max_tokens)
            )
    after = scrape(base_url)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    dyn_requests = delta.get("mergeserve_merge_latency_seconds_count", 0.0)
    routed = delta.get("mergeserve_router_latency_seconds_count", 0.0)
    tps = {m: statistics.median(x["tokens_per_s"] for x in v) for m, v in rounds.items()}
    lora = f"expert:{args.expert}"
    return {
        "benchmark": "serve_throughput",
        "model": "SmolLM2-135M-Instruct (fp32)",
        "experts": "examples/experts (six rank-8 demo experts)",
        "workload": "mixed: test-split prompts of the six tasks, interleaved",
        "dynamic_mode": args.mode,
        "policy": {"top_k": args.top_k, "floor": args.floor, "grid": args.grid},
        "engine": {"max_lora_rank": args.max_lora_rank, "max_loras": args.max_loras},
        "concurrency": args.concurrency,
        "requests_per_round": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "tokens_per_s": {m: round(v, 2) for m, v in tps.items()},
        "dynamic_over_lora": round(tps["dynamic"] / tps[lora], 3),
        "lora_over_base": round(tps[lora] / tps["base"], 3),
        "cache_hit_rate": round(delta.get("merge_hit", 0.0) / dyn_requests, 3)
        if dyn_requests
        else None,
        "router_ms_per_request": round(
            1000 * delta.get("mergeserve_router_latency_seconds_sum", 0.0) / routed, 2
        )
        if routed
        else None,
        "distinct_keys": int(after.get("mergeserve_materialized_adapters", 0.0)),
        "ttft_p50_s": {
            m: round(statistics.median(x["ttft_p50_s"] for x in v), 3) for m, v in rounds.items()
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
    p.add_argument("--mode", choices=["exact", "twin"], default="exact", help="`dynamic` is")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--floor", type=float, default=0.1)
    p.add_argument("--grid", type=float, default=0.05)
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads of the engine (set explicitly: runs are compared)",
    )
    args = p.parse_args()

    experts = default_experts_dir()
    if experts is None:
        raise SystemExit("run from a checkout: the demo experts are in examples/experts")
    env = {
        "MERGESERVE_ENGINE__CPU_THREADS": str(args.threads),
        "MERGESERVE_ENGINE__MAX_NUM_SEQS": str(max(16, args.concurrency)),
        "MERGESERVE_ENGINE__MAX_LORA_RANK": str(args.max_lora_rank),
        "MERGESERVE_ENGINE__MAX_LORAS": str(args.max_loras),
        "MERGESERVE_MERGE__DEFAULT_MODE": args.mode,
        "MERGESERVE_MERGE__STATIC_METHODS": "[]",  # not measured here; saves start-up
        "MERGESERVE_ROUTER__TOP_K": str(args.top_k),
        "MERGESERVE_ROUTER__FLOOR": str(args.floor),
        "MERGESERVE_ROUTER__GRID": str(args.grid),
    }
    with (
        tempfile.TemporaryDirectory() as tmp,
        server_process(["--experts-dir", str(experts)], Path(tmp) / "server.log", env) as s,
    ):
        result = asyncio.run(bench(s.base_url, args))
        result["server_startup_s"] = round(s.startup_s, 1)
    result["machine"] = {
        "cpus": os.cpu_count(),
        "engine_threads": args.threads,
        "processor": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
