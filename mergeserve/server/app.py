"""The FastAPI application factory.

`create_app(settings, engine=None)`: the lifespan resolves the base model, discovers the
experts, starts the engine unless one is given (tests pass a FakeEngine), and shuts the
engine down on exit. Routes reach all of it through `AppState`, never through globals.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from mergeserve import __version__
from mergeserve.adapters.peft_io import discover_lora_dirs
from mergeserve.config import Settings
from mergeserve.runtime.base_model import resolve_base_model
from mergeserve.runtime.engine import EngineClient, build_engine
from mergeserve.server.catalog import ModelCatalog
from mergeserve.server.errors import install_error_handlers
from mergeserve.server.metrics import Metrics
from mergeserve.server.openai.api_router import router as openai_router
from mergeserve.server.openai.serving import ChatService
from mergeserve.server.state import AppState, get_state

log = logging.getLogger(__name__)


def build_state(settings: Settings, engine: EngineClient | None) -> AppState:
    """Everything the routes need. Validates experts before starting the (slow) engine."""
    if engine is not None and settings.model is None:
        base_dir = Path("(engine supplied)")
    else:
        base_dir = resolve_base_model(settings.model, settings.cache)
    experts = discover_lora_dirs(settings.experts_dir) if settings.experts_dir else []
    catalog = ModelCatalog.build(base_dir, experts, settings.engine.max_lora_rank)
    if engine is None:
        engine = build_engine(base_dir, settings.engine, settings.served_model_name)
    metrics = Metrics(__version__)
    chat = ChatService(engine, catalog, metrics, settings.server)
    log.info("serving %s", ", ".join(m.id for m in catalog))
    return AppState(engine, catalog, metrics, chat, base_dir)


def create_app(settings: Settings | None = None, engine: EngineClient | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings, engine)
        app.state.mergeserve = state
        try:
            yield
        finally:
            app.state.mergeserve = None
            await state.engine.shutdown()

    app = FastAPI(title="mergeserve", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(openai_router)

    @app.get("/health")
    async def health(state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
        await state.engine.check_health()
        return JSONResponse({"status": "ok", "models": len(state.catalog)})

    @app.get("/metrics")
    async def metrics(state: Annotated[AppState, Depends(get_state)]) -> Response:
        body = state.metrics.render(state.engine.metrics_registry())
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
