"""`mergeserve eval` against the real app on a FakeEngine whose experts know their task."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
import pytest

from mergeserve.cli import main
from mergeserve.config import Settings
from mergeserve.runtime.engine import FakeEngine
from mergeserve.server.app import create_app
from mergeserve.tasks import TASKS, generate
from mergeserve.tasks.evaluate import Cell, expand_models, load_reply_cache, normalized_scores
from tests.conftest import write_fake_lora_dir
from tests.integration.conftest import uvicorn_in_thread

N = 12


def _oracle() -> FakeEngine:
    """expert:<task> answers its own task right; `base` answers only `add` right."""
    answers = {s.prompt: (t, s.answer) for t in TASKS for s in generate(t, "test", N)}

    def reply(lora: str | None, prompt: str) -> str:
        task, answer = answers.get(prompt, ("?", "?"))
        if lora == f"expert:{task}" or (lora is None and task == "add"):
            return answer + "."  # the scorer strips one trailing period
        return "I don't know"

    return FakeEngine(context_len=4096, reply_fn=reply)


def test_eval_table_json_markdown_and_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experts = tmp_path / "experts"
    for t in ("add", "capital"):
        write_fake_lora_dir(experts / t)
    settings = Settings(model=None, experts_dir=experts, cache=tmp_path / "cache")
    app = create_app(settings, _oracle())
    out = tmp_path / "eval"
    with uvicorn_in_thread(app) as url:
        main(["eval", "--base-url", url, "--models", "base,expert:*,static:linear", "--n",
              str(N), "--tasks", "add,capital,sentiment", "--out", str(out)])  # fmt: skip
    data = json.loads((out / "results.json").read_text())
    assert data["models"] == ["base", "expert:add", "expert:capital", "static:linear"]
    assert set(data["build_s"]) == {"static:linear"}  # what /v1/models says it took
    assert data["build_s"]["static:linear"] >= 0
    acc = {m: {t: c["accuracy"] for t, c in row.items()} for m, row in data["accuracy"].items()}
    assert acc["base"] == {"add": 1.0, "capital": 0.0, "sentiment": 0.0}
    assert acc["expert:add"] == {"add": 1.0, "capital": 0.0, "sentiment": 0.0}
    assert acc["expert:capital"] == {"add": 0.0, "capital": 1.0, "sentiment": 0.0}
    assert data["accuracy"]["expert:capital"]["capital"]["held_out_accuracy"] == 1.0
    # normalized over the tasks that have an expert (add, capital)
    assert data["normalized"] == {
        "base": 0.5,
        "expert:add": 0.5,
        "expert:capital": 0.5,
        "static:linear": 0.0,
    }
    table = (out / "results.md").read_text()
    assert "| normalized | build s |" in table
    assert "| `expert:capital` | 0 | 100 | 0 | 33.3 | 33.3 | 0.50 | – |" in table
    built = data["build_s"]["static:linear"]
    assert f"| `static:linear` | 0 | 0 | 0 | 0.0 | 0.0 | 0.00 | {built:.1f} |" in table
    for chart in ("results.png", "ranking.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "results.json" in capsys.readouterr().out


def test_model_patterns_and_errors() -> None:
    served = ["base", "expert:a", "expert:b", "static:ties"]
    assert expand_models(["base", "expert:*"], served) == ["base", "expert:a", "expert:b"]
    with pytest.raises(ValueError, match="matches no served model"):
        expand_models(["dynamic:*"], served)
    with pytest.raises(ValueError, match="is not served"):
        expand_models(["expert:c"], served)
    cell = Cell(accuracy=0.5, held_out_accuracy=None, n=2, errors=0)
    assert normalized_scores({"m": {"add": cell}}, ["add"]) == {"m": None}


def test_eval_resume_reuses_cached_replies(tmp_path: Path) -> None:
    experts = tmp_path / "experts"
    write_fake_lora_dir(experts / "add")
    settings = Settings(model=None, experts_dir=experts, cache=tmp_path / "cache")
    out = tmp_path / "eval"
    args = ["eval", "--models", "base,expert:add", "--n", str(N), "--tasks", "add,capital",
            "--out", str(out)]  # fmt: skip

    def accuracy() -> float:
        data = json.loads((out / "results.json").read_text())
        return float(data["accuracy"]["expert:add"]["add"]["accuracy"])

    with uvicorn_in_thread(create_app(settings, _oracle())) as url:
        main([*args, "--base-url", url])
        cache = out / "replies.jsonl"
        lines = cache.read_text().splitlines()
        assert len(lines) == 2 * 2 * N  # every reply, as it came
        # Doctor one cached reply and tear the last line, as a killed run would leave it:
        # a resumed run must take the cache as it is and ask only for what is missing.
        records = [json.loads(x) for x in lines]
        doctored = next(r for r in records if r["model"] == "expert:add" and r["task"] == "add")
        doctored["reply"] = "wrong"
        torn = records.pop()
        cache.write_text("".join(json.dumps(r) + "\n" for r in records) + json.dumps(torn)[:20])
        main([*args, "--base-url", url, "--resume"])
        assert accuracy() == pytest.approx((N - 1) / N)
        assert len(load_reply_cache(cache)) == 2 * 2 * N  # the torn one was asked again
        main([*args, "--base-url", url])  # without --resume: afresh
        assert accuracy() == 1.0


def test_resume_asks_again_for_a_model_whose_content_changed(tmp_path: Path) -> None:
    from mergeserve.testing import make_tiny_llama

    # A base the fake experts fit (16 wide, 2 layers): the server then knows every
    # model's content and publishes its digest in /v1/models.
    base = make_tiny_llama(
        tmp_path / "base", hidden_size=16, num_heads=1, num_kv_heads=1, intermediate_size=32
    )
    experts = tmp_path / "experts"
    write_fake_lora_dir(experts / "add", seed=1)
    write_fake_lora_dir(experts / "capital", seed=2)
    settings = Settings(model=base, experts_dir=experts, cache=tmp_path / "cache")
    out = tmp_path / "eval"
    args = ["eval", "--models", "base,expert:*,dynamic:exact", "--n", str(N), "--tasks",
            "add", "--out", str(out), "--resume"]  # fmt: skip
    cache = out / "replies.jsonl"

    def asked() -> Counter[str]:
        return Counter(json.loads(x)["model"] for x in cache.read_text().splitlines())

    with uvicorn_in_thread(create_app(settings, _oracle())) as url:
        cards = httpx.get(f"{url}/v1/models").json()["data"]
        digests = {c["id"]: c["digest"] for c in cards}
        assert None not in digests.values()
        # Equal content, equal digest: `dynamic` is its mode's alias, and with two experts
        # the average (linear) is task arithmetic at λ = 0.5. Every other model differs.
        assert digests["dynamic"] == digests["dynamic:exact"]
        assert digests["static:linear"] == digests["static:task_arithmetic"]
        assert len(set(digests.values())) == len(digests) - 2
        main([*args, "--base-url", url])
        main([*args, "--base-url", url])  # all cached: nothing asked
    assert asked() == {"base": N, "expert:add": N, "expert:capital": N, "dynamic:exact": N}
    write_fake_lora_dir(experts / "add", seed=3)  # retrained: same name, new weights
    with uvicorn_in_thread(create_app(settings, _oracle())) as url:
        after = {c["id"]: c["digest"] for c in httpx.get(f"{url}/v1/models").json()["data"]}
        main([*args, "--base-url", url])
    assert after["base"] == digests["base"]
    assert after["expert:capital"] == digests["expert:capital"]
    assert after["expert:add"] != digests["expert:add"]
    assert after["dynamic:exact"] != digests["dynamic:exact"]  # it merges the new add
    # Asked again: the changed expert and the merges that contain it, nothing else.
    assert asked() == {"base": N, "expert:add": 2 * N, "expert:capital": N, "dynamic:exact": 2 * N}


def test_eval_general_and_two_skill_suites(tmp_path: Path) -> None:
    """--suite general scores harm against base's reply; --suite two-skill is exact match
    on the composed tasks (FakeEngine: replies name the adapter, so only a request
    routed to none can equal base's)."""
    from mergeserve.tasks.open_world import TWO_SKILL, general_prompts

    experts = tmp_path / "experts"
    write_fake_lora_dir(experts / "add", examples=[s.prompt for s in generate("add", "train", 8)])
    write_fake_lora_dir(
        experts / "capital", examples=[s.prompt for s in generate("capital", "train", 8)]
    )
    settings = Settings(model=None, experts_dir=experts, cache=tmp_path / "cache")
    app = create_app(settings, FakeEngine(context_len=4096))
    out = tmp_path / "general"
    with uvicorn_in_thread(app) as url:
        main(["eval", "--base-url", url, "--suite", "general", "--models",
              "expert:add,dynamic,route:top1", "--max-tokens", "64",
              "--out", str(out)])  # fmt: skip
        main(["eval", "--base-url", url, "--suite", "two-skill", "--models", "base",
              "--n", "4", "--out", str(tmp_path / "two")])  # fmt: skip
    data = json.loads((out / "general.json").read_text())
    cells = data["models"]
    assert list(cells) == ["base", "expert:add", "dynamic", "route:top1"]
    n = len(general_prompts("test"))
    assert all(c["n"] == n and c["errors"] == 0 for c in cells.values())
    assert cells["base"]["same_as_base"] == 1.0
    assert cells["base"]["overlap"] == 1.0
    assert cells["expert:add"]["same_as_base"] == 0.0  # "[expert:add] ..." never equals
    assert 0 < cells["expert:add"]["overlap"] < 1  # ... but shares the reversed words
    # The open-world router sends (nearly) every general request to none: base's reply.
    assert cells["dynamic"]["same_as_base"] >= 0.9
    assert cells["route:top1"]["same_as_base"] >= 0.9
    assert "| `dynamic` |" in (out / "general.md").read_text()
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["tasks"] == list(TWO_SKILL)
    assert two["accuracy"]["base"]["sum_json"]["n"] == 4


def test_token_f1() -> None:
    from mergeserve.tasks.evaluate import token_f1

    assert token_f1("a b c", "a b c") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("x", "a b") == 0.0
    assert token_f1("A b", "a c") == pytest.approx(0.5)
