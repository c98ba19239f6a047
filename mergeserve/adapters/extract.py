"""Bring full fine-tunes in: τ = θ_ft − θ_base per linear layer, as dense deltas or LoRAs.

Only the 2-D weights inside the decoder blocks (`….layers.<i>.<kind>.weight`) become
deltas — the modules a LoRA can express. Anything else the fine-tune changed (embeddings,
norms, lm_head) is listed in `Extraction.skipped`, so that an operator knows what the
LoRA leaves out instead of finding out from the scores.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mergeserve.adapters.lowrank import (
    AdapterFactors,
    DenseDelta,
    LowRank,
    ProgressBar,
    rank_for_energy,
    stack_svd,
    top_singular,
)
from mergeserve.errors import AdapterError

LORA_PREFIX = "base_model.model.model"
_BLOCK = re.compile(r"^(?:model\.)?layers\.(?P<idx>\d+)\.(?P<kind>.+)\.weight$")


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint (sharded or not); pickles are refused."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        if any(model_dir.glob("*.bin")):
            raise AdapterError(f"{model_dir}: pickle checkpoints are refused; save as safetensors")
        raise AdapterError(f"{model_dir}: no *.safetensors checkpoint")
    return files


def iter_weights(model_dir: Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for every tensor of a checkpoint, one at a time (memory stays flat)."""
    from safetensors import safe_open

    for f in checkpoint_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield key, sf.get_tensor(key)


def _block_key(name: str) -> tuple[str, int] | None:
    m = _BLOCK.match(name)
    return (m.group("kind"), int(m.group("idx"))) if m else None


@dataclass(frozen=True)
class Extraction:
    factors: AdapterFactors
    relative_error: float
    """‖τ − LoRA‖ / ‖τ‖ over all extracted modules."""
    skipped: tuple[str, ...]
    """Tensors the fine-tune changed that no LoRA module covers."""


def dense_deltas(
    base_dir: Path,
    finetuned_dir: Path,
    targets: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[DenseDelta, tuple[str, ...]]:
    """τ per block linear layer (those whose kind ends with one of `targets`, default all),
    and the names of the other tensors that differ."""
    base = dict(iter_weights(base_dir))
    stacks: dict[str, dict[int, Tensor]] = {}
    skipped = []
    seen = set()
    for name, ft in iter_weights(finetuned_dir):
        seen.add(name)
        b = base.get(name)
        if b is None:
            raise AdapterError(f"{finetuned_dir}: tensor {name!r} is not in the base {base_dir}")
        if b.shape != ft.shape:
            raise AdapterError(
                f"{name}: fine-tuned shape {tuple(ft.shape)} != base {tuple(b.shape)}; "
                "is this a fine-tune of that base model?"
            )
        key = _block_key(name)
        wanted = (
            key is not None
            and ft.dim() == 2
            and (targets is None or key[0].rsplit(".", 1)[-1] in targets)
        )
        if not wanted:
            if not torch.equal(b, ft):
                skipped.append(name)
            continue
        assert key is not None
        tau = ft.to(torch.float64) - b.to(torch.float64)
        if not torch.isfinite(tau).all():
            raise AdapterError(f"{name}: the delta contains NaN or Inf")
        stacks.setdefault(key[0], {})[key[1]] = tau.to(dtype)
    missing = set(base) - seen
    if missing:
        raise AdapterError(f"{finetuned_dir} lacks base tensors, e.g. {sorted(missing)[:3]}")
    if not stacks:
        raise AdapterError(f"no block linear layers matched targets {targets}")
    groups, layers = {}, {}
    for kind, by_layer in sorted(stacks.items()):
        idx = tuple(sorted(by_layer))
        groups[kind] = torch.stack([by_layer[i] for i in idx])
        layers[kind] = idx
    return DenseDelta(groups, layers, LORA_PREFIX), tuple(skipped)


def dense_to_lora(
    delta: DenseDelta,
    rank: int | None = None,
    energy: float | None = None,
    progress: ProgressBar | None = None,
) -> tuple[AdapterFactors, float]:
    """Truncated SVD of each module's τ (randomized for large matrices, see top_singular).

    With `energy`, the rank per module kind is the smallest keeping that fraction of Σσ² in
    every layer (capped by `rank` when both are given). Returns the factors and the
    relative error ‖τ − B A‖ / ‖τ‖ over all modules.
    """
    if rank is None and energy is None:
        raise AdapterError("give rank and/or energy")
    if rank is not None and rank < 1:
        raise AdapterError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise AdapterError(f"energy must be in (0, 1], got {energy}")
    groups: dict[str, LowRank] = {}
    total = resid = 0.0
    for kind, t in delta.groups.items():
        cap = min(rank or min(t.shape[1:]), *t.shape[1:])
        trip = [top_singular(m, cap, full=energy is not None) for m in t]
        k = cap
        if energy is not None:
            k = min(cap, max(1, rank_for_energy(torch.stack([s for _, s, _ in trip]), energy)))
        groups[kind] = lr = stack_svd(trip, k)
        # The residual itself, not ‖τ‖² − Σσ²: that difference cancels in fp32.
        total += float(t.double().pow(2).sum())
        for j in range(t.shape[0]):
            resid += float((t[j] - lr.B[j] @ lr.A[j]).double().pow(2).sum())
        if progress is not None:
            progress.update(len(trip))
    err = math.sqrt(resid / total) if total > 0 else 0.0
    return AdapterFactors(groups, delta.layers, delta.prefix), err


def extract_lora(
    base_dir: Path,
    finetuned_dir: Path,
    rank: int | None = 16,
    energy: float | None = None,
    targets: Sequence[str] | None = None,
    progress: ProgressBar | None = None,
) -> Extraction:
    """A LoRA approximating a full fine-tune (θ_ft − θ_base per block linear layer)."""
    delta, skipped = dense_deltas(base_dir, finetuned_dir, targets)
    factors, err = dense_to_lora(delta, rank, energy, progress)
    return Extraction(factors, err, skipped)
