"""Chat completions: resolve the model, check the request against the context window,
admit it, bind it to an adapter (`service.binding`: for dynamic models, route, then lease
the merged adapter), run it on the engine, and shape the OpenAI response (whole or
streamed).

Every request is accounted exactly once in the metrics, whichever way it ends, and its
adapter lease is released exactly once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass

from mergeserve.config import ServerSettings
from mergeserve.errors import (
    ContextLengthExceededError,
    EngineOverloadedError,
    InvalidRequestError,
    MergeserveError,
)
from mergeserve.router.policy import MergeKey
from mergeserve.runtime.dynamic import DynamicMerger, RoutedRequest
from mergeserve.runtime.engine import (
    Engine,
    FinishReason,
    GenerationDelta,
    GenerationParams,
)
from mergeserve.runtime.materialize import AdapterLease, CacheStats
from mergeserve.server.errors import sse_error
from mergeserve.server.metrics import Metrics, StatusClass, status_class
from mergeserve.server.openai.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    UsageInfo,
)
from mergeserve.server.shedding import Admission
from mergeserve.service.binding import Binder, Binding, BindRequest, MergeInfo
from mergeserve.service.catalog import ModelCatalog, ServedModel
from mergeserve.service.experiments import (
    Answered,
    ArmUnavailableError,
    Experiment,
    FeedbackBook,
)
from mergeserve.service.live import Release

log = logging.getLogger(__name__)


@dataclass
class _Accounting:
    """Per-request bookkeeping that lands in the metrics when the request ends."""

    arm: str
    started: float
    admitted: float
    """When it passed admission (after any wait in the admission queue)."""
    experiment: str | None = None
    binding: Binding | None = None
    first_token_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    released: bool = False

    def saw(self, delta: GenerationDelta) -> bool:
        """Count `delta`; True when it holds the request's first token."""
        first = self.first_token_at is None and delta.num_tokens > 0
        if first:
            self.first_token_at = time.perf_counter()
        self.prompt_tokens = delta.prompt_tokens
        self.completion_tokens += delta.num_tokens
        return first

    def usage(self) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


@dataclass(frozen=True)
class PreparedChat:
    """A request that passed every check and holds an admission slot."""

    request_id: str
    model: ServedModel
    prompt_token_ids: list[int]
    params: GenerationParams
    route_text: str
    """What the router reads: the last user message (all messages if none is a user's)."""
    experiment: str | None = None
    """The A/B experiment that chose `model`, when the request named one."""


BUILD_RETRY_S = 10
"""Retry-After of a request for a static arm that is still being built."""


def arm_not_built(model: ServedModel) -> ArmUnavailableError:
    """The 503 of a request for a static arm that is not built (yet, or at all)."""
    b = model.build
    assert b is not None
    if b.status == "failed":
        return ArmUnavailableError(
            f"{model.id} failed to build ({b.note()}); see the server log, fix it and "
            "POST /admin/rebuild, or restart",
            code="arm_build_failed",
        )
    return ArmUnavailableError(
        f"{model.id} is not built yet ({b.note()}); GET /v1/models shows its status",
        code="arm_building",
        retry_after=BUILD_RETRY_S,
    )


class _BindMetrics:
    """The metrics a request's binding books (a `BindObserver`)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def routed(self, routed: RoutedRequest) -> None:
        self.m.router_latency.observe(routed.seconds)
        self.m.router_entropy.observe(routed.routing.entropy)

    def outcome(self, arm: str, outcome: str) -> None:
        self.m.routing_outcomes.labels(arm, outcome).inc()

    def weighted(self, key: MergeKey) -> None:
        for name, w in key.weights:
            self.m.expert_weight.labels(name).observe(w)

    def merged(self, lease: AdapterLease, stats: CacheStats) -> None:
        self.m.merge_latency.labels(lease.cache).observe(lease.seconds)
        self.m.materialized.set(stats.entries)
        self.m.materialized_bytes.set(stats.bytes)


def route_text(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else "\n".join(m["content"] for m in messages)


class ChatService:
    def __init__(
        self,
        engine: Engine,
        catalog: ModelCatalog,
        metrics: Metrics,
        settings: ServerSettings,
        dynamic: DynamicMerger | None = None,
        hold: Callable[[ServedModel], Release | None] | None = None,
        experiments: Mapping[str, Experiment] | None = None,
        feedback: FeedbackBook | None = None,
        admission: Admission | None = None,
    ):
        """`hold(model)` is called as a request for `model` is bound and returns what
        releases the model's files when the request ends (or None). `experiments` are
        model names that assign each request an arm; `feedback` remembers which arm
        answered each response id; `admission` admits, queues or refuses each request
        (default: no limit but `settings.max_pending_requests`)."""
        self.engine = engine
        self.metrics = metrics
        self.settings = settings
        self.admission = admission or Admission(settings.max_pending_requests, 0.0)
        self.binder = Binder(_BindMetrics(metrics), hold)
        self.experiments: Mapping[str, Experiment] = experiments or {}
        self.feedback = feedback
        self._sync_admission()
        # Chat templates and tokenizers run here, off the event loop, one at a time (a
        # fast tokenizer must not be used by two threads at once).
        self._tokenizer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.publish(catalog, dynamic)

    def _sync_admission(self) -> None:
        a, m = self.admission, self.metrics
        m.in_flight.set(a.in_flight)
        m.queued.set(a.queued)
        m.concurrency_limit.set(a.limit)

    def close(self) -> None:
        self._tokenizer.shutdown(wait=False, cancel_futures=True)
        if self.feedback is not None:
            self.feedback.close()

    def publish(self, catalog: ModelCatalog, dynamic: DynamicMerger | None) -> None:
        """Serve `catalog` from the next request on; requests already prepared keep the
        model they resolved."""
        if dynamic is None and any(m.kind == "dynamic" for m in catalog):
            raise ValueError("a catalog with dynamic models needs a DynamicMerger")
        self.catalog, self.dynamic = catalog, dynamic

    # ------------------------------------------------------------------ preparation

    def _resolve(
        self, req: ChatCompletionRequest, headers: Mapping[str, str]
    ) -> tuple[ServedModel, str | None]:
        """The served model that answers `req`, and the experiment that chose it."""
        exp = self.experiments.get(req.model)
        if exp is None:
            return self.catalog.resolve(req.model), None
        key, _ = exp.sticky_key(req.user, headers)
        arm = exp.assign(key)
        if arm not in self.catalog:
            raise ArmUnavailableError(
                f"experiment {exp.name!r} assigned this request to {arm!r}, which is not "
                "served at the moment"
            )
        return self.catalog.resolve(arm), exp.name

    def _prepare(
        self, req: ChatCompletionRequest, model: ServedModel, experiment: str | None = None
    ) -> PreparedChat:
        """Template, tokenize and check the request (blocking: runs on the tokenizer
        thread)."""
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt = self.engine.render_chat(messages)
        room = self.engine.max_model_len - len(prompt)
        asked = req.requested_max_tokens()
        if room < 1 or (asked is not None and asked > room):
            raise ContextLengthExceededError(
                f"this model's context window is {self.engine.max_model_len} tokens; the "
                f"messages take {len(prompt)} and {asked or 1} more were requested"
            )
        max_tokens = asked if asked is not None else min(self.settings.default_max_tokens, room)
        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop_list(),
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            ignore_eos=req.ignore_eos,
        )
        return PreparedChat(
            f"chatcmpl-{uuid.uuid4().hex}",
            model,
            prompt,
            params,
            route_text(messages),
            experiment,
        )

    async def _bind(self, p: PreparedChat, req: ChatCompletionRequest) -> Binding:
        r = BindRequest(p.model, p.route_text, req.merge_weights, p.experiment)
        return await self.binder.bind(r, self.catalog, self.dynamic)

    async def _admit(self) -> None:
        try:
            await self.admission.acquire()
        except EngineOverloadedError:
            self.metrics.shed.inc()
            raise
        finally:
            self._sync_admission()

    def _unadmit(self) -> None:
        """Give back an admission slot (a request that ended, or was refused after its
        admission)."""
        self.admission.release()
        self._sync_admission()

    def _release(self, acct: _Accounting, status: StatusClass) -> None:
        """Free the admission slot and record the outcome; only the first call counts."""
        if acct.released:
            return
        acct.released = True
        if acct.binding is not None:
            acct.binding.release()
        self._unadmit()
        m = self.metrics
        m.requests.labels(acct.arm, status).inc()
        m.tokens.labels(acct.arm, "prompt").inc(acct.prompt_tokens)
        m.tokens.labels(acct.arm, "completion").inc(acct.completion_tokens)
        if status == "ok":
            now = time.perf_counter()
            m.latency.labels(acct.arm).observe(now - acct.started)
            if acct.first_token_at is not None:
                m.ttft.labels(acct.arm).observe(acct.first_token_at - acct.started)
            self.admission.finished(now - acct.admitted)
        if acct.experiment is not None:
            e, a = acct.experiment, acct.arm
            m.exp_requests.labels(e, a, status).inc()
            m.exp_tokens.labels(e, a, "prompt").inc(acct.prompt_tokens)
            m.exp_tokens.labels(e, a, "completion").inc(acct.completion_tokens)
            if status == "ok":
                m.exp_latency.labels(e, a).observe(now - acct.started)
                if acct.first_token_at is not None:
                    m.exp_ttft.labels(e, a).observe(acct.first_token_at - acct.started)

    async def start(
        self, req: ChatCompletionRequest, headers: Mapping[str, str] | None = None
    ) -> tuple[PreparedChat, _Accounting]:
        """Check, admit and bind a request; a refusal is counted and raised before any
        output, and gives back whatever it held. `headers` (lower-case names) can carry
        an experiment's sticky key."""
        started = time.perf_counter()
        model: ServedModel | None = None
        experiment = None
        admitted: float | None = None
        try:
            model, experiment = self._resolve(req, headers or {})
            if model.build is not None:
                raise arm_not_built(model)
            if req.merge_weights is not None and model.kind != "dynamic":
                raise InvalidRequestError(
                    "merge_weights applies to the dynamic models only "
                    "(dynamic, dynamic:twin, dynamic:exact)",
                    param="merge_weights",
                )
            # Admitted before the template and the tokenizer run (the work a flood of
            # large requests would make), and that work happens off the event loop.
            await self._admit()
            admitted = time.perf_counter()
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(
                self._tokenizer, self._prepare, req, model, experiment
            )
        except MergeserveError as e:
            if admitted is not None:
                self._unadmit()
            # The arm is a served model's only when one was resolved: labels stay bounded.
            arm = model.arm if model is not None else "unknown"
            status = status_class(e.status_code)
            self.metrics.requests.labels(arm, status).inc()
            if req.model in self.experiments:
                self.metrics.exp_requests.labels(req.model, arm, status).inc()
            raise
        except BaseException:  # a crash or a cancellation while preparing
            if admitted is not None:
                self._unadmit()
            raise
        assert admitted is not None
        acct = _Accounting(prepared.model.arm, started, admitted, experiment)
        with self._settled(acct, release_on_success=False):
            acct.binding = await self._bind(prepared, req)
        if self.feedback is not None:
            choice = prepared.model.id if experiment is not None else None
            self.feedback.answered(
                prepared.request_id,
                Answered(req.model, acct.arm, experiment, time.time(), choice),
            )
        return prepared, acct

    @contextlib.contextmanager
    def _settled(self, acct: _Accounting, *, release_on_success: bool = True) -> Iterator[None]:
        """Release `acct` with the status the block ends with (ok, the error's class, or
        aborted for a cancellation); on success only if `release_on_success`."""
        status: StatusClass = "server_error"
        try:
            yield
            status = "ok"
        except MergeserveError as e:
            status = status_class(e.status_code)
            raise
        except BaseException:
            status = "aborted"
            raise
        finally:
            if status != "ok" or release_on_success:
                self._release(acct, status)

    def abandon(self, acct: _Accounting) -> None:
        """Release a streamed request whose generator may never have run (early disconnect)."""
        self._release(acct, "aborted")

    # --------------------------------------------------------------------- execution

    def _generate(
        self, p: PreparedChat, acct: _Accounting
    ) -> AsyncGenerator[GenerationDelta, None]:
        b = acct.binding
        lora, mixture = (b.lora, b.mixture) if b is not None else (None, None)
        return self.engine.generate(p.prompt_token_ids, p.params, p.request_id, lora, mixture)

    def _saw(self, acct: _Accounting, delta: GenerationDelta) -> None:
        if acct.saw(delta) and acct.first_token_at is not None:
            self.admission.first_token(acct.first_token_at - acct.admitted)
            self._sync_admission()

    async def complete(
        self, req: ChatCompletionRequest, headers: Mapping[str, str] | None = None
    ) -> ChatCompletionResponse:
        prepared, acct = await self.start(req, headers)
        text: list[str] = []
        finish = None
        with self._settled(acct):
            stream = self._generate(prepared, acct)
            async with aclosing(stream):
                async for delta in stream:
                    self._saw(acct, delta)
                    text.append(delta.text)
                    finish = delta.finish_reason or finish
        return ChatCompletionResponse(
            id=prepared.request_id,
            model=req.model,
            choices=[
                ChatCompletionChoice(
                    message=AssistantMessage(content="".join(text)), finish_reason=finish
                )
            ],
            usage=acct.usage(),
            merge=acct.binding.merge if acct.binding is not None else None,
        )

    async def stream(
        self, req: ChatCompletionRequest, prepared: PreparedChat, acct: _Accounting
    ) -> AsyncIterator[str]:
        """Server-sent events for an admitted request (see `start`).

        An engine failure after the first byte cannot change the HTTP status any more, so
        it is sent as an `error` event, then `[DONE]`. A client that disconnects cancels
        this generator, which closes the engine stream and so aborts the request there.
        """
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(
            delta: DeltaMessage, finish: FinishReason | None = None, merge: MergeInfo | None = None
        ) -> str:
            c = ChatCompletionChunk(
                id=prepared.request_id,
                model=req.model,
                choices=[ChatCompletionChunkChoice(delta=delta, finish_reason=finish)],
            )
            data = c.model_dump(exclude_none=True)
            if merge is not None:  # whole, nulls included, as in a non-streamed response
                data["merge"] = dataclasses.asdict(merge)
            return f"data: {json.dumps(data)}\n\n"

        status: StatusClass = "server_error"
        merge = acct.binding.merge if acct.binding is not None else None
        try:
            yield chunk(DeltaMessage(role="assistant", content=""), merge=merge)
            gen = self._generate(prepared, acct)
            async with aclosing(gen):
                async for delta in gen:
                    self._saw(acct, delta)
                    if delta.text or delta.finish_reason:
                        yield chunk(DeltaMessage(content=delta.text), delta.finish_reason)
            if include_usage:
                usage = ChatCompletionChunk(
                    id=prepared.request_id,
                    model=req.model,
                    choices=[],
                    usage=acct.usage(),
                )
                yield f"data: {usage.model_dump_json()}\n\n"
            status = "ok"
        except MergeserveError as e:
            status = status_class(e.status_code)
            yield sse_error(e)
        except BaseException:
            status = "aborted"
            raise
        finally:
            self._release(acct, status)
        yield "data: [DONE]\n\n"
