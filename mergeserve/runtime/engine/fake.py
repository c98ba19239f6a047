"""A deterministic stand-in engine for the fast test tier, never for serving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

from mergeserve.errors import EngineUnavailableError
from mergeserve.runtime.engine.base import (
    Engine,
    FinishReason,
    GenerationDelta,
    GenerationParams,
    LoRATarget,
    TemplateMessage,
)
from mergeserve.runtime.mixture import MixtureSpec


@dataclass
class FakeEngine(Engine):
    """A deterministic character-level engine for the fast test tier.

    One token is one character. The chat template is `<role>: content` lines; the reply
    is `[<adapter or base>] ` followed by the last user message reversed, so a test can
    see which adapter a request reached. Sampling parameters other than max_tokens and
    stop are accepted and ignored.
    """

    context_len: int = 512
    token_delay_s: float = 0.0
    """Sleep between tokens, to hold requests in flight."""
    in_flight: set[str] = field(default_factory=set)
    """Request ids currently generating (a test can watch aborts)."""
    loras_seen: list[str] = field(default_factory=list)
    healthy: bool = True
    closed: bool = False
    mixture: bool = False
    """Whether it accepts per-request mixtures (as vLLM with the plugin does)."""
    mixtures_seen: list[MixtureSpec] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)
    """Names of the adapters pinned now."""
    pin_delay_s: float = 0.0
    """How long a pin takes (as vLLM's, which waits for the engine's current step)."""
    mixtures_checked: list[tuple[str, MixtureSpec, str]] = field(default_factory=list)
    """(bundle, spec, reference) of each self-check asked of it."""
    reply_fn: Callable[[str | None, str], str] | None = None
    """(adapter name or None, last user message) -> reply, replacing the default."""
    mixture_live: bool = True
    """What the mixture self-check finds (False: as if the plugin were not loaded)."""

    @property
    def max_model_len(self) -> int:
        return self.context_len

    def render_chat(self, messages: Sequence[TemplateMessage]) -> list[int]:
        text = "".join(f"<{m['role']}>: {m['content']}\n" for m in messages) + "<assistant>: "
        return [ord(c) for c in text]

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: GenerationParams,
        request_id: str,
        lora: LoRATarget | None = None,
        mixture: MixtureSpec | None = None,
    ) -> AsyncGenerator[GenerationDelta, None]:
        if self.closed:
            raise EngineUnavailableError("the engine is shut down")
        self._check_mixture(lora, mixture)
        if mixture is not None:
            self.mixtures_seen.append(mixture)
        prompt = "".join(map(chr, prompt_token_ids))
        last_user = prompt.rsplit("<user>: ", 1)[-1].split("\n<", 1)[0]
        if self.reply_fn is not None:
            reply = self.reply_fn(lora.name if lora else None, last_user)
        else:
            reply = f"[{lora.name if lora else 'base'}] {last_user[::-1]}"
        if lora is not None:
            self.loras_seen.append(lora.name)
        finish: FinishReason = "stop"
        cut = min((i for i in (reply.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            reply = reply[:cut]
        if len(reply) > params.max_tokens:
            reply, finish = reply[: params.max_tokens], "length"
        n_prompt = len(prompt_token_ids)
        self.in_flight.add(request_id)
        try:
            if not reply:
                yield GenerationDelta("", 0, n_prompt, finish)
            for i, ch in enumerate(reply):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                yield GenerationDelta(ch, 1, n_prompt, finish if i + 1 == len(reply) else None)
        finally:
            self.in_flight.discard(request_id)

    @property
    def supports_mixture(self) -> bool:
        return self.mixture

    async def verify_mixture(
        self, bundle: LoRATarget, spec: MixtureSpec, reference: LoRATarget
    ) -> str | None:
        # A character engine cannot compute a merge; the check's logic runs on vLLM (e2e).
        self.mixtures_checked.append((bundle.name, spec, reference.name))
        return None if self.mixture_live else "the fake engine's mixture is marked not live"

    async def pin_adapter(self, lora: LoRATarget) -> None:
        if self.pin_delay_s:
            await asyncio.sleep(self.pin_delay_s)
        self.pinned.append(lora.name)

    async def unpin_adapter(self, lora: LoRATarget) -> None:
        self.pinned.remove(lora.name)

    async def check_health(self) -> None:
        if self.closed or not self.healthy:
            raise EngineUnavailableError("the fake engine is marked unhealthy")

    async def shutdown(self) -> None:
        self.closed = True
