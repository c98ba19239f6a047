"""`RegistryWatcher`: serves what other replicas change in a shared registry."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class RegistryWatcher:
    """Calls `sync` every `interval` seconds in a daemon thread until `stop` is set.

    `sync` reads the registry's manifest and publishes what changed (`LiveSet.sync`); a
    round that fails is logged and the next one tried (the next change may apply)."""

    def __init__(self, interval: float, sync: Callable[[], object], stop: threading.Event):
        self._interval = interval
        self._sync = sync
        self._stop = stop
        self._thread = threading.Thread(target=self._run, name="registry-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the thread to end (after `stop` is set), unless called from it."""
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._sync()
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("registry sync failed")
