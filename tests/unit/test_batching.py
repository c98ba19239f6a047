"""MicroBatcher: requests that arrive during a batch go together in the next one."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mergeserve.runtime.batching import MicroBatcher


class Doubler:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.threads: set[str] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        assert self.gate.wait(10)
        if any(x < 0 for x in items):
            raise ValueError("negative")
        return [2 * x for x in items]


async def test_idle_request_runs_alone_and_busy_ones_batch() -> None:
    fn = Doubler()
    sizes: list[int] = []
    b = MicroBatcher(fn, max_batch=3, on_batch=lambda n, s: sizes.append(n))
    assert await b.submit(1) == 2
    fn.gate.clear()
    first = asyncio.create_task(b.submit(10))
    await asyncio.sleep(0.05)  # the batch [10] is running, held at the gate
    rest = [asyncio.create_task(b.submit(i)) for i in range(5)]
    await asyncio.sleep(0.05)
    assert not first.done()  # the event loop was free meanwhile
    fn.gate.set()
    assert await first == 20
    assert [await t for t in rest] == [0, 2, 4, 6, 8]
    assert fn.batches == [[1], [10], [0, 1, 2], [3, 4]]
    assert sizes == [1, 1, 3, 2]
    assert all(name.startswith("batcher") for name in fn.threads)
    await b.close()


async def test_failure_reaches_its_batch_only() -> None:
    fn = Doubler()
    b = MicroBatcher(fn, max_batch=2)
    fn.gate.clear()
    blocker = asyncio.create_task(b.submit(0))
    await asyncio.sleep(0.05)
    bad = [asyncio.create_task(b.submit(x)) for x in (1, -1)]
    good = asyncio.create_task(b.submit(5))
    await asyncio.sleep(0.01)
    fn.gate.set()
    assert await blocker == 0
    for t in bad:
        with pytest.raises(ValueError, match="negative"):
            await t
    assert await good == 10
    await b.close()


async def test_cancelled_request_is_dropped_from_a_batch_not_started() -> None:
    fn = Doubler()
    b = MicroBatcher(fn, max_batch=8)
    fn.gate.clear()
    blocker = asyncio.create_task(b.submit(0))
    await asyncio.sleep(0.05)
    gone = asyncio.create_task(b.submit(7))
    kept = asyncio.create_task(b.submit(8))
    await asyncio.sleep(0.01)
    gone.cancel()
    fn.gate.set()
    assert (await blocker, await kept) == (0, 16)
    assert fn.batches == [[0], [8]]
    await b.close()
    with pytest.raises(RuntimeError, match="closed"):
        await b.submit(1)


async def test_wrong_result_count_is_an_error() -> None:
    gate = threading.Event()

    def one_result(items: list[int]) -> list[int]:
        assert gate.wait(10)
        return [1]

    b: MicroBatcher[int, int] = MicroBatcher(one_result)
    first = asyncio.create_task(b.submit(0))
    await asyncio.sleep(0.05)
    pair = [asyncio.create_task(b.submit(x)) for x in (1, 2)]
    await asyncio.sleep(0.01)
    gate.set()
    assert await first == 1  # a batch of one: one result is right
    for t in pair:
        with pytest.raises(RuntimeError, match="1 results for 2 items"):
            await t
    await b.close()
