"""Chat completions: resolve the model, check the request against the context window,
admit it, bind it to an adapter (for dynamic models: route, then lease the merged
adapter), run it on the engine, and shape the OpenAI response (whole or streamed).

Every request is accounted exactly once in the metrics, whichever way it ends, and its
adapter lease is released exactly once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
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
    ModelNotFoundError,
)
from mergeserve.router.policy import Routing
from mergeserve.runtime.dynamic import DynamicMerger, RoutedRequest
from mergeserve.runtime.engine import (
    EngineClient,
    FinishReason,
    GenerationDelta,
    GenerationParams,
    LoRATarget,
)
from mergeserve.runtime.materialize import AdapterLease
from mergeserve.runtime.mixture import MixtureSpec
from mergeserve.server.catalog import EXPERT_PREFIX, ModelCatalog, ServedModel
from mergeserve.server.errors import sse_error
from mergeserve.server.experiments import (
    Answered,
    ArmUnavailableError,
    Experiment,
    FeedbackBook,
)
from mergeserve.server.metrics import Metrics, StatusClass, status_class
from mergeserve.server.openai.protocol import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    MergeInfo,
    UsageInfo,
)
from mergeserve.server.shedding import Admission

log = logging.getLogger(__name__)


Release = Callable[[], None]


@dataclass
class Binding:
    """The adapter a request runs with, and what its `merge` object says."""

    lora: LoRATarget | None
    merge: MergeInfo
    lease: AdapterLease | None = None
    hold: Release | None = None
    """Keeps a hot-added expert's files while the request runs (LiveSet.hold)."""
    mixture: MixtureSpec | None = None
    """The request's scale over `lora`, a bundle adapter (in-engine mixture)."""

    def release(self) -> None:
        try:
            if self.lease is not None:
                self.lease.release()
        finally:
            if self.hold is not None:
                self.hold()


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


def route_text(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else "\n".join(m["content"] for m in messages)


class ChatService:
    def __init__(
        self,
        engine: EngineClient,
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
        self.hold = hold
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
        """The request's adapter: fixed for base, experts and static merges; routed and
        merged (or pinned by `merge_weights`) for dynamic models; routed to one expert's
        own adapter (or base) for `route:top1`."""
        model = p.model
        if model.kind == "route":
            return await self._bind_top1(p)
        if model.kind != "dynamic":
            return self._fixed(model, p.experiment)
        assert self.dynamic is not None
        assert model.mode is not None
        dyn, m = self.dynamic, self.metrics
        routing: Routing | None = None
        if req.merge_weights is not None:
            state = dyn.state
            key = dyn.pinned_key(req.merge_weights, state)
        else:
            routed = await self._route(p)
            routing, key, state = routed.routing, routed.routing.key, routed.state
            m.routing_outcomes.labels(model.arm, routing.outcome).inc()
        for name, w in key.weights:
            m.expert_weight.labels(name).observe(w)
        if dyn.serves_base(model.mode, key, state):
            # Routed to none: exactly the base model, with no LoRA work at all.
            return Binding(None, self._routed_info(model.arm, routing, None, p.experiment))
        try:
            merged = await dyn.acquire(model.mode, key, state)
        except MergeserveError:
            raise
        except Exception as e:
            log.exception("merging %s failed", key)
            raise MergeserveError(f"building the merged adapter failed: {e}") from e
        lease = merged.lease
        m.merge_latency.labels(lease.cache).observe(lease.seconds)
        stats = dyn.cache.stats()
        m.materialized.set(stats.entries)
        m.materialized_bytes.set(stats.bytes)
        info = MergeInfo(
            arm=model.arm,
            weights=key.as_dict(),
            adapter_id=lease.target.int_id,
            cache=lease.cache,
            routed=routing is not None,
            route=routing.outcome if routing is not None else None,
            in_domain=round(routing.in_domain, 6) if routing is not None else None,
            rank=merged.rank,
            truncated=merged.truncated,
            mixture=merged.mixture is not None,
            experiment=p.experiment,
        )
        return Binding(lease.target, info, lease, mixture=merged.mixture)

    def _fixed(self, model: ServedModel, experiment: str | None) -> Binding:
        """base, an expert or a static merge: its one adapter (or none)."""
        lora = model.lora
        hold = self.hold(model) if self.hold is not None else None
        return Binding(
            lora,
            MergeInfo(
                arm=model.arm,
                weights=dict(model.weights),
                adapter_id=lora.int_id if lora is not None else None,
                experiment=experiment,
            ),
            hold=hold,
        )

    async def _route(self, p: PreparedChat) -> RoutedRequest:
        """Route the request's text (micro-batched); its latency and entropy go to the
        metrics (the caller counts the outcome: the arm decides what it is)."""
        assert self.dynamic is not None
        m = self.metrics
        try:
            routed = await self.dynamic.route(p.route_text)
        except MergeserveError:
            raise
        except Exception as e:
            log.exception("routing failed")
            raise MergeserveError(f"routing failed: {e}") from e
        m.router_latency.observe(routed.seconds)
        m.router_entropy.observe(routed.routing.entropy)
        return routed

    @staticmethod
    def _routed_info(
        arm: str, routing: Routing | None, expert: ServedModel | None, experiment: str | None
    ) -> MergeInfo:
        lora = expert.lora if expert is not None else None
        return MergeInfo(
            arm=arm,
            weights=dict(expert.weights) if expert is not None else {},
            adapter_id=lora.int_id if lora is not None else None,
            routed=routing is not None,
            route=("expert" if expert is not None else "none") if routing is not None else None,
            in_domain=round(routing.in_domain, 6) if routing is not None else None,
            experiment=experiment,
        )

    async def _bind_top1(self, p: PreparedChat) -> Binding:
        """`route:top1`: the router's top expert alone, served by that expert's own
        adapter (adapter switching), or base when the request is not in domain (its
        in-domain mass below ½): the same router and gate as the dynamic arms."""
        routed = await self._route(p)
        r = routed.routing
        top = r.key.top if r.in_domain >= 0.5 else None
        if top is None:
            self.metrics.routing_outcomes.labels(p.model.arm, "none").inc()
            return Binding(None, self._routed_info(p.model.arm, r, None, p.experiment))
        self.metrics.routing_outcomes.labels(p.model.arm, "expert").inc()
        try:
            expert = self.catalog.resolve(f"{EXPERT_PREFIX}{top}")
        except ModelNotFoundError:
            raise ArmUnavailableError(
                f"expert {top!r} was removed while this request was routed; retry"
            ) from None
        hold = self.hold(expert) if self.hold is not None else None
        info = self._routed_info(p.model.arm, r, expert, p.experiment)
        return Binding(expert.lora, info, hold=hold)

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
                data["merge"] = merge.model_dump()
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
