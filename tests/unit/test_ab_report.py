"""Bootstrap intervals and verdicts of `mergeserve ab-report`."""

from __future__ import annotations

import random

import pytest

from mergeserve.tasks.ab_report import independent_bootstrap, paired_bootstrap, verdict


def outcomes(rates: dict[str, float], n: int = 100, seed: int = 0) -> dict:
    rng = random.Random(seed)
    base = [rng.random() for _ in range(2 * n)]  # shared difficulty: a paired design
    return {
        a: {"t1": [u < r for u in base[:n]], "t2": [u < r for u in base[n:]]}
        for a, r in rates.items()
    }


def test_identical_arms_differ_by_exactly_zero() -> None:
    o = outcomes({"a": 0.6})
    o["b"] = o["a"]
    each, diffs = paired_bootstrap(o, ["a", "b"], boot=300)
    d = diffs[("a", "b")]
    assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0)
    assert each["a"].low <= each["a"].value <= each["a"].high
    assert "no clear winner" in verdict(each, diffs, "Offline", "points")


def test_a_clear_gap_is_called_and_a_small_one_is_not() -> None:
    each, diffs = paired_bootstrap(outcomes({"good": 0.9, "bad": 0.5}), ["good", "bad"], 500)
    assert diffs[("good", "bad")].low > 0.25
    v = verdict(each, diffs, "Offline", "points")
    assert "**`good` is better**" in v
    d = diffs[("good", "bad")]
    assert (
        f"`good` − `bad` = {100 * d.value:.1f} [{100 * d.low:.1f}, {100 * d.high:.1f}] points" in v
    )
    each, diffs = paired_bootstrap(outcomes({"x": 0.52, "y": 0.50}, n=30, seed=3), ["x", "y"], 500)
    assert not diffs[("x", "y")].excludes_zero()
    assert "no clear winner" in verdict(each, diffs, "Offline", "points")


def test_paired_intervals_are_narrower_than_the_arms_own() -> None:
    """Pairing removes the shared difficulty: the difference is known better than either."""
    each, diffs = paired_bootstrap(outcomes({"a": 0.7, "b": 0.6}), ["a", "b"], 800)
    width = lambda i: i.high - i.low  # noqa: E731
    assert width(diffs[("a", "b")]) < width(each["a"])


def test_independent_bootstrap_on_feedback_scores() -> None:
    rng = random.Random(1)
    scores = {
        "a": [float(rng.random() < 0.8) for _ in range(200)],
        "b": [float(rng.random() < 0.4) for _ in range(200)],
        "c": [],
    }
    each, diffs = independent_bootstrap(scores, boot=500)
    assert set(each) == {"a", "b"}  # an arm without feedback has no estimate
    assert each["a"].value == pytest.approx(sum(scores["a"]) / 200)
    assert diffs[("a", "b")].excludes_zero()
    assert "**`a` is better**" in verdict(each, diffs, "Feedback", "score")
    one, none = independent_bootstrap({"a": [1.0]}, boot=50)
    assert "one arm only" in verdict(one, none, "Feedback", "score")
