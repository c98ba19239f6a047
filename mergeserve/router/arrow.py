"""`ArrowRouter`: routing with no data at all (Arrow, Ostapenko et al. 2024, as in PEFT's
`ArrowLoraLinearLayer`).

Each expert's prototype in a module is the top right singular vector of its ΔW = B·A,
the input direction it amplifies most. The base model runs on the request; per token and
module, the |cosine| of the module's input with each prototype, softmaxed over experts
at `token_temperature`, gives that token's coefficients; the request's weights are
their mean over tokens and modules (returned as log mean coefficients).
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergeserve.adapters.lowrank import AdapterFactors, truncate
from mergeserve.adapters.peft_io import discover_lora_dirs, load_lora_factors
from mergeserve.errors import AdapterError
from mergeserve.router.base import check_new_name
from mergeserve.router.embedders import HiddenStateEmbedder, decoder_layers


def _module(layer: nn.Module, kind: str) -> nn.Module | None:
    """The module a kind names inside a decoder layer ('self_attn.q_proj', 'mlp.down_proj')."""
    try:
        return layer.get_submodule(kind)
    except AttributeError:
        return None


class ArrowRouter:
    """Zero-data routing from each expert's top right singular vectors (Arrow)."""

    def __init__(
        self,
        runner: HiddenStateEmbedder,
        *,
        token_temperature: float = 0.05,
        top_k: int | None = None,
        kinds: Sequence[str] | None = None,
    ):
        """`runner` must keep every layer the experts touch (`HiddenStateEmbedder(layer=None)`).
        `kinds` limits the module kinds used (default: every kind an expert targets)."""
        if not token_temperature > 0:
            raise ValueError(f"token_temperature must be > 0, got {token_temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.runner = runner
        self.token_temperature = token_temperature
        self.top_k = top_k
        self.kinds = tuple(kinds) if kinds is not None else None
        self._layers = decoder_layers(runner.model)
        self._experts: tuple[str, ...] = ()
        self._protos: dict[tuple[str, int], Tensor] = {}  # (kind, layer) -> [E, in]
        self._lock = threading.Lock()

    @classmethod
    def from_experts_dir(
        cls, runner: HiddenStateEmbedder, root: Path, **kwargs: Any
    ) -> ArrowRouter:
        router = cls(runner, **kwargs)
        for info in discover_lora_dirs(root):
            router.add_expert(info.name, load_lora_factors(info.path))
        return router

    @property
    def name(self) -> str:
        return "arrow"

    @property
    def experts(self) -> tuple[str, ...]:
        return self._experts

    def add_expert(self, name: str, adapter: AdapterFactors) -> None:
        """Route to `name` from its adapter's own weights: no examples, no training."""
        new: dict[tuple[str, int], Tensor] = {}
        for kind, lr in adapter.groups.items():
            if self.kinds is not None and kind not in self.kinds:
                continue
            top = truncate(lr, rank=1).A[:, 0, :].float()  # [L, in] = σ₁^½ v₁ᵀ
            unit = nn.functional.normalize(top, dim=-1)
            for row, layer in zip(unit, adapter.layers[kind], strict=True):
                if layer >= len(self._layers) or _module(self._layers[layer], kind) is None:
                    raise AdapterError(
                        f"expert {name!r}: {kind} of layer {layer} is not in the base model"
                    )
                new[(kind, layer)] = row
        if not new:
            raise AdapterError(f"expert {name!r}: no module of the kinds {self.kinds}")
        with self._lock:
            check_new_name(name, self._experts)
            e = len(self._experts)
            protos = {}
            for key in set(self._protos) | set(new):
                old = self._protos.get(key)
                if old is None:
                    old = torch.zeros(e, new[key].shape[0])
                row = new.get(key, torch.zeros(old.shape[1]))
                protos[key] = torch.cat([old, row[None]])
            self._protos = protos
            self._experts = (*self._experts, name)

    def remove_expert(self, name: str) -> None:
        with self._lock:
            if name not in self._experts:
                raise KeyError(f"expert {name!r} is not routed")
            i = self._experts.index(name)
            protos = {k: torch.cat([p[:i], p[i + 1 :]]) for k, p in self._protos.items()}
            self._protos = {k: p for k, p in protos.items() if p.abs().sum() > 0}
            self._experts = self._experts[:i] + self._experts[i + 1 :]

    def with_expert(
        self, name: str, expert_dir: Path, factors: AdapterFactors | None = None
    ) -> ArrowRouter:
        new = copy.copy(self)
        new.add_expert(name, factors if factors is not None else load_lora_factors(expert_dir))
        return new

    def without_expert(self, name: str) -> ArrowRouter:
        new = copy.copy(self)
        new.remove_expert(name)
        return new

    def _coefficients(self, x: Tensor, protos: Tensor) -> Tensor:
        """Per-token Arrow coefficients: softmax over the top-k of |cos(x, prototype)|."""
        sim = (nn.functional.normalize(x.float(), dim=-1) @ protos.T).abs()  # [n, T, E]
        # An expert without this module scores 0; that is its honest similarity here.
        if self.top_k is not None and self.top_k < protos.shape[0]:
            kth = sim.topk(self.top_k, dim=-1).values[..., -1:]
            sim = sim.masked_fill(sim < kth, -math.inf)
        return torch.softmax(sim / self.token_temperature, dim=-1)

    @torch.inference_mode()
    def logits(self, texts: Sequence[str]) -> Tensor:
        with self._lock:  # the hooks go on the one shared model: one pass at a time
            return self._logits(texts)

    def _logits(self, texts: Sequence[str]) -> Tensor:
        experts, protos = self._experts, self._protos
        if not texts:
            return torch.empty(0, len(experts))
        acc = torch.zeros(len(texts), len(experts))
        mask_box: list[Tensor] = []
        offset = [0]

        def hook_for(p: Tensor) -> Any:
            def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
                mask = mask_box[0].unsqueeze(-1).float()  # [n, T, 1]
                coeff = self._coefficients(args[0], p) * mask
                per_text = coeff.sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
                acc[offset[0] : offset[0] + per_text.shape[0]] += per_text

            return hook

        hooks = []
        for (kind, layer), p in protos.items():
            mod = _module(self._layers[layer], kind)
            assert mod is not None  # checked in add_expert
            hooks.append(mod.register_forward_pre_hook(hook_for(p)))
        try:
            for i in range(0, len(texts), self.runner.batch_size):
                chunk = list(texts[i : i + self.runner.batch_size])
                enc = self.runner.tokenize(chunk)
                mask_box[:] = [enc["attention_mask"]]
                offset[0] = i
                self.runner.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        finally:
            for h in hooks:
                h.remove()
        return torch.log((acc / max(len(protos), 1)).clamp_min(1e-12))
