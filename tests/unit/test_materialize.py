"""AdapterCache: single flight, pinning, LRU by count and bytes, files, ids, failures."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from mergeserve.adapters.lowrank import AdapterFactors
from mergeserve.adapters.peft_io import load_lora_factors
from mergeserve.runtime.materialize import AdapterCache, IdAllocator

PREFIX = "base_model.model.model"


def factors(seed: int, rank: int = 4) -> AdapterFactors:
    g = torch.Generator().manual_seed(seed)
    return AdapterFactors.from_modules(
        {
            f"{PREFIX}.layers.{i}.self_attn.q_proj": (
                torch.randn(rank, 16, generator=g),
                torch.randn(16, rank, generator=g),
            )
            for i in range(2)
        }
    )


class Builds:
    """A build function per key that counts calls and can be held at a gate."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.fail: set[str] = set()

    def __call__(self, key: str, seed: int = 0):  # type: ignore[no-untyped-def]
        def build() -> AdapterFactors:
            self.calls[key] = self.calls.get(key, 0) + 1
            assert self.gate.wait(10)
            if key in self.fail:
                raise RuntimeError(f"cannot build {key}")
            return factors(seed)

        return build


@pytest.fixture
def cache(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = AdapterCache(IdAllocator(100), root=tmp_path, max_entries=2)
    yield c
    c.discard()


async def test_miss_builds_a_peft_dir_then_hits_reuse_it(cache: AdapterCache) -> None:
    builds = Builds()
    a = await cache.acquire("k", builds("k", seed=3))
    assert (a.cache, a.target.int_id, a.adapter.rank) == ("miss", 100, 4)
    assert a.target.path.parent == cache.root
    got = load_lora_factors(a.target.path)
    want = factors(3)
    for name, (a_, b) in want.modules().items():
        ga, gb = got.modules()[name]
        torch.testing.assert_close(gb @ ga, b @ a_)
    b = await cache.acquire("k", builds("k"))
    assert (b.cache, b.target) == ("hit", a.target)
    assert builds.calls == {"k": 1}
    assert a.adapter.size_bytes == sum(f.stat().st_size for f in a.target.path.iterdir())
    a.release()
    b.release()
    s = cache.stats()
    assert (s.entries, s.pinned, s.hits, s.misses, s.builds) == (1, 0, 1, 1, 1)


async def test_concurrent_misses_build_once(cache: AdapterCache) -> None:
    builds = Builds()
    builds.gate.clear()
    tasks = [asyncio.create_task(cache.acquire("k", builds("k"))) for _ in range(8)]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in tasks)  # all waiting on the one build
    builds.gate.set()
    leases = await asyncio.gather(*tasks)
    assert builds.calls == {"k": 1}
    assert {lease.target.int_id for lease in leases} == {100}
    assert {lease.cache for lease in leases} == {"miss"}
    assert cache.stats().pinned == 1
    for lease in leases:
        lease.release()
    assert cache.stats().pinned == 0


async def test_lru_evicts_unpinned_and_removes_files(cache: AdapterCache) -> None:
    builds = Builds()
    a = await cache.acquire("a", builds("a"))
    b = await cache.acquire("b", builds("b"))
    a.release()
    b.release()
    again = await cache.acquire("a", builds("a"))  # a is now the most recent
    again.release()
    c = await cache.acquire("c", builds("c"))
    assert "b" not in cache  # least recently used
    assert not b.target.path.exists()
    assert {"a", "c"} <= {k for k in ("a", "b", "c") if k in cache}
    assert cache.stats().evictions == 1
    c.release()


async def test_pinned_entries_survive_until_released(cache: AdapterCache) -> None:
    builds = Builds()
    held = [await cache.acquire(k, builds(k)) for k in ("a", "b", "c")]
    assert len(cache) == 3  # over max_entries=2: every entry is in use
    assert all(h.target.path.is_dir() for h in held)
    held[0].release()
    assert len(cache) == 2
    assert "a" not in cache
    assert not held[0].target.path.exists()
    held[0].release()  # idempotent: does not unpin a second time
    assert "b" in cache
    assert "c" in cache


async def test_byte_bound(tmp_path: Path) -> None:
    cache = AdapterCache(IdAllocator(), root=tmp_path, max_entries=100, max_bytes=1)
    builds = Builds()
    a = await cache.acquire("a", builds("a"))
    a.release()
    assert len(cache) == 0  # one adapter is already over 1 byte
    b = await cache.acquire("b", builds("b"))
    assert b.target.path.is_dir()  # pinned, so kept however large
    b.release()
    await cache.close()


async def test_new_materialization_gets_a_new_id(cache: AdapterCache) -> None:
    builds = Builds()
    ids = []
    for k in ("a", "b", "c", "a"):
        lease = await cache.acquire(k, builds(k))
        ids.append(lease.target.int_id)
        lease.release()
    assert ids == [100, 101, 102, 103]  # "a" was evicted, rebuilt, and never reuses 100


async def test_build_failure_reaches_every_waiter_and_is_retried(cache: AdapterCache) -> None:
    builds = Builds()
    builds.fail.add("k")
    builds.gate.clear()
    tasks = [asyncio.create_task(cache.acquire("k", builds("k"))) for _ in range(3)]
    await asyncio.sleep(0.05)
    builds.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert len(cache) == 0
    assert list(cache.root.iterdir()) == []
    builds.fail.clear()
    lease = await cache.acquire("k", builds("k"))
    assert lease.cache == "miss"
    assert builds.calls == {"k": 2}
    lease.release()


async def test_cancelled_waiter_does_not_cancel_the_build(cache: AdapterCache) -> None:
    builds = Builds()
    builds.gate.clear()
    first = asyncio.create_task(cache.acquire("k", builds("k")))
    second = asyncio.create_task(cache.acquire("k", builds("k")))
    await asyncio.sleep(0.05)
    first.cancel()
    await asyncio.sleep(0)
    builds.gate.set()
    lease = await second
    with pytest.raises(asyncio.CancelledError):
        await first
    assert builds.calls == {"k": 1}
    assert cache.stats().pinned == 1  # only the waiter that stayed holds it
    lease.release()
    assert cache.stats().pinned == 0


async def test_close_removes_every_file(tmp_path: Path) -> None:
    cache = AdapterCache(IdAllocator(), root=tmp_path)
    builds = Builds()
    lease = await cache.acquire("a", builds("a"))
    assert cache.root.is_dir()
    await cache.close()
    assert not cache.root.exists()
    lease.release()  # after close: harmless
    with pytest.raises(RuntimeError, match="closed"):
        await cache.acquire("b", builds("b"))
