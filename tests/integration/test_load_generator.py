"""benchmarks/load.py's generator at small scale, against the app on loopback (FakeEngine):
it keeps exactly C streams in flight, measures TTFT from the real streams, and counts a
failure with its reason."""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

import httpx

from mergeserve.config import Settings
from mergeserve.runtime.engine import FakeEngine
from mergeserve.server.app import create_app
from tests.integration.conftest import uvicorn_in_thread

# As `python benchmarks/load.py` has it: its helper module is a sibling on the path.
sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
from benchmarks.load import run_load, summarize


def test_bounded_clients_stream_and_failures_are_counted(settings: Settings) -> None:
    engine = FakeEngine(context_len=256, token_delay_s=0.01)
    prompts = itertools.cycle([("t", "hello there"), ("t", "another one")])
    seen: list[int] = []

    async def watch() -> None:  # mid-run, for 1 s: how many requests does the server have?
        for _ in range(100):
            seen.append(len(engine.in_flight))
            await asyncio.sleep(0.01)

    with uvicorn_in_thread(create_app(settings, engine)) as url:
        r = asyncio.run(
            run_load(url, clients=20, duration_s=3, prompts=prompts, model="base", at=(1.0, watch))
        )
        s = summarize(r)
        assert s["failed"] == 0, s["failures"]
        assert s["requests"] == s["ok"]
        assert s["requests"] >= 20
        assert max(seen) == 20  # bounded: one stream per client, never more
        ttft = s["ttft_s"]
        assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"] <= ttft["max"]
        # One token per 10 ms, 16 tokens: a latency of at least 0.16 s, and the first
        # token (after the `merge` chunk) at least 10 ms in.
        assert s["latency_s"]["p50"] >= 0.16
        assert ttft["p50"] >= 0.01
        assert all(x.completion_tokens == 16 for x in r.samples)
        for x in r.samples:
            assert x.routed_at is not None
            assert x.ttft is not None
            assert x.latency is not None
            assert x.started < x.routed_at <= x.started + x.ttft <= x.started + x.latency
        # Every request that started ended; the last ones after the deadline.
        assert s["wall_s"] >= 3
        assert 0 < s["ok_within_duration"] <= s["ok"]

        bad = summarize(
            asyncio.run(
                run_load(url, clients=3, duration_s=0.5, prompts=prompts, model="no-such-model")
            )
        )
        assert bad["ok"] == 0
        assert bad["failures"] == {"HTTP 404 not_found_error": bad["requests"]}

        # The engine fails after the stream began (200 sent): an error event, counted.
        engine.closed = True
        down = summarize(
            asyncio.run(run_load(url, clients=3, duration_s=0.5, prompts=prompts, model="base"))
        )
        engine.closed = False
        assert down["ok"] == 0
        assert down["failures"] == {"stream error: service_unavailable_error": down["requests"]}
        assert down["ttft_s"]["p50"] is None

        assert httpx.get(f"{url}/health").status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert "mergeserve_requests_in_flight 0.0" in metrics
