"""The dense methods: trimming, random dropping and sign election act on the entries of
Δ = B A, which no factorization keeps. Each module is formed densely (one layer at a
time, so memory stays at T·out·in), combined, and factored back by SVD to the requested
rank (randomized for large matrices; `lowrank.factor_layers`).

Each method is declared with its `combine` (the method as a function of dense deltas),
which is also what dense experts (full fine-tunes, twin.py) are merged with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from mergeserve.adapters.lowrank import (
    AdapterFactors,
    LowRank,
    ProgressBar,
    aligned,
    factor_layers,
    union_layout,
)
from mergeserve.adapters.merging.method import (
    EACH_ONE,
    Declarations,
    DenseCombine,
    MergeContext,
    need,
)
from mergeserve.adapters.merging.options import MajoritySign, MergeOptions

declared = Declarations()


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
    lam, density, normalize = need(o.scale), need(o.density), need(o.normalize)
    how: MajoritySign = need(o.majority_sign)

    def combine(d: Tensor, w: Tensor, kind: str, layer: int) -> Tensor:
        trimmed = magnitude_prune(d, density)
        return lam * disjoint_merge(trimmed, w, elect_sign(trimmed, w, how), normalize)

    return combine


def dare_linear_combine(o: MergeOptions) -> DenseCombine:
    lam, density, normalize, seed = need(o.scale), need(o.density), need(o.normalize), need(o.seed)

    def combine(d: Tensor, w: Tensor, kind: str, layer: int) -> Tensor:
        dropped = random_prune(d, density, module_generator(seed, kind, layer))
        merged = (dropped * w.reshape(-1, 1, 1)).sum(0)
        return lam * (merged / w.sum() if normalize else merged)

    return combine


def dare_ties_combine(o: MergeOptions) -> DenseCombine:
    lam, density, normalize, seed = need(o.scale), need(o.density), need(o.normalize), need(o.seed)
    how: MajoritySign = need(o.majority_sign)

    def combine(d: Tensor, w: Tensor, kind: str, layer: int) -> Tensor:
        dropped = random_prune(d, density, module_generator(seed, kind, layer))
        return lam * disjoint_merge(dropped, w, elect_sign(dropped, w, how), normalize)

    return combine


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
      the rest minmax(βᵢ) (`density` = ratio);
    * rescale: Σ βᵢ τᵢ / Σ βᵢ, times λ.

    Statistics are per module (one parameter tensor), as our TIES; the authors' code
    flattens the whole model. `weights` scale each τᵢ first.
    """
    lam, ratio = need(o.scale), need(o.density)

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
        return lam * merged.reshape(d.shape[1:])

    return combine


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


def count_modules(experts: Sequence[AdapterFactors]) -> int:
    """How many modules a dense merge of `experts` visits (a progress bar's total)."""
    return sum(len(lay) for lay in union_layout(experts).values())


def _dense(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None,
    combine: DenseCombine,
) -> AdapterFactors:
    return dense_merge(experts, need(o.weights), combine, o, progress)


@declared.method(
    "ties",
    kind="dense",
    params={
        "weights": EACH_ONE,
        "density": 0.5,
        "normalize": True,
        "majority_sign": "total",
        "scale": 1.0,
    },
    source="Yadav et al. 2023",
    combine=ties_combine,
    arm=MergeOptions(density=0.5),
)
def ties(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """TIES-Merging (Yadav et al.): trim, elect sign, disjoint merge; dense, then SVD."""
    return _dense(experts, o, progress, ties_combine(o))


@declared.method(
    "dare_linear",
    kind="dense",
    params={"weights": EACH_ONE, "density": 0.5, "normalize": False, "seed": 0, "scale": 1.0},
    source="Yu et al. 2024",
    combine=dare_linear_combine,
)
def dare_linear(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """DARE (Yu et al.): random drop + rescale, then a weighted sum; dense, then SVD."""
    return _dense(experts, o, progress, dare_linear_combine(o))


@declared.method(
    "dare_ties",
    kind="dense",
    params={
        "weights": EACH_ONE,
        "density": 0.5,
        "normalize": False,
        "majority_sign": "total",
        "seed": 0,
        "scale": 1.0,
    },
    source="Yu et al. 2024",
    combine=dare_ties_combine,
    arm=MergeOptions(density=0.5, scale=0.5, seed=0),
)
def dare_ties(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """DARE's random drop + rescale, then TIES' sign election and disjoint merge."""
    return _dense(experts, o, progress, dare_ties_combine(o))


@declared.method(
    "pcb",
    kind="dense",
    params={"weights": EACH_ONE, "density": 0.2, "scale": 1.0},
    source="Du et al. 2024",
    combine=pcb_combine,
    arm=MergeOptions(density=0.2),
)
def pcb(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """PCB-merging (Du et al.): intra/inter-task balancing, drop, rescale; dense, then SVD."""
    return _dense(experts, o, progress, pcb_combine(o))
