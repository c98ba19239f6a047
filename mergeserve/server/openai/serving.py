"""Chat completions: resolve the model, check the request against the context window,
admit it, run it on the engine, and shape the OpenAI response (whole or streamed).

Every request is accounted exactly once in the metrics, whichever way it ends.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from mergeserve.config import ServerSettings
from mergeserve.errors import (
    ContextLengthExceededError,
    EngineOverloadedError,
    MergeserveError,
)
from mergeserve.runtime.engine import (
    EngineClient,
    FinishReason,
    GenerationDelta,
    GenerationParams,
)
from mergeserve.server.catalog import ModelCatalog, ServedModel
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

log = logging.getLogger(__name__)


@dataclass
class _Accounting:
    """Per-request bookkeeping that lands in the metrics when the request ends."""

    arm: str
    started: float
    first_token_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    released: bool = False

    def saw(self, delta: GenerationDelta) -> None:
        if self.first_token_at is None and delta.num_tokens:
            self.first_token_at = time.perf_counter()
        self.prompt_tokens = delta.prompt_tokens
        self.completion_tokens += delta.num_tokens

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


class ChatService:
    def __init__(
        self,
        engine: EngineClient,
        catalog: ModelCatalog,
        metrics: Metrics,
        settings: ServerSettings,
    ):
        self.engine = engine
        self.catalog = catalog
        self.metrics = metrics
        self.settings = settings
        self._pending = 0

    # ------------------------------------------------------------------ preparation

    def _prepare(self, req: ChatCompletionRequest) -> PreparedChat:
        model = self.catalog.resolve(req.model)
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
        return PreparedChat(f"chatcmpl-{uuid.uuid4().hex}", model, prompt, params)

    def _admit(self) -> None:
        if self._pending >= self.settings.max_pending_requests:
            raise EngineOverloadedError(
                f"{self._pending} requests in flight (limit "
                f"{self.settings.max_pending_requests}); retry shortly"
            )
        self._pending += 1
        self.metrics.in_flight.set(self._pending)

    def _release(self, acct: _Accounting, status: StatusClass) -> None:
        """Free the admission slot and record the outcome; only the first call counts."""
        if acct.released:
            return
        acct.released = True
        self._pending -= 1
        m = self.metrics
        m.in_flight.set(self._pending)
        m.requests.labels(acct.arm, status).inc()
        m.tokens.labels(acct.arm, "prompt").inc(acct.prompt_tokens)
        m.tokens.labels(acct.arm, "completion").inc(acct.completion_tokens)
        if status == "ok":
            now = time.perf_counter()
            m.latency.labels(acct.arm).observe(now - acct.started)
            if acct.first_token_at is not None:
                m.ttft.labels(acct.arm).observe(acct.first_token_at - acct.started)

    def start(self, req: ChatCompletionRequest) -> tuple[PreparedChat, _Accounting]:
        """Check and admit a request; a refusal is counted and raised before any output."""
        started = time.perf_counter()
        try:
            prepared = self._prepare(req)
            self._admit()
        except MergeserveError as e:
            # The arm is the requested model only if it exists: labels stay bounded.
            arm = req.model if req.model in {m.id for m in self.catalog} else "unknown"
            self.metrics.requests.labels(arm, status_class(e.status_code)).inc()
            raise
        return prepared, _Accounting(prepared.model.id, started)

    def abandon(self, acct: _Accounting) -> None:
        """Release a streamed request whose generator may never have run (early disconnect)."""
        self._release(acct, "aborted")

    # --------------------------------------------------------------------- execution

    def _generate(self, p: PreparedChat) -> AsyncGenerator[GenerationDelta, None]:
        return self.engine.generate(p.prompt_token_ids, p.params, p.request_id, p.model.lora)

    async def complete(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        prepared, acct = self.start(req)
        status: StatusClass = "server_error"
        text: list[str] = []
        finish = None
        try:
            stream = self._generate(prepared)
            async with aclosing(stream):
                async for delta in stream:
                    acct.saw(delta)
                    text.append(delta.text)
                    finish = delta.finish_reason or finish
            status = "ok"
        except MergeserveError as e:
            status = status_class(e.status_code)
            raise
        except BaseException:
            status = "aborted"
            raise
        finally:
            self._release(acct, status)
        return ChatCompletionResponse(
            id=prepared.request_id,
            model=req.model,
            choices=[
                ChatCompletionChoice(
                    message=AssistantMessage(content="".join(text)), finish_reason=finish
                )
            ],
            usage=acct.usage(),
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

        def chunk(delta: DeltaMessage, finish: FinishReason | None = None) -> str:
            c = ChatCompletionChunk(
                id=prepared.request_id,
                model=req.model,
                choices=[ChatCompletionChunkChoice(delta=delta, finish_reason=finish)],
            )
            return f"data: {c.model_dump_json(exclude_none=True)}\n\n"

        status: StatusClass = "server_error"
        try:
            yield chunk(DeltaMessage(role="assistant", content=""))
            gen = self._generate(prepared)
            async with aclosing(gen):
                async for delta in gen:
                    acct.saw(delta)
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
