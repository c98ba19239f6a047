"""The parameters of a merge: `MergeOptions` carries them, `PARAMS` says what each one
means and what values it takes, once for every method.

A method declares which parameters it reads and their defaults (method.py); nothing
here knows a method's default. `None` in `MergeOptions` means "not given": the
method's default applies, and a given parameter the method does not read is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

MajoritySign = Literal["total", "frequency"]


@dataclass(frozen=True)
class MergeOptions:
    """Parameters of a merge; None means "not given" (see `PARAMS` for each one)."""

    weights: tuple[float, ...] | None = None
    scale: float | None = None
    density: float | None = None
    normalize: bool | None = None
    majority_sign: MajoritySign | None = None
    t: float | None = None
    seed: int | None = None
    rank: int | None = None
    energy: float | None = None
    alpha: float | None = None
    beta: float | None = None
    steps: int | None = None
    lr: float | None = None
    samples: int | None = None
    population: int | None = None

    def given(self) -> frozenset[str]:
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) is not None)


Check = Callable[[str, Any, int], str | None]
"""(name, value, number of experts) -> what is wrong with the value, or None."""


@dataclass(frozen=True)
class Param:
    """One merge parameter, as every method that reads it reads it."""

    name: str
    help: str
    """What it does (the methods' defaults are listed beside it, from their declarations)."""
    type: type
    """float, int, bool, str, or tuple for `weights`."""
    check: Check
    choices: tuple[str, ...] | None = None

    def problem(self, value: Any, n: int) -> str | None:
        """What is wrong with `value` for a merge of `n` experts, or None."""
        return self.check(self.name, value, n)


def _finite(name: str, v: Any, n: int) -> str | None:
    return None if math.isfinite(v) else f"{name} must be a finite number"


def _in(lo: float, hi: float, lo_open: bool = False) -> Check:
    def check(name: str, v: Any, n: int) -> str | None:
        ok = (lo < v if lo_open else lo <= v) and v <= hi
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        return None if ok else f"{name} must be in {interval}, got {v}"

    return check


def _at_least(k: int) -> Check:
    return lambda name, v, n: None if v >= k else f"{name} must be >= {k}, got {v}"


def _weights(name: str, v: Any, n: int) -> str | None:
    if len(v) != n:
        return f"{len(v)} weights for {n} experts"
    return None if all(math.isfinite(w) for w in v) else "weights must be finite numbers"


def _positive(name: str, v: Any, n: int) -> str | None:
    ok = math.isfinite(v) and v > 0
    return None if ok else f"{name} must be a positive number, got {v}"


def _one_of(*choices: str) -> Check:
    def check(name: str, v: Any, n: int) -> str | None:
        said = " or ".join(repr(c) for c in choices)
        return None if v in choices else f"{name} must be {said}, got {v!r}"

    return check


def _any(name: str, v: Any, n: int) -> str | None:
    return None


PARAMS: dict[str, Param] = {
    p.name: p
    for p in (
        Param("weights", "one per expert, in order", tuple, _weights),
        Param("scale", "λ, multiplies the merged delta", float, _finite),
        Param("density", "TIES/DARE/PCB: the fraction of entries kept", float, _in(0, 1, True)),
        Param("normalize", "divide by the sum of the (agreeing) weights", bool, _any),
        Param(
            "majority_sign",
            "TIES sign election: from the weighted sum, or from the sign count",
            str,
            _one_of("total", "frequency"),
            ("total", "frequency"),
        ),
        Param("t", "SLERP: 0 gives the first expert, 1 the second", float, _in(0, 1)),
        Param("seed", "seeds the random draws (DARE's masks, the searches)", int, _any),
        Param("rank", "output rank (exact methods stay exact without it)", int, _at_least(1)),
        Param(
            "energy", "truncate to keep this fraction of Σσ² in every layer", float, _in(0, 1, True)
        ),
        Param(
            "alpha",
            "RegMean: the off-diagonal of the Grams kept; LiNeS: the shallowest layer's scale",
            float,
            _finite,
        ),
        Param("beta", "LiNeS: the deepest layer's scale minus alpha", float, _finite),
        Param("steps", "AdaMerging: Adam steps; evolutionary: generations", int, _at_least(1)),
        Param("lr", "AdaMerging: Adam's learning rate", float, _positive),
        Param("samples", "data-aware methods: examples per expert used", int, _at_least(1)),
        Param("population", "evolutionary: candidates per generation", int, _at_least(2)),
    )
}
"""Every parameter of `MergeOptions`, with its meaning and its check."""

COMMON = frozenset({"rank", "energy"})
"""Parameters every method takes (default None: no truncation beyond the method's own)."""

assert set(PARAMS) == {f.name for f in fields(MergeOptions)}
