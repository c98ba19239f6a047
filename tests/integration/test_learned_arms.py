"""Data-aware static arms (RegMean, evolutionary search, …) built by the server from the
experts' examples, listed with their build time, served, and reused after a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeserve.adapters.lowrank import relative_error
from mergeserve.adapters.peft_io import load_lora_factors
from mergeserve.config import Settings
from mergeserve.errors import ConfigurationError
from mergeserve.runtime.engine import FakeEngine
from mergeserve.runtime.expert_set import STATIC_DEFAULTS, ExpertSet, merge_context, static_merge
from mergeserve.server.app import build_state
from mergeserve.testing import make_random_lora, make_tiny_llama
from tests.integration.conftest import serve

TASKS = {
    "add": [("what is 2 plus 3", "5"), ("add 4 and 1", "5"), ("sum of 6 and 2", "8")],
    "capital": [("capital of france", "paris"), ("capital of germany", "berlin")],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("learned-arms")
    base = make_tiny_llama(root / "base", hidden_size=64, intermediate_size=96)
    experts = root / "experts"
    for i, (name, rows) in enumerate(TASKS.items()):
        d = make_random_lora(base, experts / name, rank=4, seed=i + 1, b_std=0.05)
        (d / "examples.jsonl").write_text(
            "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows)
        )
    return base, experts


def settings(base: Path, experts: Path, cache: Path, **merge: object) -> Settings:
    return Settings.model_validate(
        {
            "model": base,
            "experts_dir": experts,
            "cache": cache,
            "router": {"kind": "arrow"},
            "merge": {"static_methods": ["linear", "regmean", "evolutionary"], **merge},
        }
    )


async def test_learned_arms_are_served_with_their_build_time(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    base, experts = tiny
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"prompt": "what is 1 plus 1", "answer": "2"}) + "\n")
    s = settings(base, experts, tmp_path / "cache", dev_file=str(dev))
    async for served in serve(s, FakeEngine(context_len=256)):
        cards = {m["id"]: m for m in (await served.http.get("/v1/models")).json()["data"]}
        for arm in ("static:regmean", "static:evolutionary", "static:linear"):
            assert cards[arm]["build_s"] is not None
            assert cards[arm]["build_s"] >= 0
        assert cards["expert:add"].get("build_s") is None
        r = await served.client.chat.completions.create(
            model="static:regmean", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert r.choices[0].message.content
        assert served.engine.loras_seen[-1] == "static:regmean"
        first = {arm: cards[arm]["build_s"] for arm in cards if arm.startswith("static:")}
        regmean_dir = Path(cards["static:regmean"]["root"])
    mtime = (regmean_dir / "adapter_model.safetensors").stat().st_mtime_ns
    async for served in serve(s, FakeEngine(context_len=256)):  # a restart: built before
        cards = {m["id"]: m for m in (await served.http.get("/v1/models")).json()["data"]}
        assert {a: cards[a]["build_s"] for a in first} == first
        assert Path(cards["static:regmean"]["root"]) == regmean_dir
    assert (regmean_dir / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_new_examples_give_a_new_learned_merge(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    base, experts = tiny
    exp = ExpertSet.from_dir(experts)
    cache = tmp_path / "cache"
    ctx = merge_context(exp, base)
    one = static_merge(exp, "regmean", STATIC_DEFAULTS["regmean"], 16, cache, ctx)
    assert json.loads((one.path / "build.json").read_text())["method"] == "regmean"
    again = static_merge(exp, "regmean", STATIC_DEFAULTS["regmean"], 16, cache, ctx)
    assert again.path == one.path
    other_dev = tmp_path / "dev.jsonl"
    other_dev.write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    moved = static_merge(
        exp, "regmean", STATIC_DEFAULTS["regmean"], 16, cache, merge_context(exp, base, other_dev)
    )
    assert moved.path != one.path  # the context is part of the key
    a, b = load_lora_factors(one.path), load_lora_factors(moved.path)
    dense = [{n: bb @ aa for n, (aa, bb) in f.modules().items()} for f in (a, b)]
    assert relative_error(dense[0], dense[1]) < 1e-6  # RegMean does not read the dev set
    assert one.rank == 8  # two rank-4 experts, exact, under the slot rank 16


def test_learned_arms_need_a_local_base_model_and_a_real_dev_file(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    base, experts = tiny
    exp = ExpertSet.from_dir(experts)
    with pytest.raises(ConfigurationError, match="need a local model dir"):
        merge_context(exp, None)
    with pytest.raises(ConfigurationError, match="is not a file"):
        merge_context(exp, base, tmp_path / "missing.jsonl")
    with pytest.raises(ConfigurationError, match="needs the base model and examples"):
        static_merge(exp, "fisher", STATIC_DEFAULTS["fisher"], 16, tmp_path / "c")
    bad = settings(base, experts, tmp_path / "cache", static_methods=["regmean", "frankenmerge"])
    with pytest.raises(ConfigurationError, match="no static arm 'frankenmerge'"):
        build_state(bad, FakeEngine())
