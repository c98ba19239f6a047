"""Merged adapters on disk for the engine: content key → PEFT dir on tmpfs → LoRATarget.

vLLM takes LoRA adapters as directories (`LoRARequest(name, int_id, path)`), so every
merge a request is served with is written once as a PEFT dir and then reused by every
request with the same content key. `AdapterCache` owns those dirs:

* single flight: concurrent misses for one key run the build once; the others wait for it
  (a waiter that is cancelled does not cancel the build);
* LRU bounded by entry count and bytes; an entry is pinned while any request holds a
  lease on it, and only unpinned entries are evicted (so the bounds can be exceeded while
  more distinct adapters than that are in flight; they are met again as leases end);
* files are removed on eviction and on `close()`;
* every new materialization gets a fresh engine id (`int_id`), never reused, so an engine
  that caches by id can never serve stale content under it.

The build (merge math + safetensors write) runs in a worker thread, never on the event
loop. Directories go under /dev/shm when it is writable (tmpfs: no disk I/O), else the
system temp dir. The cache knows nothing of routers or Twin: a key is an opaque string
and `build` any function returning AdapterFactors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from mergeserve.adapters.lowrank import AdapterFactors
from mergeserve.adapters.peft_io import save_lora_factors
from mergeserve.errors import ConfigurationError
from mergeserve.runtime.engine import LoRATarget

log = logging.getLogger(__name__)

CacheStatus = Literal["hit", "miss"]

SHM = Path("/dev/shm")


def default_root() -> Path:
    """tmpfs when this process can write there, else the system temp dir."""
    if SHM.is_dir() and os.access(SHM, os.W_OK | os.X_OK):
        return SHM
    return Path(tempfile.gettempdir())


class IdAllocator:
    """Engine adapter ids, unique for the life of the server (shared by every arm)."""

    def __init__(self, start: int = 1) -> None:
        self._next: Iterator[int] = itertools.count(start)

    def __call__(self) -> int:
        return next(self._next)


@dataclass(frozen=True)
class MaterializedAdapter:
    key: str
    target: LoRATarget
    rank: int
    size_bytes: int
    build_seconds: float
    """Merge + write time of this materialization."""


@dataclass
class AdapterLease:
    """A request's hold on a materialized adapter; `release()` once (idempotent)."""

    adapter: MaterializedAdapter
    cache: CacheStatus
    """`hit`: the adapter was ready; `miss`: this request waited for it to be built."""
    seconds: float
    """Time this request spent getting the adapter (≈0 on a hit)."""
    _cache: AdapterCache | None = field(repr=False, default=None)

    @property
    def target(self) -> LoRATarget:
        return self.adapter.target

    def release(self) -> None:
        cache, self._cache = self._cache, None
        if cache is not None:
            cache._unpin(self.adapter.key)


@dataclass
class _Entry:
    adapter: MaterializedAdapter
    pins: int = 0


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    pinned: int
    hits: int
    misses: int
    builds: int
    evictions: int


class AdapterCache:
    """Materialized merged adapters, keyed by content. Use from one event loop."""

    def __init__(
        self,
        ids: IdAllocator,
        *,
        root: Path | None = None,
        max_entries: int = 64,
        max_bytes: int = 4 << 30,
        name_prefix: str = "merge",
        dtype: torch.dtype = torch.float32,
        base_model_name_or_path: str | None = None,
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ConfigurationError("the adapter cache needs max_entries >= 1, max_bytes >= 1")
        parent = root if root is not None else default_root()
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix="mergeserve-adapters-", dir=parent))
        except OSError as e:
            raise ConfigurationError(f"cannot create the adapter cache under {parent}: {e}") from e
        self._ids = ids
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._prefix = name_prefix
        self._dtype = dtype
        self._base = base_model_name_or_path
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU first
        self._building: dict[str, asyncio.Task[MaterializedAdapter]] = {}
        self._waiters: dict[str, int] = {}
        self._bytes = 0
        self._hits = self._misses = self._builds = self._evictions = 0
        self._closed = False

    # ------------------------------------------------------------------ public

    async def acquire(self, key: str, build: Callable[[], AdapterFactors]) -> AdapterLease:
        """A pinned lease on the adapter of `key`, building it with `build` on a miss.

        `build` runs in a worker thread; its exception reaches every waiter, and the next
        acquire of the key tries again.
        """
        if self._closed:
            raise RuntimeError("the adapter cache is closed")
        started = time.perf_counter()
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.pins += 1
            self._hits += 1
            return AdapterLease(entry.adapter, "hit", time.perf_counter() - started, self)
        task = self._building.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._build(key, build))
            self._building[key] = task
        # The build pins its entry once per waiter when it lands, so that nothing can
        # evict it before the waiters resume.
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            # shield: a cancelled waiter must not cancel the build that others wait on.
            adapter = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and not task.cancelled() and task.exception() is None:
                self._unpin(key)  # the build landed and pinned it for us
            elif key in self._waiters:
                self._waiters[key] -= 1
            raise
        self._misses += 1
        return AdapterLease(adapter, "miss", time.perf_counter() - started, self)

    def stats(self) -> CacheStats:
        return CacheStats(
            entries=len(self._entries),
            bytes=self._bytes,
            pinned=sum(1 for e in self._entries.values() if e.pins),
            hits=self._hits,
            misses=self._misses,
            builds=self._builds,
            evictions=self._evictions,
        )

    def pins(self, key: str) -> int:
        """Leases held on `key` now (0 when it is not cached)."""
        entry = self._entries.get(key)
        return entry.pins if entry is not None else 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def discard(self) -> None:
        """Remove every file now, for a cache that never served (start-up failed)."""
        self._closed = True
        self._entries.clear()
        self._bytes = 0
        shutil.rmtree(self.root, ignore_errors=True)

    async def close(self) -> None:
        """Cancel builds in progress and remove every file; idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._building.values()):
            task.cancel()
        for task in list(self._building.values()):
            with contextlib.suppress(BaseException):
                await task
        self._entries.clear()
        self._bytes = 0
        await asyncio.to_thread(shutil.rmtree, self.root, True)

    # ----------------------------------------------------------------- internals

    async def _build(self, key: str, build: Callable[[], AdapterFactors]) -> MaterializedAdapter:
        try:
            int_id = self._ids()
            path = self.root / f"{self._prefix}-{int_id}"
            adapter = await asyncio.to_thread(self._write, key, int_id, path, build)
            if self._closed:
                shutil.rmtree(path, ignore_errors=True)
                raise RuntimeError("the adapter cache closed during the build")
            self._entries[key] = _Entry(adapter, pins=self._waiters.pop(key, 0))
            self._bytes += adapter.size_bytes
            self._builds += 1
            self._evict()
            return adapter
        finally:
            self._building.pop(key, None)
            self._waiters.pop(key, None)

    def _write(
        self, key: str, int_id: int, path: Path, build: Callable[[], AdapterFactors]
    ) -> MaterializedAdapter:
        t0 = time.perf_counter()
        factors = build()
        try:
            save_lora_factors(factors, path, self._base, dtype=self._dtype)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        size = sum(f.stat().st_size for f in path.iterdir())
        target = LoRATarget(name=f"{self._prefix}-{int_id}", int_id=int_id, path=path)
        rank = max(factors.ranks.values())
        return MaterializedAdapter(key, target, rank, size, time.perf_counter() - t0)

    def _unpin(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.pins -= 1
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used unpinned entries until both bounds hold (or only
        pinned entries are left)."""
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            victim = next((k for k, e in self._entries.items() if e.pins == 0), None)
            if victim is None:
                return
            entry = self._entries.pop(victim)
            self._bytes -= entry.adapter.size_bytes
            self._evictions += 1
            shutil.rmtree(entry.adapter.target.path, ignore_errors=True)
            log.debug("evicted merged adapter %s", entry.adapter.target.name)
