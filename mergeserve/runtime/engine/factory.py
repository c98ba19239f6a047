"""The engine `engine.kind` names."""

from __future__ import annotations

from pathlib import Path

from mergeserve.config import EngineSettings
from mergeserve.runtime.engine.base import Engine
from mergeserve.runtime.engine.fake import FakeEngine


def build_engine(model_dir: Path, settings: EngineSettings, served_name: str | None) -> Engine:
    """The engine named by settings.kind."""
    if settings.kind == "fake":
        return FakeEngine(context_len=settings.max_model_len)
    if settings.kind == "remote":
        from mergeserve.runtime.engine.remote import RemoteVllmEngine

        return RemoteVllmEngine.start(model_dir, settings.remote)
    from mergeserve.runtime.engine.local import VllmEngine

    return VllmEngine.start(model_dir, settings, served_name)
