"""The model ids a server serves (`/v1/models`), shared by the server and its clients
(`mergeserve eval`, `ab-report`): light to import, nothing else in it."""

BASE = "base"
"""The base model, no adapter."""
EXPERT_PREFIX = "expert:"
"""`expert:<name>`: one expert alone."""
STATIC_PREFIX = "static:"
"""`static:<method>`: every expert merged once by a static method."""
DYNAMIC = "dynamic"
"""`dynamic` (the default mode) and `dynamic:<mode>`: routed and merged per request."""
ROUTE_TOP1 = "route:top1"
"""Routed to the single most likely expert (adapter switching, the baseline)."""
