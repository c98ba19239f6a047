"""What the server may ask of an engine, and the types it is asked in.

`Engine` is the interface: prompt rendering, streaming generation with an optional LoRA
adapter (and, where the mergeserve vLLM plugin is live, a per-request mixture over a
bundle adapter), health and shutdown. Its implementations are `VllmEngine` (local.py,
vLLM in process), `RemoteVllmEngine` (remote.py, vLLM OpenAI servers over HTTP) and
`FakeEngine` (fake.py, the fast test tier); `build_engine` (factory.py) picks one.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CollectorRegistry

from mergeserve.errors import ConfigurationError, InvalidRequestError
from mergeserve.runtime.mixture import MixtureSpec

FinishReason = Literal["stop", "length"]

PROBE_TEXT = " ".join(
    f"Note {i}: the quick brown fox jumps over the lazy dog near the river bank." for i in range(40)
)
"""The mixture self-check's prompt: long, so that it fills several KV-cache blocks."""
PROBE_PROMPT_TOKENS = 320
"""Two and a half of vLLM-cpu's 128-token KV blocks: enough to catch shared prefix blocks."""
PROBE_TOKENS = 8


@dataclass(frozen=True)
class LoRATarget:
    """An adapter the engine can apply to one request.

    `int_id` identifies the adapter inside the engine (its LoRA slot cache key); it must
    be unique per distinct adapter content for the engine's lifetime.
    """

    name: str
    int_id: int
    path: Path


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters of one request, engine-neutral."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    """Generate exactly max_tokens (benchmarks), ignoring the end-of-sequence token."""


@dataclass(frozen=True)
class GenerationDelta:
    """New output of one request since the previous delta."""

    text: str
    num_tokens: int
    """Completion tokens in this delta."""
    prompt_tokens: int
    finish_reason: FinishReason | None = None


TemplateMessage = Mapping[str, str]
"""One chat message as the chat template takes it ({"role": ..., "content": ...}); the
OpenAI request's own message type is `server.openai.protocol.ChatMessage`."""


@dataclass(frozen=True)
class EndpointState:
    """One server an engine generates on (a remote engine may have several)."""

    url: str
    up: bool
    outstanding: int
    """Generations on it now."""
    adapters: int
    """Adapters registered on it."""
    reason: str | None = None
    """Why it is out of service (None while up)."""


class Engine(ABC):
    """What the server may ask of an engine."""

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Context window in tokens (prompt + completion)."""

    @abstractmethod
    def render_chat(self, messages: Sequence[TemplateMessage]) -> list[int]:
        """Apply the model's chat template (with the generation prompt) and tokenize."""

    @abstractmethod
    def generate(
        self,
        prompt_token_ids: list[int],
        params: GenerationParams,
        request_id: str,
        lora: LoRATarget | None = None,
        mixture: MixtureSpec | None = None,
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Stream a completion. Closing the iterator early aborts the request in the engine.

        `mixture` scales the rank blocks of `lora` (a bundle adapter) for this request;
        only for an engine whose `supports_mixture` is true."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raise EngineUnavailableError if the engine cannot serve."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and free its resources; idempotent."""

    def metrics_registry(self) -> CollectorRegistry | None:
        """The engine's own Prometheus registry, exported beside mergeserve's."""
        return None

    def endpoints(self) -> list[EndpointState]:
        """The servers this engine spreads requests over (none for an in-process engine)."""
        return []

    @property
    def supports_mixture(self) -> bool:
        """Whether `generate` applies a per-request `mixture` over a bundle adapter (the
        mergeserve vLLM plugin is active in the engine)."""
        return False

    async def pin_adapter(self, lora: LoRATarget) -> None:  # noqa: B027 (optional hook)
        """Load `lora` and keep it in a slot until `unpin_adapter` (a bundle adapter)."""

    async def unpin_adapter(self, lora: LoRATarget) -> None:  # noqa: B027 (optional hook)
        """Release what `pin_adapter` holds."""

    async def verify_mixture(
        self, bundle: LoRATarget, spec: MixtureSpec, reference: LoRATarget
    ) -> str | None:
        """Prove that this engine serves `spec` over `bundle` as the materialized merge
        `reference` it stands for; None if so, else why not (the start-up self-check).

        Three greedy generations of one long prompt (several KV blocks): the bundle
        unscaled first, so that its prefix blocks are cached, then the bundle with
        `spec`, then `reference`. The mixture must give the reference's tokens (the
        plugin scales the rank blocks, and its KV was not taken from the unscaled run)
        and differ from the unscaled bundle (the weights reached the engine at all)."""
        room = max(16, min(self.max_model_len - PROBE_TOKENS - 8, PROBE_PROMPT_TOKENS))
        prompt = self.render_chat([{"role": "user", "content": PROBE_TEXT}])[-room:]
        params = GenerationParams(max_tokens=PROBE_TOKENS, temperature=0.0, ignore_eos=True)

        async def reply(lora: LoRATarget, mixture: MixtureSpec | None) -> str:
            parts = []
            rid = f"mergeserve-probe-{uuid.uuid4().hex}"
            async for d in self.generate(prompt, params, rid, lora, mixture):
                parts.append(d.text)
            return "".join(parts)

        unscaled = await reply(bundle, None)
        mixed = await reply(bundle, spec)
        want = await reply(reference, None)
        if mixed != want:
            return (
                f"the mixture answered {mixed!r} where its materialized merge answers "
                f"{want!r}: the mergeserve plugin is not live in the engine (or its KV "
                "cache is shared across weightings)"
            )
        if mixed == unscaled:
            return (
                f"the mixture answered {mixed!r} as the unscaled bundle does: its weights "
                "do not reach the engine"
            )
        return None

    def _check_mixture(self, lora: LoRATarget | None, mixture: MixtureSpec | None) -> None:
        if mixture is None:
            return
        if not self.supports_mixture:
            raise ConfigurationError("this engine cannot apply per-request mixtures")
        if lora is None:
            raise InvalidRequestError("a mixture needs its bundle adapter")


def load_chat_tokenizer(model_dir: Path) -> Any:
    """The tokenizer of a local model dir; it must have a chat template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise ConfigurationError(f"no tokenizer could be loaded from {model_dir}: {e}") from e
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigurationError(f"the tokenizer of {model_dir} has no chat template")
    return tokenizer


def render_chat(tokenizer: Any, messages: Sequence[TemplateMessage]) -> list[int]:
    """Apply the chat template (with the generation prompt) and tokenize, as vLLM's chat
    endpoint does."""
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
        )
    except Exception as e:  # jinja errors for message shapes the template refuses
        raise InvalidRequestError(f"the chat template refused the messages: {e}") from e
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


# --------------------------------------------------------------------------------------
# vLLM
