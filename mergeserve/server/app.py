"""The FastAPI application factory.

`create_app(settings, engine=None)`: the lifespan resolves the base model, loads the
experts, builds (or loads from the cache) the Twin decomposition and the static merges,
starts the router and the engine unless one is given (tests pass a FakeEngine), and on
exit shuts the engine down and removes every merged adapter. Routes reach all of it
through `AppState`, never through globals.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mergeserve import __version__
from mergeserve.adapters.methods import MergeOptions
from mergeserve.adapters.peft_io import BaseModelSpec, LoraAdapterInfo
from mergeserve.adapters.twin import TwinConfig
from mergeserve.config import Settings
from mergeserve.errors import AdapterError, ConfigurationError
from mergeserve.router.embedders import Embedder, make_embedder
from mergeserve.router.policy import RoutingPolicy
from mergeserve.router.routers import (
    examples_digest,
    experts_examples,
    load_router,
    mlp_router_dir,
)
from mergeserve.runtime.base_model import resolve_base_model
from mergeserve.runtime.dynamic import DYNAMIC_MODES, DynamicMerger
from mergeserve.runtime.engine import EngineClient, build_engine
from mergeserve.runtime.expert_set import (
    STATIC_DEFAULTS,
    ExpertSet,
    adapter_digest,
    static_merge,
    twin_decomposition,
)
from mergeserve.runtime.materialize import AdapterCache, IdAllocator
from mergeserve.server.catalog import (
    BASE,
    EXPERT_PREFIX,
    STATIC_PREFIX,
    ModelCatalog,
    dynamic_id,
)
from mergeserve.server.errors import install_error_handlers
from mergeserve.server.metrics import Metrics
from mergeserve.server.openai.api_router import router as openai_router
from mergeserve.server.openai.serving import ChatService
from mergeserve.server.state import AppState, get_state

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def shared_embedder(name: str, base_dir: Path | None, layer: int | None, threads: int) -> Embedder:
    """One embedder per configuration per process: loading MiniLM costs seconds, and an
    app rebuilt in the same process (tests, restarts of the lifespan) reuses it."""
    return make_embedder(name, base_dir=base_dir, layer=layer, threads=threads)


def twin_config(settings: Settings) -> TwinConfig:
    """The Twin decomposition the dynamic arms serve, from the settings."""
    ms = settings.merge
    return TwinConfig(
        shared_method=ms.twin_shared_method,
        shared_options=MergeOptions(scale=ms.twin_lambda),
        exclusive_rank=ms.twin_exclusive_rank,
        shared_rank=ms.twin_shared_rank,
    )


def build_dynamic(
    settings: Settings,
    experts: ExpertSet,
    base_dir: Path | None,
    ids: IdAllocator,
    metrics: Metrics,
) -> DynamicMerger:
    """Twin decomposition (cached), router, policy and adapter cache of the dynamic arms."""
    ms, rs = settings.merge, settings.router
    assert settings.experts_dir is not None
    twin = twin_decomposition(experts, twin_config(settings), settings.cache)
    embedder = None
    if rs.kind != "arrow":
        embedder = shared_embedder(rs.embedder, base_dir, rs.hidden_layer, rs.threads)
    try:
        router = load_router(rs.kind, settings.experts_dir, embedder=embedder, base_dir=base_dir)
    except AdapterError as e:
        raise ConfigurationError(
            f"the dynamic arms cannot route: {e.message}. Give each expert an examples.jsonl, "
            "or route without data (MERGESERVE_ROUTER__KIND=arrow), or serve without the "
            "dynamic arms (MERGESERVE_MERGE__DYNAMIC=false)"
        ) from e
    policy = RoutingPolicy(rs.temperature, rs.top_k, rs.floor, rs.grid)
    cache = AdapterCache(
        ids,
        root=ms.cache_dir,
        max_entries=ms.cache_max_entries,
        max_bytes=ms.cache_max_bytes,
        name_prefix="dynamic",
    )

    def on_batch(size: int, seconds: float) -> None:
        metrics.router_batch.observe(size)

    return DynamicMerger(
        experts,
        twin,
        router,
        policy,
        cache,
        settings.engine.max_lora_rank,
        max_batch=rs.max_batch,
        on_batch=on_batch,
    )


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def router_identity(settings: Settings) -> str:
    """A digest of what the router's scores depend on: kind, embedder, examples, weights."""
    rs = settings.router
    payload: dict[str, object] = {"kind": rs.kind}
    if rs.kind != "arrow":
        payload["embedder"] = rs.embedder
        payload["layer"] = rs.hidden_layer if rs.embedder == "hidden" else None
        assert settings.experts_dir is not None
        examples = experts_examples(settings.experts_dir)
        payload["examples"] = {n: examples_digest(p) for n, p in examples.items()}
    if rs.kind == "mlp":
        assert settings.experts_dir is not None
        d = mlp_router_dir(settings.experts_dir)
        payload["mlp"] = {
            f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.glob("mlp.*"))
        }
    return _digest(payload)


def model_digests(
    settings: Settings,
    base_dir: Path | None,
    experts: ExpertSet,
    static: Mapping[str, LoraAdapterInfo],
    dynamic: DynamicMerger | None,
) -> dict[str, str]:
    """The content digest of every served model (see ServedModel.digest)."""
    if base_dir is None:
        return {}  # an engine supplied by the caller: its weights are unknown here
    base = _digest("base", base_dir.name)
    out = {BASE: base}
    out |= {f"{EXPERT_PREFIX}{n}": _digest(base, d) for n, d in experts.digests.items()}
    out |= {
        f"{STATIC_PREFIX}{m}": _digest(base, adapter_digest(info.path))
        for m, info in static.items()
    }
    if dynamic is not None:
        rid = router_identity(settings)
        out |= {dynamic_id(m): _digest(base, dynamic.identity(m, rid)) for m in DYNAMIC_MODES}
    return out


def build_state(settings: Settings, engine: EngineClient | None) -> AppState:
    """Everything the routes need. Validates experts and builds every arm before starting
    the (slow) engine, so a bad expert fails fast."""
    base_dir: Path | None = None
    if engine is None or settings.model is not None:
        base_dir = resolve_base_model(settings.model, settings.cache)
    base_spec = BaseModelSpec.from_checkpoint(base_dir) if base_dir is not None else None
    experts = (
        ExpertSet.from_dir(settings.experts_dir, base_spec)
        if settings.experts_dir is not None
        else ExpertSet({}, {}, {})
    )
    max_rank = settings.engine.max_lora_rank
    static: dict[str, LoraAdapterInfo] = {}
    if len(experts):
        for method in settings.merge.static_methods:
            if method not in STATIC_DEFAULTS:
                raise ConfigurationError(
                    f"no static arm {method!r}; static arms: {', '.join(STATIC_DEFAULTS)}"
                )
            static[method] = static_merge(
                experts, method, STATIC_DEFAULTS[method], max_rank, settings.cache
            )
    metrics = Metrics(__version__)
    metrics.registry_version.set(experts.generation)
    metrics.experts.set(len(experts))
    ids = IdAllocator()
    dynamic = None
    if settings.merge.dynamic and len(experts):
        dynamic = build_dynamic(settings, experts, base_dir, ids, metrics)
    catalog = ModelCatalog.build(
        base_dir or Path("(engine supplied)"),
        experts.infos.values(),
        max_rank,
        static=static,
        dynamic_default=settings.merge.default_mode if dynamic is not None else None,
        ids=ids,
        digests=model_digests(settings, base_dir, experts, static, dynamic),
    )
    try:
        if engine is None:
            assert base_dir is not None
            engine = build_engine(base_dir, settings.engine, settings.served_model_name)
    except BaseException:
        if dynamic is not None:
            dynamic.cache.discard()
        raise
    chat = ChatService(engine, catalog, metrics, settings.server, dynamic)
    log.info("serving %s", ", ".join(m.id for m in catalog))
    return AppState(engine, catalog, metrics, chat, base_dir or Path("(engine supplied)"), dynamic)


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
            try:
                await state.engine.shutdown()
            finally:
                if state.dynamic is not None:
                    await state.dynamic.close()

    app = FastAPI(title="mergeserve", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(openai_router)

    @app.get("/health")
    async def health(state: Annotated[AppState, Depends(get_state)]) -> JSONResponse:
        await state.engine.check_health()
        return JSONResponse({"status": "ok", "models": len(state.catalog)})

    @app.get("/metrics")
    async def metrics(state: Annotated[AppState, Depends(get_state)]) -> Response:
        """mergeserve's own metrics (`promtool check metrics` clean)."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics/engine")
    async def engine_metrics(state: Annotated[AppState, Depends(get_state)]) -> Response:
        """The engine's metrics as vLLM names them (`vllm:*`, for vLLM's dashboards; the
        colons are legal in the exposition format but fail promtool's lint, hence apart)."""
        registry = state.engine.metrics_registry()
        body = generate_latest(registry) if registry is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
