"""The real server (real vLLM) as a subprocess on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest

from mergeserve.config import Settings
from mergeserve.runtime.base_model import ensure_embedded_model
from mergeserve.testing import ServerProcess, make_random_lora, make_tiny_llama, server_process

ENGINE_ENV = {
    "MERGESERVE_ENGINE__MAX_MODEL_LEN": "1024",
    "MERGESERVE_ENGINE__MAX_NUM_SEQS": "16",
    "MERGESERVE_ENGINE__MAX_LORAS": "2",
    "MERGESERVE_ENGINE__KV_CACHE_GIB": "1",
}


@dataclass
class RealServer:
    name: str
    process: ServerProcess
    client: openai.OpenAI

    @property
    def base_url(self) -> str:
        return self.process.base_url


@pytest.fixture(scope="module", params=["tiny-llama", "smollm2"])
def real_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealServer]:
    tmp = tmp_path_factory.mktemp(request.param)
    experts = tmp / "experts"
    if request.param == "tiny-llama":
        base = make_tiny_llama(tmp / "tiny-llama")
        args = ["--model", str(base)]
    else:
        # The embedded default: converted once into the user's cache, reused across runs.
        base = ensure_embedded_model(Settings().cache)
        args = []
    make_random_lora(base, experts / "rand", rank=8)
    with server_process(
        [*args, "--experts-dir", str(experts)], tmp / "server.log", ENGINE_ENV
    ) as p:
        client = openai.OpenAI(base_url=f"{p.base_url}/v1", api_key="-", max_retries=0, timeout=120)
        yield RealServer(request.param, p, client)
