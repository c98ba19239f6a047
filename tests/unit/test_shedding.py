"""Admission: the concurrency limit, fed TTFTs on a clock the test moves and by a small
queueing model of an engine whose TTFT grows with the requests it serves at once; the
admission queue on a real event loop."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from mergeserve.config import ServerSettings
from mergeserve.errors import EngineOverloadedError
from mergeserve.server.shedding import MAX_RETRY_AFTER_S, Admission, ConcurrencyLimit


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_cold_server_admits_a_few_not_the_whole_burst() -> None:
    s = ConcurrencyLimit(1.0, max_limit=256, clock=Clock())
    assert s.limit == 4
    assert s.queue_wait(1) is None  # nothing has finished: no estimate yet
    assert ConcurrencyLimit(1.0, max_limit=2, clock=Clock()).limit == 2


def test_slow_start_doubles_per_round_then_grows_by_one_per_round() -> None:
    clock = Clock()
    s = ConcurrencyLimit(1.0, max_limit=256, clock=clock)
    for _ in range(4):  # a round at the limit, every first token within the budget
        s.first_token(0.2, in_flight=4)
    assert s.limit == 8
    for _ in range(8):
        s.first_token(0.2, in_flight=8)
    assert s.limit == 16
    clock.t += 10
    s.first_token(1.5, in_flight=16)  # over the budget: x0.7, slow start ends
    assert s.limit == 11  # floor(16 * 0.7)
    for _ in range(11):  # one round at the limit: +1
        s.first_token(0.5, in_flight=11)
    assert s.limit == 12


def test_slow_start_ends_past_half_the_budget_without_a_cut() -> None:
    s = ConcurrencyLimit(1.0, max_limit=256, clock=Clock())
    for _ in range(4):
        s.first_token(0.2, in_flight=4)
    s.first_token(0.6, in_flight=8)  # within the budget, past half of it
    assert s.limit == 8  # 8 + 1/8
    for _ in range(8):
        s.first_token(0.3, in_flight=8)
    assert s.limit == 9  # one per round from here


def test_the_limit_only_grows_while_it_is_in_use_and_stays_within_max() -> None:
    s = ConcurrencyLimit(1.0, max_limit=6, clock=Clock())
    for _ in range(100):
        s.first_token(0.1, in_flight=1)  # light traffic says nothing about 4+ at once
    assert s.limit == 4
    for _ in range(100):
        s.first_token(0.1, in_flight=4)
    assert s.limit == 6


def test_one_cut_per_round_and_not_for_a_request_alone() -> None:
    clock = Clock()
    s = ConcurrencyLimit(1.0, max_limit=256, initial=20, clock=clock)
    clock.t += 10
    s.first_token(3.0, in_flight=20)  # admitted at t=107
    assert s.limit == 14
    # Others admitted before the cut report late: they were admitted under the old limit.
    s.first_token(3.5, in_flight=19)
    s.first_token(2.0, in_flight=18)
    assert s.limit == 14
    clock.t += 5  # admitted after the cut, still over the budget: another cut
    s.first_token(2.0, in_flight=14)
    assert s.limit == 9
    clock.t += 5
    s.first_token(4.0, in_flight=1)  # alone: its own long prefill, not a queue
    assert s.limit == 9
    for _ in range(50):
        clock.t += 5
        s.first_token(5.0, in_flight=2)
    assert s.limit == 1  # never below one


def test_the_queue_wait_is_the_time_for_those_ahead_to_finish() -> None:
    s = ConcurrencyLimit(1.0, max_limit=256, initial=10, clock=Clock())
    s.finished(4.0)
    s.first_token(0.5, in_flight=1)
    assert s.ttft_s == 0.5
    assert s.queue_wait(5) == pytest.approx(5 * 4.0 / 10)  # 10 finish per 4 s
    s.finished(9.0)  # a moving mean: 4 + 0.2 * (9 - 4)
    assert s.queue_wait(10) == pytest.approx(5.0)


def test_bad_settings_and_non_finite_observations() -> None:
    with pytest.raises(ValueError, match="budget_s"):
        ConcurrencyLimit(float("nan"), max_limit=1)
    with pytest.raises(ValueError, match="max_limit"):
        ConcurrencyLimit(1.0, max_limit=0)
    with pytest.raises(ValueError, match="backoff"):
        ConcurrencyLimit(1.0, max_limit=1, backoff=1.0)
    s = ConcurrencyLimit(1.0, max_limit=8, clock=Clock())
    s.first_token(float("nan"), in_flight=4)
    s.first_token(float("inf"), in_flight=4)
    s.first_token(-1.0, in_flight=4)
    s.finished(float("inf"))
    assert s.limit == 4
    assert s.ttft_s is None
    assert s.queue_wait(1) is None


def simulate(budget_s: float, seconds: float, clients: int = 200) -> tuple[list[float], int, float]:
    """A closed loop of `clients` against an engine that serves `n` requests at once with
    a TTFT of 0.25 s + 0.06 s * n and 16 more tokens at 0.05 s + 0.01 s * n each (about
    2 CPU cores and a 135M model); a shed client waits its Retry-After. Returns the
    accepted requests' TTFTs, the number shed and the mean number served at once."""
    clock = Clock()
    s = ConcurrencyLimit(budget_s, max_limit=256, clock=clock)
    dt = 0.01
    running: list[list[float]] = []  # [admitted at, first token at (or inf), ends at]
    wake = [clock.t] * clients
    owner: list[int] = []
    ttfts: list[float] = []
    shed, busy, steps = 0, 0, 0
    end = clock.t + seconds
    while clock.t < end:
        n = len(running)
        for i in range(clients):
            if wake[i] <= clock.t and i not in owner:
                if len(running) < s.limit:
                    ttft = 0.25 + 0.06 * (n + 1)
                    running.append([clock.t, clock.t + ttft, math.inf])
                    owner.append(i)
                else:  # refused (as Admission does when the queue wait is too long)
                    shed += 1
                    wake[i] = clock.t + max(1, math.ceil(s.queue_wait(1) or 1))
        clock.t += dt
        busy, steps = busy + len(running), steps + 1
        for j in range(len(running) - 1, -1, -1):
            r = running[j]
            if r[2] == math.inf and clock.t >= r[1]:
                s.first_token(clock.t - r[0], len(running))
                ttfts.append(clock.t - r[0])
                r[2] = clock.t + 16 * (0.05 + 0.01 * len(running))
            elif clock.t >= r[2]:
                s.finished(clock.t - r[0])
                wake[owner[j]] = clock.t
                del running[j], owner[j]
    return ttfts, shed, busy / steps


@pytest.mark.parametrize("budget_s", [0.5, 1.0, 2.0])
def test_under_overload_accepted_ttfts_stay_near_the_budget(budget_s: float) -> None:
    ttfts, shed, concurrency = simulate(budget_s, seconds=60)
    assert shed > 0
    assert len(ttfts) > 50
    p99 = sorted(ttfts)[int(0.99 * (len(ttfts) - 1))]
    # Within the budget, give or take a round's overshoot (TTFT reports lag admission).
    assert p99 <= 1.5 * budget_s
    # ... and not by starving the engine: it serves at least half the concurrency the
    # budget allows (n with 0.25 + 0.06 n <= budget).
    assert concurrency >= 0.5 * (budget_s - 0.25) / 0.06


async def test_admission_queues_first_come_first_served_and_hands_slots_over() -> None:
    limiter = ConcurrencyLimit(1.0, max_limit=10, initial=2)
    limiter.finished(0.5)  # requests take 0.5 s: three queued wait ~0.75 s, within budget
    a = Admission(10, 1.0, limiter)
    await a.acquire()
    await a.acquire()
    assert (a.in_flight, a.queued) == (2, 0)
    order: list[int] = []

    async def waiter(i: int) -> None:
        await a.acquire()
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert (a.in_flight, a.queued, order) == (2, 3, [])
    a.release()  # the slot goes to the first in the queue, not to a newcomer
    await asyncio.sleep(0.01)
    assert (a.in_flight, a.queued, order) == (2, 2, [0])
    a.first_token(0.1)  # a fast first token with the limit in use: slow start, limit 3
    await asyncio.sleep(0.01)
    assert (a.limit, a.in_flight, a.queued, order) == (3, 3, 1, [0, 1])
    for _ in range(3):
        a.release()
    await asyncio.gather(*tasks)
    assert (a.in_flight, a.queued, order) == (1, 0, [0, 1, 2])


async def test_a_queued_request_is_refused_after_the_budget_and_a_cancelled_one_leaves() -> None:
    limiter = ConcurrencyLimit(0.2, max_limit=10, initial=1)
    limiter.finished(0.05)  # the estimate says a slot comes soon; this time it does not
    a = Admission(10, 0.2, limiter)
    await a.acquire()
    t0 = time.perf_counter()
    with pytest.raises(EngineOverloadedError, match=r"waited 0\.2 s in the queue") as e:
        await a.acquire()
    assert 0.15 < time.perf_counter() - t0 < 1.0
    assert e.value.retry_after == 1
    assert (a.in_flight, a.queued) == (1, 0)
    queued = asyncio.create_task(a.acquire())
    await asyncio.sleep(0.01)
    assert a.queued == 1
    queued.cancel()  # the client went away while it waited
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert (a.in_flight, a.queued) == (1, 0)
    a.release()
    assert a.in_flight == 0


async def test_over_the_expected_wait_the_refusal_is_at_once_with_retry_after() -> None:
    limiter = ConcurrencyLimit(1.0, max_limit=10, initial=2)
    limiter.finished(3.0)  # requests take 3 s: the next slot in ~1.5 s, over the budget
    a = Admission(10, 1.0, limiter)
    await a.acquire()
    await a.acquire()
    t0 = time.perf_counter()
    with pytest.raises(EngineOverloadedError, match=r"would wait about 1\.5 s") as e:
        await a.acquire()
    assert time.perf_counter() - t0 < 0.1
    assert e.value.retry_after == 2
    assert (a.in_flight, a.queued) == (2, 0)


async def test_a_cold_server_queues_one_round_of_a_crowd_and_refuses_the_rest() -> None:
    clock = Clock()
    limiter = ConcurrencyLimit(1.0, max_limit=256, initial=2, clock=clock)
    a = Admission(256, 1.0, limiter, clock=clock)
    await a.acquire()
    await a.acquire()  # the limit (2) admitted
    queued = [asyncio.create_task(a.acquire()) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert (a.in_flight, a.queued) == (2, 2)  # one round queues (nothing measured yet) ...
    retries = []
    for _ in range(6):  # ... the rest of the crowd is refused at once, in a line
        with pytest.raises(EngineOverloadedError, match="would wait") as e:
            await a.acquire()
        retries.append(e.value.retry_after)
    assert (a.in_flight, a.queued) == (2, 2)
    assert retries == sorted(retries)
    assert retries[0] >= 2  # behind the two queued and the one in front: 1.5 s -> 2
    assert retries[-1] > retries[0]  # later ones are told later, not all the same second
    a.release()
    a.release()
    await asyncio.gather(*queued)
    assert (a.in_flight, a.queued) == (2, 0)
    a.finished(0.2)  # measured now: requests take 0.2 s, and that estimate takes over
    clock.t += 60  # the refused clients' retry times have passed
    more = [asyncio.create_task(a.acquire()) for _ in range(8)]
    await asyncio.sleep(0.01)
    assert a.queued == 8  # 8 * 0.2 s / 2 = 0.8 s of waiting: within the budget
    for _ in range(10):
        a.release()
    await asyncio.gather(*more)


async def test_the_hard_cap_counts_queued_requests_and_budget_zero_never_queues() -> None:
    a = Admission(2, 0.0)
    assert a.limit == 2
    await a.acquire()
    await a.acquire()
    with pytest.raises(EngineOverloadedError, match=r"2 requests in flight or queued \(limit 2\)"):
        await a.acquire()
    assert (a.in_flight, a.queued) == (2, 0)
    a.release()
    a.release()
    measured = ConcurrencyLimit(5.0, max_limit=3, initial=1)
    measured.finished(1.0)  # requests take 1 s: two queued wait ~2 s, within the budget
    b = Admission(3, 5.0, measured)
    await b.acquire()
    waiting = [asyncio.create_task(b.acquire()) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert (b.in_flight, b.queued) == (1, 2)
    with pytest.raises(EngineOverloadedError, match="limit 3"):
        await b.acquire()  # 1 in flight + 2 queued: the cap
    b.release()
    await waiting[0]
    b.release()
    await waiting[1]
    assert (b.in_flight, b.queued) == (1, 0)


async def test_refused_clients_form_a_virtual_line_that_spreads_their_retries() -> None:
    clock = Clock()
    limiter = ConcurrencyLimit(1.0, max_limit=10, initial=2, clock=clock)
    limiter.finished(3.0)  # 2 at a time, 3 s each: a slot every 1.5 s
    a = Admission(10, 1.0, limiter, clock=clock)
    await a.acquire()
    await a.acquire()
    retries = []
    for _ in range(4):
        with pytest.raises(EngineOverloadedError) as e:
            await a.acquire()
        assert e.value.retry_after is not None
        retries.append(e.value.retry_after)
    # Each refused client waits behind those refused before it: 1.5, 3, 4.5, 6 s.
    assert retries == [2, 3, 5, 6]
    clock.t += 2.5  # the first has come back (or not): the line is 3 long
    with pytest.raises(EngineOverloadedError, match="3 refused lately") as e:
        await a.acquire()
    assert e.value.retry_after == 6  # 4 * 1.5
    clock.t += 100
    with pytest.raises(EngineOverloadedError) as e:
        await a.acquire()
    assert e.value.retry_after == 2


def test_idle_connections_outlive_the_longest_retry_after() -> None:
    # A client that waits as told and reuses its keep-alive connection must find it open.
    assert ServerSettings().keep_alive_s > MAX_RETRY_AFTER_S
