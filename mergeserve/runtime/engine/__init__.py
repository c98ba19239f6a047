"""The engines that generate: the `Engine` interface and its implementations.

base.py    the interface and the types it speaks (LoRATarget, GenerationParams, ...)
local.py   VllmEngine: vLLM's AsyncLLM in this process (and its LoRA-slot accounting)
remote.py  RemoteVllmEngine: one or more vLLM OpenAI servers over HTTP
fake.py    FakeEngine: a deterministic character engine for the fast test tier
factory.py build_engine: the one `engine.kind` names

Only local.py (inside functions) and the plugin (`mergeserve.vllm_plugin`) import vLLM.
"""

from mergeserve.runtime.engine.base import (
    PROBE_PROMPT_TOKENS,
    PROBE_TEXT,
    PROBE_TOKENS,
    EndpointState,
    Engine,
    FinishReason,
    GenerationDelta,
    GenerationParams,
    LoRATarget,
    TemplateMessage,
    load_chat_tokenizer,
    render_chat,
)
from mergeserve.runtime.engine.factory import build_engine
from mergeserve.runtime.engine.fake import FakeEngine
from mergeserve.runtime.engine.local import (
    CPU_BIND_ENV,
    SMALL_MACHINE_CORES,
    LoRASlots,
    VllmEngine,
    cpu_binding,
    set_engine_environment,
)
from mergeserve.runtime.engine.remote import RemoteVllmEngine

__all__ = [
    "CPU_BIND_ENV",
    "PROBE_PROMPT_TOKENS",
    "PROBE_TEXT",
    "PROBE_TOKENS",
    "SMALL_MACHINE_CORES",
    "EndpointState",
    "Engine",
    "FakeEngine",
    "FinishReason",
    "GenerationDelta",
    "GenerationParams",
    "LoRASlots",
    "LoRATarget",
    "RemoteVllmEngine",
    "TemplateMessage",
    "VllmEngine",
    "build_engine",
    "cpu_binding",
    "load_chat_tokenizer",
    "render_chat",
    "set_engine_environment",
]
