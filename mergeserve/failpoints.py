"""Failpoints: named places in a multi-step change where a test can stop the process.

The idea of FreeBSD's fail(9), etcd's gofail and TiKV's fail-rs, in its smallest form.
`MERGESERVE_FAILPOINTS` names the points (comma-separated) at which the process stops
itself with SIGSTOP, after logging which point it reached; a test then kills it (SIGKILL)
and restarts, so a crash lands exactly at a known step instead of at a moment guessed
from timing. Unset (always, outside tests) a failpoint is one environment lookup.

Points of a hot-add (`POST /admin/experts`), in order: `hot_add.received` (the upload is
on local disk), `hot_add.validated` (the staged copy passed every check), `hot_add.staged`
(its objects are in the store, fsynced, the manifest not yet written),
`hot_add.committed` (the new manifest is durable, nothing serves it yet) and
`hot_add.published` (the server serves it, the client has no answer yet).
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "MERGESERVE_FAILPOINTS"
HOT_ADD = (
    "hot_add.received",
    "hot_add.validated",
    "hot_add.staged",
    "hot_add.committed",
    "hot_add.published",
)

log = logging.getLogger(__name__)


def failpoint(name: str) -> None:
    """Stop this process (SIGSTOP) if `name` is listed in MERGESERVE_FAILPOINTS."""
    spec = os.environ.get(ENV)
    if not spec or name not in {s.strip() for s in spec.split(",")}:
        return
    log.warning("failpoint %s reached: stopping the process (SIGSTOP)", name)
    for h in logging.getLogger().handlers:
        h.flush()
    os.kill(os.getpid(), signal.SIGSTOP)
