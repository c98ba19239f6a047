"""Static merge methods: many LoRA experts in, one LoRA adapter out.

Every method is a pure function `(experts, options) -> AdapterFactors` registered under
its name in `METHODS`, which refuses a second method of the same name. Two families:

* exact in low-rank form — `linear`, `task_arithmetic`, `cat`, `slerp`: the result is a
  linear combination of the experts' deltas, so it is built by rank concatenation (see
  `lowrank.py`) with no error, then optionally truncated to a rank by thin QR-SVD.
  SLERP is exact too: its two coefficients per module need only ⟨Δ_0, Δ_1⟩ and the norms,
  which come from r×r Gram matrices.
* dense — `ties`, `dare_linear`, `dare_ties`: trimming, random dropping and sign election
  act on the entries of Δ = B A, which no factorization keeps. Each module is formed
  densely (one layer at a time, so memory stays at T·out·in), combined, and factored back
  by SVD to the requested rank (randomized for large matrices).

Conventions (where PEFT and mergekit differ, we follow mergekit and say so):

* `weights` default to 1 for every expert. `linear` divides by Σw (a weighted average);
  the others do not, and `scale` (λ) multiplies the result (task arithmetic's λ).
* TIES: each expert keeps its top-`density` entries by magnitude (per module, PEFT's
  `int(density·numel)`); the sign of every entry is elected from Σ wᵢ τ̂ᵢ ("total") or
  from Σ sign(τ̂ᵢ) ("frequency"); the agreeing entries are summed with their weights and,
  when `normalize` (the default for `ties`), divided by the sum of the agreeing weights.
  PEFT elects the sign from the unweighted sum and divides by the agreeing *count*; the
  two agree whenever the weights are equal, which is what the tests check against PEFT.
* DARE: each entry is kept with probability `density` and rescaled by 1/density. The
  mask of a module is drawn from a generator seeded by (seed, module kind, layer), so a
  merge is reproducible and independent of processing order. `normalize` defaults to
  False for both DARE methods (mergekit's defaults).
* PEFT's `add_weighted_adapter(combination_type="linear"|"ties"|"dare_*")` combines A
  and B separately, which is not a merge of the deltas (Σ√w B · Σ√w A has cross terms);
  its `cat` and `*_svd` variants are exact and are what ours are compared with.
* Default output rank: exact methods keep the exact rank Σ rᵢ; dense methods factor to
  the same Σ rᵢ budget (capped at min(out, in)). `rank` / `energy` truncate either.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import Tensor

from mergeserve.adapters.calibration import Example as Example
from mergeserve.adapters.lowrank import (
    AdapterFactors,
    LowRank,
    aligned,
    aligned_or_empty,
    frobenius_sq,
    inner,
    merge_adapters,
    rank_for_energy,
    truncate_adapter,
    union_layout,
)
from mergeserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from mergeserve.adapters.peft_io import BaseModelSpec

MajoritySign = Literal["total", "frequency"]

RANDOMIZED_SVD_MIN_DIM = 2048
"""Dense results whose smaller side exceeds this are factored by randomized SVD."""


class ProgressBar(Protocol):
    """What a method reports progress to (a `tqdm` bar fits): one unit per module."""

    def update(self, n: int = 1) -> object: ...


@dataclass(frozen=True)
class MergeOptions:
    """Parameters of a merge. None means "not given": the method's default applies, and a
    given option that the method does not use (`MergeMethod.uses`) is refused."""

    weights: tuple[float, ...] | None = None
    """One per expert, in order; default 1 each."""
    scale: float | None = None
    """λ: multiplies the merged delta (task arithmetic's scaling); default 1."""
    density: float | None = None
    """TIES/DARE: the fraction of entries each expert keeps, in (0, 1]; default 0.5."""
    normalize: bool | None = None
    """TIES/DARE: divide by the sum of the (agreeing) weights; default True for ties only."""
    majority_sign: MajoritySign | None = None
    """TIES sign election from the weighted sum ("total", default) or the sign count."""
    t: float | None = None
    """SLERP: 0 gives the first expert, 1 the second; default 0.5."""
    seed: int | None = None
    """DARE: seeds the drop masks; default 0."""
    rank: int | None = None
    """Output rank; default: exact methods stay exact, dense ones use Σ rᵢ."""
    energy: float | None = None
    """Truncate to the smallest rank keeping this fraction of Σσ² in every layer."""
    alpha: float | None = None
    """RegMean: the fraction of the Gram matrices' off-diagonal kept (default 0.9);
    LiNeS: the scale of the shallowest layer (default 1/T for T experts)."""
    beta: float | None = None
    """LiNeS: the deepest layer's scale is alpha + beta (default 0.5)."""
    steps: int | None = None
    """AdaMerging: optimizer steps (default 40); evolutionary search: generations (8)."""
    lr: float | None = None
    """AdaMerging: Adam's learning rate (default 0.01)."""
    samples: int | None = None
    """Data-aware methods: at most this many examples per expert (default all)."""
    population: int | None = None
    """Evolutionary search: candidates per generation (default CMA-ES's 4 + ⌊3 ln n⌋)."""

    def given(self) -> frozenset[str]:
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) is not None)

    @property
    def lam(self) -> float:
        return 1.0 if self.scale is None else self.scale

    @property
    def dens(self) -> float:
        return 0.5 if self.density is None else self.density


MergeFn = Callable[
    [Sequence[AdapterFactors], MergeOptions, ProgressBar | None, "MergeContext | None"],
    AdapterFactors,
]
"""(experts, options, progress, context) -> merged; context is None for data-free methods."""


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
    name: str
    fn: MergeFn
    exact: bool
    """True when the method is computed in low-rank form with no approximation."""
    uses: frozenset[str]
    """The MergeOptions fields it reads (besides rank and energy, which all take)."""
    summary: str
    min_experts: int = 1
    max_experts: int | None = None
    needs_data: bool = False
    """Needs a MergeContext: the base model and the experts' examples."""


class MethodRegistry:
    """Name → MergeMethod. A name is registered once; a second registration is an error."""

    def __init__(self) -> None:
        self._methods: dict[str, MergeMethod] = {}

    def register(self, method: MergeMethod) -> MergeMethod:
        if method.name in self._methods:
            raise ValueError(f"merge method {method.name!r} is already registered")
        self._methods[method.name] = method
        return method

    def get(self, name: str) -> MergeMethod:
        try:
            return self._methods[name]
        except KeyError:
            raise InvalidRequestError(
                f"unknown merge method {name!r}; known: {', '.join(self.names())}", param="method"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods


METHODS = MethodRegistry()
_COMMON = frozenset({"rank", "energy"})


def method(
    name: str,
    *,
    exact: bool,
    uses: Sequence[str] = (),
    min_experts: int = 1,
    max_experts: int | None = None,
    needs_data: bool = False,
) -> Callable[[MergeFn], MergeFn]:
    """Register the decorated function in METHODS (its docstring's first line is the summary)."""

    def deco(fn: MergeFn) -> MergeFn:
        METHODS.register(
            MergeMethod(
                name=name,
                fn=fn,
                exact=exact,
                uses=frozenset(uses),
                summary=(fn.__doc__ or "").strip().split("\n")[0],
                min_experts=min_experts,
                max_experts=max_experts,
                needs_data=needs_data,
            )
        )
        return fn

    return deco


def merge(
    name: str,
    experts: Sequence[AdapterFactors],
    options: MergeOptions | None = None,
    progress: ProgressBar | None = None,
    context: MergeContext | None = None,
) -> AdapterFactors:
    """Run the method `name` after checking the options (and the context) against it."""
    m = METHODS.get(name)
    opts = options or MergeOptions()
    check_options(m, experts, opts)
    if m.needs_data:
        if context is None:
            raise InvalidRequestError(
                f"{name} learns from data: it needs the base model and the experts' "
                "examples (a MergeContext; `mergeserve merge --base ...`)",
                param="method",
            )
        if len(context.examples) != len(experts):
            raise InvalidRequestError(
                f"{len(context.examples)} example sets for {len(experts)} experts",
                param="experts",
            )
        empty = [i for i, ex in enumerate(context.examples) if not ex]
        if empty:
            raise InvalidRequestError(
                f"{name} needs examples of every expert; expert #{empty[0]} has none "
                "(write its examples.jsonl)",
                param="experts",
            )
    return m.fn(experts, opts, progress, context)


def check_options(m: MergeMethod, experts: Sequence[AdapterFactors], o: MergeOptions) -> None:
    """Options valid for `m` and experts that can be merged (same layout and shapes)."""
    check_values(m, len(experts), o)
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


def check_values(m: MergeMethod, n: int, o: MergeOptions) -> None:
    """The options are valid for `m` merging `n` experts; raises InvalidRequestError."""
    if n < m.min_experts or (m.max_experts is not None and n > m.max_experts):
        want = (
            f"exactly {m.min_experts}"
            if m.min_experts == m.max_experts
            else f"at least {m.min_experts}"
        )
        raise InvalidRequestError(f"{m.name} merges {want} experts, got {n}", param="experts")
    unused = o.given() - m.uses - _COMMON
    if unused:
        raise InvalidRequestError(
            f"{m.name} does not use {', '.join(sorted(unused))}", param=sorted(unused)[0]
        )
    if o.weights is not None:
        if len(o.weights) != n:
            raise InvalidRequestError(f"{len(o.weights)} weights for {n} experts", param="weights")
        if not all(math.isfinite(w) for w in o.weights):
            raise InvalidRequestError("weights must be finite numbers", param="weights")
    if not math.isfinite(o.lam):
        raise InvalidRequestError("scale must be a finite number", param="scale")
    if not 0.0 < o.dens <= 1.0:
        raise InvalidRequestError(f"density must be in (0, 1], got {o.density}", param="density")
    if o.t is not None and not 0.0 <= o.t <= 1.0:
        raise InvalidRequestError(f"t must be in [0, 1], got {o.t}", param="t")
    if o.rank is not None and o.rank < 1:
        raise InvalidRequestError(f"rank must be >= 1, got {o.rank}", param="rank")
    if o.energy is not None and not 0.0 < o.energy <= 1.0:
        raise InvalidRequestError(f"energy must be in (0, 1], got {o.energy}", param="energy")
    for name in ("steps", "samples", "population"):
        v = getattr(o, name)
        if v is not None and v < 1:
            raise InvalidRequestError(f"{name} must be >= 1, got {v}", param=name)
    if o.population is not None and o.population < 2:
        raise InvalidRequestError("population must be >= 2", param="population")
    if o.lr is not None and not (math.isfinite(o.lr) and o.lr > 0):
        raise InvalidRequestError(f"lr must be a positive number, got {o.lr}", param="lr")
    for name in ("alpha", "beta"):
        v = getattr(o, name)
        if v is not None and not math.isfinite(v):
            raise InvalidRequestError(f"{name} must be a finite number", param=name)
    if o.majority_sign not in (None, "total", "frequency"):
        raise InvalidRequestError(
            f"majority_sign must be 'total' or 'frequency', got {o.majority_sign!r}",
            param="majority_sign",
        )


def weights_of(o: MergeOptions, n: int) -> list[float]:
    return list(o.weights) if o.weights is not None else [1.0] * n


def _finish(merged: AdapterFactors, o: MergeOptions) -> AdapterFactors:
    """Optional truncation of an exact result to `rank` / `energy` (thin QR-SVD)."""
    if o.rank is None and o.energy is None:
        return merged
    if o.energy is None and all(r <= (o.rank or 0) for r in merged.ranks.values()):
        return merged
    return truncate_adapter(merged, o.rank, o.energy)


# ------------------------------------------------------------------ exact in low rank


@method("task_arithmetic", exact=True, uses=("weights", "scale"))
def task_arithmetic(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """λ Σ wᵢ Δᵢ (Ilharco et al.), exact by rank concatenation."""
    w = [o.lam * wi for wi in weights_of(o, len(experts))]
    return _finish(merge_adapters(experts, w), o)


@method("linear", exact=True, uses=("weights", "scale"))
def linear(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """λ Σ wᵢ Δᵢ / Σ wᵢ: the weighted average of the deltas, exact."""
    w = weights_of(o, len(experts))
    total = sum(w)
    if abs(total) < 1e-12:
        raise InvalidRequestError("linear needs weights that do not sum to 0", param="weights")
    return _finish(merge_adapters(experts, [o.lam * wi / total for wi in w]), o)


@method("cat", exact=True, uses=("weights", "scale"))
def cat(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """λ Σ wᵢ Δᵢ at rank Σ rᵢ, never truncated (PEFT's "cat")."""
    if o.rank is not None or o.energy is not None:
        raise InvalidRequestError(
            "cat keeps the full concatenated rank; use task_arithmetic with rank to truncate",
            param="rank",
        )
    w = [o.lam * wi for wi in weights_of(o, len(experts))]
    return merge_adapters(experts, w)


@method("slerp", exact=True, uses=("t", "scale"), min_experts=2, max_experts=2)
def slerp(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """Spherical interpolation of two experts' deltas, per module (mergekit's rule), exact.

    slerp(t; Δ0, Δ1) = sin((1−t)θ)/sin θ · Δ0 + sin(tθ)/sin θ · Δ1 with cos θ the cosine of
    Δ0 and Δ1; nearly parallel (|cos θ| > 0.9995) or zero deltas fall back to linear
    interpolation. The coefficients are per module, so the result is again a rank
    concatenation, with per-layer factors on B.
    """
    x, y = experts
    groups: dict[str, LowRank] = {}
    layout = union_layout(experts)
    for kind, lay in layout.items():
        like = x.groups.get(kind) or y.groups[kind]
        gx, gy = aligned_or_empty(x, kind, lay, like), aligned_or_empty(y, kind, lay, like)
        t = 0.5 if o.t is None else o.t
        c0, c1 = slerp_coefficients(
            inner(gx, gy), frobenius_sq(gx).sqrt(), frobenius_sq(gy).sqrt(), t
        )
        groups[kind] = LowRank(
            torch.cat([gx.A, gy.A], dim=1),
            torch.cat([gx.B * (o.lam * c0)[:, None, None], gy.B * (o.lam * c1)[:, None, None]], 2),
        )
    return _finish(AdapterFactors(groups, layout, x.prefix), o)


def slerp_coefficients(
    dot: Tensor, norm0: Tensor, norm1: Tensor, t: float, threshold: float = 0.9995
) -> tuple[Tensor, Tensor]:
    """Per-layer (c0, c1) with slerp = c0·v0 + c1·v1, from ⟨v0, v1⟩ and the two norms."""
    denom = norm0 * norm1
    cos = torch.where(denom > 0, dot / denom.clamp_min(1e-300), torch.ones_like(dot))
    cos = cos.clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    near = cos.abs() > threshold
    safe = torch.where(near, torch.ones_like(sin), sin)
    c0 = torch.where(near, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / safe)
    c1 = torch.where(near, torch.full_like(cos, t), torch.sin(t * theta) / safe)
    return c0, c1


# ------------------------------------------------------------------ dense, then factored

DenseCombine = Callable[[Tensor, Tensor, str, int], Tensor]
"""(deltas [T, out, in], weights [T], module kind, layer) -> merged [out, in]."""


def magnitude_prune(deltas: Tensor, density: float) -> Tensor:
    """Keep each expert's int(density·numel) largest entries by |value| (TIES' trim). [T, …].

    A selection (kthvalue, O(n)) finds each expert's threshold; entries tied with it are
    all kept, which only matters for exactly equal magnitudes.
    """
    flat = deltas.reshape(deltas.shape[0], -1)
    n = flat.shape[1]
    k = int(density * n)
    if k >= n:
        return deltas
    if k == 0:
        return torch.zeros_like(deltas)
    mag = flat.abs()
    threshold = mag.kthvalue(n - k + 1, dim=1, keepdim=True).values
    return (flat * (mag >= threshold)).reshape(deltas.shape)


def random_prune(deltas: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1/density. [T, …]."""
    if density >= 1.0:
        return deltas
    keep = torch.rand(deltas.shape, generator=generator, dtype=torch.float64) < density
    return deltas * keep / density


def elect_sign(deltas: Tensor, weights: Tensor, how: MajoritySign) -> Tensor:
    """The elected sign (±1) of every entry; ties (sum exactly 0) go to +1. [T, …] -> […]."""
    w = weights.reshape(-1, *([1] * (deltas.dim() - 1)))
    votes = (deltas * w).sum(0) if how == "total" else deltas.sign().sum(0)
    return torch.where(votes >= 0, 1.0, -1.0).to(deltas.dtype)


def disjoint_merge(deltas: Tensor, weights: Tensor, sign: Tensor, normalize: bool) -> Tensor:
    """Σ wᵢ τᵢ over the entries whose sign agrees with the elected one (÷ Σ agreeing wᵢ)."""
    w = weights.reshape(-1, *([1] * (deltas.dim() - 1)))
    agree = deltas.sign() == sign
    total = (deltas * w * agree).sum(0)
    if not normalize:
        return total
    divisor = (w * agree).sum(0)
    return total / torch.where(divisor.abs() < 1e-12, torch.ones_like(divisor), divisor)


def module_generator(seed: int, kind: str, layer: int) -> torch.Generator:
    """The generator of one module's DARE masks: a function of (seed, kind, layer) only."""
    digest = hashlib.sha256(f"{seed}:{kind}:{layer}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def ties_combine(o: MergeOptions) -> DenseCombine:
    normalize = True if o.normalize is None else o.normalize

    def combine(d: Tensor, w: Tensor, kind: str, layer: int) -> Tensor:
        trimmed = magnitude_prune(d, o.dens)
        sign = elect_sign(trimmed, w, o.majority_sign or "total")
        return o.lam * disjoint_merge(trimmed, w, sign, normalize)

    return combine


def dare_linear_combine(o: MergeOptions) -> DenseCombine:
    def combine(d: Tensor, w: Tensor, kind: str, layer: int) -> Tensor:
        dropped = random_prune(d, o.dens, module_generator(o.seed or 0, kind, layer))
        merged = (dropped * w.reshape(-1, 1, 1)).sum(0)
        return o.lam * (merged / w.sum() if o.normalize else merged)

    return combine


def dare_ties_combine(o: MergeOptions) -> DenseCombine:
    def combine(d: Tensor, w: Tensor, kind: str, layer: int) -> Tensor:
        dropped = random_prune(d, o.dens, module_generator(o.seed or 0, kind, layer))
        sign = elect_sign(dropped, w, o.majority_sign or "total")
        return o.lam * disjoint_merge(dropped, w, sign, bool(o.normalize))

    return combine


def task_arithmetic_combine(o: MergeOptions) -> DenseCombine:
    def combine(d: Tensor, w: Tensor, kind: str, layer: int) -> Tensor:
        return o.lam * (d * w.reshape(-1, 1, 1)).sum(0)

    return combine


DENSE_COMBINERS: dict[str, Callable[[MergeOptions], DenseCombine]] = {
    "task_arithmetic": task_arithmetic_combine,
    "ties": ties_combine,
    "dare_linear": dare_linear_combine,
    "dare_ties": dare_ties_combine,
}
"""The methods as functions of dense deltas (for dense experts, see twin.py)."""


@method("ties", exact=False, uses=("weights", "density", "normalize", "majority_sign", "scale"))
def ties(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """TIES-Merging (Yadav et al.): trim, elect sign, disjoint merge; dense, then SVD."""
    return dense_merge(experts, weights_of(o, len(experts)), ties_combine(o), o, progress)


@method("dare_linear", exact=False, uses=("weights", "density", "normalize", "seed", "scale"))
def dare_linear(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """DARE (Yu et al.): random drop + rescale, then a weighted sum; dense, then SVD."""
    return dense_merge(experts, weights_of(o, len(experts)), dare_linear_combine(o), o, progress)


@method(
    "dare_ties",
    exact=False,
    uses=("weights", "density", "normalize", "majority_sign", "seed", "scale"),
)
def dare_ties(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """DARE's random drop + rescale, then TIES' sign election and disjoint merge."""
    return dense_merge(experts, weights_of(o, len(experts)), dare_ties_combine(o), o, progress)


def minmax(x: Tensor, dim: int = 1) -> Tensor:
    """(x − min) / (max − min) along `dim`; a constant row gives zeros (not NaN)."""
    lo = x.min(dim=dim, keepdim=True).values
    span = x.max(dim=dim, keepdim=True).values - lo
    return (x - lo) / torch.where(span > 0, span, torch.ones_like(span))


def quantile_clamp(x: Tensor, low: float, high: float) -> Tensor:
    """Clamp each row of x [T, n] to its values at ranks ⌊n·low⌋ and ⌊n·(1−high)⌋−1
    (0-based, ascending): PCB's outlier clip (PCB-merging's `clamp`)."""
    n = x.shape[1]
    lo_k, hi_k = int(n * low), max(int(n * (1 - high)) - 1, 0)
    lo = x.kthvalue(lo_k + 1, dim=1, keepdim=True).values
    hi = x.kthvalue(hi_k + 1, dim=1, keepdim=True).values
    return torch.maximum(torch.minimum(x, hi), lo)


PCB_CLIP = 1e-4
"""The fraction of each task vector's smallest and largest magnitudes clipped first."""


def pcb_combine(o: MergeOptions) -> DenseCombine:
    """PCB-merging (Du et al., NeurIPS 2024), as its authors' code computes it:

    * clip each task vector's magnitudes at the 0.01% / 99.99% quantiles;
    * intra-balancing: exp(T · minmax(|τᵢ|)²), a parameter's importance within its task;
    * inter-balancing: tanh(τᵢ ⊙ Σⱼ τⱼ), its agreement with the other tasks;
    * drop: βᵢ = their product; entries below βᵢ's (1 − ratio) quantile get weight 0,
      the rest minmax(βᵢ) (`density` = ratio, default 0.2);
    * rescale: Σ βᵢ τᵢ / Σ βᵢ, times λ.

    Statistics are per module (one parameter tensor), as our TIES; the authors' code
    flattens the whole model. `weights` scale each τᵢ first.
    """
    ratio = 0.2 if o.density is None else o.density

    def combine(d: Tensor, w: Tensor, kind: str, layer: int) -> Tensor:
        t = d.shape[0]
        flat = d.reshape(t, -1) * w.reshape(-1, 1)
        mag = quantile_clamp(flat.abs(), PCB_CLIP, PCB_CLIP)
        intra = torch.exp(t * minmax(mag) ** 2)
        inter = torch.tanh(flat * flat.sum(0, keepdim=True))
        score = intra * inter
        if ratio < 1.0:
            score = quantile_clamp(score, 1.0 - ratio, 0.0)
        beta = minmax(score)
        merged = (flat.sign() * mag * beta).sum(0) / beta.sum(0).clamp_min(1e-12)
        return o.lam * merged.reshape(d.shape[1:])

    return combine


DENSE_COMBINERS["pcb"] = pcb_combine


@method("pcb", exact=False, uses=("weights", "density", "scale"))
def pcb(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """PCB-merging (Du et al.): intra/inter-task balancing, drop, rescale; dense, then SVD."""
    return dense_merge(experts, weights_of(o, len(experts)), pcb_combine(o), o, progress)


def lines_scales(layers: Sequence[int], depth: int, alpha: float, beta: float) -> Tensor:
    """LiNeS' per-layer factor alpha + beta · l / (depth − 1) for each layer index l."""
    span = max(depth - 1, 1)
    return torch.tensor([alpha + beta * layer / span for layer in layers], dtype=torch.float64)


@method("lines", exact=True, uses=("weights", "alpha", "beta"))
def lines(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """LiNeS (Wang et al., ICLR 2025): Σ wᵢ Δᵢ scaled linearly with depth, exact.

    Layer l of L gets alpha + beta · l/(L − 1): shallow layers, which hold general
    features, keep little of the task vectors (alpha, default 1/T), deep ones more
    (alpha + beta, beta default 0.5). L is the deepest layer any expert adapts, plus one.
    """
    alpha = 1.0 / len(experts) if o.alpha is None else o.alpha
    beta = 0.5 if o.beta is None else o.beta
    summed = merge_adapters(experts, weights_of(o, len(experts)))
    depth = 1 + max(max(lay) for lay in summed.layers.values() if lay)
    groups = {}
    for kind, g in summed.groups.items():
        c = lines_scales(summed.layers[kind], depth, alpha, beta).to(g.B.dtype)
        groups[kind] = LowRank(g.A, g.B * c[:, None, None])
    return _finish(AdapterFactors(groups, summed.layers, summed.prefix), o)


def dense_merge(
    experts: Sequence[AdapterFactors],
    weights: Sequence[float],
    combine: DenseCombine,
    o: MergeOptions,
    progress: ProgressBar | None = None,
) -> AdapterFactors:
    """Form each module's deltas densely, `combine` them, factor the result to a rank.

    One layer at a time: peak memory is T·out·in for the deltas of one module. The rank is
    `o.rank`, else Σ rᵢ of the experts for that module kind, capped at min(out, in); with
    `o.energy`, the smallest rank keeping that fraction of Σσ² in every layer (≤ the cap).
    """
    layout = union_layout(experts)
    groups: dict[str, LowRank] = {}
    for kind, lay in layout.items():
        stacks = [aligned(e, kind, lay) for e in experts]
        present = [s for s in stacks if s is not None]
        out_f, in_f = present[0].out_features, present[0].in_features
        dtype = present[0].A.dtype
        w = torch.tensor(weights, dtype=dtype)
        cap = min(o.rank or sum(s.rank for s in present), out_f, in_f)
        merged = (
            combine(
                torch.stack(
                    [
                        s.B[j] @ s.A[j] if s is not None else torch.zeros(out_f, in_f, dtype=dtype)
                        for s in stacks
                    ]
                ),
                w,
                kind,
                layer,
            )
            for j, layer in enumerate(lay)
        )
        groups[kind] = factor_layers(merged, cap, o.energy, progress)
    return AdapterFactors(groups, layout, experts[0].prefix)


def factor_layers(
    merged: Iterable[Tensor],
    cap: int,
    energy: float | None = None,
    progress: ProgressBar | None = None,
) -> LowRank:
    """One module kind's dense merged deltas, layer by layer, as one LoRA stack by SVD: of
    rank `cap`, or with `energy` the smallest rank keeping that fraction of Σσ² in every
    layer (≤ cap). `merged` may be a generator: one dense matrix is held at a time."""
    factors: list[tuple[Tensor, Tensor, Tensor]] = []
    for m in merged:
        factors.append(top_singular(m, cap, full=energy is not None))
        if progress is not None:
            progress.update(1)
    k = cap
    if energy is not None:
        k = min(cap, rank_for_energy(torch.stack([s for _, s, _ in factors]), energy))
    return stack_svd(factors, k)


def top_singular(
    m: Tensor, k: int, full: bool = False, randomized_min_dim: int = RANDOMIZED_SVD_MIN_DIM
) -> tuple[Tensor, Tensor, Tensor]:
    """(U [out, k], S [k], Vh [k, in]) of the top k singular triplets of m [out, in].

    Exact SVD for small matrices or when the whole spectrum is needed (`full`); randomized
    (Halko et al., `torch.svd_lowrank`, 4 power iterations) when min(out, in) is large and
    k small, where a full SVD would cost O(out·in·min(out, in)).
    """
    small = min(m.shape)
    if not full and small > randomized_min_dim and k < small // 4:
        u, s, v = torch.svd_lowrank(m, q=min(k + 16, small), niter=4)
        return u[:, :k], s[:k], v[:, :k].T
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def stack_svd(factors: Sequence[tuple[Tensor, Tensor, Tensor]], k: int | None = None) -> LowRank:
    """Per-layer SVD triplets (U [out, ·], S [·], Vh [·, in]) → one LoRA stack of rank k.

    √σ goes on each side (as `truncate` does); layers with fewer than k triplets are
    padded with zero factors, which leaves their Δ unchanged. k defaults to the largest.
    """
    k = max(s.shape[0] for _, s, _ in factors) if k is None else k
    bs, as_ = [], []
    for u, s, vh in factors:
        root = s[:k].clamp_min(0).sqrt()
        b, a = u[:, :k] * root, vh[:k] * root[:, None]
        pad = k - root.shape[0]
        if pad:
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
        bs.append(b)
        as_.append(a)
    return LowRank(torch.stack(as_).contiguous(), torch.stack(bs).contiguous())


def count_modules(experts: Sequence[AdapterFactors]) -> int:
    """How many modules a dense merge of `experts` visits (a progress bar's total)."""
    return sum(len(lay) for lay in union_layout(experts).values())


# ------------------------------------------------------------------ directories in and out


def merge_dirs(
    name: str,
    dirs: Sequence[Path],
    out: Path,
    options: MergeOptions | None = None,
    progress: Callable[[int], ProgressBar] | None = None,
    dtype: torch.dtype = torch.float32,
    base: BaseModelSpec | None = None,
    context: MergeContext | None = None,
) -> Path:
    """Load PEFT LoRA dirs, merge them with method `name`, write the result as a PEFT dir.

    `progress(total)` makes a bar (for dense methods, one unit per module). With `base`,
    every expert is first checked to fit that base model. Nothing is written unless the
    merge succeeds, and `out` must not exist.
    """
    from mergeserve.adapters.peft_io import load_lora_factors, read_lora_dir, save_lora_factors

    if out.exists():
        raise InvalidRequestError(f"{out} already exists", param="out")
    opts = options or MergeOptions()
    infos = [read_lora_dir(d, check_name=False) for d in dirs]
    bases = {i.base_model_name_or_path for i in infos if i.base_model_name_or_path}
    if len(bases) > 1:
        raise InvalidRequestError(
            f"experts name different base models: {sorted(bases)}", param="experts"
        )
    experts = [load_lora_factors(d) for d in dirs]
    if base is not None:
        for info, factors in zip(infos, experts, strict=True):
            base.check(factors, info)
    m = METHODS.get(name)
    bar = None
    if progress is not None and not m.exact and not m.needs_data:
        bar = progress(count_modules(experts))
    merged = merge(name, experts, opts, bar, context)
    return save_lora_factors(
        merged, out, base_model_name_or_path=next(iter(bases), None), dtype=dtype
    )


# The data-aware methods register themselves into METHODS (imported last: they use the above).
from mergeserve.adapters import learned as _learned  # noqa: E402, F401
