"""Micro-batching of blocking work (router embeddings) off the event loop.

`MicroBatcher(fn)` runs `fn(items) -> results` in one worker thread. Requests that arrive
while a batch is running wait and go together in the next one (up to `max_batch`), so an
idle server adds no delay and a busy one amortises the embedder's per-call cost over many
requests, without ever blocking the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Batches `submit(item)` calls into `fn(items)` on one worker thread.

    `fn` must return one result per item, in order. If it raises, every request of that
    batch gets the exception. A cancelled request is dropped from its batch if the batch
    has not started yet. Use from one event loop.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 32,
        name: str = "batcher",
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._fn = fn
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, item: T) -> R:
        if self._closed:
            raise RuntimeError("the batcher is closed")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch = [(x, f) for x, f in self._queue[: self._max_batch] if not f.done()]
            del self._queue[: self._max_batch]
            if not batch:
                continue
            items = [x for x, _ in batch]
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._fn, items)
                if len(results) != len(items):
                    raise RuntimeError(f"{len(results)} results for {len(items)} items")
            except Exception as e:
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            if self._on_batch is not None:
                self._on_batch(len(items), time.perf_counter() - t0)
            for (_, f), r in zip(batch, results, strict=True):
                if not f.done():
                    f.set_result(r)

    async def close(self) -> None:
        """Fail queued requests, wait for the running batch, stop the thread."""
        self._closed = True
        for _, f in self._queue:
            if not f.done():
                f.set_exception(RuntimeError("the batcher is closed"))
        self._queue.clear()
        if self._worker is not None:
            with contextlib.suppress(BaseException):
                await self._worker
        self._executor.shutdown(wait=True)
