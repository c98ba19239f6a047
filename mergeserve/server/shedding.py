"""Admission: a measured concurrency limit, a short queue, and a quick 503 past a budget.

A request the engine cannot serve promptly waits, in vLLM's queue or in a batch so large
that every step is slow. Past a point that wait is worse than a refusal: the client (or
its balancer) could have gone to another replica, and a two-minute time to the first
token (TTFT) is a failure anyway. So every request passes `Admission.acquire` before any
work is done for it (template, tokenizer, routing, engine):

- up to `limit` requests are *in flight* (admitted, not yet finished);
- over it, a request *queues* (first come, first served), if its expected wait plus the
  TTFT the engine gives lately is within the budget `budget_s`; a request whose wait in
  the queue passes that budget after all leaves it with the same 503;
- otherwise it is refused at once: 503 `overloaded_error` with `Retry-After`, the time
  for the requests ahead of it to finish (the mean request time lately times their
  number, over the limit; 1 to 60 s). `max_in_flight` + as many queued is a hard cap.

Those ahead of a refused request include the clients refused before it that have not
come back yet: each was told a time, and counts until then. So under a crowd the
refusals form a virtual line, Retry-After grows with it and spreads the retries over
time at the rate slots free up, instead of every refused client coming back after 1 s
to be refused again (a crowd of 200 on 2 cores did that ~150 times a second, and the
503s alone took CPU the engine needed).

The limit is measured, not configured, because what the engine can take depends on the
hardware, the prompts and the adapters: vLLM's `max_num_seqs` is a batch bound, not a
promise about latency (on 2 CPU cores 64 concurrent sequences give TTFTs of 4-6 s where
one alone takes 0.25 s). `ConcurrencyLimit` follows the TTFT each admitted request saw
from its admission, as TCP's congestion window follows losses (additive increase,
multiplicative decrease; Netflix's `concurrency-limits` and Envoy's adaptive concurrency
filter do the same for RPCs):

- it starts small (`initial`), so a burst at a cold server is not admitted whole before
  anything has been measured; until a request has finished, a request is assumed to take
  the budget, so one round of the burst (the limit) queues and the rest is refused;
- a first token within the budget, while the limit was in use (at least half of it in
  flight), raises it: by 1 ("slow start", doubling per round) until a TTFT passes half
  the budget (TTFT reports lag admissions by a round, so doubling up to the budget itself
  would overshoot it by up to 2x; TCP's HyStart leaves slow start on rising delay the
  same way) or the first overrun, then by 1/limit (one per round);
- a first token over the budget lowers it to `backoff` times itself, once per round: only
  a request admitted after the last decrease can lower it again (the others were admitted
  under the old limit and say nothing about the new one). A request alone in flight does
  not lower it: its TTFT is its own prefill, which no shedding shortens.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections import deque
from collections.abc import Callable

from mergeserve.errors import EngineOverloadedError

MAX_RETRY_AFTER_S = 60
"""The longest Retry-After given (the openai SDK honours up to 60 s)."""


class ConcurrencyLimit:
    """How many requests may be in flight for their first tokens to come within
    `budget_s`, from the TTFTs of those admitted (see the module's docstring).

    `limit` is read before admitting a request (`Admission` does); `first_token(ttft,
    in_flight)` is called as each admitted request's first token comes (`ttft` from its
    admission), `finished(latency)` when one ends; `queue_wait` and `ttft_s` estimate a
    refused or queued request's wait. `budget_s` of 0 turns it off (no limit). Not
    thread-safe.
    """

    def __init__(
        self,
        budget_s: float,
        max_limit: int,
        *,
        initial: int = 4,
        backoff: float = 0.7,
        alpha: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ):
        if budget_s < 0 or not math.isfinite(budget_s):
            raise ValueError(f"budget_s must be finite and >= 0, got {budget_s}")
        if max_limit < 1:
            raise ValueError(f"max_limit must be >= 1, got {max_limit}")
        if initial < 1:
            raise ValueError(f"initial must be >= 1, got {initial}")
        if not 0 < backoff < 1:
            raise ValueError(f"backoff must be in (0, 1), got {backoff}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.budget_s = budget_s
        self.max_limit = max_limit
        self.backoff = backoff
        self.alpha = alpha
        self._clock = clock
        self._limit = float(min(initial, max_limit))
        self._slow_start = True
        self._last_cut = -math.inf
        self._ttft: float | None = None  # moving means, for the estimates in a refusal
        self._latency: float | None = None

    @property
    def enabled(self) -> bool:
        return self.budget_s > 0

    @property
    def limit(self) -> int:
        """Requests admitted at once now."""
        return max(1, math.floor(self._limit))

    def _mean(self, old: float | None, x: float) -> float:
        return x if old is None else old + self.alpha * (x - old)

    def first_token(self, ttft_s: float, in_flight: int) -> None:
        """A request admitted `ttft_s` ago got its first token, with `in_flight` requests
        (itself included) admitted now."""
        if not math.isfinite(ttft_s) or ttft_s < 0:
            return
        self._ttft = self._mean(self._ttft, ttft_s)
        if ttft_s > self.budget_s:
            now = self._clock()
            if in_flight > 1 and now - ttft_s > self._last_cut:  # admitted after the cut
                self._limit = max(1.0, self._limit * self.backoff)
                self._last_cut = now
                self._slow_start = False
        elif in_flight >= self._limit / 2:
            if ttft_s > self.budget_s / 2:
                self._slow_start = False  # close to the budget: feel the way from here
            self._limit += 1.0 if self._slow_start else 1.0 / self._limit
            self._limit = min(self._limit, float(self.max_limit))

    def finished(self, latency_s: float) -> None:
        """An admitted request ended, `latency_s` after it was admitted."""
        if math.isfinite(latency_s) and latency_s >= 0:
            self._latency = self._mean(self._latency, latency_s)

    @property
    def ttft_s(self) -> float | None:
        """The mean TTFT from admission lately (None before any)."""
        return self._ttft

    def queue_wait(self, position: int) -> float | None:
        """Seconds until the `position`-th request in the queue (1: the next) gets a slot
        while the limit is in use: `position` requests must finish, `limit` at a time,
        each taking the mean request time lately. None before any request finished."""
        if self._latency is None:
            return None
        return position * self._latency / self.limit


class Admission:
    """The gate every request passes before any work is done for it: admitted (in
    flight), queued, or refused with `EngineOverloadedError` (503, `Retry-After`); see the
    module's docstring. `budget_s` of 0: no limit, no queue, only the hard cap of
    `max_in_flight`. Call `release` once per admitted request, `first_token` and
    `finished` with its times from admission. Event-loop only.
    """

    def __init__(
        self,
        max_in_flight: int,
        budget_s: float,
        limiter: ConcurrencyLimit | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_in_flight = max_in_flight
        self.budget_s = budget_s
        self.limiter = limiter or ConcurrencyLimit(budget_s, max_in_flight, clock=clock)
        self.in_flight = 0
        self._queue: deque[asyncio.Future[None]] = deque()
        self._clock = clock
        self._told: list[float] = []  # a heap: when refused clients were told to retry

    def _crowd(self) -> int:
        """Refused clients whose Retry-After has not passed yet."""
        now = self._clock()
        while self._told and self._told[0] <= now:
            heapq.heappop(self._told)
        return len(self._told)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def limit(self) -> int:
        """Requests in flight at once now (`max_in_flight` with shedding off)."""
        return self.limiter.limit if self.limiter.enabled else self.max_in_flight

    async def acquire(self) -> None:
        """Return once admitted, or raise `EngineOverloadedError` (at once, or when the
        wait in the queue passes the budget). A cancellation while queued leaves the
        queue holding nothing."""
        if self.in_flight + len(self._queue) >= self.max_in_flight:
            raise EngineOverloadedError(
                f"{self.in_flight + len(self._queue)} requests in flight or queued (limit "
                f"{self.max_in_flight}); retry shortly",
                retry_after=1,
            )
        if not self._queue and self.in_flight < self.limit:
            self.in_flight += 1
            return
        ttft = self.limiter.ttft_s or 0.0
        position = len(self._queue) + self._crowd() + 1
        wait = self.limiter.queue_wait(position)
        if wait is None:
            # Nothing has finished yet (a cold server, a crowd arriving at once): no
            # request time measured. Take the budget as one, so one round (the limit)
            # queues and the rest are refused at once, in the virtual line; letting the
            # whole crowd queue put requests that waited out most of the budget into
            # the batches of a limit still growing (accepted TTFTs of 3x the budget).
            wait = position * self.budget_s / self.limit
        if wait + ttft > self.budget_s:
            raise self._overloaded(wait, ttft)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(fut)
        try:
            done, _ = await asyncio.wait({fut}, timeout=max(0.0, self.budget_s - ttft))
        except BaseException:  # cancelled while queued
            if not self._leave(fut):
                self.release()  # a slot was handed over just before: give it back
            raise
        if not done and self._leave(fut):
            raise self._overloaded(wait, ttft, waited=True)

    def _leave(self, fut: asyncio.Future[None]) -> bool:
        """Take `fut` out of the queue; False if it was given a slot already."""
        if fut.done() and not fut.cancelled():
            return False
        fut.cancel()
        self._queue.remove(fut)
        return True

    def _overloaded(
        self, wait: float, ttft: float, *, waited: bool = False
    ) -> EngineOverloadedError:
        ahead = (
            f"{self.in_flight} requests in flight (the limit now), {len(self._queue)} "
            f"queued, {len(self._told)} refused lately and told to retry later"
        )
        budget = f"its first-token budget of {self.budget_s:g} s"
        if waited:
            why = f"waited {self.budget_s - ttft:.1f} s in the queue without a slot; {budget}"
        else:
            why = f"a request now would wait about {wait + ttft:.1f} s, over {budget}"
        retry = max(1, min(MAX_RETRY_AFTER_S, math.ceil(wait)))
        if len(self._told) < 100_000:
            heapq.heappush(self._told, self._clock() + retry)
        return EngineOverloadedError(
            f"overloaded: {ahead}; {why}; retry in {retry} s", retry_after=retry
        )

    def release(self) -> None:
        """An admitted request ended (or was refused after its admission): its slot goes
        to the next in the queue."""
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._queue and self.in_flight < self.limit:
            self._queue.popleft().set_result(None)
            self.in_flight += 1

    def first_token(self, ttft_s: float) -> None:
        """An admitted request got its first token `ttft_s` after its admission."""
        self.limiter.first_token(ttft_s, self.in_flight)
        self._wake()

    def finished(self, latency_s: float) -> None:
        """An admitted request ended `latency_s` after its admission."""
        self.limiter.finished(latency_s)
