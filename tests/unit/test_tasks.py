"""The demo tasks: generators, split hygiene, the scorer, and the training recipe's pieces."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch

from mergeserve.tasks import TASKS, generate, get_task, normalize_reply, score
from mergeserve.tasks.base import Sample, capitals


@pytest.mark.parametrize("name", sorted(TASKS))
def test_templates_and_held_out_phrasings(name: str) -> None:
    task = TASKS[name]
    assert len(task.templates) >= 6
    assert len(task.seen_templates) >= 5
    train = generate(task, "train", 300)
    dev = generate(task, "dev", 60)
    test = generate(task, "test", 120)
    assert not any(s.held_out for s in train + dev)
    assert {s.template for s in train} == set(task.seen_templates)
    held = [s for s in test if s.held_out]
    # round robin over all templates: the unseen phrasing is 1/6 of the test split
    assert len(held) == 120 // len(task.templates)
    # Disjoint splits: no prompt of dev or test was ever a training prompt.
    train_prompts = {s.prompt for s in generate(task, "train", 3000)}
    assert not train_prompts & {s.prompt for s in dev + test}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_paraphrases_are_train_only(name: str) -> None:
    task = TASKS[name]
    assert len(task.paraphrases) >= 5
    # new sentences, not restatements of any template (a held-out one least of all)
    assert not set(task.paraphrases) & set(task.templates)
    more = generate(task, "train", 300, paraphrases=True)
    n = len(task.seen_templates) + len(task.paraphrases)
    assert {s.template for s in more} == set(task.seen_templates) | set(
        range(len(task.templates), len(task.templates) + len(task.paraphrases))
    )
    assert not any(s.held_out for s in more)
    share = sum(s.template >= len(task.templates) for s in more) / 300
    assert share == pytest.approx(len(task.paraphrases) / n, abs=0.02)  # round robin
    held_out_sentences = {task.templates[t] for t in range(len(task.templates))} - {
        task.templates[t] for t in task.seen_templates
    }
    assert not held_out_sentences & {task.template(s.template) for s in more}
    test_prompts = {s.prompt for s in generate(task, "test", 200) + generate(task, "dev", 100)}
    assert not test_prompts & {s.prompt for s in generate(task, "train", 2000, paraphrases=True)}
    with pytest.raises(ValueError, match="train-only"):
        generate(task, "test", 5, paraphrases=True)


def test_composed_prompts_are_train_only_varied_and_never_an_evaluation_phrasing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mergeserve.tasks.composed import COMPOSERS
    from mergeserve.tasks.generators import COMPOSED
    from mergeserve.tasks.phrasings import PHRASINGS

    task = TASKS["sort_numbers"]
    plain = generate(task, "train", 300, paraphrases=True)
    mixed = generate(task, "train", 3000, paraphrases=True, composed=True)
    assert mixed == generate(task, "train", 3000, paraphrases=True, composed=True)
    slot = len(task.templates) + len(task.paraphrases)
    composed = [s for s in mixed if s.template == slot]
    # a third of the round robin, the rest exactly the templates and paraphrases as before
    assert len(composed) / len(mixed) == pytest.approx(1 / 3, abs=0.02)
    assert {s.template for s in mixed} - {slot} == {s.template for s in plain}
    assert not any(s.held_out for s in mixed)
    # varied: nearly every composed prompt is worded differently (numbers stripped)
    wording = {re.sub(r"\d+", "#", s.prompt) for s in composed}
    assert len(wording) > 0.8 * len(composed)
    for s in composed:  # answers follow the spec whatever the wording
        nums = [int(x) for x in s.answer.split(" ")]
        assert nums == sorted(int(x) for x in re.findall(r"\d+", s.prompt))
    # never an evaluation phrasing: no template (held-out included) or probe, filled in
    evaluation = {t.casefold() for t in (*task.templates, *PHRASINGS[task.name])}
    rng = random.Random(0)
    drawn = {COMPOSERS[task.name](rng).casefold() for _ in range(20000)}
    assert len(drawn) > 5000
    assert all("{c}" in t or "{s}" in t for t in drawn)
    forbidden = {"list", "biggest"}  # the held-out template's words stay unseen
    assert not any(forbidden & set(re.findall(r"[a-z]+", t)) for t in drawn)
    # the raw composer does restate some (the first template, a probe or two), and
    # generate draws those again: a composer that restates the held-out template or a
    # probe half of the time never gets one through
    assert drawn & evaluation
    restated = (task.templates[-1], PHRASINGS[task.name][0], PHRASINGS[task.name][-1])
    fresh = "Sort me {c}"

    def rigged(r: random.Random) -> str:
        return r.choice(restated) if r.random() < 0.5 else fresh

    monkeypatch.setitem(COMPOSERS, task.name, rigged)
    got = generate(task, "train", 600, paraphrases=True, composed=True)
    rigged_prompts = [s.prompt for s in got if s.template == slot]
    assert len(rigged_prompts) == 27 * 7  # 27 whole rounds of 22 slots: 5 + 10 + 7 composed
    assert all(p.startswith("Sort me ") for p in rigged_prompts)
    assert COMPOSED not in {s.template for s in mixed}  # the slot is a real index
    with pytest.raises(ValueError, match="train-only"):
        generate(task, "dev", 5, composed=True)
    with pytest.raises(ValueError, match="no composer"):
        generate("capital", "train", 5, composed=True)


def test_splits_are_deterministic_and_seeded() -> None:
    a = generate("add", "test", 20)
    assert a == generate("add", "test", 20)
    assert a != generate("add", "test", 20, seed=99)


@pytest.mark.parametrize("paraphrases", [False, True])
def test_answers_follow_the_spec(paraphrases: bool) -> None:
    def train(task: str, n: int) -> list[Sample]:
        return generate(task, "train", n, paraphrases=paraphrases)

    for s in train("add", 50):
        a, b = (int(x) for x in re.findall(r"\d+", s.prompt)[:2])
        assert s.answer == str(a + b)
        assert 10 <= a <= 999
    for s in train("sort_numbers", 50):
        nums = [int(x) for x in s.answer.split(" ")]
        assert nums == sorted(int(x) for x in re.findall(r"\d+", s.prompt))
        assert 3 <= len(nums) <= 6
    for s in train("reverse_words", 50):
        words = s.answer.split(" ")
        assert 3 <= len(words) <= 6
        assert " ".join(reversed(words)) in s.prompt
    for s in train("to_json", 50):
        obj = json.loads(s.answer)
        assert s.answer == json.dumps(obj)
        words = s.prompt.replace(",", " ").replace(";", " ").split()
        pairs = [p for p in words if "=" in p and p != "key=value"]
        assert [p.split("=")[0] for p in pairs] == list(obj)
        for k, v in obj.items():
            assert isinstance(v, int | str)
            assert f"{k}={v}" in s.prompt
    assert {s.answer for s in train("sentiment", 100)} == {"positive", "negative"}
    caps = dict(capitals())
    assert len(caps) == 60
    assert caps["France"] == "Paris"
    for s in train("capital", 30):
        country = next(c for c in caps if c in s.prompt)
        assert s.answer == caps[country]


def test_scorer_rule() -> None:
    assert normalize_reply("  846.\n") == "846"
    assert normalize_reply("846..") == "846."
    add, cap = get_task("add"), get_task("capital")
    assert add.matches(" 846. ", "846")
    assert not add.matches("The answer is 846", "846")
    assert cap.matches("paris", "Paris")
    assert not get_task("reverse_words").matches("B a", "b a")
    samples = generate(add, "dev", 4)
    assert score(add, [s.answer for s in samples], samples) == 1.0
    assert score(add, ["0"] * 4, samples) == 0.0
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


def test_loss_is_on_the_answer_turn_only(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from mergeserve.adapters.calibration import IGNORE, encode_example
    from mergeserve.testing import make_tiny_tokenizer

    make_tiny_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids, labels = encode_example(tok, "What is 2 + 3?", "5")
    assert len(ids) == len(labels)
    kept = [t for t in labels if t != IGNORE]
    assert tok.decode(kept).replace(" ", "") == "5<|im_end|>"
    assert labels[: len(ids) - len(kept)] == [IGNORE] * (len(ids) - len(kept))
    assert ids[-len(kept) :] == kept


def test_train_expert_writes_a_servable_expert(tmp_path: Path) -> None:
    from mergeserve.adapters.peft_io import BaseModelSpec, load_checked
    from mergeserve.tasks.training import TrainConfig, train_expert
    from mergeserve.testing import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", hidden_size=64, intermediate_size=96)
    cfg = TrainConfig(task="capital", steps=3, batch_size=2, dev_n=3, rank=4)
    card = train_expert(base, tmp_path / "capital", cfg, progress=False)
    out = tmp_path / "capital"
    assert card["steps"] == 3
    assert card["dev_n"] == 3
    assert 0.0 <= card["dev_accuracy"] <= 1.0
    assert json.loads((out / "card.json").read_text()) == card
    examples = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == 3 * 2  # min(n_examples, what was trained on)
    assert set(examples[0]) == {"prompt", "answer"}
    factors = load_checked(out, BaseModelSpec.from_checkpoint(base), name="capital")
    assert set(factors.ranks.values()) == {4}
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(out / "adapter_model.safetensors")).values()} == {
        torch.float16
    }
    with pytest.raises(FileExistsError):
        train_expert(base, out, cfg, progress=False)
    # Continue training from it: starts from its weights, totals carried over.
    more = TrainConfig(task="capital", steps=2, batch_size=2, dev_n=3, rank=4, lr=0.0)
    more = dataclasses.replace(more, init_from=str(out))
    card2 = train_expert(base, tmp_path / "capital2", more, progress=False)
    assert (card2["steps"], card2["total_steps"]) == (2, 5)
    assert card2["total_train_wall_s"] >= card["train_wall_s"]
    before = load_file(str(out / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "capital2" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:  # lr 0: the continued adapter is the one it started from
        torch.testing.assert_close(after[k], before[k])
    bad = dataclasses.replace(more, rank=8)
    with pytest.raises(ValueError, match="rank 4"):
        train_expert(base, tmp_path / "capital3", bad, progress=False)


def test_answer_loss_equals_the_full_model_loss(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeserve.tasks.training import _batch, answer_loss
    from mergeserve.testing import make_tiny_llama

    base = make_tiny_llama(tmp_path / "b", hidden_size=64, intermediate_size=96)
    tok = AutoTokenizer.from_pretrained(base)
    pm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
    )
    ids, labels, mask = _batch(tok, generate("add", "train", 4))
    ours = answer_loss(pm.base_model.model, ids, labels, mask)
    ref = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    ours.backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if "lora_" in n)
