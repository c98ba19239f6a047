"""Bootstrap intervals and verdicts of `mergeserve ab-report`."""

from __future__ import annotations

import random

import pytest

from mergeserve.tasks.ab_report import (
    feedback_scores,
    independent_bootstrap,
    paired_bootstrap,
    trimmed_mean,
    verdict,
)


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


def test_feedback_scores_drop_what_the_server_would_refuse() -> None:
    records = [
        {"arm": "a", "score": 1},
        {"choice": "b", "arm": "dynamic:exact", "score": 0.5},  # by the experiment's name
        {"arm": "a", "score": 1e300},  # outside SCORE_RANGE
        {"arm": "a", "score": float("nan")},
        {"arm": "a", "score": True},  # not a number, whatever Python says
        {"arm": "a", "score": "1"},
        {"score": 1.0},  # no arm
    ]
    scores, dropped = feedback_scores(records, ["a", "b"])
    assert scores == {"a": [1.0], "b": [0.5]}
    assert dropped == 5


def test_a_few_extreme_scores_cannot_make_a_winner_unnoticed() -> None:
    """Both arms score alike except ten maximal scores on b (of 300): b's mean wins
    clearly, its trimmed mean does not."""
    rng = random.Random(2)
    a = [float(rng.random() < 0.5) for _ in range(300)]
    b = [float(rng.random() < 0.5) for _ in range(290)] + [100.0] * 10
    assert trimmed_mean([0.0] * 18 + [100.0, 100.0]) == 0.0  # 10% off each end
    each, diffs = independent_bootstrap({"a": a, "b": b}, boot=500)
    assert "**`b` is better**" in verdict(each, diffs, "Feedback", "score")
    t_each, t_diffs = independent_bootstrap({"a": a, "b": b}, boot=500, stat=trimmed_mean)
    assert "no clear winner" in verdict(t_each, t_diffs, "Feedback", "score")
