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
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class MergedAdapter:
    """What a dynamic request is generated with."""

    mode: DynamicMode
    key: MergeKey
    lease: AdapterLease
    rank: int
    """Rank of the served adapter (after truncation)."""
    truncated: bool


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
        if set(twin.names) != set(experts.names):
            raise ValueError("the Twin decomposition is not of this expert set")
        if set(router.experts) - set(experts.names):
            raise ValueError("the router knows experts that are not served")
        self.experts = experts
        self.twin = twin
        self.router = router
        self.policy = policy
        self.cache = cache
        self.max_rank = max_rank
        self._twin_id = hashlib.sha256(
            json.dumps(twin.config.to_json(), sort_keys=True).encode()
        ).hexdigest()
        self._batcher: MicroBatcher[str, Routing] = MicroBatcher(
            self._route_batch, max_batch=max_batch, name="router", on_batch=on_batch
        )

    # ------------------------------------------------------------------- routing

    def _route_batch(self, texts: list[str]) -> Sequence[Routing]:
        # One read of the router's columns for the whole batch: logits and names agree.
        experts = self.router.experts
        logits = self.router.logits(texts)
        return self.policy.apply(experts, logits)

    async def route(self, text: str) -> RoutedRequest:
        t0 = time.perf_counter()
        routing = await self._batcher.submit(text)
        return RoutedRequest(routing, time.perf_counter() - t0)

    def pinned_key(self, weights: dict[str, float]) -> MergeKey:
        """A client's own `merge_weights`, checked against the experts and rounded to the
        policy's grid (so pinned keys share adapters like routed ones)."""
        return MergeKey.from_weights(weights, self.experts.names, self.policy.grid)

    # ------------------------------------------------------------------- merging

    def content_key(self, mode: DynamicMode, key: MergeKey) -> str:
        h = hashlib.sha256(b"mergeserve-merge/1\n")
        h.update(f"{mode}\n{self.experts.version}\n".encode())
        if mode == "twin":
            h.update(f"{self._twin_id}\n".encode())
        h.update(json.dumps(key.weights).encode())
        return h.hexdigest()

    def build(self, mode: DynamicMode, key: MergeKey) -> AdapterFactors:
        """The merged adapter's factors (blocking: runs in the cache's worker thread)."""
        weights = key.as_dict()
        merged = self.twin.merged(weights) if mode == "twin" else self.twin.merged_exact(weights)
        if max(merged.ranks.values()) > self.max_rank:
            merged = truncate_adapter(merged, self.max_rank)
        return merged

    def merged_rank(self, mode: DynamicMode, key: MergeKey) -> int:
        """The rank of the untruncated merge, from the factors' ranks alone."""
        source = self.twin.exclusives if mode == "twin" else self.experts.factors
        parts = [source[n] for n in key.experts]
        if mode == "twin" and self.twin.shared is not None:
            parts.append(self.twin.shared)
        kinds = {k for p in parts for k in p.ranks}
        return max(sum(p.ranks.get(k, 0) for p in parts) for k in kinds)

    def max_routed_rank(self, mode: DynamicMode) -> int:
        """An upper bound of the rank of any routed merge (top-k experts of largest rank)."""
        parts = self.twin.exclusives if mode == "twin" else self.experts.factors
        ranks = sorted((max(f.ranks.values()) for f in parts.values()), reverse=True)
        bound = sum(ranks[: self.policy.top_k or len(ranks)])
        if mode == "twin" and self.twin.shared is not None:
            bound += max(self.twin.shared.ranks.values())
        return bound

    def identity(self, mode: DynamicMode, router_id: str) -> str:
        """A digest of everything a routed reply of `mode` depends on besides the base
        model: the experts, the Twin configuration, the router (`router_id`), the policy,
        and the slot rank when a routed merge can exceed it (then it is truncated)."""
        payload = {
            "mode": mode,
            "experts": self.experts.version,
            "twin": self._twin_id if mode == "twin" else None,
            "router": router_id,
            "policy": asdict(self.policy),
            "cap": self.max_rank if self.max_routed_rank(mode) > self.max_rank else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    async def acquire(self, mode: DynamicMode, key: MergeKey) -> MergedAdapter:
        lease = await self.cache.acquire(self.content_key(mode, key), lambda: self.build(mode, key))
        full = self.merged_rank(mode, key)
        return MergedAdapter(mode, key, lease, lease.adapter.rank, full > self.max_rank)

    async def close(self) -> None:
        await self._batcher.close()
        await self.cache.close()
