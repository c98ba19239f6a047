"""Binding a request to what it runs with: the adapter (or none), the leases that keep it,
and the `MergeInfo` that tells the client.

`Binder.bind` decides, per model kind: base, an expert or a static merge is its one
adapter; `dynamic[:mode]` is routed (or pinned by the request's `merge_weights`) and its
merge leased from the `DynamicMerger` (the bundle with a mixture, or a materialized
merge); `route:top1` is the router's top expert alone (adapter switching). What happens
on the way (routing time and outcome, weights, merge latency) goes to a `BindObserver`:
the server's metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from mergeserve.errors import MergeserveError, ModelNotFoundError
from mergeserve.router.policy import MergeKey, Routing
from mergeserve.runtime.dynamic import DynamicMerger, RoutedRequest
from mergeserve.runtime.engine import LoRATarget
from mergeserve.runtime.materialize import AdapterLease, CacheStats
from mergeserve.runtime.mixture import MixtureSpec
from mergeserve.service.catalog import ModelCatalog, ServedModel
from mergeserve.service.experiments import ArmUnavailableError
from mergeserve.service.live import Release
from mergeserve.service.model_ids import EXPERT_PREFIX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeInfo:
    """mergeserve's extension on every response: what the request was generated with."""

    arm: str
    """The served arm (`dynamic` resolves to `dynamic:twin` or `dynamic:exact`)."""
    weights: dict[str, float]
    """Expert weights of the merge ({} for base and static merges of every expert)."""
    adapter_id: int | None
    """The engine's adapter id (None for base)."""
    cache: Literal["hit", "miss"] | None = None
    """Dynamic arms: whether the merged adapter was ready (hit) or built for this request."""
    routed: bool | None = None
    """Dynamic arms: True when the router chose the weights, False when pinned."""
    route: Literal["expert", "blend", "none"] | None = None
    """Routed requests: one expert, a blend of two or more, or none (the base model
    answered: the request belongs to no expert)."""
    in_domain: float | None = None
    """Routed requests: the router's in-domain mass (how much the request belongs to the
    experts at all; 1 for a closed-world router)."""
    rank: int | None = None
    """Dynamic arms: rank of the merged adapter as served."""
    truncated: bool | None = None
    """Dynamic arms: True when the merge exceeded the engine's slot rank and was truncated."""
    mixture: bool | None = None
    """Dynamic arms: True when served by the in-engine mixture (the bundle adapter with
    this request's weights), False when by a materialized merged adapter."""
    experiment: str | None = None
    """The A/B experiment that assigned `arm`, when the request named one."""


@dataclass
class Binding:
    """The adapter a request runs with, and what its `merge` object says."""

    lora: LoRATarget | None
    merge: MergeInfo
    lease: AdapterLease | None = None
    hold: Release | None = None
    """Keeps a hot-added expert's files while the request runs (LiveSet.hold)."""
    mixture: MixtureSpec | None = None
    """The request's scale over `lora`, a bundle adapter (in-engine mixture)."""

    def release(self) -> None:
        try:
            if self.lease is not None:
                self.lease.release()
        finally:
            if self.hold is not None:
                self.hold()


class BindObserver(Protocol):
    """Who hears what binding a request involved (the server's metrics)."""

    def routed(self, routed: RoutedRequest) -> None:
        """A request's text was routed (its latency and entropy)."""

    def outcome(self, arm: str, outcome: str) -> None:
        """How a routed request of `arm` was served: expert, blend or none."""

    def weighted(self, key: MergeKey) -> None:
        """The weights a dynamic request is merged with."""

    def merged(self, lease: AdapterLease, stats: CacheStats) -> None:
        """A merge was leased (its latency), and the adapter cache's state after."""


@dataclass(frozen=True)
class BindRequest:
    """What binding needs of a request."""

    model: ServedModel
    route_text: str
    """What the router reads."""
    merge_weights: dict[str, float] | None = None
    """The client's own weights for a dynamic model (not routed)."""
    experiment: str | None = None


class Binder:
    """Binds requests (module doc); `hold(model)` keeps a model's files while a request
    runs on them, and returns what releases them (or None)."""

    def __init__(
        self,
        observer: BindObserver,
        hold: Callable[[ServedModel], Release | None] | None = None,
    ) -> None:
        self.observer = observer
        self.hold = hold

    async def bind(
        self, r: BindRequest, catalog: ModelCatalog, dynamic: DynamicMerger | None
    ) -> Binding:
        """The request's adapter: fixed for base, experts and static merges; routed and
        merged (or pinned by `merge_weights`) for dynamic models; routed to one expert's
        own adapter (or base) for `route:top1`. `catalog` and `dynamic` are those the
        request was resolved in."""
        model = r.model
        if model.kind == "route":
            return await self._top1(r, catalog, dynamic)
        if model.kind != "dynamic":
            return self._fixed(model, r.experiment)
        assert dynamic is not None
        assert model.mode is not None
        routing: Routing | None = None
        if r.merge_weights is not None:
            state = dynamic.state
            key = dynamic.pinned_key(r.merge_weights, state)
        else:
            routed = await self._route(r, dynamic)
            routing, key, state = routed.routing, routed.routing.key, routed.state
            self.observer.outcome(model.arm, routing.outcome)
        self.observer.weighted(key)
        if dynamic.serves_base(model.mode, key, state):
            # Routed to none: exactly the base model, with no LoRA work at all.
            return Binding(None, _routed_info(model.arm, routing, None, r.experiment))
        try:
            merged = await dynamic.acquire(model.mode, key, state)
        except MergeserveError:
            raise
        except Exception as e:
            log.exception("merging %s failed", key)
            raise MergeserveError(f"building the merged adapter failed: {e}") from e
        lease = merged.lease
        self.observer.merged(lease, dynamic.cache.stats())
        info = MergeInfo(
            arm=model.arm,
            weights=key.as_dict(),
            adapter_id=lease.target.int_id,
            cache=lease.cache,
            routed=routing is not None,
            route=routing.outcome if routing is not None else None,
            in_domain=round(routing.in_domain, 6) if routing is not None else None,
            rank=merged.rank,
            truncated=merged.truncated,
            mixture=merged.mixture is not None,
            experiment=r.experiment,
        )
        return Binding(lease.target, info, lease, mixture=merged.mixture)

    def _fixed(self, model: ServedModel, experiment: str | None) -> Binding:
        """base, an expert or a static merge: its one adapter (or none)."""
        lora = model.lora
        return Binding(
            lora,
            MergeInfo(
                arm=model.arm,
                weights=dict(model.weights),
                adapter_id=lora.int_id if lora is not None else None,
                experiment=experiment,
            ),
            hold=self._hold(model),
        )

    def _hold(self, model: ServedModel) -> Release | None:
        return self.hold(model) if self.hold is not None else None

    async def _route(self, r: BindRequest, dynamic: DynamicMerger) -> RoutedRequest:
        """Route the request's text (micro-batched); the observer hears its latency and
        entropy (the caller reports the outcome: the arm decides what it is)."""
        try:
            routed = await dynamic.route(r.route_text)
        except MergeserveError:
            raise
        except Exception as e:
            log.exception("routing failed")
            raise MergeserveError(f"routing failed: {e}") from e
        self.observer.routed(routed)
        return routed

    async def _top1(
        self, r: BindRequest, catalog: ModelCatalog, dynamic: DynamicMerger | None
    ) -> Binding:
        """`route:top1`: the router's top expert alone, served by that expert's own
        adapter (adapter switching), or base when the request is not in domain (its
        in-domain mass below ½): the same router and gate as the dynamic arms."""
        assert dynamic is not None
        routing = (await self._route(r, dynamic)).routing
        top = routing.key.top if routing.in_domain >= 0.5 else None
        arm = r.model.arm
        if top is None:
            self.observer.outcome(arm, "none")
            return Binding(None, _routed_info(arm, routing, None, r.experiment))
        self.observer.outcome(arm, "expert")
        try:
            expert = catalog.resolve(f"{EXPERT_PREFIX}{top}")
        except ModelNotFoundError:
            raise ArmUnavailableError(
                f"expert {top!r} was removed while this request was routed; retry"
            ) from None
        info = _routed_info(arm, routing, expert, r.experiment)
        return Binding(expert.lora, info, hold=self._hold(expert))


def _routed_info(
    arm: str, routing: Routing | None, expert: ServedModel | None, experiment: str | None
) -> MergeInfo:
    lora = expert.lora if expert is not None else None
    return MergeInfo(
        arm=arm,
        weights=dict(expert.weights) if expert is not None else {},
        adapter_id=lora.int_id if lora is not None else None,
        routed=routing is not None,
        route=("expert" if expert is not None else "none") if routing is not None else None,
        in_domain=round(routing.in_domain, 6) if routing is not None else None,
        experiment=experiment,
    )
