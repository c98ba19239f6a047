"""The unseen-phrasings probe set: deterministic, disjoint parts, never a trained phrasing."""

from __future__ import annotations

import re
import string

import pytest

from mergeserve.tasks import TASKS, generate
from mergeserve.tasks.phrasings import PHRASINGS, generate_phrasings, phrasings


def _skeleton(template: str) -> str:
    """A template without its fields, case, spacing and punctuation: two phrasings that
    differ only in those are the same phrasing."""
    text = re.sub(r"\{\w+\}", " ", template).casefold()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def test_every_demo_task_has_ten_phrasings_five_per_part() -> None:
    assert set(PHRASINGS) == set(TASKS)
    for task, texts in PHRASINGS.items():
        assert len(texts) == 10, task
        assert len(set(map(_skeleton, texts))) == 10, task
        dev, test = phrasings(task, "dev"), phrasings(task, "test")
        assert len(dev) == len(test) == 5
        assert not set(dev) & set(test)
        assert dev + test == texts


@pytest.mark.parametrize("task", sorted(TASKS))
def test_no_phrasing_is_a_template_or_a_paraphrase(task: str) -> None:
    t = TASKS[task]
    trained = {_skeleton(x) for x in t.templates + t.paraphrases}
    fields = set(re.findall(r"\{(\w+)\}", " ".join(t.templates)))
    for text in PHRASINGS[task]:
        assert _skeleton(text) not in trained, text
        assert set(re.findall(r"\{(\w+)\}", text)) <= fields, text  # renders with the maker


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generated_samples_are_deterministic_round_robin_and_scored_by_the_task(
    task: str,
) -> None:
    dev = generate_phrasings(task, "dev", 20)
    assert dev == generate_phrasings(task, "dev", 20)
    assert [s.template for s in dev] == [i % 5 for i in range(20)]
    test = generate_phrasings(task, "test", 20)
    assert [s.template for s in test] == [5 + i % 5 for i in range(20)]
    assert all(s.held_out and s.task == task for s in dev + test)
    assert {s.prompt for s in dev}.isdisjoint(s.prompt for s in test)
    # never a prompt of the task's own splits (train with paraphrases, dev, test)
    seen = {s.prompt for s in generate(task, "train", 2000, paraphrases=True)}
    seen |= {s.prompt for s in generate(task, "dev", 200) + generate(task, "test", 200)}
    assert seen.isdisjoint(s.prompt for s in dev + test)
    # the answers are the task's: its own scorer accepts them
    t = TASKS[task]
    assert all(t.matches(s.answer, s.answer) for s in dev + test)


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        phrasings("add", "train")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no phrasings"):
        phrasings("sum_json", "dev")
    with pytest.raises(ValueError, match="not a demo task"):
        generate_phrasings("nope", "dev", 1)
