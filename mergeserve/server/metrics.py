"""mergeserve's Prometheus metrics: one object owning its own CollectorRegistry.

Labels are bounded: `arm` (a served model name, bounded by the registry), `status`
(a class: ok, client_error, server_error, aborted), token `kind`, `cache` (hit, miss) and
`expert` (an expert name, bounded by the registry). Never a request id, user or adapter
hash. The engine's own registry (vLLM's) is exported apart, on /metrics/engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    Summary,
    generate_latest,
)

from mergeserve.runtime.engine import EndpointState

StatusClass = Literal["ok", "client_error", "server_error", "aborted"]

# Latency buckets sized for CPU serving of small models: 5 ms .. 2 min.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Routing and merging: 0.5 ms .. 10 s.
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
_WEIGHT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
_ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def status_class(http_status: int) -> StatusClass:
    if http_status < 400:
        return "ok"
    return "client_error" if http_status < 500 else "server_error"


class Metrics:
    def __init__(self, version: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mergeserve_requests",
            "Chat completion requests by served arm and status class.",
            ["arm", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "mergeserve_tokens",
            "Tokens processed, by arm and kind (prompt or completion).",
            ["arm", "kind"],
            registry=r,
        )
        self.ttft = Histogram(
            "mergeserve_time_to_first_token_seconds",
            "Seconds from request arrival to the first generated token.",
            ["arm"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "mergeserve_request_latency_seconds",
            "Seconds from request arrival to the last generated token.",
            ["arm"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "mergeserve_requests_in_flight",
            "Requests admitted and not yet finished.",
            registry=r,
        )
        self.shed = Counter(
            "mergeserve_requests_shed",
            "Requests refused at admission (503 + Retry-After): their expected wait for a "
            "first token was over server.queue_budget_s, or they waited that long in the "
            "admission queue, or server.max_pending_requests were in flight or queued.",
            registry=r,
        )
        self.queued = Gauge(
            "mergeserve_requests_queued",
            "Requests waiting in the admission queue for a slot (mergeserve.server.shedding).",
            registry=r,
        )
        self.concurrency_limit = Gauge(
            "mergeserve_concurrency_limit",
            "Requests admitted at once before load shedding refuses the next: the number "
            "in flight at which first tokens still come within server.queue_budget_s, "
            "measured (mergeserve.server.shedding).",
            registry=r,
        )
        self.router_latency = Histogram(
            "mergeserve_router_latency_seconds",
            "Seconds a dynamic request waited for its routing (queue + embedding batch).",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.router_batch = Histogram(
            "mergeserve_router_batch_size",
            "Requests embedded together in one router batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.router_seconds = Counter(
            "mergeserve_router_compute_seconds",
            "Seconds the router's worker spent embedding and routing batches: the CPU "
            "routing takes from generation (with router.threads threads).",
            registry=r,
        )
        self.router_entropy = Histogram(
            "mergeserve_router_entropy_nats",
            "Entropy of the router's distribution over experts (0: one expert).",
            buckets=_ENTROPY_BUCKETS,
            registry=r,
        )
        self.routing_outcomes = Counter(
            "mergeserve_routing_outcomes_total",
            "Routed requests by arm and outcome: one expert, a blend, or none (base).",
            ["arm", "outcome"],
            registry=r,
        )
        self.expert_weight = Histogram(
            "mergeserve_expert_weight",
            "Weight of each expert in dynamic merges (observed when > 0).",
            ["expert"],
            buckets=_WEIGHT_BUCKETS,
            registry=r,
        )
        self.merge_latency = Histogram(
            "mergeserve_merge_latency_seconds",
            "Seconds a dynamic request waited for its merged adapter, by cache hit or miss.",
            ["cache"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.materialized = Gauge(
            "mergeserve_materialized_adapters",
            "Merged adapters materialized on disk (the adapter cache's entries).",
            registry=r,
        )
        self.materialized_bytes = Gauge(
            "mergeserve_materialized_adapter_bytes",
            "Bytes of the materialized merged adapters.",
            registry=r,
        )
        self.registry_version = Gauge(
            "mergeserve_registry_version",
            "Generation of the served expert set (increases when it changes).",
            registry=r,
        )
        self.experts = Gauge(
            "mergeserve_experts",
            "Experts in the served expert set.",
            registry=r,
        )
        self.mixture_active = Gauge(
            "mergeserve_mixture_active",
            "1 while the dynamic arms are served by the in-engine mixture (its start-up "
            "self-check passed), 0 while each merge is materialized.",
            registry=r,
        )
        # A remote engine's servers (bounded by its configuration or discovery).
        self.endpoint_up = Gauge(
            "mergeserve_engine_endpoint_up",
            "1 while the remote engine's vLLM server is in service, 0 while it is out.",
            ["endpoint"],
            registry=r,
        )
        self.endpoint_requests = Gauge(
            "mergeserve_engine_endpoint_requests",
            "Generations in flight on each of the remote engine's vLLM servers.",
            ["endpoint"],
            registry=r,
        )
        # A/B experiments: the same per-arm figures, labelled by experiment (bounded by
        # the experiments file) so an experiment's arms are never mixed with direct use.
        self.exp_requests = Counter(
            "mergeserve_experiment_requests",
            "Requests to an A/B experiment by assigned arm and status class.",
            ["experiment", "arm", "status"],
            registry=r,
        )
        self.exp_tokens = Counter(
            "mergeserve_experiment_tokens",
            "Tokens of an A/B experiment's requests, by arm and kind.",
            ["experiment", "arm", "kind"],
            registry=r,
        )
        self.exp_ttft = Histogram(
            "mergeserve_experiment_time_to_first_token_seconds",
            "Seconds to the first token of an A/B experiment's requests, by arm.",
            ["experiment", "arm"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.exp_latency = Histogram(
            "mergeserve_experiment_request_latency_seconds",
            "Seconds to the last token of an A/B experiment's requests, by arm.",
            ["experiment", "arm"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # A summary (count and sum: the mean score per arm); scores may be negative,
        # and a histogram with negative buckets exposes no _sum.
        self.feedback = Summary(
            "mergeserve_feedback_score",
            "Feedback scores (POST /v1/feedback) by experiment ('none': a direct request) and arm.",
            ["experiment", "arm"],
            registry=r,
        )
        Info("mergeserve_build", "mergeserve version.", registry=r).info({"version": version})

    def observe_endpoints(self, endpoints: Sequence[EndpointState]) -> None:
        """The endpoint gauges, as `endpoints` are now (those gone are dropped)."""
        self.endpoint_up.clear()
        self.endpoint_requests.clear()
        for e in endpoints:
            self.endpoint_up.labels(e.url).set(int(e.up))
            self.endpoint_requests.labels(e.url).set(e.outstanding)

    def render(self) -> bytes:
        """The text exposition of this registry (the engine's is served apart)."""
        return generate_latest(self.registry)
