"""`PrototypeRouter`: each expert is the embeddings of its example prompts.

A request scores the cosine similarity to each expert's centroid (`aggregate="mean"`) or
to its nearest example (`"max"`), times `scale`. Adding an expert is embedding its
examples: no training, nothing else changes. With a gate (open_world.py) it is
open-world.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mergeserve.adapters.lowrank import AdapterFactors
from mergeserve.errors import ConfigurationError
from mergeserve.router.base import check_new_name, example_prompts, experts_examples
from mergeserve.router.embedders import Embedder
from mergeserve.router.open_world import OpenWorldGate, Similarities


@dataclass(frozen=True)
class _ProtoState:
    experts: tuple[str, ...]
    centroids: Tensor  # [E, d], unit rows
    examples: Tensor  # [N, d], unit rows
    owner: Tensor  # [N], the expert index of each example
    thresholds: Tensor  # [E], each expert's open-world threshold (router/open_world.py)


class PrototypeRouter:
    """Cosine similarity to each expert's example prompts; experts come and go in O(1).

    With a `gate` (router/open_world.py) it is open-world: `scores` also gives each
    request's in-domain mass, calibrated from the same examples (and, for the knn gate,
    the general prompts the gate holds)."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        scale: float = 20.0,
        aggregate: Literal["mean", "max"] = "mean",
        gate: OpenWorldGate | None = None,
    ):
        if aggregate not in ("mean", "max"):
            raise ValueError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.embedder = embedder
        self.scale = scale
        self.aggregate = aggregate
        self.gate = gate
        d = embedder.dim
        self._state = _ProtoState(
            (), torch.empty(0, d), torch.empty(0, d), torch.empty(0).long(), torch.empty(0)
        )
        self._lock = threading.Lock()  # writers only: readers take the current state

    @classmethod
    def from_examples(
        cls, embedder: Embedder, examples: Mapping[str, Sequence[str]], **kwargs: Any
    ) -> PrototypeRouter:
        router = cls(embedder, **kwargs)
        for name, prompts in examples.items():
            router.add_expert(name, prompts)
        return router

    @classmethod
    def from_experts_dir(cls, embedder: Embedder, root: Path, **kwargs: Any) -> PrototypeRouter:
        return cls.from_examples(embedder, experts_examples(root), **kwargs)

    @property
    def name(self) -> str:
        return "prototype"

    @property
    def experts(self) -> tuple[str, ...]:
        return self._state.experts

    def add_expert(self, name: str, prompts: Sequence[str]) -> None:
        """Route to `name` from now on, by the embeddings of its example prompts."""
        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            raise ValueError(f"expert {name!r}: no example prompts")
        emb = self.embedder.embed(prompts)
        tau = self.gate.threshold(emb) if self.gate is not None else -1.0
        with self._lock:
            s = self._state
            check_new_name(name, s.experts)
            centroid = nn.functional.normalize(emb.mean(dim=0, keepdim=True), dim=-1)
            owner = torch.full((len(prompts),), len(s.experts), dtype=torch.long)
            self._state = _ProtoState(
                (*s.experts, name),
                torch.cat([s.centroids, centroid]),
                torch.cat([s.examples, emb]),
                torch.cat([s.owner, owner]),
                torch.cat([s.thresholds, torch.tensor([tau])]),
            )

    def remove_expert(self, name: str) -> None:
        with self._lock:
            s = self._state
            if name not in s.experts:
                raise KeyError(f"expert {name!r} is not routed")
            i = s.experts.index(name)
            keep = s.owner != i
            owner = s.owner[keep]
            self._state = _ProtoState(
                s.experts[:i] + s.experts[i + 1 :],
                torch.cat([s.centroids[:i], s.centroids[i + 1 :]]),
                s.examples[keep],
                owner - (owner > i).long(),
                torch.cat([s.thresholds[:i], s.thresholds[i + 1 :]]),
            )

    def with_expert(
        self, name: str, expert_dir: Path, factors: AdapterFactors | None = None
    ) -> PrototypeRouter:
        new = copy.copy(self)
        new.add_expert(name, example_prompts(expert_dir))
        return new

    def without_expert(self, name: str) -> PrototypeRouter:
        new = copy.copy(self)
        new.remove_expert(name)
        return new

    @staticmethod
    def _nearest(emb: Tensor, s: _ProtoState) -> Tensor:
        """[n, E] cosine similarity of unit rows `emb` to each expert's nearest example."""
        sims = emb @ s.examples.T  # [n, N]
        out = torch.full((emb.shape[0], len(s.experts)), -1.0)
        return out.scatter_reduce(1, s.owner.expand(emb.shape[0], -1), sims, reduce="amax")

    def similarities(self, emb: Tensor) -> Tensor:
        """[n, E] cosine similarity of unit rows `emb` to each expert."""
        s = self._state
        if self.aggregate == "mean":
            return emb @ s.centroids.T
        return self._nearest(emb, s)

    def logits_for(self, emb: Tensor) -> Tensor:
        return self.similarities(emb) * self.scale

    def logits(self, texts: Sequence[str]) -> Tensor:
        return self.logits_for(self.embedder.embed(texts))

    def _sims(self, emb: Tensor, s: _ProtoState) -> Similarities:
        return Similarities(emb, emb @ s.centroids.T, self._nearest(emb, s))

    @property
    def thresholds(self) -> dict[str, float]:
        """Each expert's open-world threshold τ (router/open_world.py)."""
        s = self._state
        return dict(zip(s.experts, s.thresholds.tolist(), strict=True))

    def in_domain_score(self, emb: Tensor) -> Tensor:
        """The gate's raw in-domain score of each request (unit rows `emb`)."""
        if self.gate is None:
            raise ConfigurationError("this prototype router has no open-world gate")
        s = self._state
        return self.gate.scores(self._sims(emb, s), s.thresholds)

    def in_domain_for(self, emb: Tensor) -> Tensor | None:
        """The in-domain mass of each request; None without a gate (closed world)."""
        if self.gate is None:
            return None
        s = self._state
        return self.gate.in_domain(self._sims(emb, s), s.thresholds)

    def scores(self, texts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """Logits and in-domain mass from one embedding and one set of similarities."""
        emb = self.embedder.embed(texts)
        s = self._state
        sims = self._sims(emb, s)
        logits = (sims.centroid if self.aggregate == "mean" else sims.nearest) * self.scale
        mass = self.gate.in_domain(sims, s.thresholds) if self.gate is not None else None
        return logits, mass
