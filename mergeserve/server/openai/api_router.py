"""OpenAI-compatible routes; the logic lives in serving.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from mergeserve.server.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelCard,
    ModelList,
)
from mergeserve.server.openai.serving import ChatService
from mergeserve.server.state import AppState, get_state

router = APIRouter(prefix="/v1")

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


def get_chat(state: Annotated[AppState, Depends(get_state)]) -> ChatService:
    return state.chat


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    body: ChatCompletionRequest, chat: Annotated[ChatService, Depends(get_chat)]
) -> Any:
    if not body.stream:
        response = await chat.complete(body)
        arm = response.merge.arm if response.merge is not None else body.model
        return JSONResponse(response.model_dump(), headers={ARM_HEADER: arm})
    prepared, acct = await chat.start(body)
    return _GuardedStream(
        chat.stream(body, prepared, acct),
        on_close=lambda: chat.abandon(acct),
        media_type="text/event-stream",
        headers={ARM_HEADER: acct.arm, "cache-control": "no-cache"},
    )


@router.get("/models", response_model=ModelList)
async def list_models(state: Annotated[AppState, Depends(get_state)]) -> ModelList:
    return ModelList(data=[ModelCard(id=m.id, root=m.root, digest=m.digest) for m in state.catalog])


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, state: Annotated[AppState, Depends(get_state)]) -> ModelCard:
    m = state.catalog.resolve(model_id)
    return ModelCard(id=m.id, root=m.root, digest=m.digest)
