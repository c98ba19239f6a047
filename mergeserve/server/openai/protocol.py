"""OpenAI chat-completions wire types (the subset mergeserve serves), as pydantic models.

Requests forbid unknown fields: a parameter this server does not implement (tools,
logprobs, n > 1, …) is refused with a 400 naming it, never silently ignored.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergeserve.service.binding import MergeInfo


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---------------------------------------------------------------------------- requests


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # int64, as OpenAI takes it
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # Extensions (send with the openai client's extra_body).
    ignore_eos: bool = False
    """vLLM's extension: keep generating past the end-of-sequence token (benchmarks)."""
    merge_weights: dict[str, float] | None = None
    """Dynamic models only: merge these experts with these weights instead of routing,
    as given (not normalized; each in [0, 10]), rounded to the routing grid."""

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --------------------------------------------------------------------------- responses


def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    merge: MergeInfo | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None
    merge: MergeInfo | None = None
    """Sent on the first chunk."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "mergeserve"
    root: str | None = None
    """What the model is built from: the base model dir, or the adapter dir."""
    digest: str | None = None
    """mergeserve's extension: content digest of what answers (equal digest, equal greedy
    replies); `mergeserve eval --resume` keys its reply cache on it."""
    arms: dict[str, float] | None = None
    """An A/B experiment's arms: served model -> share of the traffic."""
    build_s: float | None = None
    """mergeserve's extension: how long a static merge took to build (seconds)."""
    serving: Literal["mixture", "materialized"] | None = None
    """mergeserve's extension, dynamic models: served by the in-engine mixture, or by
    materializing each merge (no mixture-capable engine, or its self-check failed)."""
    serving_note: str | None = None
    """Why a dynamic model is materialized although the mixture was asked for."""
    status: Literal["ready", "queued", "building", "failed"] = "ready"
    """mergeserve's extension: whether the model answers now. Static arms are built in
    the background after start-up (`merge.background_builds`): until then `queued` or
    `building` (requests get 503 with Retry-After), or `failed` (see `status_note`)."""
    status_note: str | None = None
    """What a model that is not ready is doing: how long it has been building, or why
    it failed."""


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`: an outcome for a response this server gave."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    """The response's `id` (chatcmpl-…)."""
    score: float
    comment: str | None = Field(None, max_length=2000)


class FeedbackResponse(BaseModel):
    id: str
    model: str
    arm: str
    experiment: str | None
    score: float


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
