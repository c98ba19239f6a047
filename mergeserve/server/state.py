"""What the running app holds, built by the lifespan and read by the routes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from mergeserve.errors import EngineUnavailableError
from mergeserve.runtime.dynamic import DynamicMerger
from mergeserve.runtime.engine import Engine
from mergeserve.server.metrics import Metrics
from mergeserve.server.openai.serving import ChatService
from mergeserve.service.catalog import ModelCatalog
from mergeserve.service.live import LiveSet


@dataclass(frozen=True)
class AppState:
    engine: Engine
    metrics: Metrics
    chat: ChatService
    base_model_dir: Path
    live: LiveSet

    @property
    def catalog(self) -> ModelCatalog:
        """The models served now (replaced whole on every change of the expert set)."""
        return self.chat.catalog

    @property
    def dynamic(self) -> DynamicMerger | None:
        return self.live.dynamic


def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "mergeserve", None)
    if state is None:
        raise EngineUnavailableError("the server is starting or stopping")
    return state
