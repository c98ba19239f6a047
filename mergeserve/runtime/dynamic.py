"""Per-request merging: route a request's text to expert weights, then lease the merged
adapter for those weights from the AdapterCache.

Two modes over one expert set (DESIGN.md, "Two kinds of experts"):
* `twin`:  S + Σ wᵢ Xᵢ, the shared adapter plus the compressed exclusives;
* `exact`: Σ wᵢ Δᵢ of the uncompressed experts.
Either merge is built by rank concatenation. A merge whose rank exceeds the engine's
slot rank (`max_rank`) is truncated to it by the factored SVD, and says so (`truncated`).

Two ways to serve a merge:
* the *mixture* (when the engine supports it and the bundle fits `mixture_rank`): every
  request of a mode leases the one bundle adapter of the state (runtime/mixture.py),
  pinned in an engine slot, and carries its weights as a `MixtureSpec`; nothing is built
  per key and a new state (hot-add) gets a new bundle, while requests on the old one
  finish on it (their leases keep it; it is unpinned once they are done);
* *materializing* (the fallback and the reference): one adapter per content key.

The content key of a merged adapter is a hash of (mode, expert-set version, Twin
configuration, the rounded weights), so equal requests share one materialized adapter
and a changed expert set can never reuse a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from mergeserve.adapters.lowrank import AdapterFactors, truncate_adapter
from mergeserve.adapters.twin import SHARED_TERM, TwinDecomposition
from mergeserve.router.base import Router, router_scores
from mergeserve.router.policy import MergeKey, Routing, RoutingPolicy
from mergeserve.runtime.batching import MicroBatcher
from mergeserve.runtime.engine import LoRATarget
from mergeserve.runtime.expert_set import ExpertSet
from mergeserve.runtime.materialize import AdapterCache, AdapterLease
from mergeserve.runtime.mixture import MixtureBundle, MixtureSpec
from mergeserve.runtime.pinning import AdapterHook, BundlePins

log = logging.getLogger(__name__)

MixtureVerifier = Callable[[LoRATarget, MixtureSpec, LoRATarget], Awaitable[str | None]]
"""(bundle, spec, materialized reference) -> None if the engine agrees, else why not."""

PROBE_WEIGHT = 0.5

DynamicMode = Literal["twin", "exact"]
DYNAMIC_MODES: tuple[DynamicMode, ...] = ("twin", "exact")

TwinNone = Literal["base", "shared"]
"""What the shared adapter S gets outside the experts (a routed key's none mass): `base`
scales S by the in-domain mass 1 − none, so a request routed to none is the base model;
`shared` keeps S at full weight on every request (Twin-Merging's own form)."""


@dataclass(frozen=True)
class RoutedRequest:
    routing: Routing
    seconds: float
    """Wall time the request waited for its routing (queue + its batch)."""
    state: DynamicState
    """The state it was routed with: acquire its merge from the same one."""


@dataclass(frozen=True)
class MergedAdapter:
    """What a dynamic request is generated with."""

    mode: DynamicMode
    key: MergeKey
    lease: AdapterLease
    rank: int
    """Rank of the served merge (after truncation)."""
    truncated: bool
    mixture: MixtureSpec | None = None
    """Set when served by the in-engine mixture: `lease` holds the bundle adapter and
    this is the request's scale over its blocks."""


@dataclass(frozen=True)
class DynamicState:
    """One consistent view of what dynamic requests merge: the experts, their Twin
    decomposition and the router over them. Replaced whole when the expert set changes;
    a request keeps the state it was routed with until it has its adapter."""

    experts: ExpertSet
    twin: TwinDecomposition
    router: Router
    shared_of: tuple[str, ...] = ()
    """The experts S was computed over (default: all); fewer after a hot-add, whose
    exclusive is taken against the S of the experts before it."""
    twin_id: str = field(init=False)
    """Names the Twin configuration and the expert set behind S: with the expert-set
    version it identifies every exclusive and S."""

    def __post_init__(self) -> None:
        if set(self.twin.names) != set(self.experts.names):
            raise ValueError("the Twin decomposition is not of this expert set")
        if set(self.router.experts) != set(self.experts.names):
            raise ValueError(
                f"the router routes {sorted(self.router.experts)}, the experts are "
                f"{sorted(self.experts.names)}"
            )
        shared_of = self.shared_of or self.experts.names
        if set(shared_of) - set(self.experts.names):
            raise ValueError("S cannot be of experts that are not in the set")
        object.__setattr__(self, "shared_of", tuple(shared_of))
        basis = {n: self.experts.digests[n] for n in sorted(shared_of)}
        payload = {"config": self.twin.config.to_json(), "shared_of": basis}
        twin_id = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        object.__setattr__(self, "twin_id", twin_id)

    def content_key(self, mode: DynamicMode, key: MergeKey, shared_scale: float) -> str:
        """The materialized merge's cache key: equal requests share one adapter, and a
        changed expert set or Twin configuration never reuses a stale one."""
        h = hashlib.sha256(b"mergeserve-merge/2\n")
        h.update(f"{mode}\n{self.experts.digest}\n".encode())
        if mode == "twin":
            h.update(f"{self.twin_id}\n{shared_scale!r}\n".encode())
        h.update(json.dumps(key.weights).encode())
        return h.hexdigest()

    def merged(self, mode: DynamicMode, key: MergeKey, shared_scale: float) -> AdapterFactors:
        """The merge of `key` by rank concatenation (untruncated; blocking)."""
        if mode == "twin":
            return self.twin.merged(key.as_dict(), shared_scale)
        return self.twin.merged_exact(key.as_dict())

    def merged_rank(self, mode: DynamicMode, key: MergeKey, shared_scale: float) -> int:
        """The rank of the untruncated merge, from the factors' ranks alone."""
        source = self.twin.exclusives if mode == "twin" else self.experts.factors
        parts = [source[n] for n in key.experts]
        if mode == "twin" and self.twin.shared is not None and shared_scale != 0:
            parts.append(self.twin.shared)
        kinds = {k for p in parts for k in p.ranks}
        return max((sum(p.ranks.get(k, 0) for p in parts) for k in kinds), default=0)

    def rank_bound(self, mode: DynamicMode, top_k: int | None) -> int:
        """An upper bound of the rank of any merge of at most `top_k` experts."""
        parts = self.twin.exclusives if mode == "twin" else self.experts.factors
        ranks = sorted((max(f.ranks.values()) for f in parts.values()), reverse=True)
        bound = sum(ranks[: top_k or len(ranks)])
        if mode == "twin" and self.twin.shared is not None:
            bound += max(self.twin.shared.ranks.values())
        return bound

    def bundle_terms(self, mode: DynamicMode) -> dict[str, AdapterFactors]:
        """The mixture bundle's blocks in order: S then the exclusives (twin), or the
        experts (exact)."""
        if mode == "exact":
            return dict(self.experts.factors)
        terms = dict(self.twin.exclusives)
        if self.twin.shared is not None:
            terms = {SHARED_TERM: self.twin.shared, **terms}
        return terms

    def bundle_rank(self, mode: DynamicMode) -> int:
        return sum(max(f.ranks.values(), default=0) for f in self.bundle_terms(mode).values())

    def bundle_key(self, mode: DynamicMode) -> str:
        h = hashlib.sha256(b"mergeserve-bundle/1\n")
        h.update(f"{mode}\n{self.experts.digest}\n".encode())
        if mode == "twin":
            h.update(f"{self.twin_id}\n".encode())
        return h.hexdigest()

    def mixture_spec(self, mode: DynamicMode, key: MergeKey, shared_scale: float) -> MixtureSpec:
        """The request's scale over the bundle's blocks."""
        terms = self.bundle_terms(mode)
        ranks = tuple(max(f.ranks.values(), default=0) for f in terms.values())
        weights = key.as_dict()
        w = tuple(shared_scale if n == SHARED_TERM else float(weights.get(n, 0.0)) for n in terms)
        return MixtureSpec(ranks, w)


class DynamicMerger:
    """Routing (micro-batched, off the event loop) and merged-adapter leases."""

    def __init__(
        self,
        experts: ExpertSet,
        twin: TwinDecomposition,
        router: Router,
        policy: RoutingPolicy,
        cache: AdapterCache,
        max_rank: int,
        *,
        max_batch: int = 32,
        on_batch: Callable[[int, float], None] | None = None,
        mixture_rank: int | None = None,
        pin: AdapterHook | None = None,
        unpin: AdapterHook | None = None,
        twin_none: TwinNone = "base",
    ) -> None:
        self._state = DynamicState(experts, twin, router)
        self.policy = policy
        self.twin_none = twin_none
        self.cache = cache
        self.max_rank = max_rank
        self.mixture_rank = mixture_rank
        """Largest bundle rank served by the mixture; None: always materialize."""
        self.pins = BundlePins(cache)
        self.pins.configure(pin, unpin)
        self._batcher: MicroBatcher[str, tuple[Routing, DynamicState]] = MicroBatcher(
            self._route_batch, max_batch=max_batch, name="router", on_batch=on_batch
        )

    @property
    def state(self) -> DynamicState:
        return self._state

    def publish(self, state: DynamicState) -> None:
        """Serve `state` from now on. Requests routed before keep the state they were
        routed with (their merges are keyed by its expert-set version, so nothing built
        for one state is ever served for another)."""
        self._state = state

    @property
    def experts(self) -> ExpertSet:
        return self._state.experts

    @property
    def twin(self) -> TwinDecomposition:
        return self._state.twin

    @property
    def router(self) -> Router:
        return self._state.router

    # ------------------------------------------------------------------- routing

    def _route_batch(self, texts: list[str]) -> Sequence[tuple[Routing, DynamicState]]:
        # One state for the whole batch: its router's columns are its experts.
        state = self._state
        logits, in_domain = router_scores(state.router, texts)
        routings = self.policy.apply(state.router.experts, logits, in_domain)
        return [(r, state) for r in routings]

    async def route(self, text: str) -> RoutedRequest:
        t0 = time.perf_counter()
        routing, state = await self._batcher.submit(text)
        return RoutedRequest(routing, time.perf_counter() - t0, state)

    def pinned_key(self, weights: dict[str, float], state: DynamicState | None = None) -> MergeKey:
        """A client's own `merge_weights`, checked against the experts, served as given
        (not normalized: {"a": 1, "b": 1} is task arithmetic at λ = 1 each) and rounded
        to the policy's grid (so pinned keys share adapters like routed ones)."""
        state = state or self._state
        return MergeKey.from_weights(
            weights, state.experts.names, self.policy.grid, normalize=False
        )

    # ------------------------------------------------------------------- merging

    def shared_scale(self, key: MergeKey) -> float:
        """The weight of S in a twin merge of `key` (see TwinNone)."""
        return 1.0 if self.twin_none == "shared" else 1.0 - key.none

    def serves_base(
        self, mode: DynamicMode, key: MergeKey, state: DynamicState | None = None
    ) -> bool:
        """Whether `key` in `mode` is exactly the base model: routed to none, and in twin
        mode S scaled to 0 (or folded away): served with no LoRA work at all."""
        if not key.is_base:
            return False
        shared = (state or self._state).twin.shared
        return mode == "exact" or shared is None or self.shared_scale(key) == 0.0

    def content_key(
        self, mode: DynamicMode, key: MergeKey, state: DynamicState | None = None
    ) -> str:
        return (state or self._state).content_key(mode, key, self.shared_scale(key))

    def build(
        self, mode: DynamicMode, key: MergeKey, state: DynamicState | None = None
    ) -> AdapterFactors:
        """The merged adapter's factors, truncated to `max_rank` (blocking: runs in the
        cache's worker thread)."""
        merged = (state or self._state).merged(mode, key, self.shared_scale(key))
        if max(merged.ranks.values()) > self.max_rank:
            merged = truncate_adapter(merged, self.max_rank)
        return merged

    def identity(self, mode: DynamicMode, router_id: str, state: DynamicState | None = None) -> str:
        """A digest of everything a routed reply of `mode` depends on besides the base
        model: the experts, the Twin configuration, the router (`router_id`), the policy,
        and the slot rank when a routed merge can exceed it (then it is truncated)."""
        state = state or self._state
        capped = state.rank_bound(mode, self.policy.top_k) > self.max_rank
        payload = {
            "mode": mode,
            "experts": state.experts.digest,
            "twin": state.twin_id if mode == "twin" else None,
            "twin_none": self.twin_none if mode == "twin" else None,
            "router": router_id,
            "policy": asdict(self.policy),
            "cap": self.max_rank if capped else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def top1_identity(self, router_id: str, state: DynamicState | None = None) -> str:
        """The digest of `route:top1`'s replies: the experts, the router and the policy
        (which picks the top expert and the none outcome)."""
        state = state or self._state
        payload = {
            "route": "top1",
            "experts": state.experts.digest,
            "router": router_id,
            "policy": asdict(self.policy),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------- mixture

    def uses_mixture(self, mode: DynamicMode, state: DynamicState | None = None) -> bool:
        """Whether requests of `mode` under `state` are served by the mixture."""
        rank = self.mixture_rank
        return rank is not None and (state or self._state).bundle_rank(mode) <= rank

    async def _acquire_mixture(
        self, mode: DynamicMode, key: MergeKey, st: DynamicState
    ) -> MergedAdapter:
        scale = self.shared_scale(key)
        spec = st.mixture_spec(mode, key, scale)
        lease = await self.cache.acquire(
            st.bundle_key(mode), lambda: MixtureBundle.build(st.bundle_terms(mode)).factors
        )
        try:
            await self.pins.serve(mode, lease.adapter)
        except BaseException:
            lease.release()
            raise
        return MergedAdapter(mode, key, lease, st.merged_rank(mode, key, scale), False, spec)

    async def probe_mixture(self, verify: MixtureVerifier) -> str | None:
        """The start-up self-check of the mixture path: None if the engine serves the
        mixture as the materialized merge it stands for, else why not.

        Probes the first expert at weight 0.5 (a weighting the unscaled bundle does not
        give) in `exact` mode if the mixture serves it, else in `twin`: the bundle with
        that spec and the materialized merge of the same key are handed to `verify`
        (Engine.verify_mixture). Nothing to check (None) when no mode is served
        by the mixture."""
        st = self._state
        modes = [m for m in ("exact", "twin") if self.uses_mixture(m, st)]
        if not modes or not st.experts.names:
            return None
        mode: DynamicMode = "exact" if "exact" in modes else "twin"
        key = MergeKey(((st.experts.names[0], PROBE_WEIGHT),))
        merged = await self._acquire_mixture(mode, key, st)
        try:
            assert merged.mixture is not None
            ref = await self.cache.acquire(
                self.content_key(mode, key, st), lambda: self.build(mode, key, st)
            )
            try:
                return await verify(merged.lease.adapter.target, merged.mixture, ref.adapter.target)
            finally:
                ref.release()
        finally:
            merged.lease.release()

    async def stop_mixture(self) -> None:
        """Serve by materializing from now on, and unpin the bundles (each once no
        request holds it)."""
        self.mixture_rank = None
        await self.pins.retire_all()

    def use_mixture(
        self,
        rank: int | None,
        pin: AdapterHook | None = None,
        unpin: AdapterHook | None = None,
        max_pinned: int = 3,
    ) -> None:
        """Serve by the in-engine mixture from now on, bundles up to `rank` (None: off),
        pinning at most `max_pinned` bundles in engine slots at once."""
        self.mixture_rank = rank
        self.pins.configure(pin, unpin, max_pinned)

    # ------------------------------------------------------------------- leases

    async def acquire(
        self, mode: DynamicMode, key: MergeKey, state: DynamicState | None = None
    ) -> MergedAdapter:
        """Lease the merge of `key` under `state` (default: the current one): the bundle
        and a mixture spec when the mixture serves it, else the materialized merge."""
        st = state or self._state
        unknown = set(key.experts) - set(st.experts.names)
        if unknown:  # a key from one state asked of another: never merge it silently
            raise ValueError(f"experts {sorted(unknown)} are not in this expert set")
        if self.serves_base(mode, key, st):
            raise ValueError("a key routed to none is the base model: serve it without LoRA")
        if self.uses_mixture(mode, st):
            return await self._acquire_mixture(mode, key, st)
        lease = await self.cache.acquire(
            self.content_key(mode, key, st), lambda: self.build(mode, key, st)
        )
        full = st.merged_rank(mode, key, self.shared_scale(key))
        return MergedAdapter(mode, key, lease, lease.adapter.rank, full > self.max_rank)

    async def close(self) -> None:
        await self._batcher.close()
        await self.pins.close()
        await self.cache.close()
