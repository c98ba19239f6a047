"""Static arms built in the background: the rest answers at once, an arm not built yet
is listed with its status and answers 503 with Retry-After until it is."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from mergeserve.config import Settings
from mergeserve.runtime.engine import FakeEngine
from mergeserve.service import served_set as live_module
from tests.integration.conftest import Served, serve

USER = [{"role": "user", "content": "What is 12 plus 30?"}]


async def _chat(s: Served, model: str) -> Any:
    return await s.http.post("/v1/chat/completions", json={"model": model, "messages": USER})


async def _status(s: Served) -> dict[str, str]:
    models = (await s.http.get("/v1/models")).json()["data"]
    return {m["id"]: m["status"] for m in models}


async def _until(check: Callable[[], Any], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_the_server_answers_while_its_static_arms_build(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.merge.background_builds = True
    settings.merge.static_methods = ["linear", "ties", "task_arithmetic"]
    release = threading.Event()
    real = live_module.static_merge

    def gated(experts: Any, method: str, *args: Any) -> Any:
        if method == "ties":
            assert release.wait(30)
        if method == "task_arithmetic":
            raise RuntimeError("out of disk")
        return real(experts, method, *args)

    monkeypatch.setattr(live_module, "static_merge", gated)
    async for s in serve(settings, FakeEngine(context_len=256)):
        # linear is built first; ties then blocks in its build, the last one waits
        async def ties_building(s: Served = s) -> bool:
            return (await _status(s))["static:ties"] == "building"

        await _until(ties_building)
        status = await _status(s)
        assert status["static:linear"] == status["base"] == status["dynamic"] == "ready"
        assert status["static:task_arithmetic"] == "queued"
        ready = (await s.http.get("/ready")).json()
        assert (ready["status"], ready["building"], ready["failed"]) == ("ready", 2, [])
        assert (await _chat(s, "base")).status_code == 200
        assert (await _chat(s, "dynamic")).status_code == 200
        assert (await _chat(s, "static:linear")).status_code == 200
        r = await _chat(s, "static:ties")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "10"
        assert r.json()["error"]["code"] == "arm_building"
        card = (await s.http.get("/v1/models/static:ties")).json()
        assert card["status_note"].startswith("building for ")
        assert s.engine.loras_seen.count("static:ties") == 0

        release.set()

        async def settled(s: Served = s) -> bool:
            return (await s.http.get("/ready")).json()["building"] == 0

        await _until(settled)
        assert (await _chat(s, "static:ties")).status_code == 200
        failed = await _chat(s, "static:task_arithmetic")
        assert failed.status_code == 503
        assert "retry-after" not in failed.headers
        assert failed.json()["error"]["code"] == "arm_build_failed"
        assert "out of disk" in failed.json()["error"]["message"]
        card = (await s.http.get("/v1/models/static:task_arithmetic")).json()
        assert (card["status"], card["status_note"]) == ("failed", "RuntimeError: out of disk")
        assert (await s.http.get("/ready")).json()["failed"] == ["task_arithmetic"]


async def test_without_background_builds_every_arm_is_ready_before_the_first_request(
    settings: Settings,
) -> None:
    settings.merge.background_builds = False
    async for s in serve(settings, FakeEngine(context_len=256)):
        status = await _status(s)
        assert set(status.values()) == {"ready"}
        assert any(m.startswith("static:") for m in status)
        assert (await s.http.get("/ready")).json()["building"] == 0
