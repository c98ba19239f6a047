"""Load shedding's estimate of a new request's wait, on a clock the test moves."""

from __future__ import annotations

import pytest

from mergeserve.server.shedding import LoadShedder


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_nothing_is_shed_while_the_engine_has_free_sequences_or_nothing_is_known() -> None:
    s = LoadShedder(1.0, capacity=4, clock=Clock())
    assert s.check(1000) is None  # no finished request yet: no service time to go on
    s.first_token(0.1)
    s.observe(2.0)
    assert s.check(3) is None  # a fourth sequence fits
    assert s.expected_wait(3) == 0.0


def test_the_wait_grows_with_the_queue_and_is_refused_over_the_budget() -> None:
    clock = Clock()
    s = LoadShedder(2.0, capacity=4, clock=clock)
    s.first_token(0.1)
    s.observe(2.0)  # S = 2 s, prefill 0.1 s
    # 4 in flight: the next starts when one of 4 finishes, ~S/4 = 0.5 s, + prefill
    assert s.expected_wait(4) == pytest.approx(0.6)
    assert s.check(4) is None
    # 10 in flight: 7 must finish first: 7 * 2 / 4 = 3.5 s + 0.1 > 2 s
    shed = s.check(10)
    assert shed is not None
    assert shed.expected_wait_s == pytest.approx(3.6)
    assert shed.retry_after_s == 2  # ceil(3.6 - 2)


def test_service_time_is_a_moving_average_and_old_ttfts_expire() -> None:
    clock = Clock()
    s = LoadShedder(1.0, capacity=1, alpha=0.5, window_s=5.0, clock=clock)
    s.first_token(0.0)
    s.observe(1.0)
    s.first_token(0.0)
    s.observe(3.0)  # S = 1 + 0.5 * (3 - 1) = 2
    assert s.expected_wait(1) == pytest.approx(2.0)
    # What clients saw lately bounds the estimate from below while requests queue ...
    s.first_token(9.0)
    assert s.expected_wait(1) == pytest.approx(3.0)  # mean of 0, 0, 9
    assert s.expected_wait(0) == 0.0  # ... never when a sequence is free
    clock.t += 6.0  # ... and only lately
    assert s.expected_wait(1) == pytest.approx(2.0)


def test_retry_after_is_bounded_and_budget_zero_is_off() -> None:
    s = LoadShedder(0.5, capacity=1, clock=Clock())
    s.first_token(0.0)
    s.observe(100.0)
    shed = s.check(50)
    assert shed is not None
    assert shed.retry_after_s == 60
    off = LoadShedder(0.0, capacity=1, clock=Clock())
    off.first_token(0.0)
    off.observe(100.0)
    assert not off.enabled
    assert off.check(50) is None


def test_bad_settings_and_non_finite_observations() -> None:
    with pytest.raises(ValueError, match="budget_s"):
        LoadShedder(float("nan"), capacity=1)
    with pytest.raises(ValueError, match="capacity"):
        LoadShedder(1.0, capacity=0)
    s = LoadShedder(1.0, capacity=1, clock=Clock())
    s.observe(float("inf"))
    s.first_token(float("nan"))
    assert s.check(10) is None  # nothing usable was observed
