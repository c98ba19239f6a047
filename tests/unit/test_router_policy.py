"""RoutingPolicy and MergeKey: temperature, top-k, floor, grid, entropy, explicit weights."""

from __future__ import annotations

import math

import pytest
import torch

from mergeserve.errors import InvalidRequestError
from mergeserve.router.policy import MergeKey, RoutingPolicy, entropy, round_to_grid

EXPERTS = ("add", "capital", "sentiment", "sort")


def _apply(policy: RoutingPolicy, row: list[float]) -> dict[str, float]:
    (r,) = policy.apply(EXPERTS, torch.tensor([row]))
    return r.key.as_dict()


def test_no_truncation_is_the_softmax() -> None:
    row = [1.0, 2.0, 0.5, -1.0]
    (r,) = RoutingPolicy(grid=None).apply(EXPERTS, torch.tensor([row]))
    want = torch.softmax(torch.tensor(row, dtype=torch.float64), 0).tolist()
    assert r.key.as_dict() == pytest.approx(dict(zip(EXPERTS, want, strict=True)))
    assert r.probs == pytest.approx(dict(zip(EXPERTS, want, strict=True)))
    assert r.entropy == pytest.approx(-sum(p * math.log(p) for p in want))
    assert r.key.top == "capital"


def test_temperature_sharpens_and_flattens() -> None:
    row = [1.0, 2.0, 0.0, 0.0]
    sharp = _apply(RoutingPolicy(temperature=0.01, grid=None), row)
    assert sharp["capital"] == pytest.approx(1.0)
    assert sum(sharp.values()) == pytest.approx(1.0)
    assert _apply(RoutingPolicy(temperature=0.01), row) == {"capital": 1.0}
    flat = _apply(RoutingPolicy(temperature=1e6, grid=None), row)
    assert flat == pytest.approx(dict.fromkeys(EXPERTS, 0.25), abs=1e-5)


def test_top_k_keeps_the_largest_and_renormalizes() -> None:
    w = _apply(RoutingPolicy(top_k=2, grid=None), [3.0, 2.0, 1.0, 0.0])
    p = torch.softmax(torch.tensor([3.0, 2.0], dtype=torch.float64), 0).tolist()
    assert w == pytest.approx({"add": p[0], "capital": p[1]})


def test_top_k_ties_go_to_the_earlier_expert() -> None:
    w = _apply(RoutingPolicy(top_k=1, grid=None), [1.0, 1.0, 1.0, 1.0])
    assert w == {"add": 1.0}


def test_floor_drops_small_weights_but_never_the_top() -> None:
    w = _apply(RoutingPolicy(floor=0.2, grid=None), [2.0, 1.9, 0.0, 0.0])
    assert set(w) == {"add", "capital"}
    assert sum(w.values()) == pytest.approx(1.0)
    only = _apply(RoutingPolicy(floor=0.9, grid=None), [0.0, 0.0, 0.0, 0.0])
    assert only == {"add": 1.0}


def test_grid_rounding_sums_to_one_and_repeats() -> None:
    policy = RoutingPolicy(grid=0.05)
    a = policy.apply(EXPERTS, torch.tensor([[2.0, 1.0, 0.0, -5.0]]))[0].key
    b = policy.apply(EXPERTS, torch.tensor([[2.001, 1.0, 0.0, -5.0]]))[0].key
    assert a == b
    assert hash(a) == hash(b)
    assert sum(a.as_dict().values()) == pytest.approx(1.0)
    for w in a.as_dict().values():
        assert round(w / 0.05) * 0.05 == pytest.approx(w)
    assert "sort" not in a.as_dict()  # rounded to zero: dropped from the key


def test_round_to_grid_largest_remainder() -> None:
    assert round_to_grid([1 / 3, 1 / 3, 1 / 3], 0.1) == pytest.approx([0.4, 0.3, 0.3])
    assert round_to_grid([0.26, 0.74], 0.5) == pytest.approx([0.5, 0.5])
    assert round_to_grid([2.0, 6.0], 0.25) == pytest.approx([0.25, 0.75])  # normalizes
    for bad in (0.0, -0.1, 0.3, 1.5):
        with pytest.raises(ValueError, match="grid"):
            round_to_grid([1.0], bad)


def test_minus_inf_excludes_an_expert() -> None:
    w = _apply(RoutingPolicy(grid=None), [0.0, -math.inf, 0.0, -math.inf])
    assert w == pytest.approx({"add": 0.5, "sentiment": 0.5})


@pytest.mark.parametrize(
    "logits",
    [[[math.nan, 0.0, 0.0, 0.0]], [[-math.inf] * 4], [[math.inf, 0.0, 0.0, 0.0]], [[0.0, 1.0]]],
)
def test_bad_logits_are_refused(logits: list[list[float]]) -> None:
    with pytest.raises(ValueError, match="logits"):
        RoutingPolicy().apply(EXPERTS, torch.tensor(logits))


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": 0.0}, {"temperature": math.inf}, {"top_k": 0}, {"floor": 1.0}, {"grid": 0.3}],
)
def test_bad_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RoutingPolicy(**kwargs)  # type: ignore[arg-type]


def test_entropy() -> None:
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert entropy(p).tolist() == pytest.approx([0.0, math.log(4)])


def test_merge_key_from_weights() -> None:
    key = MergeKey.from_weights({"sort": 3.0, "add": 1.0, "capital": 0.0}, EXPERTS)
    assert key.weights == (("add", 0.25), ("sort", 0.75))  # sorted, normalized, zeros gone
    assert key == MergeKey.from_weights({"add": 0.25, "sort": 0.75})
    assert key.top == "sort"
    assert key.experts == ("add", "sort")
    assert str(key) == "add=0.25,sort=0.75"
    rounded = MergeKey.from_weights({"add": 0.33, "sort": 0.67}, grid=0.1)
    assert rounded.as_dict() == pytest.approx({"add": 0.3, "sort": 0.7})


def test_merge_key_as_given_is_not_normalized() -> None:
    both = MergeKey.from_weights({"add": 1, "sort": 1}, EXPERTS, normalize=False)
    assert both.as_dict() == {"add": 1.0, "sort": 1.0}  # two skills at full strength
    assert both != MergeKey.from_weights({"add": 1, "sort": 1}, EXPERTS)
    half = MergeKey.from_weights({"add": 0.52, "sort": 0.0}, EXPERTS, 0.05, normalize=False)
    assert half.as_dict() == pytest.approx({"add": 0.5})
    assert MergeKey.from_weights({"add": 10.0}, EXPERTS, normalize=False).as_dict() == {"add": 10.0}
    with pytest.raises(InvalidRequestError, match=r"after rounding to the grid 0\.05"):
        MergeKey.from_weights({"add": 0.02}, EXPERTS, 0.05, normalize=False)
    with pytest.raises(ValueError, match=r"\(0, 10\]"):
        MergeKey((("add", 11.0),))


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({}, "empty"),
        ({"nope": 1.0}, "unknown experts in merge weights: nope"),
        ({"add": -1.0}, r"in \[0, 10\], got add=-1.0"),
        ({"add": math.nan}, r"in \[0, 10\], got add=nan"),
        ({"add": math.inf, "sort": 1.0}, r"in \[0, 10\], got add=inf"),
        ({"add": 1e308, "sort": 1e308}, r"in \[0, 10\]"),
        ({"add": 0.0}, "at least one positive"),
    ],
)
def test_merge_key_from_bad_weights(weights: dict[str, float], match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match) as e:
        MergeKey.from_weights(weights, EXPERTS)
    assert e.value.param == "merge_weights"


def test_merge_key_invariants() -> None:
    with pytest.raises(ValueError, match="routes everything to none"):
        MergeKey(())
    with pytest.raises(ValueError, match="none mass"):
        MergeKey((("a", 0.5),), none=1.5)
    base = MergeKey.base()
    assert base.is_base
    assert base.top is None
    assert base.outcome == "none"
    assert str(base) == "none=1"
    with pytest.raises(ValueError, match="unique and sorted"):
        MergeKey((("b", 0.5), ("a", 0.5)))
    with pytest.raises(ValueError, match=r"must be in \(0, 10\]"):
        MergeKey((("a", 0.0),))
