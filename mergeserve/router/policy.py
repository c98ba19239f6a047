"""Router scores -> the weights a request is merged with, as a hashable `MergeKey`.

A router gives one row of logits per request over the experts and, when it is open-world
(router/open_world.py), the request's in-domain mass m: how much it belongs to the
experts at all. The policy turns them into merge weights in five steps, each optional:

1. temperature: p = softmax(logits / T)    (T → 0: the top expert alone; T → ∞: uniform)
2. top-k: keep the k largest, renormalize
3. floor: drop weights below `floor` (the top expert always stays), renormalize
4. in-domain mass: w = m·p; the rest, 1 − m, goes to *none* (no expert: the base model)
5. grid: round the weights and the none mass to multiples of `grid` that still sum to 1
   (largest remainder), so that near-equal requests share one key, and so one
   materialized adapter; a request whose experts all round to 0 is routed to none

The entropy of p (step 1, before truncation) is returned beside the key for metrics:
low entropy means the router is sure of one expert.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mergeserve.errors import InvalidRequestError

_EPS = 1e-9

MAX_PINNED_WEIGHT = 10.0
"""Largest weight a client may pin one expert at (`merge_weights`): task arithmetic uses
λ up to ~1–2; far beyond, a merge is noise (and, past float32, NaN)."""


RoutingOutcome = Literal["expert", "blend", "none"]


@dataclass(frozen=True)
class MergeKey:
    """Which experts a request is merged from, and with what weights (all > 0).

    Routed keys sum to 1 − `none` (the mass the router gave to no expert; a key with no
    weights at all is the base model); a client's pinned `merge_weights` are served as
    given (each at most MAX_PINNED_WEIGHT), e.g. two skills at full strength, 1 each.
    Hashable and ordered by expert name, so equal merges compare and hash equal whatever
    the order the weights were given in.
    """

    weights: tuple[tuple[str, float], ...]
    none: float = 0.0
    """The mass routed to no expert, in [0, 1] (0 for pinned keys). Twin merges scale
    the shared adapter by 1 − none (MergeSettings.twin_none)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.none <= 1.0:
            raise ValueError(f"the none mass must be in [0, 1], got {self.none}")
        if not self.weights and self.none != 1.0:
            raise ValueError("a MergeKey without experts routes everything to none (none=1)")
        names = [n for n, _ in self.weights]
        if names != sorted(set(names)):
            raise ValueError(f"expert names must be unique and sorted, got {names}")
        if any(not 0 < w <= MAX_PINNED_WEIGHT for _, w in self.weights):
            raise ValueError(f"weights must be in (0, {MAX_PINNED_WEIGHT:g}], got {self.weights}")

    @classmethod
    def from_weights(
        cls,
        weights: Mapping[str, float],
        experts: Sequence[str] | None = None,
        grid: float | None = None,
        *,
        normalize: bool = True,
    ) -> MergeKey:
        """A key from explicit weights: checked, zeros dropped, normalized to sum 1 (or,
        with normalize=False, kept as given), and rounded to `grid` when given (a
        distribution by largest remainder; weights as given each to the nearest multiple).

        Raises InvalidRequestError naming what is wrong: unknown experts, negative,
        non-finite or too large weights (> MAX_PINNED_WEIGHT), or no positive weight.
        """
        if not weights:
            raise InvalidRequestError("merge weights are empty", param="merge_weights")
        if experts is not None:
            unknown = sorted(set(weights) - set(experts))
            if unknown:
                raise InvalidRequestError(
                    f"unknown experts in merge weights: {', '.join(unknown)}; "
                    f"experts: {', '.join(experts)}",
                    param="merge_weights",
                )
        bad = {
            n: w
            for n, w in weights.items()
            if not math.isfinite(w) or not 0 <= w <= MAX_PINNED_WEIGHT
        }
        if bad:
            raise InvalidRequestError(
                f"merge weights must be numbers in [0, {MAX_PINNED_WEIGHT:g}], got "
                f"{', '.join(f'{n}={w!r}' for n, w in sorted(bad.items())[:4])}",
                param="merge_weights",
            )
        total = sum(weights.values())
        names = sorted(weights)
        if normalize:
            probs = [weights[n] / total for n in names] if total > 0 else []
            if probs and grid is not None:
                probs = round_to_grid(probs, grid)
        else:
            probs = [float(weights[n]) for n in names]
            if grid is not None:
                probs = [round(round(p / grid) * grid, 12) for p in probs]
        key = tuple((n, p) for n, p in zip(names, probs, strict=False) if p > 0)
        if not key:
            raise InvalidRequestError(
                "merge weights need at least one positive weight"
                + (f" (after rounding to the grid {grid:g})" if grid and total > 0 else ""),
                param="merge_weights",
            )
        return cls(key)

    def as_dict(self) -> dict[str, float]:
        return dict(self.weights)

    @classmethod
    def base(cls) -> MergeKey:
        """Routed to no expert: the base model."""
        return cls((), none=1.0)

    @property
    def is_base(self) -> bool:
        return not self.weights

    @property
    def outcome(self) -> RoutingOutcome:
        """none (no expert), expert (one) or blend (two or more)."""
        return "none" if not self.weights else "expert" if len(self.weights) == 1 else "blend"

    @property
    def top(self) -> str | None:
        """The expert of largest weight (the first by name on a tie); None for base."""
        if not self.weights:
            return None
        return min(self.weights, key=lambda nw: (-nw[1], nw[0]))[0]

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.weights)

    def __str__(self) -> str:
        parts = [f"{n}={w:g}" for n, w in self.weights]
        if self.none > 0:
            parts.append(f"none={self.none:g}")
        return ",".join(parts)


@dataclass(frozen=True)
class Routing:
    """One request's routing: the key to merge with, the full distribution, its entropy."""

    key: MergeKey
    probs: dict[str, float]
    """softmax(logits / T) over every expert, before top-k, floor and grid."""
    entropy: float
    """Shannon entropy of `probs`, in nats (0: one expert; ln E: uniform)."""
    in_domain: float = 1.0
    """The router's in-domain mass m before rounding (1 for a closed-world router)."""

    @property
    def outcome(self) -> RoutingOutcome:
        return self.key.outcome


def round_to_grid(probs: Sequence[float], grid: float) -> list[float]:
    """Round a distribution to multiples of `grid` summing to exactly 1.

    Largest-remainder rounding: each weight gets floor(p / grid) units, and the units
    left over go to the largest remainders (ties to the earlier entry). `1 / grid` must
    be a whole number.
    """
    if not 0 < grid <= 1 or abs(round(1.0 / grid) * grid - 1.0) > 1e-9:
        raise ValueError(f"grid must divide 1 (like 0.05 or 0.1), got {grid}")
    units_total = round(1.0 / grid)
    total = sum(probs)
    scaled = [p / total * units_total for p in probs]
    units = [math.floor(s + _EPS) for s in scaled]
    left = units_total - sum(units)
    order = sorted(range(len(scaled)), key=lambda i: (-(scaled[i] - units[i]), i))
    for i in order[:left]:
        units[i] += 1
    return [u / units_total for u in units]


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy (nats) of each row of a probability matrix."""
    p = probs.clamp_min(0)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)


@dataclass(frozen=True)
class RoutingPolicy:
    temperature: float = 1.0
    top_k: int | None = None
    """Keep the k most likely experts (None: all)."""
    floor: float = 0.0
    """Drop experts whose weight, after top-k, is below this (the top one always stays)."""
    grid: float | None = 0.05
    """Round weights to multiples of this (None: no rounding; keys then rarely repeat)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.floor < 1.0:
            raise ValueError(f"floor must be in [0, 1), got {self.floor}")
        if self.grid is not None:
            round_to_grid([1.0], self.grid)  # checks that the grid divides 1

    def apply(
        self, experts: Sequence[str], logits: Tensor, in_domain: Tensor | None = None
    ) -> list[Routing]:
        """Routings for each row of `logits` ([n, E], columns in `experts` order).

        A logit of -inf excludes that expert (weight 0). Rows must have a finite entry.
        `in_domain` ([n] in [0, 1], from an open-world router) scales each row's weights;
        the rest of the mass is routed to none. None: every request is in domain.
        """
        if logits.dim() != 2 or logits.shape[1] != len(experts):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(experts)} experts")
        x = logits.detach().to(torch.float64)
        if not torch.isfinite(x).any(dim=1).all():
            raise ValueError("every row of logits needs at least one finite entry")
        if torch.isnan(x).any() or torch.isposinf(x).any():
            raise ValueError("logits must not be NaN or +inf")
        probs = torch.softmax(x / self.temperature, dim=1)
        ent = entropy(probs)
        kept = probs.clone()
        if self.top_k is not None and self.top_k < len(experts):
            # Stable order: ties go to the earlier expert, so equal inputs give equal keys.
            order = torch.argsort(-kept, dim=1, stable=True)
            kept.scatter_(1, order[:, self.top_k :], 0.0)
            kept = kept / kept.sum(dim=1, keepdim=True)
        if self.floor > 0:
            top = kept.argmax(dim=1, keepdim=True)
            below = kept < self.floor
            below.scatter_(1, top, False)
            kept = kept.masked_fill(below, 0.0)
            kept = kept / kept.sum(dim=1, keepdim=True)
        if in_domain is None:
            mass = [1.0] * len(kept)
        else:
            if in_domain.shape != (len(kept),):
                raise ValueError(f"in_domain {tuple(in_domain.shape)} is not one per row")
            m_ok = torch.isfinite(in_domain) & (in_domain >= 0) & (in_domain <= 1)
            if not m_ok.all():
                raise ValueError("in_domain masses must be in [0, 1]")
            mass = in_domain.tolist()
        out = []
        for row, full, h, m in zip(kept.tolist(), probs.tolist(), ent.tolist(), mass, strict=True):
            scaled = [w * m for w in row]
            if self.grid is not None:
                # The none mass is one more column of the distribution (last: a tie goes
                # to an expert), so rounding keeps Σ weights + none = 1.
                weights = round_to_grid([*scaled, 1.0 - m], self.grid)[:-1]
            else:
                weights = scaled
            pairs = tuple(sorted((n, w) for n, w in zip(experts, weights, strict=True) if w > 0))
            none = min(1.0, max(0.0, round(1.0 - sum(w for _, w in pairs), 12)))
            key = MergeKey(pairs, none=none) if pairs else MergeKey.base()
            out.append(Routing(key, dict(zip(experts, full, strict=True)), float(h), float(m)))
        return out
