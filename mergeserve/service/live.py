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
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from mergeserve.adapters.calibration import load_base
from mergeserve.adapters.merging import METHODS
from mergeserve.adapters.peft_io import BaseModelSpec, LoraAdapterInfo
from mergeserve.adapters.registry import (
    ExpertExistsError,
    ExpertGoneError,
    ExpertNotFoundError,
    ExpertRegistry,
    RegistrySnapshot,
)
from mergeserve.config import Settings
from mergeserve.errors import AdapterError, ConfigurationError
from mergeserve.failpoints import failpoint
from mergeserve.router.embedders import Embedder
from mergeserve.router.policy import RoutingPolicy
from mergeserve.runtime.dynamic import DYNAMIC_MODES, DynamicMerger, DynamicMode, DynamicState
from mergeserve.runtime.engine import Engine
from mergeserve.runtime.expert_set import merge_context
from mergeserve.runtime.materialize import AdapterCache, IdAllocator
from mergeserve.service.catalog import BuildState, ServedModel
from mergeserve.service.model_ids import EXPERT_PREFIX
from mergeserve.service.publisher import Publisher
from mergeserve.service.served_set import ServedSet, SetBuilder
from mergeserve.service.watcher import RegistryWatcher

log = logging.getLogger(__name__)

Release = Callable[[], None]
"""Ends a hold on a served model's files (`LiveSet.hold`)."""


class SeedExpertError(AdapterError):
    """A change asked of an expert that comes from `experts_dir` (read-only)."""

    status_code = 409
    error_type = "conflict_error"


class LiveSet:
    """Owns the served set, the dynamic merger and every change to them (module doc).

    The parts: `SetBuilder` builds sets (served_set.py), `Publisher` swaps them in
    (publisher.py), `RegistryWatcher` brings in other replicas' changes (watcher.py);
    this class orders the changes (one lock) and keeps the registry consistent with what
    is served."""

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
        self.ids = ids
        self._on_batch = on_batch
        self._lock = threading.Lock()
        self.dynamic: DynamicMerger | None = None
        self._engine: Engine | None = None
        self.registry: ExpertRegistry | None = None
        self._stop = threading.Event()
        self._watcher: RegistryWatcher | None = None
        self._static_builds: threading.Thread | None = None
        self.mixture_refused: str | None = None
        """Why the mixture self-check failed (then dynamic merges are materialized)."""
        self.mixture_check_s: float | None = None
        self._sync_refused: set[tuple[str, str]] = set()
        """(name, digest) entries of the registry that failed this server's validation."""
        self._sets = SetBuilder(settings, base_dir, base_spec, ids, embedder, self._merger_for)
        if settings.admin.token is not None:
            root = settings.admin.registry_dir or settings.cache / "registry"
            self.registry = ExpertRegistry.open(
                root,
                self._sets.validate,
                max_adapter_bytes=settings.admin.max_upload_bytes,
                shared=True,
            )
        try:
            self._pub = Publisher(self._sets.start(self.registry), lambda: self.dynamic)
        except BaseException:
            self.discard()
            raise
        if self.registry is not None and settings.admin.watch_interval_s > 0:
            self._watcher = RegistryWatcher(settings.admin.watch_interval_s, self.sync, self._stop)
            self._watcher.start()

    # ------------------------------------------------------------------ reading

    @property
    def current(self) -> ServedSet:
        return self._pub.current

    def subscribe(self, fn: Callable[[ServedSet], None]) -> None:
        """Call `fn(served)` after each published change (from the changing thread)."""
        self._pub.subscribe(fn)

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
                self._pub.publish(new)
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
            self._pub.publish(new)
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
            cur = self._pub.current
            new = self._caught_up(registry, snap)
        return None if new.experts is cur.experts else new

    def _caught_up(
        self, registry: ExpertRegistry, snap: RegistrySnapshot | None = None
    ) -> ServedSet:
        """The served set after adopting what the registry holds now, if that is newer
        than what is served (caller holds the change lock); published if it changed."""
        cur = self._pub.current
        latest = registry.refresh()
        if snap is None or snap.version < latest.version:
            snap = latest
        if snap.version <= cur.registry_version:
            return cur
        new = self._synced(cur, snap)
        if new.experts is cur.experts:  # the same experts: only the version moved
            self._pub.advance(new)
        else:
            self._pub.publish(new)
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
            new = self._sets.rebuilt(experts, sources, cur)
        assert self.registry is not None
        for n in added:
            digest = snap[n].digest
            try:
                # Leased while read: another replica may remove it meanwhile, and then its
                # files must not vanish half-read (nor be taken for a bad adapter).
                with self.registry.lease(digests=[digest]):
                    if n != adding:
                        self._sets.validate(want[n])
                    new = self._sets.extended(new, n, want[n])
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

    def rebuild(self) -> ServedSet:
        """Recompute S, the exclusives and the static merges of the current experts."""
        with self._lock:
            cur = self._pub.current
            new = self._sets.rebuilt(cur.experts.next_generation(), cur.sources, cur)
            self._pub.publish(new)
        log.info("rebuilt %d experts (generation %d)", len(new.experts), new.generation)
        return new

    def build_in_background(self) -> threading.Thread | None:
        """Build the static arms listed as queued (`merge.background_builds`) in a
        thread, one after another, publishing each as soon as it is built; the thread,
        or None when nothing is queued. Call once the engine is up: the arms that need no
        build answer meanwhile."""
        if not self._pub.current.building or self._static_builds is not None:
            return None
        self._static_builds = threading.Thread(target=self._build_queued, name="static-builds")
        self._static_builds.daemon = True
        self._static_builds.start()
        return self._static_builds

    def _build_queued(self) -> None:
        cur = self._pub.current
        experts, basis = cur.experts, cur.basis
        ms = self.settings.merge
        context = None
        try:
            for method in [m for m in ms.static_methods if m in cur.building]:
                if self._stop.is_set() or self._pub.current.basis != basis:
                    return  # closing, or a rebuild or removal built its own
                self._set_building(basis, method, BuildState("building", since=time.time()))
                log.info("building static:%s in the background", method)
                t0 = time.perf_counter()
                try:
                    if context is None and METHODS.get(method).needs_data:
                        context = merge_context(
                            experts, self._sets.base_dir, ms.dev_file, ms.build_threads
                        )
                    info = self._sets.static_arm(experts, method, context)
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
            cur = self._pub.current
            if cur.basis != basis or method not in cur.building:
                return
            building = {m: b for m, b in cur.building.items() if m != method}
            if state is not None:
                building[method] = state
            static = {**cur.static, method: built} if built is not None else dict(cur.static)
            new = self._sets.served(
                cur.experts, cur.sources, static, cur.basis, cur.dynamic, cur, building
            )
            self._pub.publish(new)

    def close_registry(self) -> None:
        self._stop.set()
        if self._watcher is not None:
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

    # ------------------------------------------------------------------ engine

    def attach_engine(self, engine: Engine) -> None:
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

    def _merger_for(self, state: DynamicState) -> DynamicMerger:
        """The dynamic merger (made for the first dynamic state, then kept)."""
        if self.dynamic is not None:
            return self.dynamic
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
        return self.dynamic
