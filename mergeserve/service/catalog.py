"""What each `model` name in a request means (DESIGN.md, "Models served").

* `base`              no adapter
* `expert:<name>`     one expert's LoRA dir
* `static:<method>`   one static merge of every expert, built once per expert set
* `dynamic:twin`      routed, S + Σ wᵢ Xᵢ       (merged per request)
* `dynamic:exact`     routed, Σ wᵢ Δᵢ           (merged per request)
* `dynamic`           an alias of one of the two (settings)
* `route:top1`        routed, the top expert's own adapter, or base when the router
                      routes the request to none: adapter switching behind a classifier,
                      as vLLM, LoRAX and S-LoRA users serve many experts (the baseline
                      that per-request merging has to beat)

A served model's `arm` is the name metrics and the `merge` object report: its own id,
except for the alias `dynamic`, whose arm is the mode it stands for, so that one arm is
never counted under two names.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from mergeserve.adapters.peft_io import LoraAdapterInfo
from mergeserve.errors import ConfigurationError, ModelNotFoundError
from mergeserve.runtime.dynamic import DYNAMIC_MODES, DynamicMode
from mergeserve.runtime.engine import LoRATarget
from mergeserve.runtime.expert_set import build_seconds
from mergeserve.runtime.materialize import IdAllocator
from mergeserve.service.model_ids import BASE, DYNAMIC, EXPERT_PREFIX, ROUTE_TOP1, STATIC_PREFIX

ModelKind = Literal["base", "expert", "static", "dynamic", "route"]
BuildStatus = Literal["queued", "building", "failed"]


@dataclass(frozen=True)
class BuildState:
    """A static arm that is not served yet: waiting for its build, being built (since
    `since`, a time.time()), or failed (`error`)."""

    status: BuildStatus
    since: float | None = None
    error: str | None = None

    def note(self) -> str:
        """What the arm is doing, for people: why it failed, or how long it has been
        building, or that it waits for the arms before it."""
        if self.status == "failed":
            return self.error or "failed"
        if self.since is not None:
            return f"building for {time.time() - self.since:.0f} s"
        return "waiting for the static arms before it"


def dynamic_id(mode: DynamicMode) -> str:
    return f"{DYNAMIC}:{mode}"


@dataclass(frozen=True)
class ServedModel:
    id: str
    """The name clients put in `model`."""
    kind: ModelKind
    root: str
    """What the model is built from: the base model dir, an adapter dir, or a description."""
    lora: LoRATarget | None = None
    """The fixed adapter of `expert:` and `static:` models."""
    mode: DynamicMode | None = None
    """The merge of a dynamic model."""
    weights: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """The fixed expert weights of `expert:` models (`{name: 1.0}`)."""
    digest: str | None = None
    """A content digest of what answers (base model, adapter, router and policy): equal
    digests give equal greedy replies, so a client may cache replies by it."""
    build_s: float | None = None
    """How long a static merge took to build (seconds, when it was built; None if
    unknown or not a static merge)."""
    build: BuildState | None = None
    """Set while a static arm is not built yet (it has no `lora` then): requests to it
    get 503 with Retry-After."""

    @property
    def arm(self) -> str:
        return dynamic_id(self.mode) if self.mode is not None else self.id


class ModelCatalog:
    """An immutable name → ServedModel map."""

    def __init__(self, models: Iterable[ServedModel]):
        self._models: Mapping[str, ServedModel] = MappingProxyType({m.id: m for m in models})

    @classmethod
    def build(
        cls,
        base_dir: Path,
        experts: Iterable[LoraAdapterInfo],
        max_lora_rank: int,
        *,
        static: Mapping[str, LoraAdapterInfo] | None = None,
        dynamic_default: DynamicMode | None = None,
        ids: IdAllocator | None = None,
        digests: Mapping[str, str] | None = None,
        reuse: ModelCatalog | None = None,
        building: Mapping[str, BuildState] | None = None,
    ) -> ModelCatalog:
        """Every model: base, one per expert, one per static merge, and the dynamic arms
        when `dynamic_default` is given. Engine ids come from `ids` (default: from 1);
        `digests` maps model ids to their content digests (see ServedModel.digest). A
        model of `reuse` with the same name, files and digest keeps its engine id, so a
        change of the expert set reloads only the adapters that changed. `building`:
        the static arms listed before they are built (method -> its state)."""
        ids = ids or IdAllocator()
        dg = digests or {}

        def target(name: str, path: Path) -> LoRATarget:
            old = reuse._models.get(name) if reuse is not None else None
            if (
                old is not None
                and old.lora is not None
                and old.lora.path == path
                and old.digest == dg.get(name)
            ):
                return old.lora
            return LoRATarget(name=name, int_id=ids(), path=path)

        models = [ServedModel(BASE, "base", str(base_dir), digest=dg.get(BASE))]
        too_big = []
        for info in sorted(experts, key=lambda e: e.name):
            if info.rank > max_lora_rank:
                too_big.append(f"{info.name} (r={info.rank})")
            lora = target(f"{EXPERT_PREFIX}{info.name}", info.path)
            models.append(
                ServedModel(
                    lora.name,
                    "expert",
                    str(info.path),
                    lora=lora,
                    weights=MappingProxyType({info.name: 1.0}),
                    digest=dg.get(lora.name),
                )
            )
        if too_big:
            raise ConfigurationError(
                f"experts of rank above max_lora_rank={max_lora_rank}: {', '.join(too_big)}; "
                "raise MERGESERVE_ENGINE__MAX_LORA_RANK"
            )
        built, pending = dict(static or {}), dict(building or {})
        for method in sorted({*built, *pending}):
            name = f"{STATIC_PREFIX}{method}"
            if method not in built:
                root = f"static merge ({pending[method].status})"
                models.append(ServedModel(name, "static", root, build=pending[method]))
                continue
            lora = target(name, built[method].path)
            models.append(
                ServedModel(
                    lora.name,
                    "static",
                    str(built[method].path),
                    lora=lora,
                    digest=dg.get(lora.name),
                    build_s=build_seconds(built[method].path),
                )
            )
        if dynamic_default is not None:
            for mode in DYNAMIC_MODES:
                name = dynamic_id(mode)
                root = f"router + {mode} merge"
                models.append(ServedModel(name, "dynamic", root, mode=mode, digest=dg.get(name)))
            alias = dynamic_id(dynamic_default)
            models.append(
                ServedModel(
                    DYNAMIC,
                    "dynamic",
                    f"alias of {alias}",
                    mode=dynamic_default,
                    digest=dg.get(alias),
                )
            )
            models.append(
                ServedModel(
                    ROUTE_TOP1,
                    "route",
                    "router + the top expert's adapter (or base)",
                    digest=dg.get(ROUTE_TOP1),
                )
            )
        return cls(models)

    def resolve(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)
