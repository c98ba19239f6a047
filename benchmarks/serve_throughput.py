"""Generation throughput of `base` vs one LoRA expert on the same engine, through the server.

Starts `mergeserve serve` on the embedded SmolLM2-135M-Instruct with one random rank-8
LoRA on all seven projections, then runs rounds of C concurrent streaming clients, each
round timing `base` and `expert:rand` back to back (order alternating), with
`ignore_eos` so every request generates exactly max_tokens. Prints one JSON object; the
figure to compare is `lora_over_base`, a ratio measured side by side in one run.

    python benchmarks/serve_throughput.py [--concurrency 16] [--requests 32] [--max-tokens 64]
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

import openai

from mergeserve.config import Settings
from mergeserve.runtime.base_model import ensure_embedded_model
from mergeserve.testing import make_random_lora, server_process

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


async def run_round(
    client: openai.AsyncOpenAI, model: str, concurrency: int, requests: int, max_tokens: int
) -> dict[str, float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    tokens = 0
    ttfts: list[float] = []

    async def worker() -> None:
        nonlocal tokens
        while not queue.empty():
            queue.get_nowait()
            t0 = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(
                model=model,
                messages=PROMPT,
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


async def bench(base_url: str, args: argparse.Namespace) -> dict[str, object]:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="-", max_retries=0, timeout=600)
    # Warm up both paths (first LoRA use loads the adapter into a slot).
    for model in ("base", "expert:rand"):
        await run_round(client, model, 2, 2, 8)
    rounds: dict[str, list[dict[str, float]]] = {"base": [], "expert:rand": []}
    for r in range(args.rounds):
        order = ["base", "expert:rand"] if r % 2 == 0 else ["expert:rand", "base"]
        for model in order:
            rounds[model].append(
                await run_round(client, model, args.concurrency, args.requests, args.max_tokens)
            )
    tps = {m: statistics.median(x["tokens_per_s"] for x in v) for m, v in rounds.items()}
    return {
        "benchmark": "serve_throughput",
        "model": "SmolLM2-135M-Instruct (fp32)",
        "lora": "random rank 8, all 7 projections",
        "concurrency": args.concurrency,
        "requests_per_round": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "tokens_per_s": {"base": round(tps["base"], 2), "lora": round(tps["expert:rand"], 2)},
        "lora_over_base": round(tps["expert:rand"] / tps["base"], 3),
        "ttft_p50_s": {
            m: round(statistics.median(x["ttft_p50_s"] for x in v), 3) for m, v in rounds.items()
        },
        "per_round": rounds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=32, help="requests per round and model")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads of the engine (set explicitly: runs are compared)",
    )
    args = p.parse_args()

    base = ensure_embedded_model(Settings().cache)
    with tempfile.TemporaryDirectory() as tmp:
        experts = Path(tmp) / "experts"
        make_random_lora(base, experts / "rand", rank=8)
        env = {
            "MERGESERVE_ENGINE__CPU_THREADS": str(args.threads),
            "MERGESERVE_ENGINE__MAX_NUM_SEQS": str(max(16, args.concurrency)),
        }
        with server_process(["--experts-dir", str(experts)], Path(tmp) / "server.log", env) as s:
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
