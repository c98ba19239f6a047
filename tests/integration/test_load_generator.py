"""benchmarks/load.py's generator at small scale, against the app on loopback (FakeEngine):
it keeps exactly C streams in flight, measures TTFT from the real streams, and counts a
failure with its reason."""

from __future__ import annotations

import asyncio
import itertools

import httpx

from benchmarks.load import run_load, summarize
from mergeserve.config import Settings
from mergeserve.runtime.engine import FakeEngine
from mergeserve.server.app import create_app
from tests.integration.conftest import uvicorn_in_thread


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
        assert isinstance(s["requests"], int)
        assert s["requests"] >= 20
        assert max(seen) == 20  # bounded: one stream per client, never more
        ttft = s["ttft_s"]
        assert isinstance(ttft, dict)
        assert 0 < ttft["p50"] <= ttft["p99"] <= ttft["max"]
        # One token per 10 ms, 16 tokens: a latency of at least 0.16 s.
        lat = s["latency_s"]
        assert isinstance(lat, dict)
        assert lat["p50"] >= 0.16
        assert all(x.completion_tokens == 16 for x in r.samples)

        bad = asyncio.run(
            run_load(url, clients=3, duration_s=0.5, prompts=prompts, model="no-such-model")
        )
        b = summarize(bad)
        assert b["ok"] == 0
        assert b["failures"] == {"HTTP 404": b["requests"]}
        assert httpx.get(f"{url}/health").status_code == 200
