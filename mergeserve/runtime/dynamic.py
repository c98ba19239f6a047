"""Per-request merging: route a request's text to expert weights, then lease the merged
adapter for those weights from the AdapterCache.

Two modes over one expert set (DESIGN.md, "Two kinds of experts"):
* `twin`:  S + Σ wᵢ Xᵢ, the shared adapter plus the compressed exclusives;
* `exact`: Σ wᵢ Δᵢ of the uncompressed experts.
Either merge is built by rank concatenation. A merge whose rank exceeds the engine's
slot rank (`max_rank`) is truncated to it by the thin QR-SVD, and says so (`truncated`).

The content key of a merged adapter is a hash of (mode, expert-set version, Twin
configuration, the rounded weights), so equal requests share one materialized adapter
and a changed expert set can never reuse a stale one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from mergeserve.adapters.lowrank import AdapterFactors, truncate_adapter
from mergeserve.adapters.twin import TwinDecomposition
from mergeserve.router.policy import MergeKey, Routing, RoutingPolicy
from mergeserve.router.routers import Router
from mergeserve.runtime.batching import MicroBatcher
from mergeserve.runtime.expert_set import ExpertSet
from mergeserve.runtime.materialize import AdapterCache, AdapterLease

DynamicMode = Literal["twin", "exact"]
DYNAMIC_MODES: tuple[DynamicMode, ...] = ("twin", "exact")


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
    """Rank of the served adapter (after truncation)."""
    truncated: bool


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
    ) -> None:
        self._state = DynamicState(experts, twin, router)
        self.policy = policy
        self.cache = cache
        self.max_rank = max_rank
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
        routings = self.policy.apply(state.router.experts, state.router.logits(texts))
        return [(r, state) for r in routings]

    async def route(self, text: str) -> RoutedRequest:
        t0 = time.perf_counter()
        routing, state = await self._batcher.submit(text)
        return RoutedRequest(routing, time.perf_counter() - t0, state)

    def pinned_key(self, weights: dict[str, float], state: DynamicState | None = None) -> MergeKey:
        """A client's own `merge_weights`, checked against the experts and rounded to the
        policy's grid (so pinned keys share adapters like routed ones)."""
        state = state or self._state
        return MergeKey.from_weights(weights, state.experts.names, self.policy.grid)

    # ------------------------------------------------------------------- merging

    def content_key(
        self, mode: DynamicMode, key: MergeKey, state: DynamicState | None = None
    ) -> str:
        state = state or self._state
        h = hashlib.sha256(b"mergeserve-merge/1\n")
        h.update(f"{mode}\n{state.experts.version}\n".encode())
        if mode == "twin":
            h.update(f"{state.twin_id}\n".encode())
        h.update(json.dumps(key.weights).encode())
        return h.hexdigest()

    def build(
        self, mode: DynamicMode, key: MergeKey, state: DynamicState | None = None
    ) -> AdapterFactors:
        """The merged adapter's factors (blocking: runs in the cache's worker thread)."""
        twin = (state or self._state).twin
        weights = key.as_dict()
        merged = twin.merged(weights) if mode == "twin" else twin.merged_exact(weights)
        if max(merged.ranks.values()) > self.max_rank:
            merged = truncate_adapter(merged, self.max_rank)
        return merged

    def merged_rank(
        self, mode: DynamicMode, key: MergeKey, state: DynamicState | None = None
    ) -> int:
        """The rank of the untruncated merge, from the factors' ranks alone."""
        state = state or self._state
        source = state.twin.exclusives if mode == "twin" else state.experts.factors
        parts = [source[n] for n in key.experts]
        if mode == "twin" and state.twin.shared is not None:
            parts.append(state.twin.shared)
        kinds = {k for p in parts for k in p.ranks}
        return max(sum(p.ranks.get(k, 0) for p in parts) for k in kinds)

    def max_routed_rank(self, mode: DynamicMode, state: DynamicState | None = None) -> int:
        """An upper bound of the rank of any routed merge (top-k experts of largest rank)."""
        state = state or self._state
        parts = state.twin.exclusives if mode == "twin" else state.experts.factors
        ranks = sorted((max(f.ranks.values()) for f in parts.values()), reverse=True)
        bound = sum(ranks[: self.policy.top_k or len(ranks)])
        if mode == "twin" and state.twin.shared is not None:
            bound += max(state.twin.shared.ranks.values())
        return bound

    def identity(self, mode: DynamicMode, router_id: str, state: DynamicState | None = None) -> str:
        """A digest of everything a routed reply of `mode` depends on besides the base
        model: the experts, the Twin configuration, the router (`router_id`), the policy,
        and the slot rank when a routed merge can exceed it (then it is truncated)."""
        state = state or self._state
        payload = {
            "mode": mode,
            "experts": state.experts.version,
            "twin": state.twin_id if mode == "twin" else None,
            "router": router_id,
            "policy": asdict(self.policy),
            "cap": self.max_rank if self.max_routed_rank(mode, state) > self.max_rank else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    async def acquire(
        self, mode: DynamicMode, key: MergeKey, state: DynamicState | None = None
    ) -> MergedAdapter:
        """Lease the merge of `key` under `state` (default: the current one)."""
        st = state or self._state
        unknown = set(key.experts) - set(st.experts.names)
        if unknown:  # a key from one state asked of another: never merge it silently
            raise ValueError(f"experts {sorted(unknown)} are not in this expert set")
        lease = await self.cache.acquire(
            self.content_key(mode, key, st), lambda: self.build(mode, key, st)
        )
        full = self.merged_rank(mode, key, st)
        return MergedAdapter(mode, key, lease, lease.adapter.rank, full > self.max_rank)

    async def close(self) -> None:
        await self._batcher.close()
        await self.cache.close()
