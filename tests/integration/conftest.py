from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from mergeserve.config import Settings
from mergeserve.runtime.engine import FakeEngine
from mergeserve.server.app import create_app


@dataclass
class Served:
    http: httpx.AsyncClient
    client: openai.AsyncOpenAI
    engine: FakeEngine
    app: FastAPI


async def serve(settings: Settings, engine: FakeEngine) -> AsyncIterator[Served]:
    """The real app (lifespan included) over an in-process ASGI transport."""
    app = create_app(settings, engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            client = openai.AsyncOpenAI(
                base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0
            )
            yield Served(http, client, engine, app)


@pytest.fixture
def settings(experts_dir: Path, tmp_path: Path) -> Settings:
    s = Settings(model=None, experts_dir=experts_dir, cache=tmp_path / "cache")
    # Bursts are sent on purpose here and every request must answer; admission control
    # has its own tests (test_openai_api, tests/unit/test_shedding.py).
    s.server.queue_budget_s = 0
    return s


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[Served]:
    async for s in serve(settings, FakeEngine(context_len=256)):
        yield s


@contextmanager
def uvicorn_in_thread(app: FastAPI) -> Iterator[str]:
    """Serve `app` on a free loopback port in a thread; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # the lifespan builds the arms first
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples named `name` in a Prometheus exposition, keyed by their sorted labels."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out
