"""Remove, re-add and the manifest watcher, interleaved on purpose (issue: a removed and
re-added expert's name got stuck; a fresh add vanished for a poll after its 201).

Each interleaving is forced with a hook, not hoped for with sleeps: the watcher is paused
right after it has read the registry, or a removal right before it collects the files,
while the test makes the competing change. Then loops of add / use / remove / re-add /
use / remove on one server and on two replicas sharing a registry, with the watcher
polling every few milliseconds, must see no unexpected status code. The fake engine
stands in for vLLM, which plays no part in the registry."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mergeserve.adapters.registry import ExpertNotFoundError, ExpertRegistry, RegistrySnapshot
from mergeserve.config import AdminSettings, Settings
from mergeserve.runtime.engine import FakeEngine
from mergeserve.service.live import LiveSet
from tests.conftest import write_fake_lora_dir
from tests.integration.conftest import Served, serve

TOKEN = "races-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WATCH_S = 0.005


def _settings(settings: Settings, registry: Path, cache: Path) -> Settings:
    return settings.model_copy(
        update={
            "cache": cache,
            "admin": AdminSettings(
                token=TOKEN, registry_dir=registry, watch_interval_s=WATCH_S, remove_timeout_s=10
            ),
            "merge": settings.merge.model_copy(update={"static_methods": ["linear"]}),
        }
    )


@pytest.fixture
def race_settings(settings: Settings, tmp_path: Path) -> Settings:
    return _settings(settings, tmp_path / "registry", tmp_path / "cache-a")


@pytest.fixture
async def server(race_settings: Settings) -> AsyncIterator[Served]:
    async for s in serve(race_settings, FakeEngine(context_len=256)):
        yield s


@pytest.fixture
def racer(tmp_path: Path) -> Path:
    return write_fake_lora_dir(tmp_path / "up" / "racer", examples=["race me", "who wins"])


def live_of(s: Served) -> LiveSet:
    live: LiveSet = s.app.state.mergeserve.live
    return live


def _files(src: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (f.name, f.read_bytes())) for f in sorted(src.iterdir())]


async def add(s: Served, src: Path, name: str = "racer") -> int:
    files = await asyncio.to_thread(_files, src)
    r = await s.http.post("/admin/experts", headers=AUTH, data={"name": name}, files=files)
    return r.status_code


async def delete(s: Served, name: str = "racer") -> int:
    return (await s.http.delete(f"/admin/experts/{name}", headers=AUTH)).status_code


async def chat(s: Served, name: str = "racer") -> int:
    r = await s.http.post(
        "/v1/chat/completions",
        json={
            "model": f"expert:{name}",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 32,
        },
    )
    if r.status_code == 200:
        assert r.json()["choices"][0]["message"]["content"].startswith(f"[expert:{name}]")
    return r.status_code


class WatcherPause:
    """Pauses the registry watcher once, right after it has read the registry and
    before it publishes anything, until `go` (or 2 s). Today's watcher reads under the
    change lock, so a competing change waits for it; the old one read outside it."""

    def __init__(self, registry: ExpertRegistry):
        self._refresh = registry.refresh
        self.armed = threading.Event()
        self.read = threading.Event()
        self.go = threading.Event()
        self.seen: list[tuple[str, ...]] = []

    def __call__(self) -> RegistrySnapshot:
        snap = self._refresh()
        if self.armed.is_set() and threading.current_thread().name == "registry-watch":
            self.armed.clear()
            self.seen.append(snap.names)
            self.read.set()
            self.go.wait(2)
        return snap

    async def hold_while(self, change: Callable[[], Any]) -> Any:
        """Pause the watcher after its next read, make `change` meanwhile, resume."""
        self.armed.set()
        assert await asyncio.to_thread(self.read.wait, 5), "the watcher never polled"
        task = asyncio.ensure_future(change())
        await asyncio.sleep(0.3)  # the change runs (or waits for the change lock)
        self.go.set()
        return await task


@pytest.fixture
def pause(server: Served, monkeypatch: pytest.MonkeyPatch) -> WatcherPause:
    registry = live_of(server).registry
    assert registry is not None
    p = WatcherPause(registry)
    monkeypatch.setattr(registry, "refresh", p)
    return p


def published(live: LiveSet) -> list[tuple[int, tuple[str, ...]]]:
    """(generation, expert names) of every set published from now on."""
    out: list[tuple[int, tuple[str, ...]]] = []
    live.subscribe(lambda s: out.append((s.generation, s.experts.names)))
    return out


# ------------------------------------------------------------- forced interleavings


async def test_a_stale_watcher_read_never_takes_a_fresh_add_back(
    server: Served, pause: WatcherPause, racer: Path
) -> None:
    history = published(live_of(server))
    status = await pause.hold_while(lambda: add(server, racer))
    assert status == 201
    assert pause.seen == [()]  # the watcher read the registry before the add
    for _ in range(20):  # at once, and over many polls of the watcher after it
        assert await chat(server) == 200
        await asyncio.sleep(WATCH_S * 2)
    assert all("racer" in names for _, names in history), history  # never went back


async def test_remove_then_re_add_during_a_stale_watcher_read_is_not_stuck(
    server: Served, pause: WatcherPause, racer: Path
) -> None:
    assert await add(server, racer) == 201
    assert await pause.hold_while(lambda: delete(server)) == 200
    assert pause.seen == [("racer",)]  # the watcher read the registry before the removal
    await asyncio.sleep(WATCH_S * 20)  # the watcher publishes whatever it makes of it
    assert await chat(server) == 404
    for _ in range(3):  # add / use / remove the same files again, as an operator does
        assert await add(server, racer) == 201
        await asyncio.sleep(WATCH_S * 20)
        assert await chat(server) == 200
        assert await delete(server) == 200
        assert await chat(server) == 404


async def test_a_re_add_while_the_removal_collects_revives_the_files(
    server: Served, racer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = live_of(server)
    registry = live.registry
    assert registry is not None
    collecting, resume = threading.Event(), threading.Event()
    real = registry.collect

    def paused_collect(digest: str, **kw: Any) -> None:
        collecting.set()
        resume.wait(5)
        real(digest, **kw)

    monkeypatch.setattr(registry, "collect", paused_collect)
    assert await add(server, racer) == 201
    path = registry.snapshot()["racer"].path
    removal = asyncio.ensure_future(delete(server))
    assert await asyncio.to_thread(collecting.wait, 5)  # unpublished, not collected yet
    assert await chat(server) == 404
    assert await add(server, racer) == 201  # the same content: the same object
    assert await chat(server) == 200
    resume.set()
    assert await removal == 200
    assert await chat(server) == 200  # the collection left the revived files alone
    assert registry.verify() == ()
    assert path.joinpath("adapter_config.json").is_file()
    assert await delete(server) == 200
    assert not path.exists()


async def test_a_request_resolved_before_a_remove_and_re_add_leases_what_it_resolved(
    server: Served, racer: Path, tmp_path: Path
) -> None:
    live = live_of(server)
    assert await add(server, racer) == 201
    resolved = live.current.catalog.resolve("expert:racer")
    assert await delete(server) == 200
    other = write_fake_lora_dir(tmp_path / "other" / "racer", examples=["another racer"])
    assert await add(server, other) == 201  # the same name, other content
    with pytest.raises(ExpertNotFoundError, match="racer"):
        live.hold(resolved)  # never the new content under the old resolution
    again = live.current.catalog.resolve("expert:racer")
    assert again.root != resolved.root
    release = live.hold(again)
    assert release is not None
    assert live.registry is not None
    assert live.registry.usage() == {Path(again.root).name: 1}
    release()
    # The same content re-added: the request resolved before may lease it again.
    assert await delete(server) == 200
    assert await add(server, racer) == 201
    release = live.hold(resolved)
    assert release is not None
    release()


async def test_delete_of_a_name_in_the_manifest_always_succeeds(
    server: Served, racer: Path, race_settings: Settings
) -> None:
    """A name this server does not serve (refused by its own checks) is still removable."""
    live = live_of(server)
    assert live.registry is not None
    big = write_fake_lora_dir(racer.parent / "big", rank=race_settings.engine.max_lora_rank * 2)
    # Another replica with a larger slot rank committed it; this server refuses to serve it.
    with ExpertRegistry.open(live.registry.root, shared=True) as other:
        other.add("big", big)
    await asyncio.sleep(WATCH_S * 40)
    assert "big" not in live.current.sources
    assert "big" in live.registry.refresh()
    assert await add(server, racer, name="big") == 409  # the name is taken...
    assert await delete(server, "big") == 200  # ...and can be freed
    assert await add(server, racer, name="big") == 201
    assert await chat(server, "big") == 200


# ------------------------------------------------------------------------------ loops

ROUNDS = 200


async def one_round(x: Served, y: Served, racer: Path) -> list[tuple[str, int]]:
    """Add on x and use it there at once, remove and re-add the same files on y and use
    them there at once, remove on x (x may be y); the steps that got another status."""
    steps: tuple[tuple[str, Callable[[], Awaitable[int]], int], ...] = (
        ("add on x", lambda: add(x, racer), 201),
        ("chat on x", lambda: chat(x), 200),
        ("delete on y", lambda: delete(y), 200),
        ("re-add on y", lambda: add(y, racer), 201),
        ("chat on y", lambda: chat(y), 200),
        ("delete on x", lambda: delete(x), 200),
    )
    unexpected = []
    for step, call, want in steps:
        status = await call()
        if status != want:
            unexpected.append((step, status))
    return unexpected


async def test_add_use_remove_re_add_loop_on_one_server(server: Served, racer: Path) -> None:
    unexpected = [
        (i, *bad) for i in range(ROUNDS) for bad in await one_round(server, server, racer)
    ]
    assert unexpected == []


async def test_add_use_remove_re_add_loop_on_two_replicas(
    settings: Settings, tmp_path: Path, racer: Path
) -> None:
    """Two servers on one registry; each round's changes alternate between them, and each
    use goes to the server that just added (the other learns within a poll)."""
    registry = tmp_path / "shared-registry"
    a_settings = _settings(settings, registry, tmp_path / "cache-a")
    b_settings = _settings(settings, registry, tmp_path / "cache-b")
    unexpected: list[tuple[int, str, int]] = []
    async for a in serve(a_settings, FakeEngine(context_len=256)):
        async for b in serve(b_settings, FakeEngine(context_len=256)):
            for i in range(ROUNDS):
                x, y = (a, b) if i % 2 == 0 else (b, a)
                unexpected += [(i, *bad) for bad in await one_round(x, y, racer)]
            assert live_of(a).registry is not None
            assert live_of(a).registry.verify() == ()  # type: ignore[union-attr]
    assert unexpected == []
