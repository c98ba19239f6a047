"""The router `router.kind` names: one table, kind -> how to build it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from mergeserve.adapters.lowrank import AdapterFactors
from mergeserve.adapters.peft_io import discover_lora_dirs, load_lora_factors
from mergeserve.errors import ConfigurationError
from mergeserve.router.arrow import ArrowRouter
from mergeserve.router.base import Router, example_prompts
from mergeserve.router.embedders import Embedder, HiddenStateEmbedder
from mergeserve.router.mlp import MLPRouter, mlp_router_dir
from mergeserve.router.open_world import OpenWorldGate
from mergeserve.router.prototype import PrototypeRouter


@dataclass(frozen=True)
class RouterInputs:
    """What building a router may use; each kind takes what it needs and says what it
    misses."""

    experts: Mapping[str, Path]
    """Expert name -> its PEFT dir."""
    factors: Mapping[str, AdapterFactors] | None = None
    """The experts' factors, if loaded already (Arrow; else read from the dirs)."""
    embedder: Embedder | None = None
    base_dir: Path | None = None
    mlp_dir: Path | None = None
    """Where the MLP's trained weights are."""
    gate: OpenWorldGate | None = None
    """Makes the prototype and MLP routers open-world."""

    def prototypes(self, kind: str) -> tuple[PrototypeRouter, dict[str, list[str]]]:
        if self.embedder is None:
            raise ConfigurationError(f"the {kind} router needs an embedder")
        examples = {n: example_prompts(p) for n, p in self.experts.items()}
        return PrototypeRouter.from_examples(self.embedder, examples, gate=self.gate), examples


def _prototype(i: RouterInputs) -> Router:
    return i.prototypes("prototype")[0]


def _mlp(i: RouterInputs) -> Router:
    proto, examples = i.prototypes("mlp")
    if i.mlp_dir is None:
        raise ConfigurationError("the mlp router needs the dir of its trained weights")
    return MLPRouter.load(i.mlp_dir, proto.embedder, proto, examples)


def _arrow(i: RouterInputs) -> Router:
    if i.base_dir is None:
        raise ConfigurationError("the arrow router needs the base model dir")
    router = ArrowRouter(HiddenStateEmbedder(i.base_dir, layer=None))
    for name, path in i.experts.items():
        router.add_expert(name, i.factors[name] if i.factors else load_lora_factors(path))
    return router


ROUTERS: Mapping[str, Callable[[RouterInputs], Router]] = MappingProxyType(
    {"prototype": _prototype, "mlp": _mlp, "arrow": _arrow}
)
"""Every router kind (`router.kind`, `mergeserve route --router`) and how it is built."""


def router_for(
    kind: str,
    experts: Mapping[str, Path],
    *,
    factors: Mapping[str, AdapterFactors] | None = None,
    embedder: Embedder | None = None,
    base_dir: Path | None = None,
    mlp_dir: Path | None = None,
    gate: OpenWorldGate | None = None,
) -> Router:
    """The `kind` router over `experts` (name -> PEFT dir): prototypes from each dir's
    examples.jsonl, the MLP saved in `mlp_dir` (prototypes for the experts it has not
    seen), or Arrow from the adapters' `factors` (loaded from the dirs if not given).
    `gate` makes the prototype and MLP routers open-world (Arrow has no examples to
    calibrate one from: closed world)."""
    build = ROUTERS.get(kind)
    if build is None:
        raise ConfigurationError(f"unknown router {kind!r}; routers: {', '.join(ROUTERS)}")
    return build(RouterInputs(experts, factors, embedder, base_dir, mlp_dir, gate))


def load_router(
    name: str,
    experts_dir: Path,
    *,
    embedder: Embedder | None = None,
    base_dir: Path | None = None,
    gate: OpenWorldGate | None = None,
) -> Router:
    """The named router over the experts under `experts_dir` (its MLP saved beside them)."""
    experts = {info.name: info.path for info in discover_lora_dirs(experts_dir)}
    return router_for(
        name,
        experts,
        embedder=embedder,
        base_dir=base_dir,
        mlp_dir=mlp_router_dir(experts_dir),
        gate=gate,
    )
