"""Closed-loop streaming clients for the throughput benchmarks (serve_throughput.py,
cpu_lora.py): C workers drain a queue of prompts through the official openai client."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any

import openai

from mergeserve.tasks import TASKS, generate


def bench_client(url: str) -> openai.AsyncOpenAI:
    """The client every benchmark here measures with: no retries, a long timeout."""
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=1800)


def mixed_prompts(n: int) -> list[str]:
    """n test-split prompts, the six tasks interleaved (a fixed, reproducible mix)."""
    per_task = [[s.prompt for s in generate(t, "test", n // len(TASKS) + 1)] for t in TASKS]
    mixed = [p for group in zip(*per_task, strict=True) for p in group]
    return mixed[:n]


async def run_round(
    client: openai.AsyncOpenAI,
    model: str | Sequence[str],
    prompts: Sequence[str],
    concurrency: int,
    max_tokens: int,
    bodies: Sequence[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Every prompt once (greedy, `ignore_eos`: exactly max_tokens each), `concurrency` at a
    time; `bodies[i]` is added to request i's body; `model` may name each request's model
    (client-side routing). Tokens/s over the round's wall time."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    tokens = 0
    ttfts: list[float] = []

    async def worker() -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            body: dict[str, Any] = {"ignore_eos": True, **(bodies[i] if bodies else {})}
            t0 = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(
                model=model if isinstance(model, str) else model[i],
                messages=[{"role": "user", "content": prompts[i]}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=body,
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
