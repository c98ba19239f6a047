"""The FastAPI application factory.

`create_app(settings, engine=None)`: the lifespan resolves the base model, loads the
experts, builds (or loads from the cache) the Twin decomposition and the static merges,
starts the router and the engine unless one is given (tests pass a FakeEngine), and on
exit shuts the engine down and removes every merged adapter. Routes reach all of it
through `AppState`, never through globals.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Scope

from mergeserve import __version__
from mergeserve.adapters.peft_io import BaseModelSpec
from mergeserve.config import Settings
from mergeserve.router.embedders import Embedder, make_embedder
from mergeserve.runtime.base_model import resolve_base_model
from mergeserve.runtime.engine import Engine, build_engine
from mergeserve.runtime.materialize import IdAllocator
from mergeserve.server.admin import FORM_SLACK
from mergeserve.server.admin import router as admin_router
from mergeserve.server.errors import BodyLimit, install_error_handlers
from mergeserve.server.metrics import Metrics
from mergeserve.server.openai.api_router import router as openai_router
from mergeserve.server.openai.serving import ChatService
from mergeserve.server.shedding import Admission
from mergeserve.server.state import AppState, get_state
from mergeserve.service.experiments import FeedbackBook, check_arms, load_experiments
from mergeserve.service.live import LiveSet
from mergeserve.service.served_set import ServedSet

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def shared_embedder(name: str, base_dir: Path | None, layer: int | None, threads: int) -> Embedder:
    """One embedder per configuration per process: loading MiniLM costs seconds, and an
    app rebuilt in the same process (tests, restarts of the lifespan) reuses it."""
    return make_embedder(name, base_dir=base_dir, layer=layer, threads=threads)


def build_state(settings: Settings, engine: Engine | None) -> AppState:
    """Everything the routes need. Validates experts and builds every arm before starting
    the (slow) engine, so a bad expert fails fast."""
    base_dir: Path | None = None
    if engine is None or settings.model is not None:
        base_dir = resolve_base_model(settings.model, settings.cache)
    base_spec = BaseModelSpec.from_checkpoint(base_dir) if base_dir is not None else None
    metrics = Metrics(__version__)
    rs = settings.router

    def on_batch(size: int, seconds: float) -> None:
        metrics.router_batch.observe(size)
        metrics.router_seconds.inc(seconds)

    live = LiveSet(
        settings,
        base_dir,
        base_spec,
        IdAllocator(),
        embedder=lambda: shared_embedder(rs.embedder, base_dir, rs.hidden_layer, rs.threads),
        on_batch=on_batch,
    )
    try:
        experiments = {}
        if settings.experiments.file is not None:  # checked before the (slow) engine starts
            experiments = load_experiments(settings.experiments.file)
            check_arms(experiments.values(), [m.id for m in live.current.catalog])
        if engine is None:
            assert base_dir is not None
            engine = build_engine(base_dir, settings.engine, settings.served_model_name)
        live.attach_engine(engine)
    except BaseException:
        live.discard()
        raise
    served = live.current
    es = settings.experiments
    token = es.feedback_token.get_secret_value() if es.feedback_token is not None else None
    book = FeedbackBook(
        es.feedback_log or settings.cache / "feedback.jsonl",
        es.feedback_window,
        max_bytes=es.feedback_max_bytes,
        keep=es.feedback_keep,
        token=token or None,
    )
    chat = ChatService(
        engine,
        served.catalog,
        metrics,
        settings.server,
        live.dynamic,
        hold=live.hold,
        experiments=experiments,
        feedback=book,
        admission=Admission(settings.server.max_pending_requests, settings.server.queue_budget_s),
    )

    def on_change(new: ServedSet) -> None:
        chat.publish(new.catalog, live.dynamic if new.dynamic is not None else None)
        metrics.registry_version.set(new.generation)
        metrics.experts.set(len(new.experts))
        metrics.mixture_active.set(live.mixture_active)

    live.subscribe(on_change)
    on_change(served)
    log.info("serving %s", ", ".join(m.id for m in served.catalog))
    return AppState(engine, metrics, chat, base_dir or Path("(engine supplied)"), live)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings, engine)
        try:
            await state.live.check_mixture()
        except BaseException:
            await state.engine.shutdown()
            await state.live.close()
            raise
        state.metrics.mixture_active.set(state.live.mixture_active)
        state.live.build_in_background()  # the static arms, now that the engine is up
        app.state.mergeserve = state
        try:
            yield
        finally:
            app.state.mergeserve = None
            state.chat.close()
            try:
                await state.engine.shutdown()
            finally:
                await state.live.close()

    app = FastAPI(title="mergeserve", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    upload_limit = settings.admin.max_upload_bytes + FORM_SLACK

    def body_limit(scope: Scope) -> int:
        if scope.get("method") == "POST" and scope.get("path") == "/admin/experts":
            return upload_limit  # the upload route counts its files itself too
        return settings.server.max_body_bytes

    app.add_middleware(BodyLimit, limit_for=body_limit)
    app.include_router(openai_router)
    if settings.admin.token is not None:
        app.include_router(admin_router)

    @app.get("/health")
    async def health(state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
        """Liveness: the process serves HTTP and its engine is alive (a dead engine is
        only mended by a restart)."""
        await state.engine.check_health()
        return JSONResponse({"status": "ok", "models": len(state.catalog)})

    @app.get("/ready")
    async def ready(state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
        """Readiness: the engine is up and the router loaded, so base, the experts and
        the dynamic arms answer; 503 otherwise, so a balancer sends traffic elsewhere
        without the pod being restarted. Static arms still being built in the background
        are counted in `building` (they answer 503 with Retry-After meanwhile)."""
        await state.engine.check_health()
        served = state.live.current
        endpoints = state.engine.endpoints()
        return JSONResponse(
            {
                "status": "ready",
                **({"endpoints": [asdict(e) for e in endpoints]} if endpoints else {}),
                "models": len(state.catalog),
                "experts": len(served.experts),
                "mixture": state.live.mixture_active,
                "building": sum(b.status != "failed" for b in served.building.values()),
                "failed": sorted(m for m, b in served.building.items() if b.status == "failed"),
            }
        )

    @app.get("/metrics")
    async def metrics(state: Annotated[AppState, Depends(get_state)]) -> Response:
        """mergeserve's own metrics (`promtool check metrics` clean)."""
        state.metrics.observe_endpoints(state.engine.endpoints())
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics/engine")
    async def engine_metrics(state: Annotated[AppState, Depends(get_state)]) -> Response:
        """The engine's metrics as vLLM names them (`vllm:*`, for vLLM's dashboards; the
        colons are legal in the exposition format but fail promtool's lint, hence apart)."""
        registry = state.engine.metrics_registry()
        body = generate_latest(registry) if registry is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
