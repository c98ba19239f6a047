"""Open-world evaluation splits: general prompts outside the six skills, two-skill tasks."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from mergeserve.tasks import TASKS, generate, get_task
from mergeserve.tasks.base import capitals
from mergeserve.tasks.open_world import (
    COMPOSED_OF,
    OPEN_SPLITS,
    TWO_SKILL,
    GeneralPrompt,
    general_prompts,
    parse_general,
    two_skill_parts,
)

# Phrasing of the six demo skills (TASKS.md). It flags every prompt of their templates
# (checked below), so that it flagging no general prompt means something. (Some train-only
# paraphrases escape it, e.g. "Put {s} in numerical order.": they are not eval prompts.)
SKILL_PATTERNS = {
    "reverse_words": r"\brevers|\bbackwards?\b|\bopposite order\b",
    "add": r"\badd\b|\bsum\b|\bplus\b|\btotal of\b|\d\s*\+\s*\d",
    "sort_numbers": r"ascending|increasing order|low to high|smallest to (the )?(largest|biggest)",
    "capital": r"\bcapital\b",
    "sentiment": r"positive\s*(or|/)\s*negative",
    "to_json": r"\w+=\w+",
}
DETECTOR = re.compile("|".join(f"(?:{p})" for p in SKILL_PATTERNS.values()), re.IGNORECASE)


# ----------------------------------------------------------------------------- general


def test_general_prompts_count_and_categories() -> None:
    prompts = general_prompts()
    assert len(prompts) >= 360
    counts = Counter(p.category for p in prompts)
    assert len(counts) >= 10
    assert min(counts.values()) >= 25, counts
    assert all(isinstance(p, GeneralPrompt) and p.prompt.strip() for p in prompts)


def test_general_parts_are_disjoint_cover_all_and_stratified() -> None:
    everything = general_prompts()
    parts = {s: general_prompts(s) for s in OPEN_SPLITS}
    seen: set[GeneralPrompt] = set()
    for s, ps in parts.items():
        assert len(set(ps)) == len(ps)
        assert not seen & set(ps), s
        seen |= set(ps)
    assert seen == set(everything)
    assert sum(map(len, parts.values())) == len(everything)
    categories = {p.category for p in everything}
    for s, ps in parts.items():
        # about a third each, every category in every part
        assert abs(len(ps) - len(everything) / 3) <= len(categories), s
        assert {p.category for p in ps} == categories, s
        per = Counter(p.category for p in ps)
        total = Counter(p.category for p in everything)
        for c in categories:
            assert abs(per[c] - total[c] / 3) < 1, (s, c)


def test_general_prompts_are_deterministic() -> None:
    assert general_prompts() == general_prompts()
    for s in OPEN_SPLITS:
        assert general_prompts(s) == general_prompts(s)
    with pytest.raises(ValueError, match="unknown split"):
        general_prompts("train")  # type: ignore[arg-type]


def test_detector_flags_every_demo_task_prompt() -> None:
    for name in TASKS:
        for s in generate(name, "test", 200) + generate(name, "train", 200):
            assert DETECTOR.search(s.prompt), (name, s.prompt)


def test_general_prompts_are_outside_the_six_skills() -> None:
    flagged = [p.prompt for p in general_prompts() if DETECTOR.search(p.prompt)]
    assert not flagged
    task_prompts = {s.prompt for t in TASKS for s in generate(t, "test", 200)}
    assert not task_prompts & {p.prompt for p in general_prompts()}


def test_parse_general_rejects_duplicates_and_bad_lines() -> None:
    good = '{"category": "chat", "prompt": "hi"}\n\n{"category": "chat", "prompt": "hello"}\n'
    assert parse_general(good) == (GeneralPrompt("chat", "hi"), GeneralPrompt("chat", "hello"))
    dup = good + '{"category": "advice", "prompt": "Hi "}\n'
    with pytest.raises(ValueError, match=r"line 4: duplicate prompt .* \(first on line 1\)"):
        parse_general(dup)
    with pytest.raises(ValueError, match="line 1: not JSON"):
        parse_general("{nope\n")
    with pytest.raises(ValueError, match="line 1: want an object"):
        parse_general('{"prompt": "hi"}\n')
    with pytest.raises(ValueError, match="line 1: empty"):
        parse_general('{"category": "chat", "prompt": "  "}\n')


# ----------------------------------------------------------------------------- two-skill


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _check_sort_descending(prompt: str, answer: str) -> None:
    nums = _ints(prompt)
    assert 3 <= len(nums) <= 6
    assert all(0 <= n <= 99 for n in nums)
    assert answer == " ".join(map(str, sorted(nums, reverse=True)))


def _check_capital_json(prompt: str, answer: str) -> None:
    obj = json.loads(answer)
    assert list(obj) == ["capital"]
    assert isinstance(obj["capital"], str)
    country = max((c for c, _ in capitals() if c in prompt), key=len)  # "South Korea"
    assert obj["capital"] == dict(capitals())[country]


def _check_sum_json(prompt: str, answer: str) -> None:
    a, b = _ints(prompt)
    assert 10 <= a <= 999
    assert 10 <= b <= 999
    obj = json.loads(answer)
    assert list(obj) == ["sum"]
    assert type(obj["sum"]) is int
    assert obj["sum"] == a + b
    assert answer == json.dumps({"sum": a + b})


def _check_sentiment_json(prompt: str, answer: str) -> None:
    from mergeserve.tasks.base import NEGATIVE, POSITIVE

    obj = json.loads(answer)
    assert list(obj) == ["sentiment"]
    pos = any(p in prompt for p in POSITIVE)
    neg = any(p in prompt for p in NEGATIVE)
    assert pos != neg
    assert obj["sentiment"] == ("positive" if pos else "negative")


CHECKS = {
    "sort_descending": _check_sort_descending,
    "capital_json": _check_capital_json,
    "sum_json": _check_sum_json,
    "sentiment_json": _check_sentiment_json,
}


def test_two_skill_tasks_are_registered_apart_from_the_demo_tasks() -> None:
    assert len(TWO_SKILL) >= 4
    assert set(CHECKS) <= set(TWO_SKILL)
    assert set(COMPOSED_OF) == set(TWO_SKILL)
    assert not set(TWO_SKILL) & set(TASKS)
    assert len(TASKS) == 6
    for name, (a, b) in COMPOSED_OF.items():
        assert a in TASKS
        assert b in TASKS
        assert a != b
        assert get_task(name) is TWO_SKILL[name]
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_two_skill_splits(name: str) -> None:
    task = TWO_SKILL[name]
    assert len(task.templates) >= 6
    assert task.held_out == 1
    # the output format is stated (json ones name their key)
    if name.endswith("_json"):
        key = next(iter(json.loads(generate(name, "dev", 1)[0].answer)))
        assert all("json" in t.casefold() and f'"{key}"' in t for t in task.templates)
    dev, test = generate(name, "dev", 50), generate(name, "test", 50)
    assert len(dev) == len(test) == 50
    assert generate(name, "dev", 50) == dev
    assert generate(task, "test", 50) == test
    assert not {s.prompt for s in dev} & {s.prompt for s in test}
    # capital_json has 60 countries x 5 seen templates, a tenth of them in each of dev and
    # test, so 50 draws repeat some prompts (as the demo capital task's do); the rest barely
    distinct = 20 if name == "capital_json" else 45
    assert len({s.prompt for s in dev}) >= distinct
    assert len({s.prompt for s in test}) >= distinct
    held = len(task.templates) - 1
    assert not any(s.held_out or s.template == held for s in dev)
    assert {s.template for s in dev} == set(task.seen_templates)
    assert {s.template for s in test} == set(range(len(task.templates)))
    assert all(s.held_out == (s.template == held) for s in test)
    for s in dev + test:
        assert s.task == name
        CHECKS[name](s.prompt, s.answer)
        assert task.matches(s.answer, s.answer)
        assert task.matches(f" {s.answer}.\n", s.answer)
        assert not task.matches(f"The answer is {s.answer}", s.answer)
    if task.casefold:
        s = dev[0]
        assert task.matches(s.answer.upper(), s.answer)


@pytest.mark.parametrize(
    ("composition", "reply", "answer", "halves"),
    [
        # the answer itself has both halves; spacing and a trailing period do not matter
        ("sort_descending", "75 67 42 18 9", "75 67 42 18 9", (True, True)),
        ("sort_descending", "75, 67, 42, 18, 9.", "75 67 42 18 9", (True, True)),
        # sort_numbers alone: the right numbers, smallest first
        ("sort_descending", "9 18 42 67 75", "75 67 42 18 9", (True, False)),
        # descending but a number lost or made up
        ("sort_descending", "75 67 42 9", "75 67 42 18 9", (False, True)),
        ("sort_descending", "81 62 42 18 9", "75 67 42 18 9", (False, True)),
        ("sort_descending", "42", "42", (True, False)),  # one number has no order
        ("sort_descending", "the numbers are 9 18", "18 9", (False, False)),
        ("sum_json", '{"sum": 57}', '{"sum": 57}', (True, True)),
        ("sum_json", '{"sum":57}', '{"sum": 57}', (True, True)),  # exact match says no
        ("sum_json", "57", '{"sum": 57}', (True, False)),  # add alone
        ("sum_json", "157", '{"sum": 57}', (False, False)),
        ("sum_json", '{"total": 57}', '{"sum": 57}', (True, False)),  # the wrong key
        ("sum_json", '{"sum": 57, "a": 1}', '{"sum": 57}', (True, False)),  # another key
        ("sum_json", '{"sum": 75}', '{"sum": 57}', (False, True)),
        ("sum_json", '["sum", 57]', '{"sum": 57}', (True, False)),  # JSON, not an object
        ("capital_json", "Rabat", '{"capital": "Rabat"}', (True, False)),
        ("capital_json", '{"capital": "rabat"}', '{"capital": "Rabat"}', (True, True)),
        ("capital_json", '{"capital": "..."}', '{"capital": "Rabat"}', (False, True)),
        ("sentiment_json", '{"sentiment": "negative"}', '{"sentiment": "positive"}', (False, True)),
        # the key twice: two answers, neither given; nor is the form one key
        (
            "sentiment_json",
            '{"sentiment": "positive", "sentiment": "negative"}',
            '{"sentiment": "negative"}',
            (False, False),
        ),
        ("sentiment_json", "positive or negative", '{"sentiment": "negative"}', (False, False)),
        ("sentiment_json", "negative", '{"sentiment": "negative"}', (True, False)),
        # the asked key's value decides, not a number elsewhere in the object
        ("sum_json", '{"sum": 744, "num": 57}', '{"sum": 57}', (False, False)),
        ("sum_json", '{"sum": "57"}', '{"sum": 57}', (True, True)),
        ("capital_json", '{"capital": " Beijing" }', '{"capital": "Beijing"}', (True, True)),
        ("capital_json", '{"city": "Bern"}', '{"capital": "Bern"}', (True, False)),
    ],
)
def test_two_skill_parts_splits_a_reply_into_content_and_form(
    composition: str, reply: str, answer: str, halves: tuple[bool, bool]
) -> None:
    assert two_skill_parts(composition, reply, answer) == halves


def test_two_skill_parts_agrees_with_exact_match_and_knows_every_composition() -> None:
    for name in TWO_SKILL:
        for s in generate(name, "dev", 10):
            assert two_skill_parts(name, s.answer, s.answer) == (True, True)
            assert two_skill_parts(name, "", s.answer) == (False, False)
    with pytest.raises(ValueError, match="unknown composition"):
        two_skill_parts("add", "1", "1")
