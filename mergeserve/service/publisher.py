"""`Publisher`: the served set requests read now, and who hears of a new one."""

from __future__ import annotations

from collections.abc import Callable

from mergeserve.runtime.dynamic import DynamicMerger
from mergeserve.service.served_set import ServedSet


class Publisher:
    """Holds the current `ServedSet`. Readers take `current` (one attribute read, no
    lock); a change publishes a complete new set: the dynamic merger's state first, so a
    request that resolves a dynamic model in the new catalog routes over the new experts,
    then the set, then the subscribers (from the changing thread)."""

    def __init__(self, first: ServedSet, merger: Callable[[], DynamicMerger | None]) -> None:
        self._current = first
        self._merger = merger
        self._subscribers: list[Callable[[ServedSet], None]] = []

    @property
    def current(self) -> ServedSet:
        return self._current

    def subscribe(self, fn: Callable[[ServedSet], None]) -> None:
        """Call `fn(served)` after each published change."""
        self._subscribers.append(fn)

    def publish(self, new: ServedSet) -> None:
        merger = self._merger()
        if new.dynamic is not None and merger is not None:
            merger.publish(new.dynamic)
        self._current = new
        for fn in self._subscribers:
            fn(new)

    def advance(self, new: ServedSet) -> None:
        """Take `new`, which serves what `current` does (only its registry version
        moved), without telling anyone."""
        self._current = new
