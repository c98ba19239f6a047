"""mergeserve's Prometheus metrics: one object owning its own CollectorRegistry.

Labels are bounded: `arm` (a served model name, bounded by the registry), `status`
(a class: ok, client_error, server_error, aborted) and token `kind`. Never a request id,
user or adapter hash. The engine's own registry (vLLM's) is exported beside this one.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

StatusClass = Literal["ok", "client_error", "server_error", "aborted"]

# Latency buckets sized for CPU serving of small models: 5 ms .. 2 min.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


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
        Info("mergeserve_build", "mergeserve version.", registry=r).info({"version": version})

    def render(self, engine_registry: CollectorRegistry | None) -> bytes:
        """The text exposition of our registry, followed by the engine's."""
        out = generate_latest(self.registry)
        if engine_registry is not None:
            out += generate_latest(engine_registry)
        return out
