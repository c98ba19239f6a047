"""LoRASlots: distinct adapters in flight never exceed the engine's slots, pinned included
(vLLM's scheduler does not count a pinned adapter's slot; overflowing it kills the engine)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from mergeserve.runtime.engine import LoRASlots


async def _blocked(coro: Awaitable[None]) -> bool:
    """Whether `coro` is still waiting after the loop has run everything it can."""
    task = asyncio.ensure_future(coro)
    for _ in range(5):
        await asyncio.sleep(0)
    done = task.done()
    if not done:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    return not done


async def test_distinct_adapters_wait_for_a_free_slot() -> None:
    slots = LoRASlots(2)
    await slots.acquire(1)
    await slots.acquire(1)  # the same adapter shares its slot
    await slots.acquire(2)
    assert slots.free == 0
    assert await _blocked(slots.acquire(3))
    slots.release(1)
    assert await _blocked(slots.acquire(3))  # adapter 1 still has a request
    waiter = asyncio.ensure_future(slots.acquire(3))
    await asyncio.sleep(0)
    assert not waiter.done()
    slots.release(1)
    await asyncio.wait_for(waiter, 1)
    assert set(slots.in_flight) == {2, 3}
    await slots.acquire(2)  # in flight: never waits


async def test_a_pinned_adapter_takes_a_slot_and_never_waits() -> None:
    slots = LoRASlots(3)
    await slots.pin(9)
    assert slots.free == 2
    await slots.acquire(1)
    await slots.acquire(2)
    assert await _blocked(slots.acquire(3))  # 2 unpinned + the pinned one: full
    await slots.acquire(9)  # the pinned adapter's requests go through
    slots.release(9)
    assert slots.pinned == {9}
    slots.unpin(9)
    await asyncio.wait_for(slots.acquire(3), 1)  # its slot is free again


async def test_pinning_waits_for_room_and_never_takes_the_last_slot() -> None:
    slots = LoRASlots(3)
    await slots.acquire(1)
    await slots.acquire(2)
    assert await _blocked(slots.pin(9))  # would leave 2 in flight in 1 slot
    await slots.pin(2)  # already in flight: it keeps its slot, now for good
    assert slots.free == 1
    with pytest.raises(RuntimeError, match="no LoRA slot to pin in"):
        await LoRASlots(1).pin(1)
    with pytest.raises(ValueError, match="slots"):
        LoRASlots(0)
