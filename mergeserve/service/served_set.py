"""`ServedSet`: everything that answers requests at one moment, and `SetBuilder`, which
builds one from experts and settings.

A builder never publishes and holds no lock: `LiveSet` (live.py) decides when a set is
built and swaps it in through its `Publisher` (publisher.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from mergeserve.adapters.calibration import load_base
from mergeserve.adapters.merging import METHODS, MergeContext, MergeOptions
from mergeserve.adapters.peft_io import (
    BaseModelSpec,
    LoraAdapterInfo,
    discover_lora_dirs,
    load_lora_factors,
    read_lora_dir,
)
from mergeserve.adapters.registry import ExpertRegistry
from mergeserve.adapters.twin import TwinConfig
from mergeserve.config import Settings
from mergeserve.errors import AdapterError, ConfigurationError
from mergeserve.router.base import example_prompts, examples_digest
from mergeserve.router.embedders import Embedder
from mergeserve.router.factory import router_for
from mergeserve.router.mlp import mlp_router_dir
from mergeserve.router.open_world import OpenWorldGate, general_calibration_prompts, make_gate
from mergeserve.runtime.dynamic import DYNAMIC_MODES, DynamicMerger, DynamicState
from mergeserve.runtime.expert_set import (
    STATIC_DEFAULTS,
    ExpertSet,
    adapter_digest,
    merge_context,
    static_merge,
    twin_decomposition,
)
from mergeserve.runtime.materialize import IdAllocator
from mergeserve.service.catalog import BuildState, ModelCatalog, dynamic_id
from mergeserve.service.model_ids import BASE, EXPERT_PREFIX, ROUTE_TOP1, STATIC_PREFIX

log = logging.getLogger(__name__)

EMBEDDING_REVISION = 2
"""Bumped when the vectors an embedder gives change (2: int8 one text at a time), so the
digests of routed models change with them."""

Source = Literal["seed", "registry"]


def twin_config(settings: Settings) -> TwinConfig:
    """The Twin decomposition the dynamic arms serve, from the settings."""
    ms = settings.merge
    return TwinConfig(
        shared_method=ms.twin_shared_method,
        shared_options=MergeOptions(scale=ms.twin_lambda),
        exclusive_rank=ms.twin_exclusive_rank,
        shared_rank=ms.twin_shared_rank,
    )


def digest_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class ServedSet:
    """Everything that answers requests at one moment; never mutated."""

    experts: ExpertSet
    sources: Mapping[str, Source]
    static: Mapping[str, LoraAdapterInfo]
    """The static merges by method, of the experts of the last rebuild (`basis`)."""
    basis: tuple[str, ...]
    """The experts that S and the static merges were computed over."""
    dynamic: DynamicState | None
    catalog: ModelCatalog
    registry_version: int = 0
    """The version of the registry snapshot this set serves (0 without a registry)."""
    building: Mapping[str, BuildState] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    """Static arms listed but not built yet (`merge.background_builds`): method -> state."""

    @property
    def generation(self) -> int:
        """The registry version: 1 at start-up, +1 on every published change."""
        return self.experts.generation

    @property
    def stale(self) -> tuple[str, ...]:
        """Experts hot-added since the last rebuild: not in S nor in the static merges."""
        return tuple(n for n in self.experts.names if n not in self.basis)


class SetBuilder:
    """Builds complete `ServedSet`s: S, exclusives, router, static merges and catalog of
    a set of experts, under one server's settings.

    `merger_for` gives the dynamic merger that serves a `DynamicState` (created once, by
    the caller, which owns it): the dynamic arms' digests are the merger's."""

    def __init__(
        self,
        settings: Settings,
        base_dir: Path | None,
        base_spec: BaseModelSpec | None,
        ids: IdAllocator,
        embedder: Callable[[], Embedder] | None,
        merger_for: Callable[[DynamicState], DynamicMerger],
    ) -> None:
        """`embedder` makes the router's embedder (called once, when first needed)."""
        self.settings = settings
        self.base_dir = base_dir
        self.base_spec = base_spec
        self.ids = ids
        self._make_embedder = embedder
        self._embedder: Embedder | None = None
        self._gate: OpenWorldGate | None = None
        self._merger_for = merger_for

    def start(self, registry: ExpertRegistry | None) -> ServedSet:
        """The served set at start-up: the seed dirs plus the registry's experts."""
        seed = discover_lora_dirs(self.settings.experts_dir) if self.settings.experts_dir else []
        infos = {i.name: i for i in seed}
        sources: dict[str, Source] = dict.fromkeys(infos, "seed")
        version = 0
        if registry is not None:
            snap = registry.snapshot()
            version = snap.version
            for name, ref in snap.experts.items():
                if name in infos:
                    log.warning(
                        "expert %s is in the experts dir and in the registry (%s): serving "
                        "the experts dir's",
                        name,
                        registry.root,
                    )
                    continue
                infos[name] = read_lora_dir(ref.path, name)
                sources[name] = "registry"
        experts = ExpertSet.load(list(infos.values()), self.base_spec)
        served = self.rebuilt(experts, sources, None, defer=self.settings.merge.background_builds)
        return dataclasses.replace(served, registry_version=version)

    def rebuilt(
        self,
        experts: ExpertSet,
        sources: Mapping[str, Source],
        prev: ServedSet | None,
        *,
        defer: bool = False,
    ) -> ServedSet:
        """A served set with S, exclusives, router and static merges all of `experts`;
        with `defer`, the static merges are listed as queued, for `build_in_background`."""
        ms = self.settings.merge
        static: dict[str, LoraAdapterInfo] = {}
        queued: dict[str, BuildState] = {}
        if len(experts):
            unknown = [m for m in ms.static_methods if m not in STATIC_DEFAULTS]
            if unknown:
                raise ConfigurationError(
                    f"no static arm {unknown[0]!r}; static arms: {', '.join(STATIC_DEFAULTS)}"
                )
        if defer and len(experts):
            queued = dict.fromkeys(ms.static_methods, BuildState("queued"))
        elif len(experts):
            context = None
            if any(METHODS.get(m).needs_data for m in ms.static_methods):
                context = merge_context(experts, self.base_dir, ms.dev_file, ms.build_threads)
            try:
                for method in ms.static_methods:
                    static[method] = self.static_arm(experts, method, context)
            finally:
                if context is not None:
                    load_base.cache_clear()  # the HF copy of the base model: not kept
        dyn = self._dynamic_state(experts) if ms.dynamic and len(experts) else None
        return self.served(experts, sources, static, experts.names, dyn, prev, queued)

    def extended(self, cur: ServedSet, name: str, path: Path) -> ServedSet:
        """`cur` plus the registry expert at `path`: routed by its examples and merged
        with its exclusive against the current S (module doc)."""
        info = read_lora_dir(path, name)
        factors = load_lora_factors(path)
        experts = cur.experts.plus(info, factors, adapter_digest(path))
        sources: dict[str, Source] = {**cur.sources, name: "registry"}
        if not len(cur.experts):  # the first expert: nothing to extend
            return self.rebuilt(experts, sources, cur)
        dyn = None
        if cur.dynamic is not None:
            d = cur.dynamic
            dyn = DynamicState(
                experts,
                d.twin.with_expert(name, factors),
                d.router.with_expert(name, path, factors),
                d.shared_of,
            )
        return self.served(experts, sources, cur.static, cur.basis, dyn, cur, cur.building)

    def static_arm(
        self, experts: ExpertSet, method: str, context: MergeContext | None
    ) -> LoraAdapterInfo:
        """The `static:<method>` merge of `experts` (built, or read from the cache)."""
        # Served at the rank it was built, up to the engine's slot size: with the mixture
        # on the slots are rank 64 and the plugin costs an adapter its own rank, so cutting
        # a rank-48 merge to max_lora_rank would only tilt static-vs-dynamic comparisons.
        return static_merge(
            experts,
            method,
            STATIC_DEFAULTS[method],
            self.settings.engine.slot_rank,
            self.settings.cache,
            context,
        )

    def _dynamic_state(self, experts: ExpertSet) -> DynamicState:
        rs = self.settings.router
        twin = twin_decomposition(experts, twin_config(self.settings), self.settings.cache)
        embedder = None
        if rs.kind != "arrow":
            if self._embedder is None:
                if self._make_embedder is None:
                    raise ConfigurationError(f"the {rs.kind} router needs an embedder")
                self._embedder = self._make_embedder()
                self._gate = make_gate(rs.gate_config(), self._embedder)
            embedder = self._embedder
        paths = {n: i.path for n, i in experts.infos.items()}
        mlp = mlp_router_dir(self.settings.experts_dir) if self.settings.experts_dir else None
        try:
            router = router_for(
                rs.kind,
                paths,
                factors=experts.factors,
                embedder=embedder,
                base_dir=self.base_dir,
                mlp_dir=mlp,
                gate=self._gate,
            )
        except AdapterError as e:
            raise ConfigurationError(
                f"the dynamic arms cannot route: {e.message}. Give each expert an "
                "examples.jsonl, or route without data (MERGESERVE_ROUTER__KIND=arrow), or "
                "serve without the dynamic arms (MERGESERVE_MERGE__DYNAMIC=false)"
            ) from e
        return DynamicState(experts, twin, router)

    def served(
        self,
        experts: ExpertSet,
        sources: Mapping[str, Source],
        static: Mapping[str, LoraAdapterInfo],
        basis: tuple[str, ...],
        dyn: DynamicState | None,
        prev: ServedSet | None,
        building: Mapping[str, BuildState] | None = None,
    ) -> ServedSet:
        merger = self._merger_for(dyn) if dyn is not None else None
        catalog = ModelCatalog.build(
            self.base_dir or Path("(engine supplied)"),
            experts.infos.values(),
            self.settings.engine.max_lora_rank,
            static=static,
            dynamic_default=self.settings.merge.default_mode if dyn is not None else None,
            ids=self.ids,
            digests=self._digests(experts, static, dyn, merger),
            reuse=prev.catalog if prev is not None else None,
            building=building,
        )
        return ServedSet(
            experts,
            MappingProxyType(dict(sources)),
            MappingProxyType(dict(static)),
            tuple(basis),
            dyn,
            catalog,
            prev.registry_version if prev is not None else 0,
            MappingProxyType(dict(building or {})),
        )

    def validate(self, path: Path) -> None:
        """The registry's check of a candidate dir, before anything is committed: what
        the registry checks itself, plus fit to this server's base model, slot rank,
        LoRA targets, and (for the routers that need them) example prompts."""
        # what the registry checks itself: the tensors load, within the size limit
        factors = load_lora_factors(path, max_bytes=self.settings.admin.max_upload_bytes)
        info = read_lora_dir(path)
        rank_cap = self.settings.engine.max_lora_rank
        if info.rank > rank_cap:
            raise AdapterError(
                f"{info.name}: rank {info.rank} is above this server's slot rank "
                f"(max_lora_rank={rank_cap})"
            )
        targets = self.settings.engine.lora_target_modules
        if targets is not None:
            extra = sorted(set(info.target_modules) - set(targets))
            if extra:
                raise AdapterError(
                    f"{info.name}: targets {extra}, which this server's engine gives no LoRA "
                    f"layer (lora_target_modules={targets})"
                )
        if self.base_spec is not None:
            self.base_spec.check(factors, info)
        if self.settings.merge.dynamic and self.settings.router.kind != "arrow":
            example_prompts(path)

    def _digests(
        self,
        experts: ExpertSet,
        static: Mapping[str, LoraAdapterInfo],
        dyn: DynamicState | None,
        merger: DynamicMerger | None,
    ) -> dict[str, str]:
        """The content digest of every served model (see ServedModel.digest)."""
        if self.base_dir is None:
            return {}  # an engine supplied by the caller: its weights are unknown here
        base = digest_of("base", self.base_dir.name)
        out = {BASE: base}
        out |= {f"{EXPERT_PREFIX}{n}": digest_of(base, d) for n, d in experts.digests.items()}
        out |= {
            f"{STATIC_PREFIX}{m}": digest_of(base, adapter_digest(info.path))
            for m, info in static.items()
        }
        if dyn is not None and merger is not None:
            rid = self._router_identity(experts)
            out |= {
                dynamic_id(m): digest_of(base, merger.identity(m, rid, dyn)) for m in DYNAMIC_MODES
            }
            out[ROUTE_TOP1] = digest_of(base, merger.top1_identity(rid, dyn))
        return out

    def _router_identity(self, experts: ExpertSet) -> str:
        """A digest of what the router's scores depend on: kind, embedder, examples, weights."""
        rs = self.settings.router
        payload: dict[str, object] = {"kind": rs.kind}
        if rs.kind != "arrow":
            payload["embedder"] = rs.embedder
            payload["embedding"] = EMBEDDING_REVISION
            payload["layer"] = rs.hidden_layer if rs.embedder == "hidden" else None
            payload["gate"] = dataclasses.asdict(rs.gate_config())
            if rs.gate_config().needs_general:
                payload["general"] = examples_digest(general_calibration_prompts())
            payload["examples"] = {
                n: examples_digest(example_prompts(i.path)) for n, i in experts.infos.items()
            }
        if rs.kind == "mlp" and self.settings.experts_dir is not None:
            d = mlp_router_dir(self.settings.experts_dir)
            payload["mlp"] = {
                f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.glob("mlp.*"))
            }
        return digest_of(payload)
