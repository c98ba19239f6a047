"""`BundlePins`: the mixture bundles held in engine slots.

Every dynamic request of a mode is served by the one bundle adapter of the current
`DynamicState` (runtime/mixture.py), so the bundle is pinned in an engine slot rather than
loaded and evicted like a per-key merge. A new state (hot-add, rebuild) brings a new
bundle; the old one is unpinned once no request holds it (its cache lease count is 0).

Pinning and unpinning run in the background: a request never waits on them. Each is a
call into the engine that, under load, waits for the engine's current step (vLLM handles
adapter calls between steps); on 2 CPU cores a hot-added expert's first request waited
1.2-1.8 s for the pin of the new bundle (add + pin), against ~25 ms unloaded. A request
on a bundle not pinned yet is served as any adapter is: the engine loads it on demand
(vLLM from its path, within the step that schedules it; a remote server registers it
first), and the pin then keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from mergeserve.runtime.engine import LoRATarget
from mergeserve.runtime.materialize import AdapterCache, MaterializedAdapter

log = logging.getLogger(__name__)

AdapterHook = Callable[[LoRATarget], Awaitable[None]]


class BundlePins:
    """Pins each mode's current bundle (while fewer than `max_pinned` are pinned: the
    other slots stay free for experts and static merges; an unpinned bundle is loaded on
    demand like any adapter) and unpins superseded ones once no request holds them, in a
    background task (module doc)."""

    def __init__(self, cache: AdapterCache) -> None:
        self._cache = cache
        self._pin_fn: AdapterHook | None = None
        self._unpin_fn: AdapterHook | None = None
        self._max_pinned = 3
        self._current: dict[str, MaterializedAdapter] = {}
        """The bundle of each mode's latest state."""
        self._refused: set[str] = set()
        """Keys of bundles the engine failed to pin (not asked again)."""
        self._engine_pinned: dict[str, MaterializedAdapter] = {}
        """Bundles pinned in the engine now, by key."""
        self._retiring: list[MaterializedAdapter] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def configure(
        self, pin: AdapterHook | None, unpin: AdapterHook | None, max_pinned: int = 3
    ) -> None:
        """The engine's pin and unpin calls (None: nothing is pinned)."""
        self._pin_fn, self._unpin_fn = pin, unpin
        self._max_pinned = max_pinned

    @property
    def pinned(self) -> list[str]:
        """Names of the bundles pinned in the engine now, in pinning order."""
        return [a.target.name for a in self._engine_pinned.values()]

    async def serve(self, mode: str, adapter: MaterializedAdapter) -> None:
        """`adapter` is the bundle requests of `mode` are served by now: have it pinned
        (if a slot may be spent on it) and the one it replaces retired, without waiting
        for either."""
        cur = self._current.get(mode)
        if cur is None or cur.key != adapter.key:
            self._current[mode] = adapter
            # back in service (a removal undone before the old bundle drained): kept
            self._retiring = [a for a in self._retiring if a.key != adapter.key]
            if cur is not None:
                self._retiring.append(cur)
            self._kick()
        elif self._retiring:
            self._kick()

    async def retire_all(self) -> None:
        """No bundle serves any mode any more: unpin each once no request holds it."""
        self._retiring.extend(self._current.values())
        self._current.clear()
        self._kick()
        await self.settled()

    async def settled(self) -> None:
        """Wait until the engine's pins reflect every change made so far."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Stop the background work (at shutdown: the engine goes too)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _kick(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True  # the running pass may have read the state already
            return
        self._task = asyncio.get_running_loop().create_task(self._reconcile())

    async def _reconcile(self) -> None:
        while True:
            self._again = False
            async with self._lock:
                await self._sweep()
                # Every current bundle not pinned yet: a new one, or one that found every
                # pinnable slot taken by bundles still draining (swept above since).
                for mode, adapter in list(self._current.items()):
                    if self._current.get(mode) is adapter:  # not superseded meanwhile
                        await self._pin(mode, adapter)
            if not self._again:
                return

    async def _pin(self, mode: str, adapter: MaterializedAdapter) -> None:
        if adapter.key in self._engine_pinned or adapter.key in self._refused:
            return
        if self._pin_fn is None or len(self._engine_pinned) >= self._max_pinned:
            return
        try:
            await self._pin_fn(adapter.target)
        except Exception as e:  # the engine loads it on demand instead
            log.warning("could not pin %s: %s", adapter.target.name, e)
            self._refused.add(adapter.key)
            return
        self._engine_pinned[adapter.key] = adapter
        log.info("pinned the %s bundle %s", mode, adapter.target.name)

    async def _sweep(self) -> None:
        current = {a.key for a in self._current.values()}
        done = [a for a in self._retiring if self._cache.pins(a.key) == 0]
        for a in done:
            self._retiring.remove(a)
            if a.key in current:  # another mode's bundle, or this one's again
                continue
            if self._engine_pinned.pop(a.key, None) is not None and self._unpin_fn is not None:
                try:
                    await self._unpin_fn(a.target)
                    log.info("unpinned the bundle %s (no request holds it)", a.target.name)
                except Exception as e:
                    log.warning("could not unpin %s: %s", a.target.name, e)
