"""The price and the effect of isolating the KV cache per mixture weighting, before and
after, side by side in one run.

Real traffic shares prompt prefixes (system prompts, few-shot examples, chat history).
vLLM's prefix cache keys blocks by the LoRA adapter; every mixture request uses the one
bundle adapter, so before the isolation a block computed under one weighting was reused
under another (wrong answers); after it, each weighting has its own blocks (a salt per
mixture) and equal weightings still share.

Starts two `mergeserve serve` servers at once on the embedded SmolLM2-135M-Instruct with
the six demo experts, identical but for the code they run:

* `after`:  this checkout;
* `before`: `--before REV` (default: the commit before the isolation) checked out into a
            temporary git worktree and imported from there (PYTHONPATH), the vLLM plugin too.

Both run eagerly (`engine.compile=false`: a compiled start takes minutes on 2 cores) with
the same settings. Workload: every request carries one long shared system message (about
400 tokens) and a test-split prompt of the six tasks. Arms, in a balanced rotating order
over the rounds, each on both servers:

* `routed`   `dynamic` routed by the MiniLM router (weights on the default 0.05 grid, so
             requests of one task mostly share a weighting);
* `pinned`   `dynamic:exact` with a distinct weighting of all six experts per request;
             new weightings and prompts every round unless `--repeat`;
* `static`   `static:linear`: one adapter for every request (maximal sharing).

Reported per arm and server: tokens/s and TTFT p50 (medians over rounds, with min–max),
vLLM's prefix-cache hit rate over the arm's requests (`vllm:prefix_cache_hits` /
`queries` deltas), and for `routed`/`pinned`: how many replies differ from the same
request's reply computed alone on `after` before the rounds (greedy; a batch changes
float rounding, so a few differences are noise on both servers; the shared-prefix reuse
across weightings shows as many more on `before`).

    python benchmarks/prefix_isolation.py [--before REV] [--rounds 5] [--requests 24]
        [--concurrency 8] [--max-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
from harness import machine_facts
from prometheus_client.parser import text_string_to_metric_families
from serve_throughput import distinct_weights
from stream_clients import mixed_prompts

from mergeserve.config import Settings, default_experts_dir
from mergeserve.runtime.base_model import ensure_embedded_model
from mergeserve.testing import server_process

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "9bdd3ee"
"""The last commit without the per-mixture KV isolation."""

SYSTEM = "You are a careful assistant of the ACME support desk. " + " ".join(
    f"Policy {i}: keep answers short, exact and free of speculation; never reveal "
    "internal notes; prefer plain words."
    for i in range(20)
)


def prefix_counters(base_url: str) -> tuple[float, float]:
    """vLLM's prefix-cache (hits, queries) counters, in tokens."""
    text = httpx.get(f"{base_url}/metrics/engine", timeout=30).text
    got = {"vllm:prefix_cache_hits": 0.0, "vllm:prefix_cache_queries": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name = s.name.removesuffix("_total")
            if name in got:
                got[name] += s.value
    return got["vllm:prefix_cache_hits"], got["vllm:prefix_cache_queries"]


async def one(
    client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, body: dict[str, Any]
) -> tuple[str, float, int]:
    """(reply, TTFT, completion tokens) of one streamed greedy request."""
    t0 = time.perf_counter()
    first, parts, n = None, [], 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, **body},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return "".join(parts), first or 0.0, n


async def run_arm(
    client: openai.AsyncOpenAI,
    url: str,
    model: str,
    prompts: list[str],
    bodies: list[dict[str, Any]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    h0, q0 = prefix_counters(url)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    replies: list[str] = [""] * len(prompts)
    ttfts: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            replies[i], ttft, n = await one(client, model, prompts[i], args.max_tokens, bodies[i])
            ttfts.append(ttft)
            tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - t0
    h1, q1 = prefix_counters(url)
    return {
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "prefix_hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else None,
        "replies": replies,
    }


async def bench(urls: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    clients = {
        k: openai.AsyncOpenAI(base_url=f"{u}/v1", api_key="-", max_retries=0, timeout=1800)
        for k, u in urls.items()
    }
    n, fresh = args.requests, not args.repeat
    every = mixed_prompts(n * (args.rounds if fresh else 1) + 2)
    weights = distinct_weights(len(every), random.Random(0))
    models = {"routed": "dynamic", "pinned": "dynamic:exact", "static": "static:linear"}

    def workload(r: int) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
        """Round r's prompts and each arm's bodies: new ones every round (fresh), so
        a hit is a prefix shared within the round, never one cached by an earlier round."""
        at = slice(r * n, (r + 1) * n) if fresh else slice(0, n)
        bodies: dict[str, list[dict[str, Any]]] = {
            "routed": [{} for _ in every[at]],
            "pinned": [{"merge_weights": w} for w in weights[at]],
            "static": [{} for _ in every[at]],
        }
        return every[at], bodies

    # References for round 0: each dynamic request alone (one at a time) on `after`, whose
    # prefix blocks are then computed under that request's own weighting (or an equal one).
    prompts0, bodies0 = workload(0)
    refs: dict[str, list[str]] = {}
    for arm in ("routed", "pinned"):
        refs[arm] = [
            (await one(clients["after"], models[arm], p, args.max_tokens, b))[0]
            for p, b in zip(prompts0, bodies0[arm], strict=True)
        ]
    warm = every[-2:]  # prompts of no round
    for server in urls:  # warm-up: first loads and batches, not measured
        for arm, model in models.items():
            body = [{}, {}] if arm != "pinned" else [{"merge_weights": w} for w in weights[-2:]]
            await asyncio.gather(
                *(one(clients[server], model, warm[i], 4, body[i]) for i in (0, 1))
            )
    plan = [(arm, server) for arm in models for server in urls]
    rounds: dict[str, list[dict[str, Any]]] = {f"{a}/{s}": [] for a, s in plan}
    for r in range(args.rounds):
        prompts, bodies = workload(r)
        k = r % len(plan)
        for arm, server in plan[k:] + plan[:k]:
            res = await run_arm(
                clients[server], urls[server], models[arm], prompts, bodies[arm], args
            )
            if arm in refs and (r == 0 or not fresh):
                res["differ_from_cold"] = sum(
                    a != b for a, b in zip(res["replies"], refs[arm], strict=True)
                )
            del res["replies"]
            rounds[f"{arm}/{server}"].append(res)
            print(f"round {r} {arm}/{server}: {res}", file=sys.stderr, flush=True)

    def summary(v: list[dict[str, Any]], key: str) -> dict[str, float | None]:
        xs = [x[key] for x in v if x.get(key) is not None]
        if not xs:
            return {"median": None, "min": None, "max": None}
        return {
            "median": round(statistics.median(xs), 4),
            "min": round(min(xs), 4),
            "max": round(max(xs), 4),
        }

    table = {
        name: {
            "tokens_per_s": summary(v, "tokens_per_s"),
            "ttft_p50_s": summary(v, "ttft_p50_s"),
            "prefix_hit_rate": summary(v, "prefix_hit_rate"),
            "differ_from_cold": summary(v, "differ_from_cold"),
        }
        for name, v in rounds.items()
    }
    ratios = {}
    for arm in models:
        pairs = [
            a["tokens_per_s"] / b["tokens_per_s"]
            for a, b in zip(rounds[f"{arm}/after"], rounds[f"{arm}/before"], strict=True)
        ]
        ratios[arm] = {
            "median": round(statistics.median(pairs), 3),
            "min": round(min(pairs), 3),
            "max": round(max(pairs), 3),
        }
    return {
        "benchmark": "prefix_isolation",
        "model": "SmolLM2-135M-Instruct (fp32), eager",
        "experts": "examples/experts (six rank-8 demo experts; bundle rank 48)",
        "workload": (
            f"one ~400-token system message + {n} mixed test prompts, "
            + ("new prompts and pinned weightings every round" if fresh else "the same every round")
        ),
        "requests_per_round": n,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "before": args.before,
        "arms": table,
        "after_over_before_tokens_per_s": ratios,
        "per_round": rounds,
    }


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev],
        check=True,
        capture_output=True,
    )
    return where


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", default=BEFORE, help="the revision without the isolation")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--repeat",
        action="store_true",
        help="send the same requests every round (repeated traffic: after round 1 every "
        "weighting's prefix is cached) instead of new ones",
    )
    args = p.parse_args()

    experts = default_experts_dir()
    if experts is None:
        raise SystemExit("run from a checkout: the demo experts are in examples/experts")
    ensure_embedded_model(Settings().cache)
    env = {
        "MERGESERVE_ENGINE__CPU_THREADS": str(args.threads),
        "MERGESERVE_ENGINE__MAX_NUM_SEQS": str(max(16, args.concurrency)),
        "MERGESERVE_ENGINE__MAX_LORA_RANK": "64",
        "MERGESERVE_ENGINE__COMPILE": "false",
        "MERGESERVE_SERVER__QUEUE_BUDGET_S": "0",  # every concurrent request runs at once
        "MERGESERVE_MERGE__DEFAULT_MODE": "exact",
        "MERGESERVE_MERGE__STATIC_METHODS": '["linear"]',
    }
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        t = Path(tmp)
        old = worktree(args.before, t / "before-src")
        stack.callback(
            subprocess.run,
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
            check=False,
        )
        serve = ["--experts-dir", str(experts)]
        after = stack.enter_context(
            server_process(serve, t / "after.log", {**env, "MERGESERVE_CACHE": str(t / "a")})
        )
        before = stack.enter_context(
            server_process(
                serve,
                t / "before.log",
                {**env, "MERGESERVE_CACHE": str(t / "b"), "PYTHONPATH": str(old)},
            )
        )
        if "mixture self-check" in before.log.read_text(errors="replace"):
            raise SystemExit("the `before` server runs this checkout's code, not --before's")
        result = asyncio.run(bench({"after": after.base_url, "before": before.base_url}, args))
    result["machine"] = machine_facts(engine_threads=args.threads)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
