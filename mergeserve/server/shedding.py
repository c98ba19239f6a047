"""Load shedding: refuse a request at once when it would wait longer than a time budget.

A request the engine cannot start waits in vLLM's queue. Past a point that wait is worse
than a refusal: the client (or its balancer) could have gone to another replica, and a
two-minute TTFT is a failure anyway. So before a request is admitted the server
estimates how long it would wait for its first token and, over the budget, answers 503
with `Retry-After` at once (`EngineOverloadedError`), having done no work for it.

The estimate treats the engine as `capacity` servers (vLLM runs up to `max_num_seqs`
sequences at once). With `pending` requests in flight, a new one starts when
`pending - capacity + 1` of them have finished; each running one takes about `S` (time
from its first token to its end, an exponentially weighted mean over recent requests),
so it waits about

    (pending - capacity + 1) * S / capacity + P

where `P` is the prefill time (the smallest TTFT seen lately: a request that did not
wait). The estimate is also held to what the clients see: while requests are queued, the
mean TTFT of the requests that got their first token in the last `window_s` is a lower
bound of it (a model of the engine that is too hopeful is corrected by the queue it let
grow). Without any finished request yet there is no `S`, and nothing is shed on the
estimate (the hard cap `max_pending_requests` still holds).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ShedDecision:
    expected_wait_s: float
    """The estimated wait of a request admitted now, seconds."""
    retry_after_s: int
    """Seconds after which the estimate falls within the budget (at least 1)."""


class LoadShedder:
    """Decides, per request, whether its expected wait is within `budget_s`.

    `first_token` is called with each request's TTFT as its first token comes, `observe`
    with its decode time when it ends; `check` with the requests in flight before
    admitting the next one. `budget_s` of 0 turns it off.
    Not thread-safe: the server calls it from the event loop only.
    """

    def __init__(
        self,
        budget_s: float,
        capacity: int,
        *,
        window_s: float = 5.0,
        alpha: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ):
        if budget_s < 0 or not math.isfinite(budget_s):
            raise ValueError(f"budget_s must be finite and >= 0, got {budget_s}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.budget_s = budget_s
        self.capacity = capacity
        self.window_s = window_s
        self.alpha = alpha
        self._clock = clock
        self._service_s: float | None = None
        self._ttfts: deque[tuple[float, float]] = deque()  # (when, ttft)

    @property
    def enabled(self) -> bool:
        return self.budget_s > 0

    def observe(self, decode_s: float) -> None:
        """A request finished, `decode_s` after its first token (its TTFT was given to
        `first_token` then)."""
        if not math.isfinite(decode_s):
            return
        decode_s = max(0.0, decode_s)
        s = self._service_s
        self._service_s = decode_s if s is None else s + self.alpha * (decode_s - s)

    def first_token(self, ttft_s: float) -> None:
        """A request got its first token (streamed or not) after `ttft_s`: what queued
        requests see now, before they finish."""
        if math.isfinite(ttft_s):
            self._ttfts.append((self._clock(), max(0.0, ttft_s)))
            self._trim()

    def _trim(self) -> None:
        horizon = self._clock() - self.window_s
        while self._ttfts and self._ttfts[0][0] < horizon:
            self._ttfts.popleft()
        while len(self._ttfts) > 4096:
            self._ttfts.popleft()

    def expected_wait(self, pending: int) -> float:
        """Estimated seconds to the first token of a request admitted with `pending`
        others in flight (0 while the engine has free sequences or nothing is known)."""
        self._trim()
        if pending < self.capacity or self._service_s is None:
            return 0.0
        prefill = min((t for _, t in self._ttfts), default=0.0)
        model = (pending - self.capacity + 1) * self._service_s / self.capacity + prefill
        seen = sum(t for _, t in self._ttfts) / len(self._ttfts) if self._ttfts else 0.0
        return max(model, seen)

    def check(self, pending: int) -> ShedDecision | None:
        """None to admit; a `ShedDecision` to refuse (expected wait over the budget)."""
        if not self.enabled:
            return None
        wait = self.expected_wait(pending)
        if wait <= self.budget_s:
            return None
        return ShedDecision(wait, max(1, min(60, math.ceil(wait - self.budget_s))))
