"""What a merge method is: its declaration (`MergeMethod`), made beside its function by
`Declarations.method`, and the checks every merge goes through.

A declaration says everything the rest of mergeserve derives from: which parameters the
method reads and their defaults (the CLI's flags and help, the README's methods table
and `mergeserve methods` list them), how many experts it takes, whether it needs data,
its dense form (`combine`, for dense experts: twin.py), and the options of its
`static:<name>` arm when a server serves one (`arm`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from torch import Tensor

from mergeserve.adapters.calibration import Example
from mergeserve.adapters.lowrank import AdapterFactors, ProgressBar, truncate_adapter, union_layout
from mergeserve.adapters.merging.options import COMMON, PARAMS, MergeOptions
from mergeserve.errors import InvalidRequestError

Kind = Literal["exact", "dense"]

MergeFn = Callable[
    [Sequence[AdapterFactors], MergeOptions, ProgressBar | None, "MergeContext | None"],
    AdapterFactors,
]
"""(experts, resolved options, progress, context) -> merged; context is None for the
data-free methods."""

DenseCombine = Callable[[Tensor, Tensor, str, int], Tensor]
"""(deltas [T, out, in], weights [T], module kind, layer) -> merged [out, in]."""


@dataclass(frozen=True)
class PerExperts:
    """A default that depends on the number of experts T."""

    text: str
    """How it reads in help and docs, e.g. '1/T'."""
    value: Callable[[int], Any]


EACH_ONE = PerExperts("1 each", lambda n: (1.0,) * n)
"""The default of `weights`."""


@dataclass(frozen=True)
class MergeContext:
    """What the data-aware methods (RegMean, Fisher, AdaMerging, evolutionary search) need
    besides the experts' factors: the base model and examples of every expert's task."""

    base_dir: Path
    """The base model (a Hugging Face dir) the experts adapt."""
    examples: tuple[tuple[Example, ...], ...]
    """Per expert, in the experts' order: its examples (`examples.jsonl`)."""
    dev: tuple[Example, ...] = ()
    """Labelled held-out examples: the evolutionary search's fitness (default: every
    expert's examples)."""
    threads: int | None = None
    """torch threads while building (None: torch's default)."""

    def digest(self) -> str:
        """A content hash of the base model's config and every example (cache keys)."""
        h = hashlib.sha256(b"mergeserve-merge-context/1\n")
        config = self.base_dir / "config.json"
        h.update(config.read_bytes() if config.is_file() else str(self.base_dir).encode())
        for i, rows in enumerate((*self.examples, self.dev)):
            h.update(f"\0set {i}\0".encode())
            for e in rows:
                h.update(f"{e.prompt}\0{e.answer}\n".encode())
        return h.hexdigest()

    @property
    def labelled_dev(self) -> tuple[Example, ...]:
        rows = self.dev or tuple(e for ex in self.examples for e in ex)
        return tuple(e for e in rows if e.answer)


@dataclass(frozen=True)
class MergeMethod:
    """A merge method's declaration (module doc)."""

    name: str
    fn: MergeFn
    kind: Kind
    """exact: computed in low-rank form with no approximation; dense: formed densely,
    then factored back by SVD."""
    params: Mapping[str, Any]
    """The parameters it reads (besides rank and energy, which all take) and their
    defaults: a value, a `PerExperts`, or None (the parameter is off unless given)."""
    source: str
    """Where the method comes from (a paper or a codebase)."""
    summary: str
    min_experts: int = 1
    max_experts: int | None = None
    needs_data: bool = False
    """Needs a MergeContext: the base model and the experts' examples."""
    combine: Callable[[MergeOptions], DenseCombine] | None = None
    """The method as a function of dense deltas (for dense experts), given resolved options."""
    arm: MergeOptions | None = None
    """The options of its `static:<name>` arm; None: not servable as a static arm."""

    @property
    def exact(self) -> bool:
        return self.kind == "exact"

    @property
    def uses(self) -> frozenset[str]:
        return frozenset(self.params)

    def default(self, name: str, n: int) -> Any:
        d = self.params.get(name)
        return d.value(n) if isinstance(d, PerExperts) else d

    def default_text(self, name: str) -> str | None:
        d = self.params.get(name)
        return d.text if isinstance(d, PerExperts) else (None if d is None else str(d))

    def resolve(self, options: MergeOptions, n: int) -> MergeOptions:
        """`options` with the defaults of the parameters not given, for `n` experts."""
        filled = {
            name: self.default(name, n) for name in self.params if getattr(options, name) is None
        }
        return replace(options, **filled)

    def check(self, n: int, o: MergeOptions) -> None:
        """The options are valid for this method merging `n` experts; raises
        InvalidRequestError naming the first wrong parameter."""
        if n < self.min_experts or (self.max_experts is not None and n > self.max_experts):
            want = (
                f"exactly {self.min_experts}"
                if self.min_experts == self.max_experts
                else f"at least {self.min_experts}"
            )
            raise InvalidRequestError(
                f"{self.name} merges {want} experts, got {n}", param="experts"
            )
        unused = o.given() - self.uses - COMMON
        if unused:
            raise InvalidRequestError(
                f"{self.name} does not use {', '.join(sorted(unused))}", param=sorted(unused)[0]
            )
        for name in PARAMS:  # declaration order: the first wrong one is named
            value = getattr(o, name)
            problem = PARAMS[name].problem(value, n) if value is not None else None
            if problem is not None:
                raise InvalidRequestError(problem, param=name)


T = TypeVar("T")


def need(value: T | None) -> T:
    """A resolved parameter the method declared a default for (never None)."""
    if value is None:
        raise RuntimeError("a merge method read a parameter it declares no default for")
    return value


class Declarations:
    """The methods one module declares, in order; `method` is its decorator."""

    def __init__(self) -> None:
        self.methods: list[MergeMethod] = []

    def method(
        self,
        name: str,
        *,
        kind: Kind,
        params: Mapping[str, Any],
        source: str,
        min_experts: int = 1,
        max_experts: int | None = None,
        needs_data: bool = False,
        combine: Callable[[MergeOptions], DenseCombine] | None = None,
        arm: MergeOptions | None = None,
    ) -> Callable[[MergeFn], MergeFn]:
        """Declare the decorated function as method `name` (its docstring's first line is
        the summary)."""
        unknown = set(params) - set(PARAMS)
        if unknown:
            raise ValueError(f"{name}: unknown parameters {sorted(unknown)}")

        def deco(fn: MergeFn) -> MergeFn:
            self.methods.append(
                MergeMethod(
                    name=name,
                    fn=fn,
                    kind=kind,
                    params=dict(params),
                    source=source,
                    summary=(fn.__doc__ or "").strip().split("\n")[0],
                    min_experts=min_experts,
                    max_experts=max_experts,
                    needs_data=needs_data,
                    combine=combine,
                    arm=arm,
                )
            )
            return fn

        return deco


def check_options(m: MergeMethod, experts: Sequence[AdapterFactors], o: MergeOptions) -> None:
    """Options valid for `m` and experts that can be merged (same layout and shapes)."""
    m.check(len(experts), o)
    prefixes = {e.prefix for e in experts}
    if len(prefixes) > 1:
        raise InvalidRequestError(
            f"experts of different module layouts: {sorted(prefixes)}", param="experts"
        )
    for kind in union_layout(experts):
        shapes = {
            (e.groups[kind].out_features, e.groups[kind].in_features)
            for e in experts
            if kind in e.groups
        }
        if len(shapes) > 1:
            raise InvalidRequestError(
                f"experts disagree on the shape of {kind}: {sorted(shapes)}; "
                "are they adapters of the same base model?",
                param="experts",
            )


def truncated(merged: AdapterFactors, o: MergeOptions) -> AdapterFactors:
    """An exact result truncated to `rank` / `energy` when given (factored SVD)."""
    if o.rank is None and o.energy is None:
        return merged
    if o.energy is None and all(r <= (o.rank or 0) for r in merged.ranks.values()):
        return merged
    return truncate_adapter(merged, o.rank, o.energy)


__all__ = [
    "EACH_ONE",
    "Declarations",
    "DenseCombine",
    "Kind",
    "MergeContext",
    "MergeFn",
    "MergeMethod",
    "PerExperts",
    "ProgressBar",
    "check_options",
    "need",
    "truncated",
]
