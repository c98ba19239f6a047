"""The in-engine mixture: one *bundle* adapter per expert-set version, and a per-request
scale over its rank axis.

A weighted merge of low-rank terms is rank concatenation (adapters/lowrank.py):

    Σ_t w_t B_t A_t = [B_1 | … | B_T] · diag(s) · [A_1; …; A_T],   s = (w_1·1_{r_1}, …)

so the engine can hold the concatenation once — the bundle — and serve any weights by
scaling the rank-space activations between LoRA shrink and expand (the vLLM plugin,
mergeserve/vllm_plugin.py). For `dynamic:twin` the terms are the shared adapter (first
block, scale 1) and the exclusives; for `dynamic:exact` the uncompressed experts.

Every term is one *block* of a fixed rank in every module kind: a kind where a term has
a smaller rank (rank_pattern) or none is padded with zero rows/columns. Zero columns add
exact zeros, so Δ is unchanged, and the engine needs only one scale vector per request,
not one per module kind.

The request carries `MixtureSpec.extra_args()` in vLLM's SamplingParams.extra_args (or as
`vllm_xargs` in a request to vLLM's OpenAI server); the plugin expands it to the [R]
scale. Imports no vLLM.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mergeserve.adapters.lowrank import AdapterFactors, LowRank, aligned, union_layout
from mergeserve.adapters.peft_io import is_int

MIX_RANKS = "mergeserve_mix_ranks"
MIX_WEIGHTS = "mergeserve_mix_weights"
"""The keys of SamplingParams.extra_args that carry a request's mixture: two flat lists,
so that they also pass as `vllm_xargs` through vLLM's OpenAI server."""

MAX_BLOCKS = 1024
"""Most blocks (terms) a mixture may have; a bundle has one per expert (+ S)."""
MAX_BLOCK_RANK = 1 << 16
MAX_ABS_WEIGHT = 1e3
"""Largest |weight| of a block. The scale is applied in float32 to activations, and a
reply computed with a huge weight is noise (and NaN past float32's range, which prefix
caching would then hand to later requests): refused instead."""


def _f32(w: float) -> float:
    """`w` as the float32 the engine multiplies by (so checks and hashes see that); ±inf
    past float32's range. A struct round trip: 0.2 µs against 4 µs through a tensor, on
    every request's path."""
    try:
        return float(struct.unpack("f", struct.pack("f", w))[0])
    except OverflowError:  # Pythons that refuse to pack it rather than round to inf
        return math.copysign(math.inf, w)


@dataclass(frozen=True)
class MixtureSpec:
    """A request's weights over a bundle's blocks: block t (rank `ranks[t]`) is scaled by
    `weights[t]`.

    Checked on construction, as the engine will apply it: at most MAX_BLOCKS blocks of
    rank 1..MAX_BLOCK_RANK, weights finite in float32 and |w| <= MAX_ABS_WEIGHT; the
    weights are stored as their float32 values. Raises ValueError otherwise."""

    ranks: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.ranks) != len(self.weights):
            raise ValueError(f"{len(self.ranks)} block ranks but {len(self.weights)} weights")
        if not self.ranks:
            raise ValueError("a mixture needs at least one block")
        if len(self.ranks) > MAX_BLOCKS:
            raise ValueError(f"{len(self.ranks)} blocks; a mixture has at most {MAX_BLOCKS}")
        if any(not 1 <= r <= MAX_BLOCK_RANK for r in self.ranks):
            raise ValueError(f"block ranks must be in 1..{MAX_BLOCK_RANK}")
        weights = tuple(_f32(w) for w in self.weights)
        if not all(math.isfinite(w) and abs(w) <= MAX_ABS_WEIGHT for w in weights):
            raise ValueError(
                f"mixture weights must be finite (in float32) with |w| <= {MAX_ABS_WEIGHT:g}"
            )
        object.__setattr__(self, "weights", weights)

    def salt(self, salt: str | None = None) -> str:
        """A prefix-cache salt for this mixture (combined with a client's own `salt`):
        requests with equal mixtures get equal salts and share KV blocks; different
        mixtures never do (vLLM hashes the salt into the first block of the prompt)."""
        h = hashlib.sha256(b"mergeserve-mixture/1\n")
        h.update(json.dumps([list(self.ranks), list(self.weights)]).encode())
        mine = f"mergeserve-mix-{h.hexdigest()[:32]}"
        return mine if not salt or salt == mine else f"{salt}|{mine}"

    @property
    def rank(self) -> int:
        return sum(self.ranks)

    def scale(self) -> Tensor:
        """The [R] float32 scale vector: weights[t] repeated over block t."""
        return torch.repeat_interleave(
            torch.tensor(self.weights, dtype=torch.float32), torch.tensor(self.ranks)
        )

    def row(self, width: int) -> Tensor:
        """The scale zero-padded to `width` (≥ rank): [width] float32, made once per width
        and kept on the spec (the engine asks for it at every step of the request).
        Read-only: callers copy it."""
        rows: dict[int, Tensor] = self.__dict__.setdefault("_rows", {})
        row = rows.get(width)
        if row is None:
            if self.rank > width:
                raise ValueError(f"a mixture of rank {self.rank} exceeds the slot rank {width}")
            row = torch.zeros(width, dtype=torch.float32)
            row[: self.rank] = self.scale()
            rows[width] = row
        return row

    def extra_args(self) -> dict[str, Any]:
        """What goes into SamplingParams.extra_args (JSON-able: also travels as
        `vllm_xargs` to a remote vLLM server with the plugin installed)."""
        return {MIX_RANKS: list(self.ranks), MIX_WEIGHTS: list(self.weights)}

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None) -> MixtureSpec | None:
        """The spec a request carries, or None. Raises ValueError for a malformed one."""
        if not extra_args or (MIX_RANKS not in extra_args and MIX_WEIGHTS not in extra_args):
            return None
        raw_r, raw_w = extra_args.get(MIX_RANKS), extra_args.get(MIX_WEIGHTS)
        if not isinstance(raw_r, list | tuple) or not isinstance(raw_w, list | tuple):
            raise ValueError(
                f"a mixture needs both {MIX_RANKS} and {MIX_WEIGHTS} as lists of numbers"
            )
        if len(raw_r) > MAX_BLOCKS or len(raw_w) > MAX_BLOCKS:
            raise ValueError(f"a mixture has at most {MAX_BLOCKS} blocks")
        if not all(is_int(r) for r in raw_r):
            raise ValueError(f"{MIX_RANKS} must be integers")
        if not all(isinstance(w, int | float) and not isinstance(w, bool) for w in raw_w):
            raise ValueError(f"{MIX_WEIGHTS} must be numbers")
        return cls(tuple(raw_r), tuple(float(w) for w in raw_w))


@dataclass(frozen=True)
class MixtureBundle:
    """Terms concatenated along the rank axis, one block per term (see the module doc).

    `factors` is a plain adapter of rank `rank` (Σ block ranks): written as a PEFT dir,
    any LoRA engine loads it; with the scale of `spec(...)` applied between shrink and
    expand it computes Σ_t w_t Δ_t.
    """

    names: tuple[str, ...]
    """Block order; a shared adapter, when there is one, is the first block."""
    ranks: tuple[int, ...]
    factors: AdapterFactors

    @property
    def rank(self) -> int:
        return sum(self.ranks)

    @classmethod
    def build(cls, terms: Mapping[str, AdapterFactors]) -> MixtureBundle:
        """Concatenate `terms` in order; each block gets the term's largest rank over its
        module kinds, the other kinds padded with zeros."""
        if not terms:
            raise ValueError("a bundle needs at least one term")
        names = tuple(terms)
        values = [terms[n] for n in names]
        prefixes = {t.prefix for t in values}
        if len(prefixes) != 1:
            raise ValueError(f"terms of different module layouts: {sorted(prefixes)}")
        ranks = tuple(max(t.ranks.values(), default=0) for t in values)
        if any(r < 1 for r in ranks):
            empty = [n for n, r in zip(names, ranks, strict=True) if r < 1]
            raise ValueError(f"terms without factors: {empty}")
        layout = union_layout(values)
        groups: dict[str, LowRank] = {}
        for kind, lay in layout.items():
            like = next(t.groups[kind] for t in values if kind in t.groups)
            a_parts, b_parts = [], []
            for t, r in zip(values, ranks, strict=True):
                lr = aligned(t, kind, lay)
                A = like.A.new_zeros(len(lay), r, like.in_features)
                B = like.B.new_zeros(len(lay), like.out_features, r)
                if lr is not None:
                    A[:, : lr.rank] = lr.A
                    B[:, :, : lr.rank] = lr.B
                a_parts.append(A)
                b_parts.append(B)
            groups[kind] = LowRank(torch.cat(a_parts, 1), torch.cat(b_parts, 2))
        return cls(names, ranks, AdapterFactors(groups, layout, values[0].prefix))

    def spec(
        self, weights: Mapping[str, float], *, fixed: Mapping[str, float] | None = None
    ) -> MixtureSpec:
        """The spec for `weights` by term name (absent terms weigh 0); `fixed` names
        terms whose weight does not come from the request (the shared adapter: 1)."""
        fixed = fixed or {}
        unknown = set(weights) - set(self.names)
        if unknown:
            raise ValueError(f"terms {sorted(unknown)} are not in the bundle {list(self.names)}")
        w = tuple(float(fixed.get(n, weights.get(n, 0.0))) for n in self.names)
        return MixtureSpec(self.ranks, w)


def scale_rows(
    specs: Sequence[MixtureSpec | None], num_tokens: Sequence[int], width: int
) -> Tensor | None:
    """Per-token scale rows [Σ num_tokens, width] for a batch whose request i has
    `num_tokens[i]` consecutive tokens: its spec's scale (zero-padded to `width`), or ones
    for a request without a spec. None when no request has one (nothing to scale)."""
    if len(specs) != len(num_tokens):
        raise ValueError(f"{len(specs)} specs for {len(num_tokens)} requests")
    if all(s is None for s in specs):
        return None
    ones = torch.ones(width, dtype=torch.float32)
    per_request = torch.stack([ones if s is None else s.row(width) for s in specs])
    if all(n == 1 for n in num_tokens):  # a decode step: one token per request
        return per_request
    return per_request.repeat_interleave(torch.tensor(num_tokens, dtype=torch.long), dim=0)
