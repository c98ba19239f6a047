"""Merging PEFT dirs: load, merge, write."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mergeserve.adapters.lowrank import ProgressBar
from mergeserve.adapters.merging.dense import count_modules
from mergeserve.adapters.merging.method import MergeContext
from mergeserve.adapters.merging.options import MergeOptions
from mergeserve.adapters.merging.table import METHODS, merge
from mergeserve.adapters.peft_io import (
    BaseModelSpec,
    load_lora_factors,
    read_lora_dir,
    save_lora_factors,
)
from mergeserve.errors import InvalidRequestError


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
