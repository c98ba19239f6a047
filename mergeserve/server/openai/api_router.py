"""OpenAI-compatible routes; the logic lives in serving.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from mergeserve.errors import ClientDisconnectedError, InvalidRequestError
from mergeserve.server.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    FeedbackRequest,
    FeedbackResponse,
    ModelCard,
    ModelList,
)
from mergeserve.server.openai.serving import ChatService
from mergeserve.server.state import AppState, get_state
from mergeserve.service.catalog import ServedModel
from mergeserve.service.experiments import Experiment

router = APIRouter(prefix="/v1")
T = TypeVar("T")

ARM_HEADER = "x-mergeserve-arm"


class _GuardedStream(StreamingResponse):
    """A StreamingResponse that runs `on_close` however the response ends.

    If the client goes away before the body iterator starts, the iterator's own cleanup
    never runs; this hook is what then gives the request's admission slot back.
    """

    def __init__(self, content: Any, on_close: Callable[[], None], **kw: Any):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


DISCONNECT_POLL_S = 0.25


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled as soon as the client has gone away (a non-streamed request
    would otherwise generate to the end for nobody; the cancellation aborts it in the
    engine and frees its slot, counted as aborted)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise ClientDisconnectedError("the client went away")
    finally:
        if not task.done():  # this handler itself was cancelled
            task.cancel()


def get_chat(state: Annotated[AppState, Depends(get_state)]) -> ChatService:
    return state.chat


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, chat: Annotated[ChatService, Depends(get_chat)]
) -> Any:
    headers = request.headers  # case-insensitive: an experiment's sticky-key header
    if not body.stream:
        response = await _unless_disconnected(request, chat.complete(body, headers))
        arm = response.merge.arm if response.merge is not None else body.model
        return JSONResponse(response.model_dump(), headers={ARM_HEADER: arm})
    prepared, acct = await chat.start(body, headers)
    return _GuardedStream(
        chat.stream(body, prepared, acct),
        on_close=lambda: chat.abandon(acct),
        media_type="text/event-stream",
        headers={ARM_HEADER: acct.arm, "cache-control": "no-cache"},
    )


def _experiment_card(exp: Experiment) -> ModelCard:
    shares = exp.shares
    root = "A/B experiment: " + ", ".join(f"{m} {100 * w:.0f}%" for m, w in shares.items())
    return ModelCard(id=exp.name, root=root, arms=shares)


def _card(m: ServedModel, state: AppState) -> ModelCard:
    card = ModelCard(id=m.id, root=m.root, digest=m.digest, build_s=m.build_s)
    if m.build is not None:
        card.status, card.status_note = m.build.status, m.build.note()
    if m.mode is not None:
        card.serving = state.live.serving(m.mode)
        card.serving_note = state.live.mixture_refused
    return card


@router.get("/models", response_model=ModelList)
async def list_models(state: Annotated[AppState, Depends(get_state)]) -> ModelList:
    cards = [_card(m, state) for m in state.catalog]
    cards += [_experiment_card(e) for e in state.chat.experiments.values()]
    return ModelList(data=cards)


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, state: Annotated[AppState, Depends(get_state)]) -> ModelCard:
    exp = state.chat.experiments.get(model_id)
    if exp is not None:
        return _experiment_card(exp)
    return _card(state.catalog.resolve(model_id), state)


@router.post("/feedback", response_model=FeedbackResponse)
async def feedback(
    body: FeedbackRequest, request: Request, chat: Annotated[ChatService, Depends(get_chat)]
) -> FeedbackResponse:
    """Record an outcome for a response this server gave, against the arm that gave it
    (with `experiments.feedback_token` set, only from clients that bear it)."""
    book = chat.feedback
    if book is None:
        raise InvalidRequestError("feedback is not recorded by this server")
    book.check_token(request.headers.get("authorization", ""))
    answered = book.record(body.id, body.score, body.comment)  # cheap: a thread writes the log
    chat.metrics.feedback.labels(answered.experiment or "none", answered.arm).observe(body.score)
    return FeedbackResponse(
        id=body.id,
        model=answered.model,
        arm=answered.arm,
        experiment=answered.experiment,
        score=body.score,
    )
