"""`BundlePins`: the mixture bundles held in engine slots.

Every dynamic request of a mode is served by the one bundle adapter of the current
`DynamicState` (runtime/mixture.py), so the bundle is pinned in an engine slot rather than
loaded and evicted like a per-key merge. A new state (hot-add, rebuild) brings a new
bundle; the old one is unpinned once no request holds it (its cache lease count is 0).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from mergeserve.runtime.engine import LoRATarget
from mergeserve.runtime.materialize import AdapterCache, MaterializedAdapter

log = logging.getLogger(__name__)

AdapterHook = Callable[[LoRATarget], Awaitable[None]]


class BundlePins:
    """Pins each mode's current bundle (while fewer than `max_pinned` are pinned: the
    other slots stay free for experts and static merges; an unpinned bundle is loaded on
    demand like any adapter) and unpins superseded ones once no request holds them."""

    def __init__(self, cache: AdapterCache) -> None:
        self._cache = cache
        self._pin_fn: AdapterHook | None = None
        self._unpin_fn: AdapterHook | None = None
        self._max_pinned = 3
        self._current: dict[str, MaterializedAdapter] = {}
        """The bundle of each mode's latest state."""
        self._engine_pinned: dict[str, MaterializedAdapter] = {}
        """Bundles pinned in the engine now, by key."""
        self._retiring: list[MaterializedAdapter] = []
        self._lock = asyncio.Lock()

    def configure(
        self, pin: AdapterHook | None, unpin: AdapterHook | None, max_pinned: int = 3
    ) -> None:
        """The engine's pin and unpin calls (None: nothing is pinned)."""
        self._pin_fn, self._unpin_fn = pin, unpin
        self._max_pinned = max_pinned

    async def serve(self, mode: str, adapter: MaterializedAdapter) -> None:
        """`adapter` is the bundle requests of `mode` are served by now: pin it (if a
        slot may be spent on it), and retire the one it replaces."""
        cur = self._current.get(mode)
        if cur is None or cur.key != adapter.key:
            async with self._lock:
                cur = self._current.get(mode)
                if cur is None or cur.key != adapter.key:
                    self._current[mode] = adapter
                    if cur is not None:
                        self._retiring.append(cur)
                    await self._sweep()
                    await self._pin(mode, adapter)
        if self._retiring:
            await self._sweep()

    async def retire_all(self) -> None:
        """No bundle serves any mode any more: unpin each once no request holds it."""
        async with self._lock:
            self._retiring.extend(self._current.values())
            self._current.clear()
            await self._sweep()

    async def _pin(self, mode: str, adapter: MaterializedAdapter) -> None:
        if self._pin_fn is None or len(self._engine_pinned) >= self._max_pinned:
            return
        try:
            await self._pin_fn(adapter.target)
        except Exception as e:  # the engine loads it on demand instead
            log.warning("could not pin %s: %s", adapter.target.name, e)
            return
        self._engine_pinned[adapter.key] = adapter
        log.info("pinned the %s bundle %s", mode, adapter.target.name)

    async def _sweep(self) -> None:
        done = [a for a in self._retiring if self._cache.pins(a.key) == 0]
        for a in done:
            self._retiring.remove(a)
            if self._engine_pinned.pop(a.key, None) is not None and self._unpin_fn is not None:
                try:
                    await self._unpin_fn(a.target)
                    log.info("unpinned the bundle %s (no request holds it)", a.target.name)
                except Exception as e:
                    log.warning("could not unpin %s: %s", a.target.name, e)
