"""The settings the serving benchmarks start servers with, in one place.

A `--profile` names what a user runs: `make-serve` (what `make serve` starts: eager) or
`deployed` (what the deploy files start: the model compiled). `PROFILES` is the
`mergeserve serve` side, `PLUGIN_PROFILES` a vLLM OpenAI server with mergeserve's plugin
(the plugin compiles the model in a vLLM server unless told not to, so `make-serve` says
so); a benchmark with both sides gives them the same profile, compiled or eager alike.
`mergeserve_env` is the server every throughput benchmark measures.
"""

from __future__ import annotations

PROFILES: dict[str, dict[str, str]] = {
    "deployed": {"MERGESERVE_ENGINE__COMPILE": "true"},  # the deploy files' setting
    "make-serve": {},  # what `make serve` runs
}

PLUGIN_PROFILES: dict[str, dict[str, str]] = {
    "deployed": {"MERGESERVE_LORA_COMPILE": "1"},
    "make-serve": {"MERGESERVE_LORA_COMPILE": "0"},
}


def mergeserve_env(profile: str, concurrency: int, slots: int) -> dict[str, str]:
    """A `mergeserve serve` for throughput at a fixed concurrency: no admission control
    (it would cap the concurrency; load.py measures it), rank-64 slots (no merge truncated),
    `slots` of them, exact merges on a fine grid (every weighting its own merge), and room
    in the merge cache for every materialized merge."""
    return {
        **PROFILES[profile],
        "MERGESERVE_SERVER__QUEUE_BUDGET_S": "0",
        "MERGESERVE_ENGINE__MAX_NUM_SEQS": str(max(16, concurrency)),
        "MERGESERVE_ENGINE__MAX_LORA_RANK": "64",
        "MERGESERVE_ENGINE__MAX_LORAS": str(slots),
        "MERGESERVE_MERGE__DEFAULT_MODE": "exact",
        "MERGESERVE_MERGE__STATIC_METHODS": '["linear"]',
        "MERGESERVE_ROUTER__GRID": "0.001",
        "MERGESERVE_MERGE__CACHE_MAX_ENTRIES": "512",
    }
