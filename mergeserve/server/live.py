"""The served expert set, changed while the server runs: hot-add, remove, rebuild.

Two sources of experts:
* the *seed*: the PEFT dirs under `experts_dir`, read at start-up and never written;
* the *registry* (`ExpertRegistry`, when the admin API is on): experts added at run time,
  content-addressed with a manifest, so they are served again after a restart.

Every change builds a complete new `ServedSet` (experts, static merges, catalog, and the
dynamic arms' `DynamicState`) beside the current one and then publishes it with two
reference swaps; nothing a request holds is ever mutated. A request resolves its model
from the catalog it saw, and a dynamic request is routed and merged within one
`DynamicState`, so in-flight requests finish on the snapshot they started with.

* `add` validates the adapter (PEFT config, tensors, NaN/Inf, size, base-model fit, slot
  rank, example prompts when the router needs them) *before* the registry commits it;
  a refusal changes nothing. The new expert is routed at once by the prototypes of its
  examples (no router training) and merged with its exclusive X = SVD_k(Δ − S) against
  the current shared S; S and the static merges stay those of the last rebuild.
* `remove` commits the registry without the expert and publishes the set without it (S,
  exclusives and static merges recomputed, so nothing of it is served any more); then,
  outside the change lock, waits for in-flight requests on its files before deleting
  them. A re-add of the same content meanwhile revives the files (the registry collects
  by reference). A name in the registry is always removable, served here or not.
* `rebuild` recomputes S, the exclusives and the static merges of the current experts.
* Replicas: several servers may share one registry dir (a volume). Each opens it shared and
  watches its manifest (`admin.watch_interval_s`); what another replica added or removed
  is served here within one interval (`sync`), as if this replica had done it.
* The served set only moves forward: each one carries the registry version it reflects
  (`registry_version`), every change reads the registry under the change lock, and a
  registry snapshot older than (or as old as) the one served is never published. So a
  watcher that read the manifest just before an add committed cannot take the new expert
  away again, on this replica or on another.

Blocking (file copies, SVDs, embeddings): call from a worker thread. Changes are
serialized by a lock; reads (`current`) are a plain attribute read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from mergeserve.adapters.calibration import load_base
from mergeserve.adapters.methods import METHODS, MergeContext, MergeOptions
from mergeserve.adapters.peft_io import (
    BaseModelSpec,
    LoraAdapterInfo,
    discover_lora_dirs,
    load_lora_factors,
    read_lora_dir,
)
from mergeserve.adapters.registry import (
    ExpertExistsError,
    ExpertGoneError,
    ExpertNotFoundError,
    ExpertRegistry,
    RegistrySnapshot,
    _default_validator,
)
from mergeserve.adapters.twin import TwinConfig
from mergeserve.config import Settings
from mergeserve.errors import AdapterError, ConfigurationError
from mergeserve.failpoints import failpoint
from mergeserve.router.embedders import Embedder
from mergeserve.router.open_world import OpenWorldGate, general_calibration_prompts, make_gate
from mergeserve.router.policy import RoutingPolicy
from mergeserve.router.routers import (
    examples_digest,
    mlp_router_dir,
    read_examples,
    router_for,
    router_with,
)
from mergeserve.runtime.dynamic import DYNAMIC_MODES, DynamicMerger, DynamicMode, DynamicState
from mergeserve.runtime.engine import EngineClient
from mergeserve.runtime.expert_set import (
    STATIC_DEFAULTS,
    ExpertSet,
    adapter_digest,
    merge_context,
    static_merge,
    twin_decomposition,
)
from mergeserve.runtime.materialize import AdapterCache, IdAllocator
from mergeserve.server.catalog import (
    BASE,
    EXPERT_PREFIX,
    ROUTE_TOP1,
    STATIC_PREFIX,
    BuildState,
    ModelCatalog,
    ServedModel,
    dynamic_id,
)
from mergeserve.server.openai.serving import Release

log = logging.getLogger(__name__)

EMBEDDING_REVISION = 2
"""Bumped when the vectors an embedder gives change (2: int8 one text at a time), so the
digests of routed models change with them."""

Source = Literal["seed", "registry"]


class SeedExpertError(AdapterError):
    """A change asked of an expert that comes from `experts_dir` (read-only)."""

    status_code = 409
    error_type = "conflict_error"


def twin_config(settings: Settings) -> TwinConfig:
    """The Twin decomposition the dynamic arms serve, from the settings."""
    ms = settings.merge
    return TwinConfig(
        shared_method=ms.twin_shared_method,
        shared_options=MergeOptions(scale=ms.twin_lambda),
        exclusive_rank=ms.twin_exclusive_rank,
        shared_rank=ms.twin_shared_rank,
    )


def _digest(*parts: object) -> str:
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


class LiveSet:
    """Owns the served set, the dynamic merger and every change to them (module doc)."""

    def __init__(
        self,
        settings: Settings,
        base_dir: Path | None,
        base_spec: BaseModelSpec | None,
        ids: IdAllocator,
        embedder: Callable[[], Embedder] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        """`embedder` makes the router's embedder (called once, when first needed)."""
        self.settings = settings
        self.base_dir = base_dir
        self.base_spec = base_spec
        self.ids = ids
        self._make_embedder = embedder
        self._embedder: Embedder | None = None
        self._gate: OpenWorldGate | None = None
        self._on_batch = on_batch
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[ServedSet], None]] = []
        self.dynamic: DynamicMerger | None = None
        self._engine: EngineClient | None = None
        self.registry: ExpertRegistry | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._builder: threading.Thread | None = None
        self.mixture_refused: str | None = None
        """Why the mixture self-check failed (then dynamic merges are materialized)."""
        self.mixture_check_s: float | None = None
        self._sync_refused: set[tuple[str, str]] = set()
        """(name, digest) entries of the registry that failed this server's validation."""
        if settings.admin.token is not None:
            root = settings.admin.registry_dir or settings.cache / "registry"
            self.registry = ExpertRegistry.open(
                root,
                self._validate,
                max_adapter_bytes=settings.admin.max_upload_bytes,
                shared=True,
            )
        try:
            self._current = self._start()
        except BaseException:
            self.discard()
            raise
        if self.registry is not None and settings.admin.watch_interval_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="registry-watch", daemon=True)
            self._watcher.start()

    # ------------------------------------------------------------------ reading

    @property
    def current(self) -> ServedSet:
        return self._current

    def subscribe(self, fn: Callable[[ServedSet], None]) -> None:
        """Call `fn(served)` after each published change (from the changing thread)."""
        self._subscribers.append(fn)

    def hold(self, model: ServedModel) -> Release | None:
        """Keep the files `model` is generated with until the returned call: an
        `expert:` model of a hot-added expert leases the content it was resolved to
        (removal waits for it), never what its name points to now. Raises
        ExpertNotFoundError if that content was removed meanwhile."""
        if model.kind != "expert" or self.registry is None:
            return None
        root = Path(model.root)
        if not root.is_relative_to(self.registry.root):
            return None  # a seed expert: its files are never deleted
        name = model.id.removeprefix(EXPERT_PREFIX)
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(self.registry.lease(digests=[root.name]))
        except ExpertNotFoundError:
            raise ExpertNotFoundError(name) from None
        return stack.close

    # ------------------------------------------------------------------ changes

    def add(self, name: str, src_dir: Path, *, follow_symlinks: bool = True) -> ServedSet:
        """Validate, store and serve the expert at `src_dir` as `name` (blocking);
        follow_symlinks=False refuses links among its files (a dir a client names)."""
        registry = self._registry("added")
        with self._lock:
            cur = self._caught_up(registry)
            self._check_free(cur, name)
            # validates, then commits the manifest
            snap = registry.add(name, src_dir, follow_symlinks=follow_symlinks)
            try:
                new = self._synced(cur, snap, adding=name)
                self._publish(new)
                failpoint("hot_add.published")
            except BaseException:
                with contextlib.suppress(Exception):  # nothing served it: no lease
                    _, ref = registry.unpublish(name)
                    registry.collect(ref.digest, timeout=0, name=name)
                raise
        log.info("added expert %s (generation %d)", name, new.generation)
        return new

    def remove(self, name: str) -> ServedSet:
        """Stop serving `name` (S, exclusives and static merges recomputed without it),
        then delete its files once no in-flight request uses them (blocking).

        Any name in the registry's manifest is removed, also one this server does not
        serve (refused by its validation, or not synced yet)."""
        registry = self._registry("removed")
        with self._lock:
            cur = self._caught_up(registry)
            if cur.sources.get(name) == "seed":
                raise SeedExpertError(
                    f"expert {name!r} comes from the experts dir, which the server never "
                    "writes; remove its dir there and restart",
                    code="seed_expert",
                )
            snap, ref = registry.unpublish(name)  # ExpertNotFoundError: not in the manifest
            new = self._synced(cur, snap)
            self._publish(new)
        log.info("removed expert %s (generation %d)", name, new.generation)
        # Unpublished above; now wait for requests still generating with its files,
        # without holding up other changes (a re-add of the same content revives them).
        if ref.digest not in snap.digests:
            registry.collect(
                ref.digest, timeout=self.settings.admin.remove_timeout_s, name=name, snapshot=snap
            )
        return new

    def sync(self, snap: RegistrySnapshot | None = None) -> ServedSet | None:
        """Serve what the registry holds now (changes made by another replica sharing
        it); the new served set, or None if nothing changed.

        The registry is read under the change lock (a snapshot `snap` read earlier is
        only taken if it is newer than what is served): a view older than the served
        one is never published."""
        registry = self._registry("synced")
        with self._lock:
            cur = self._current
            new = self._caught_up(registry, snap)
        return None if new.experts is cur.experts else new

    def _caught_up(
        self, registry: ExpertRegistry, snap: RegistrySnapshot | None = None
    ) -> ServedSet:
        """The served set after adopting what the registry holds now, if that is newer
        than what is served (caller holds the change lock); published if it changed."""
        cur = self._current
        latest = registry.refresh()
        if snap is None or snap.version < latest.version:
            snap = latest
        if snap.version <= cur.registry_version:
            return cur
        new = self._synced(cur, snap)
        if new.experts is cur.experts:  # the same experts: only the version moved
            self._current = new
        else:
            self._publish(new)
        return new

    def _synced(
        self, cur: ServedSet, snap: RegistrySnapshot, adding: str | None = None
    ) -> ServedSet:
        """`cur` changed to serve the registry experts of `snap` (at its version).

        Experts gone or changed are dropped with a rebuild; new ones are extended in
        (routed by their examples, merged against the current S). A new expert that
        fails this server's validation is logged and left out, unless it is `adding`
        (this server's own add, validated before the commit), whose errors raise."""
        self._sync_refused &= {(n, r.digest) for n, r in snap.experts.items()}
        have = {n: cur.experts.infos[n].path for n, s in cur.sources.items() if s == "registry"}
        want = {
            n: r.path
            for n, r in snap.experts.items()
            if cur.sources.get(n) != "seed" and (n, r.digest) not in self._sync_refused
        }
        gone = [n for n, p in have.items() if want.get(n) != p]
        added = [n for n, p in want.items() if have.get(n) != p]
        new = cur
        if gone:
            experts = cur.experts
            for n in gone:
                experts = experts.minus(n)
            sources = {n: s for n, s in cur.sources.items() if n not in gone}
            new = self._rebuilt(experts, sources, cur)
        assert self.registry is not None
        for n in added:
            digest = snap[n].digest
            try:
                # Leased while read: another replica may remove it meanwhile, and then its
                # files must not vanish half-read (nor be taken for a bad adapter).
                with self.registry.lease(digests=[digest]):
                    if n != adding:
                        self._validate(want[n])
                    new = self._extended(new, n, want[n])
            except ExpertGoneError:
                if n == adding:
                    raise
                log.info("expert %s was removed from the shared registry meanwhile", n)
            except AdapterError as e:
                if n == adding:
                    raise
                log.error("not serving expert %s of the shared registry: %s", n, e.message)
                self._sync_refused.add((n, digest))
        others = [n for n in added if n != adding]
        if gone or others:
            log.info(
                "registry sync: +%s -%s (generation %d, registry version %d)",
                others or "[]",
                gone or "[]",
                new.generation,
                snap.version,
            )
        return dataclasses.replace(new, registry_version=snap.version)

    def _registry(self, verb: str) -> ExpertRegistry:
        if self.registry is None:
            raise ConfigurationError(f"experts can be {verb} only with the admin API on")
        return self.registry

    def rebuild(self) -> ServedSet:
        """Recompute S, the exclusives and the static merges of the current experts."""
        with self._lock:
            cur = self._current
            new = self._rebuilt(cur.experts.next_generation(), cur.sources, cur)
            self._publish(new)
        log.info("rebuilt %d experts (generation %d)", len(new.experts), new.generation)
        return new

    def build_in_background(self) -> threading.Thread | None:
        """Build the static arms listed as queued (`merge.background_builds`) in a
        thread, one after another, publishing each as soon as it is built; the thread,
        or None when nothing is queued. Call once the engine is up: the arms that need no
        build answer meanwhile."""
        if not self._current.building or self._builder is not None:
            return None
        self._builder = threading.Thread(target=self._build_queued, name="static-builds")
        self._builder.daemon = True
        self._builder.start()
        return self._builder

    def _build_queued(self) -> None:
        cur = self._current
        experts, basis = cur.experts, cur.basis
        ms = self.settings.merge
        context = None
        try:
            for method in [m for m in ms.static_methods if m in cur.building]:
                if self._stop.is_set() or self._current.basis != basis:
                    return  # closing, or a rebuild or removal built its own
                self._set_building(basis, method, BuildState("building", since=time.time()))
                log.info("building static:%s in the background", method)
                t0 = time.perf_counter()
                try:
                    if context is None and METHODS.get(method).needs_data:
                        context = merge_context(
                            experts, self.base_dir, ms.dev_file, ms.build_threads
                        )
                    info = self._static_arm(experts, method, context)
                except Exception as e:  # the others are still worth building
                    log.exception("static:%s failed to build", method)
                    state = BuildState("failed", error=f"{type(e).__name__}: {e}")
                    self._set_building(basis, method, state)
                    continue
                self._set_building(basis, method, None, info)
                log.info("static:%s built in %.1f s", method, time.perf_counter() - t0)
        finally:
            if context is not None:
                load_base.cache_clear()

    def _set_building(
        self,
        basis: tuple[str, ...],
        method: str,
        state: BuildState | None,
        built: LoraAdapterInfo | None = None,
    ) -> None:
        """Publish a static arm's new build state, or (`built`) the arm itself, unless
        the served set moved to another basis meanwhile."""
        with self._lock:
            cur = self._current
            if cur.basis != basis or method not in cur.building:
                return
            building = {m: b for m, b in cur.building.items() if m != method}
            if state is not None:
                building[method] = state
            static = {**cur.static, method: built} if built is not None else dict(cur.static)
            new = self._served(
                cur.experts, cur.sources, static, cur.basis, cur.dynamic, cur, building
            )
            self._publish(new)

    def close_registry(self) -> None:
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(10)
        if self.registry is not None:
            self.registry.close()

    def discard(self) -> None:
        """Undo a start-up that will never serve (the engine failed to start)."""
        try:
            if self.dynamic is not None:
                self.dynamic.cache.discard()
        finally:
            self.close_registry()

    async def close(self) -> None:
        """Stop routing, remove every merged adapter, release the registry."""
        try:
            if self.dynamic is not None:
                await self.dynamic.close()
        finally:
            self.close_registry()

    # ------------------------------------------------------------------ internals

    def _watch(self) -> None:
        """Poll the shared registry's manifest; serve what other replicas changed."""
        assert self.registry is not None
        interval = self.settings.admin.watch_interval_s
        while not self._stop.wait(interval):
            try:
                self.sync()
            except Exception:  # keep watching: the next change may apply
                if self._stop.is_set():
                    return
                log.exception("registry sync failed")

    def _extended(self, cur: ServedSet, name: str, path: Path) -> ServedSet:
        """`cur` plus the registry expert at `path`: routed by its examples and merged
        with its exclusive against the current S (module doc)."""
        info = read_lora_dir(path, name)
        factors = load_lora_factors(path)
        experts = cur.experts.plus(info, factors, adapter_digest(path))
        sources: dict[str, Source] = {**cur.sources, name: "registry"}
        if not len(cur.experts):  # the first expert: nothing to extend
            return self._rebuilt(experts, sources, cur)
        dyn = None
        if cur.dynamic is not None:
            d = cur.dynamic
            dyn = DynamicState(
                experts,
                d.twin.with_expert(name, factors),
                router_with(d.router, name, path, factors),
                d.shared_of,
            )
        return self._served(experts, sources, cur.static, cur.basis, dyn, cur, cur.building)

    def _start(self) -> ServedSet:
        seed = discover_lora_dirs(self.settings.experts_dir) if self.settings.experts_dir else []
        infos = {i.name: i for i in seed}
        sources: dict[str, Source] = dict.fromkeys(infos, "seed")
        version = 0
        if self.registry is not None:
            snap = self.registry.snapshot()
            version = snap.version
            for name, ref in snap.experts.items():
                if name in infos:
                    log.warning(
                        "expert %s is in the experts dir and in the registry (%s): serving "
                        "the experts dir's",
                        name,
                        self.registry.root,
                    )
                    continue
                infos[name] = read_lora_dir(ref.path, name)
                sources[name] = "registry"
        experts = ExpertSet.load(list(infos.values()), self.base_spec)
        served = self._rebuilt(experts, sources, None, defer=self.settings.merge.background_builds)
        return dataclasses.replace(served, registry_version=version)

    def _rebuilt(
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
                    static[method] = self._static_arm(experts, method, context)
            finally:
                if context is not None:
                    load_base.cache_clear()  # the HF copy of the base model: not kept
        dyn = self._dynamic_state(experts) if ms.dynamic and len(experts) else None
        return self._served(experts, sources, static, experts.names, dyn, prev, queued)

    def _static_arm(
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

    def _served(
        self,
        experts: ExpertSet,
        sources: Mapping[str, Source],
        static: Mapping[str, LoraAdapterInfo],
        basis: tuple[str, ...],
        dyn: DynamicState | None,
        prev: ServedSet | None,
        building: Mapping[str, BuildState] | None = None,
    ) -> ServedSet:
        if dyn is not None:
            self._ensure_merger(dyn)
        catalog = ModelCatalog.build(
            self.base_dir or Path("(engine supplied)"),
            experts.infos.values(),
            self.settings.engine.max_lora_rank,
            static=static,
            dynamic_default=self.settings.merge.default_mode if dyn is not None else None,
            ids=self.ids,
            digests=self._digests(experts, static, dyn),
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

    def attach_engine(self, engine: EngineClient) -> None:
        """The engine dynamic arms run on: they use its in-engine mixture when it has one
        and `engine.mixture` is on (else each merge is materialized)."""
        self._engine = engine
        if self.dynamic is not None:
            self._configure_mixture(self.dynamic)

    async def check_mixture(self) -> str | None:
        """The start-up self-check (`DynamicMerger.probe_mixture`): before the dynamic
        arms are served by the in-engine mixture, prove that the engine computes it. If
        it does not, every dynamic request is served by materializing its merge instead,
        and the log, `/v1/models` and `mergeserve_mixture_active` say so. The reason it
        failed, or None."""
        dyn, engine = self.dynamic, self._engine
        if dyn is None or engine is None or dyn.mixture_rank is None:
            return None
        t0 = time.perf_counter()
        try:
            reason = await dyn.probe_mixture(engine.verify_mixture)
        except Exception as e:  # an engine that fails the probe cannot be trusted with it
            log.exception("the mixture self-check failed")
            reason = f"the self-check failed: {e}"
        self.mixture_check_s = time.perf_counter() - t0
        if reason is None:
            log.info("mixture self-check passed in %.2f s", self.mixture_check_s)
            return None
        self.mixture_refused = reason
        await dyn.stop_mixture()
        log.error(
            "mixture self-check failed (%s); the dynamic arms are served by materializing "
            "each merge instead",
            reason,
        )
        self._configure_mixture(dyn)
        return reason

    @property
    def mixture_active(self) -> bool:
        """Whether some dynamic arm is served by the in-engine mixture now."""
        return any(self.serving(m) == "mixture" for m in DYNAMIC_MODES)

    def serving(self, mode: DynamicMode) -> Literal["mixture", "materialized"]:
        """How the dynamic arm of `mode` is served now: 'mixture' or 'materialized'."""
        dyn = self.dynamic
        if dyn is not None and dyn.uses_mixture(mode):
            return "mixture"
        return "materialized"

    def _configure_mixture(self, merger: DynamicMerger) -> None:
        es, engine = self.settings.engine, self._engine
        if (
            engine is not None
            and es.mixture
            and engine.supports_mixture
            and self.mixture_refused is None
        ):
            # Pin at most half the slots (less one): the rest serve experts and static
            # merges. Bundles beyond that load on demand like any adapter.
            pins = max(0, (es.max_loras - 1) // 2)
            merger.use_mixture(es.slot_rank, engine.pin_adapter, engine.unpin_adapter, pins)
        else:
            merger.use_mixture(None)

    def _ensure_merger(self, state: DynamicState) -> None:
        if self.dynamic is not None:
            return
        ms, rs = self.settings.merge, self.settings.router
        cache = AdapterCache(
            self.ids,
            root=ms.cache_dir,
            max_entries=ms.cache_max_entries,
            max_bytes=ms.cache_max_bytes,
            name_prefix="dynamic",
        )
        self.dynamic = DynamicMerger(
            state.experts,
            state.twin,
            state.router,
            RoutingPolicy(rs.temperature, rs.top_k, rs.floor, rs.grid),
            cache,
            self.settings.engine.max_lora_rank,
            max_batch=rs.max_batch,
            on_batch=self._on_batch,
            twin_none=ms.twin_none,
        )
        self._configure_mixture(self.dynamic)

    def _publish(self, new: ServedSet) -> None:
        if new.dynamic is not None and self.dynamic is not None:
            self.dynamic.publish(new.dynamic)
        self._current = new
        for fn in self._subscribers:
            fn(new)

    def _check_free(self, cur: ServedSet, name: str) -> None:
        source = cur.sources.get(name)
        if source == "seed":
            raise SeedExpertError(
                f"expert {name!r} comes from the experts dir; pick another name",
                code="seed_expert",
            )
        if source is not None:
            raise ExpertExistsError(
                f"expert {name!r} is already served; remove it first", code="expert_exists"
            )

    def _validate(self, path: Path) -> None:
        """The registry's check of a candidate dir, before anything is committed: what
        the registry checks itself, plus fit to this server's base model, slot rank,
        LoRA targets, and (for the routers that need them) example prompts."""
        _default_validator(path, self.settings.admin.max_upload_bytes)
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
            self.base_spec.check(load_lora_factors(path), info)
        if self.settings.merge.dynamic and self.settings.router.kind != "arrow":
            read_examples(path)

    def _digests(
        self,
        experts: ExpertSet,
        static: Mapping[str, LoraAdapterInfo],
        dyn: DynamicState | None,
    ) -> dict[str, str]:
        """The content digest of every served model (see ServedModel.digest)."""
        if self.base_dir is None:
            return {}  # an engine supplied by the caller: its weights are unknown here
        base = _digest("base", self.base_dir.name)
        out = {BASE: base}
        out |= {f"{EXPERT_PREFIX}{n}": _digest(base, d) for n, d in experts.digests.items()}
        out |= {
            f"{STATIC_PREFIX}{m}": _digest(base, adapter_digest(info.path))
            for m, info in static.items()
        }
        if dyn is not None and self.dynamic is not None:
            rid = self._router_identity(experts)
            out |= {
                dynamic_id(m): _digest(base, self.dynamic.identity(m, rid, dyn))
                for m in DYNAMIC_MODES
            }
            out[ROUTE_TOP1] = _digest(base, self.dynamic.top1_identity(rid, dyn))
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
                n: examples_digest(read_examples(i.path)) for n, i in experts.infos.items()
            }
        if rs.kind == "mlp" and self.settings.experts_dir is not None:
            d = mlp_router_dir(self.settings.experts_dir)
            payload["mlp"] = {
                f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.glob("mlp.*"))
            }
        return _digest(payload)
