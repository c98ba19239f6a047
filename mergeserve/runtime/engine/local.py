"""vLLM in this process: AsyncLLM (its engine core in a child process) with LoRA on.

With the plugin (`mergeserve.vllm_plugin`), the only code that imports vLLM; it does so
inside functions, so that importing mergeserve does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from mergeserve.config import EngineSettings
from mergeserve.errors import (
    ConfigurationError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    MergeserveError,
)
from mergeserve.runtime.engine.base import (
    Engine,
    GenerationDelta,
    GenerationParams,
    LoRATarget,
    TemplateMessage,
    render_chat,
)
from mergeserve.runtime.mixture import MixtureSpec


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
    binding it to both cores served 1.28x the tokens/s (1.17-1.52 over 8 rounds; 1.33x
    in the run before) at a lower TTFT, while OMP_NUM_THREADS=2 changed nothing
    (benchmarks/threads.py, routed dynamic at concurrency 16; docs/benchmarks.md). So:
    `threads` set, the first `threads` of the cores this process may use
    (`engine.cpu_threads` is then really the worker's thread count, e.g. a container's
    CPU limit); unset, every usable core on a machine of up to SMALL_MACHINE_CORES cores,
    and vLLM's `auto` on larger ones, where the reserved core costs 1/n of the compute
    (not measured here)."""
    usable = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if threads is not None:
        chosen = usable[: max(1, threads)]
    elif len(usable) <= SMALL_MACHINE_CORES:
        chosen = usable
    else:
        return None
    return ",".join(map(str, chosen))


class VllmEngine(Engine):
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

    def render_chat(self, messages: Sequence[TemplateMessage]) -> list[int]:
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
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
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
        except (VLLMClientError, ValueError) as e:  # vLLM's request validation
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
