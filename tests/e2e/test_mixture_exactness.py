"""End to end on real vLLM: the in-engine mixture is exact. Greedy tokens of the bundle
adapter with per-request weights equal those of each weighting's materialized merge, in a
batch where every request has different weights, and in a batch that also holds a
single-expert and a base request (tiny llama and SmolLM2; exact and Twin bundles); a
batch in which every request weights one expert alone (the plugin then computes that
block's columns only) equals that expert served as its own adapter.
Without the plugin the same requests do not match: the check can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergeserve.config import Settings, default_experts_dir
from mergeserve.runtime.base_model import ensure_embedded_model
from mergeserve.testing import make_random_lora, make_tiny_llama

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("mixture-tiny")
    base = make_tiny_llama(tmp / "base")
    for name, rank, seed in (("e1", 8, 1), ("e2", 8, 2), ("e3", 4, 3)):
        make_random_lora(base, tmp / "experts" / name, rank=rank, seed=seed)
    return base, tmp / "experts"


def run_engine(
    base: Path, experts: Path, out: Path, mode: str, plugin: str, **env_extra: str
) -> dict:
    env = {
        **os.environ,
        "MERGESERVE_MIXTURE_PLUGIN": plugin,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        **env_extra,
    }
    script = [sys.executable, "-m", "tests.e2e.mixture_engine"]
    proc = subprocess.run(
        [*script, str(base), str(experts), str(out), "--mode", mode],
        capture_output=True,
        text=True,
        timeout=800,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict = json.loads((out / "result.json").read_text())
    result["log"] = proc.stdout + proc.stderr
    return result


def check_exact(r: dict) -> None:
    n = len(r["reference"])
    assert len({tuple(t) for t in r["reference"]}) > 1, "the weights should matter"
    for j in range(n):
        assert r["mixture"][j] == r["reference"][j], (j, r["weights"][j])
        assert r["mixed"][j] == r["reference"][j], (j, r["weights"][j])
    assert r["mixed"][n] == r["single"][0]  # a single expert beside the mixtures
    assert r["mixed"][n + 1] == r["base"][0]  # and a base request
    if r["mode"] == "exact":  # one expert's block alone in every request: that expert
        assert r["one_block"] == r["single_all"]


@pytest.mark.parametrize("mode", ["exact", "twin"])
def test_tiny_llama_mixture_equals_materialized(
    tiny: tuple[Path, Path], tmp_path: Path, mode: str
) -> None:
    check_exact(run_engine(*tiny, tmp_path, mode, "1"))


def test_without_the_plugin_the_bundle_is_not_the_mixture(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    r = run_engine(*tiny, tmp_path, "exact", "0")
    assert r["plugin"] == "0"
    assert any(m != ref for m, ref in zip(r["mixture"], r["reference"], strict=True))


def test_second_start_loads_the_compile_cache(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """vLLM-cpu saves the compiled model (AOT) and, with the plugin, loads it at the next
    start instead of compiling again; the loaded graph computes the same mixture."""
    cache = str(tmp_path / "vllm-cache")
    first = run_engine(*tiny, tmp_path / "first", "exact", "1", VLLM_CACHE_ROOT=cache)
    second = run_engine(*tiny, tmp_path / "second", "exact", "1", VLLM_CACHE_ROOT=cache)
    assert "saved AOT compiled function" in first["log"]
    assert "Directly load AOT compilation" in second["log"], second["log"][-3000:]
    assert "load failure" not in second["log"]
    check_exact(second)
    assert second["mixed"] == first["mixed"]


def test_smollm2_demo_experts_mixture_equals_materialized(tmp_path: Path) -> None:
    experts = default_experts_dir()
    assert experts is not None
    base = ensure_embedded_model(Settings().cache)
    r = run_engine(base, experts, tmp_path, "exact", "1")
    assert r["bundle_rank"] == 48  # six rank-8 experts
    check_exact(r)
