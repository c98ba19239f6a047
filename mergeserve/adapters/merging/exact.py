"""The methods exact in low-rank form: the result is a linear combination of the experts'
deltas (per module for SLERP, per layer for LiNeS), built by rank concatenation
(lowrank.py) with no error, then truncated to `rank` / `energy` when given.

SLERP is exact too: its two coefficients per module need only ⟨Δ_0, Δ_1⟩ and the norms,
which come from r×r Gram matrices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergeserve.adapters.lowrank import (
    AdapterFactors,
    LowRank,
    ProgressBar,
    aligned_or_empty,
    frobenius_sq,
    inner,
    merge_adapters,
    union_layout,
)
from mergeserve.adapters.merging.method import (
    EACH_ONE,
    Declarations,
    DenseCombine,
    MergeContext,
    PerExperts,
    need,
    truncated,
)
from mergeserve.adapters.merging.options import MergeOptions
from mergeserve.errors import InvalidRequestError

declared = Declarations()


def task_arithmetic_combine(o: MergeOptions) -> DenseCombine:
    """Task arithmetic as a function of dense deltas (for dense experts)."""
    lam = need(o.scale)

    def combine(d: Tensor, w: Tensor, kind: str, layer: int) -> Tensor:
        return lam * (d * w.reshape(-1, 1, 1)).sum(0)

    return combine


@declared.method(
    "task_arithmetic",
    kind="exact",
    params={"weights": EACH_ONE, "scale": 1.0},
    source="Ilharco et al. 2023",
    combine=task_arithmetic_combine,
    arm=MergeOptions(scale=0.5),
)
def task_arithmetic(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """λ Σ wᵢ Δᵢ (Ilharco et al.), exact by rank concatenation."""
    lam = need(o.scale)
    return truncated(merge_adapters(experts, [lam * w for w in need(o.weights)]), o)


@declared.method(
    "linear",
    kind="exact",
    params={"weights": EACH_ONE, "scale": 1.0},
    source="Ilharco et al. 2023",
    arm=MergeOptions(),
)
def linear(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """λ Σ wᵢ Δᵢ / Σ wᵢ: the weighted average of the deltas, exact."""
    w, lam = need(o.weights), need(o.scale)
    total = sum(w)
    if abs(total) < 1e-12:
        raise InvalidRequestError("linear needs weights that do not sum to 0", param="weights")
    return truncated(merge_adapters(experts, [lam * wi / total for wi in w]), o)


@declared.method(
    "cat",
    kind="exact",
    params={"weights": EACH_ONE, "scale": 1.0},
    source="PEFT",
)
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
    lam = need(o.scale)
    return merge_adapters(experts, [lam * w for w in need(o.weights)])


@declared.method(
    "slerp",
    kind="exact",
    params={"t": 0.5, "scale": 1.0},
    source="mergekit",
    min_experts=2,
    max_experts=2,
)
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
    t, lam = need(o.t), need(o.scale)
    groups: dict[str, LowRank] = {}
    layout = union_layout(experts)
    for kind, lay in layout.items():
        like = x.groups.get(kind) or y.groups[kind]
        gx, gy = aligned_or_empty(x, kind, lay, like), aligned_or_empty(y, kind, lay, like)
        c0, c1 = slerp_coefficients(
            inner(gx, gy), frobenius_sq(gx).sqrt(), frobenius_sq(gy).sqrt(), t
        )
        groups[kind] = LowRank(
            torch.cat([gx.A, gy.A], dim=1),
            torch.cat([gx.B * (lam * c0)[:, None, None], gy.B * (lam * c1)[:, None, None]], 2),
        )
    return truncated(AdapterFactors(groups, layout, x.prefix), o)


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


def lines_scales(layers: Sequence[int], depth: int, alpha: float, beta: float) -> Tensor:
    """LiNeS' per-layer factor alpha + beta · l / (depth − 1) for each layer index l."""
    span = max(depth - 1, 1)
    return torch.tensor([alpha + beta * layer / span for layer in layers], dtype=torch.float64)


@declared.method(
    "lines",
    kind="exact",
    params={"weights": EACH_ONE, "alpha": PerExperts("1/T", lambda n: 1.0 / n), "beta": 0.5},
    source="Wang et al. 2025",
    arm=MergeOptions(),
)
def lines(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """LiNeS (Wang et al., ICLR 2025): Σ wᵢ Δᵢ scaled linearly with depth, exact.

    Layer l of L gets alpha + beta · l/(L − 1): shallow layers, which hold general
    features, keep little of the task vectors (alpha), deep ones more (alpha + beta). L is
    the deepest layer any expert adapts, plus one.
    """
    alpha, beta = need(o.alpha), need(o.beta)
    summed = merge_adapters(experts, need(o.weights))
    depth = 1 + max(max(lay) for lay in summed.layers.values() if lay)
    groups = {}
    for kind, g in summed.groups.items():
        c = lines_scales(summed.layers[kind], depth, alpha, beta).to(g.B.dtype)
        groups[kind] = LowRank(g.A, g.B * c[:, None, None])
    return truncated(AdapterFactors(groups, summed.layers, summed.prefix), o)
