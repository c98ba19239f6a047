"""Twin decomposition of an expert set: one shared adapter and compressed exclusives.

    S   = merge(Δ_1..Δ_T)               default task arithmetic, S = λ Σ Δ_t, λ = 0.3
    X_t = truncate_k(Δ_t − S)           rank k, factored SVD (LoRA experts) or SVD (dense)

Per request, `merged(w)` = S + Σ w_t X_t, built by rank concatenation (exact given S and
the X_t; the approximation is all in truncate_k, and the report measures it). Next to it,
`merged_exact(w)` = Σ w_t Δ_t of the uncompressed experts, the reference arm.

Two kinds of experts (DESIGN.md, "Two kinds of experts"):
* LoRA experts (`decompose`): Δ_t are low-rank; Δ_t − S has rank r_t + rank(S), so its
  truncation never touches a dense matrix, and neither does the error report (norms and
  inner products come from r×r Gram matrices).
* Full fine-tunes (`decompose_dense`): τ_t are dense; S is dense too and is either folded
  into the served base weights once (`fold_shared=True`, then merged(w) = Σ w_t X_t) or
  compressed to a LoRA of rank `shared_rank`. The exclusives are where compression pays:
  rank-k LoRAs instead of dense deltas.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from mergeserve.adapters.lowrank import (
    AdapterFactors,
    ConcatBasis,
    DenseDelta,
    LowRank,
    ProgressBar,
    ScaledFactors,
    aligned_or_empty,
    frobenius_sq,
    merge_adapters,
    stack_svd,
    subtract,
    top_singular,
    truncate_adapter,
    truncate_spectrum,
    union_layout,
)
from mergeserve.adapters.merging import METHODS, MergeOptions, merge
from mergeserve.adapters.merging.method import need
from mergeserve.errors import AdapterError, InvalidRequestError

TWIN_FILE = "twin.json"
SHARED_TERM = "\0shared"  # not a valid expert name, so it cannot collide
SHARED_DENSE_FILE = "shared_dense.safetensors"
DEFAULT_LAMBDA = 0.3


@dataclass(frozen=True)
class ExpertReport:
    """How much of one expert the decomposition keeps (relative Frobenius errors)."""

    name: str
    rank: int
    """The expert's own largest module rank (min(out, in) for a dense expert)."""
    exclusive_rank: int
    exclusive_error: float
    """‖X_t − (Δ_t − S)‖ / ‖Δ_t − S‖: what truncate_k drops of the expert's own part."""
    reconstruction_error: float
    """‖S + X_t − Δ_t‖ / ‖Δ_t‖: the expert as served alone (weight 1) versus itself."""


@dataclass(frozen=True)
class TwinConfig:
    shared_method: str = "task_arithmetic"
    shared_options: MergeOptions = field(default_factory=lambda: MergeOptions(scale=DEFAULT_LAMBDA))
    exclusive_rank: int | None = 8
    exclusive_energy: float | None = None
    shared_rank: int | None = None
    """Truncate S to this rank (None: keep S exact; for dense experts, fold S)."""

    def to_json(self) -> dict[str, Any]:
        """The configuration as saved in twin.json (options given, not defaulted)."""
        return {
            "shared_method": self.shared_method,
            "shared_options": {
                k: v for k, v in asdict(self.shared_options).items() if v is not None
            },
            "exclusive_rank": self.exclusive_rank,
            "exclusive_energy": self.exclusive_energy,
            "shared_rank": self.shared_rank,
        }


@dataclass(frozen=True)
class TwinDecomposition:
    """An expert set split into `shared` (None when folded into the base) and exclusives."""

    names: tuple[str, ...]
    shared: AdapterFactors | None
    exclusives: Mapping[str, AdapterFactors]
    report: tuple[ExpertReport, ...]
    config: TwinConfig
    experts: Mapping[str, AdapterFactors] | None = field(default=None, compare=False)
    """The uncompressed experts (for merged_exact); dense experts as full-rank factors."""
    shared_dense: DenseDelta | None = field(default=None, compare=False)
    """Dense experts with fold_shared: S, to be added to the base weights once."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclusives", MappingProxyType(dict(self.exclusives)))
        if set(self.exclusives) != set(self.names):
            raise ValueError("exclusives must be keyed by exactly the expert names")

    def _weights(self, weights: Mapping[str, float]) -> list[tuple[str, float]]:
        unknown = set(weights) - set(self.names)
        if unknown:
            raise InvalidRequestError(
                f"unknown experts {sorted(unknown)}; known: {list(self.names)}",
                param="merge_weights",
            )
        out = [(n, float(weights[n])) for n in self.names if weights.get(n, 0.0) != 0.0]
        if not all(math.isfinite(w) for _, w in out):
            raise InvalidRequestError("weights must be finite", param="merge_weights")
        return out

    def merged(self, weights: Mapping[str, float], shared_scale: float = 1.0) -> AdapterFactors:
        """s·S + Σ w_t X_t by rank concatenation: rank(S) + Σ k over the non-zero weights
        (S left out at s = 0)."""
        active = self._weights(weights)
        terms = [self.exclusives[n] for n, _ in active]
        ws = [w for _, w in active]
        if self.shared is not None and shared_scale != 0.0:
            terms.insert(0, self.shared)
            ws.insert(0, float(shared_scale))
        if not terms:
            raise InvalidRequestError("all weights are zero", param="merge_weights")
        return merge_adapters(terms, ws)

    @cached_property
    def basis(self) -> ConcatBasis:
        """Shared and exclusives concatenated once: `merged_view` gathers over it."""
        terms = dict(self.exclusives)
        if self.shared is not None:
            terms = {SHARED_TERM: self.shared, **terms}
        return ConcatBasis.build(terms)

    def merged_view(self, weights: Mapping[str, float]) -> ScaledFactors:
        """`merged(weights)` without copying a factor: the hot-path form (see ConcatBasis).

        Zero-weight experts stay in the basis with scale 0 (rank r_s + Σ k over all
        experts); `.materialize()` drops them.
        """
        self._weights(weights)  # validates
        w = [1.0] if self.shared is not None else []
        w += [float(weights.get(n, 0.0)) for n in self.names]
        return self.basis.merged(w)

    def merged_exact(self, weights: Mapping[str, float]) -> AdapterFactors:
        """Σ w_t Δ_t of the uncompressed experts (rank Σ r_t over the non-zero weights)."""
        if self.experts is None:
            raise AdapterError("this decomposition was loaded without its experts")
        active = self._weights(weights)
        if not active:
            raise InvalidRequestError("all weights are zero", param="merge_weights")
        return merge_adapters([self.experts[n] for n, _ in active], [w for _, w in active])

    def with_expert(self, name: str, delta: AdapterFactors) -> TwinDecomposition:
        """This decomposition plus one expert, without recomputing S: its exclusive is
        the truncated SVD of Δ − S (S holds only the experts decomposed before, until the
        next full `decompose`). How a hot-added expert is served at once."""
        if name in self.names:
            raise AdapterError(f"expert {name!r} is already in the decomposition")
        if self.experts is None:
            raise AdapterError("this decomposition was loaded without its experts")
        if self.shared is None:
            raise AdapterError("a decomposition with S folded into the base takes no new expert")
        x, report = _exclusive(name, delta, self.shared, self.config)
        return TwinDecomposition(
            (*self.names, name),
            self.shared,
            {**self.exclusives, name: x},
            (*self.report, report),
            self.config,
            {**self.experts, name: delta},
        )

    # -------------------------------------------------------------- persistence

    def save(self, out_dir: Path, base_model_name_or_path: str | None = None) -> Path:
        """shared/ and exclusive/<name>/ as PEFT dirs, twin.json with config and report.

        Written into a temp dir then renamed: a reader never sees half a decomposition.
        """
        import os
        import shutil
        import tempfile

        from safetensors.torch import save_file

        from mergeserve.adapters.peft_io import save_lora_factors

        if out_dir.exists():
            raise AdapterError(f"{out_dir} already exists")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
        try:
            if self.shared is not None:
                save_lora_factors(self.shared, tmp / "shared", base_model_name_or_path)
            if self.shared_dense is not None:
                save_file(
                    {
                        f"{self.shared_dense.prefix}.layers.{i}.{kind}.weight": t[j].contiguous()
                        for kind, t in self.shared_dense.groups.items()
                        for j, i in enumerate(self.shared_dense.layers[kind])
                    },
                    str(tmp / SHARED_DENSE_FILE),
                )
            for name in self.names:
                save_lora_factors(
                    self.exclusives[name], tmp / "exclusive" / name, base_model_name_or_path
                )
            meta = {
                "format": 1,
                "names": list(self.names),
                "shared": "lora" if self.shared is not None else "folded",
                "config": self.config.to_json(),
                "report": [asdict(r) for r in self.report],
            }
            (tmp / TWIN_FILE).write_text(json.dumps(meta, indent=2))
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir

    @classmethod
    def load(
        cls, path: Path, experts: Mapping[str, AdapterFactors] | None = None
    ) -> TwinDecomposition:
        """Read a saved decomposition; pass the experts to enable merged_exact."""
        from mergeserve.adapters.peft_io import load_lora_factors

        try:
            meta: dict[str, Any] = json.loads((path / TWIN_FILE).read_text())
            names = tuple(str(n) for n in meta["names"])
            c = meta["config"]
            so = dict(c["shared_options"])
            if "weights" in so:
                so["weights"] = tuple(so["weights"])
            config = TwinConfig(
                shared_method=c["shared_method"],
                shared_options=MergeOptions(**so),
                exclusive_rank=c["exclusive_rank"],
                exclusive_energy=c["exclusive_energy"],
                shared_rank=c["shared_rank"],
            )
            report = tuple(ExpertReport(**r) for r in meta["report"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AdapterError(f"{path}: not a saved Twin decomposition ({e})") from e
        shared = load_lora_factors(path / "shared") if meta.get("shared") == "lora" else None
        exclusives = {n: load_lora_factors(path / "exclusive" / n) for n in names}
        if experts is not None and set(experts) != set(names):
            raise AdapterError(f"experts {sorted(experts)} do not match {list(names)}")
        return cls(names, shared, exclusives, report, config, experts)


def _exclusive(
    name: str,
    delta: AdapterFactors,
    shared: AdapterFactors,
    cfg: TwinConfig,
    progress: ProgressBar | None = None,
) -> tuple[AdapterFactors, ExpertReport]:
    """X = the truncated SVD of Δ − S, and how much of Δ − S and of Δ it misses."""
    groups, layers = {}, {}
    num = den_own = den_delta = 0.0
    for kind, lay in union_layout([delta, shared]).items():
        like = delta.groups.get(kind) or shared.groups[kind]
        d = aligned_or_empty(delta, kind, lay, like)
        s = aligned_or_empty(shared, kind, lay, like)
        own = subtract(d, s).astype(torch.float64)
        x, sigma = truncate_spectrum(own, cfg.exclusive_rank, cfg.exclusive_energy)
        # x is own's best rank-k approximation: ‖own‖² = Σσ², ‖own − x‖² = Σ_{i≥k} σ².
        sq = sigma**2
        own_sq = float(sq.sum())
        num += float(sq[:, x.rank :].sum())
        den_own += own_sq
        den_delta += float(frobenius_sq(d.astype(torch.float64)).sum())
        groups[kind] = x.astype(d.A.dtype)
        layers[kind] = lay
        if progress is not None:
            progress.update(1)
    x_t = AdapterFactors(groups, layers, delta.prefix)
    return x_t, ExpertReport(
        name=name,
        rank=max(delta.ranks.values()),
        exclusive_rank=max(x_t.ranks.values()),
        exclusive_error=_ratio(num, den_own),
        reconstruction_error=_ratio(num, den_delta),
    )


def decompose(
    experts: Mapping[str, AdapterFactors],
    config: TwinConfig | None = None,
    progress: ProgressBar | None = None,
) -> TwinDecomposition:
    """Twin decomposition of LoRA experts, entirely in low-rank form.

    `progress` advances once per (expert, module kind) truncated.
    """
    cfg = config or TwinConfig()
    if not experts:
        raise InvalidRequestError("no experts to decompose", param="experts")
    if cfg.exclusive_rank is None and cfg.exclusive_energy is None:
        raise InvalidRequestError("give exclusive_rank and/or exclusive_energy", param="rank")
    names = tuple(experts)
    values = [experts[n] for n in names]
    shared = merge(cfg.shared_method, values, cfg.shared_options)
    if cfg.shared_rank is not None:
        shared = truncate_adapter(shared, cfg.shared_rank)
    exclusives: dict[str, AdapterFactors] = {}
    report = []
    for name, delta in zip(names, values, strict=True):
        exclusives[name], r = _exclusive(name, delta, shared, cfg, progress)
        report.append(r)
    return TwinDecomposition(names, shared, exclusives, tuple(report), cfg, dict(experts))


def decompose_dense(
    experts: Mapping[str, DenseDelta],
    config: TwinConfig | None = None,
    fold_shared: bool = True,
    progress: ProgressBar | None = None,
) -> TwinDecomposition:
    """Twin decomposition of full fine-tunes τ_t (dense), one module at a time.

    S is formed densely with the shared method (task_arithmetic, ties, dare_linear or
    dare_ties); exclusives are the rank-k SVD of τ_t − S. With `fold_shared`, S is kept
    dense in `shared_dense` (fold it into the base once); otherwise it is compressed to
    `config.shared_rank` (default: k) and served as part of every merge.
    `progress` advances once per module (kind, layer).
    """
    cfg = config or TwinConfig()
    if not experts:
        raise InvalidRequestError("no experts to decompose", param="experts")
    method = METHODS.get(cfg.shared_method)
    if method.combine is None:
        dense = sorted(m.name for m in METHODS if m.combine is not None)
        raise InvalidRequestError(
            f"dense experts take shared_method in {dense}, not {cfg.shared_method!r}",
            param="shared_method",
        )
    if cfg.exclusive_rank is None:
        raise InvalidRequestError("dense decomposition needs exclusive_rank", param="rank")
    names = tuple(experts)
    values = [experts[n] for n in names]
    method.check(len(values), cfg.shared_options)
    opts = method.resolve(cfg.shared_options, len(values))
    combine = method.combine(opts)
    w = torch.tensor(need(opts.weights))
    kinds = sorted({k for v in values for k in v.groups})
    shared_dense: dict[str, Tensor] = {}
    shared_lr: dict[str, LowRank] = {}
    excl: dict[str, dict[str, LowRank]] = {n: {} for n in names}
    layouts: dict[str, tuple[int, ...]] = {}
    num = dict.fromkeys(names, 0.0)
    den_own = dict.fromkeys(names, 0.0)
    den_delta = dict.fromkeys(names, 0.0)
    s_rank = cfg.shared_rank or cfg.exclusive_rank
    for kind in kinds:
        lay = tuple(sorted({i for v in values if kind in v.layers for i in v.layers[kind]}))
        layouts[kind] = lay
        stacks = [_dense_aligned(v, kind, lay) for v in values]
        s_layers, s_fact = [], []
        x_fact: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {n: [] for n in names}
        for j, layer in enumerate(lay):
            taus = torch.stack([st[j] for st in stacks])
            s = combine(taus, w.to(taus.dtype), kind, layer)
            if fold_shared:
                s_layers.append(s)
            else:
                s_fact.append(top_singular(s, min(s_rank, *s.shape)))
                u, sv, vh = s_fact[-1]
                s = (u * sv) @ vh  # what is served
            for i, n in enumerate(names):
                own = taus[i] - s
                k = min(cfg.exclusive_rank, *own.shape)
                u, sv, vh = top_singular(own, k)
                x_fact[n].append((u, sv, vh))
                own_sq = float(own.double().pow(2).sum())
                kept = float(sv.double().pow(2).sum())
                num[n] += max(0.0, own_sq - kept)
                den_own[n] += own_sq
                den_delta[n] += float(taus[i].double().pow(2).sum())
            if progress is not None:
                progress.update(1)
        if fold_shared:
            shared_dense[kind] = torch.stack(s_layers)
        else:
            shared_lr[kind] = stack_svd(s_fact)
        for n in names:
            excl[n][kind] = stack_svd(x_fact[n])
    prefix = values[0].prefix
    exclusives = {n: AdapterFactors(excl[n], layouts, prefix) for n in names}
    report = tuple(
        ExpertReport(
            name=n,
            rank=min(min(t.shape[1:]) for t in experts[n].groups.values()),
            exclusive_rank=max(exclusives[n].ranks.values()),
            exclusive_error=_ratio(num[n], den_own[n]),
            reconstruction_error=_ratio(num[n], den_delta[n]),
        )
        for n in names
    )
    return TwinDecomposition(
        names,
        None if fold_shared else AdapterFactors(shared_lr, layouts, prefix),
        exclusives,
        report,
        cfg,
        {n: experts[n].to_factors() for n in names},
        DenseDelta(shared_dense, layouts, prefix) if fold_shared else None,
    )


def _ratio(num_sq: float, den_sq: float) -> float:
    return math.sqrt(num_sq / den_sq) if den_sq > 0 else 0.0


def _dense_aligned(v: DenseDelta, kind: str, lay: tuple[int, ...]) -> Tensor:
    t = v.groups.get(kind)
    if t is None:
        raise AdapterError(f"dense experts must cover the same modules; one lacks {kind}")
    if v.layers[kind] == lay:
        return t
    pos = {idx: j for j, idx in enumerate(v.layers[kind])}
    out = t.new_zeros(len(lay), *t.shape[1:])
    for j, idx in enumerate(lay):
        if idx in pos:
            out[j] = t[pos[idx]]
    return out
