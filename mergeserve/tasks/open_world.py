"""Evaluation splits for open-world routing: requests the six demo tasks do not cover.

Two kinds of prompts a router meets beyond the six skills (../shared/TASKS.md):

* *general*: hand-written user requests outside all six skills (chat, advice, creative
  writing, explanations, non-capital facts, non-addition arithmetic, translation, code,
  rewriting, planning, opinions, trivia), kept in `data/general.jsonl`. They have no exact
  answer; they measure whether a router knows when no expert applies. Some are near the
  skills on purpose ("What is 7 times 8?", "What is the largest city in Australia?").
  Each prompt belongs to exactly one of the parts `calibration`, `dev` and `test`: within
  each category the prompts are ordered by the sha256 of their text and dealt round robin,
  so every part holds about a third of every category. (Adding a prompt can move others of
  its category to another part; the parts are fixed for a given data file.)
* *two-skill*: requests that need two demo skills at once, with exact answers
  (`TWO_SKILL`, each composed of the two skills in `COMPOSED_OF`). They are ordinary
  `Task`s, so `generate(task, "dev" | "test", n)` draws them with the demo tasks' disjoint
  hash split, and the last template of each is test-only. `get_task` finds them by name;
  they are not in `TASKS`, which stays the six demo tasks.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from importlib import resources
from itertools import pairwise
from typing import Literal

from mergeserve.tasks.base import Task, make_add, make_capital, make_sentiment

OpenSplit = Literal["calibration", "dev", "test"]
OPEN_SPLITS: tuple[OpenSplit, ...] = ("calibration", "dev", "test")


# ----------------------------------------------------------------------------- general


@dataclass(frozen=True)
class GeneralPrompt:
    category: str
    prompt: str


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _dedup_key(prompt: str) -> str:
    """Prompts that differ only in case or spacing count as duplicates."""
    return " ".join(prompt.split()).casefold()


def parse_general(text: str, source: str = "general.jsonl") -> tuple[GeneralPrompt, ...]:
    """The prompts of a general.jsonl text, in file order.

    One JSON object per line with the string fields `category` and `prompt`; blank lines
    are skipped. A malformed line or a duplicate prompt is a ValueError naming the line.
    """
    seen: dict[str, int] = {}
    out: list[GeneralPrompt] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or set(row) != {"category", "prompt"}:
            raise ValueError(f"{source} line {n}: want an object with category and prompt")
        category, prompt = row["category"], row["prompt"]
        if not isinstance(category, str) or not isinstance(prompt, str):
            raise ValueError(f"{source} line {n}: category and prompt must be strings")
        if not category.strip() or not prompt.strip():
            raise ValueError(f"{source} line {n}: empty category or prompt")
        key = _dedup_key(prompt)
        if key in seen:
            raise ValueError(
                f"{source} line {n}: duplicate prompt {prompt!r} (first on line {seen[key]})"
            )
        seen[key] = n
        out.append(GeneralPrompt(category.strip(), prompt))
    return tuple(out)


def assign_parts(prompts: tuple[GeneralPrompt, ...]) -> dict[GeneralPrompt, OpenSplit]:
    """Each prompt's part: per category, ordered by sha256 of the text, dealt round robin."""
    by_category: dict[str, list[GeneralPrompt]] = defaultdict(list)
    for p in prompts:
        by_category[p.category].append(p)
    parts: dict[GeneralPrompt, OpenSplit] = {}
    for items in by_category.values():
        for i, p in enumerate(sorted(items, key=lambda p: (_digest(p.prompt), p.prompt))):
            parts[p] = OPEN_SPLITS[i % len(OPEN_SPLITS)]
    return parts


@cache
def _general() -> tuple[tuple[GeneralPrompt, OpenSplit], ...]:
    path = resources.files("mergeserve.tasks").joinpath("data/general.jsonl")
    prompts = parse_general(path.read_text(encoding="utf-8"))
    parts = assign_parts(prompts)
    return tuple((p, parts[p]) for p in prompts)


def general_prompts(split: OpenSplit | None = None) -> list[GeneralPrompt]:
    """The general prompts of one part (file order), or all of them for `None`."""
    if split is not None and split not in OPEN_SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(OPEN_SPLITS)}")
    return [p for p, part in _general() if split is None or part == split]


# ----------------------------------------------------------------------------- two-skill


def _sort_descending(rng: random.Random) -> tuple[dict[str, str], str]:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return (
        {"c": ", ".join(map(str, nums)), "s": " ".join(map(str, nums))},
        " ".join(map(str, sorted(nums, reverse=True))),
    )


def _capital_json(rng: random.Random) -> tuple[dict[str, str], str]:
    fields, capital = make_capital(rng)
    return fields, json.dumps({"capital": capital})


def _sum_json(rng: random.Random) -> tuple[dict[str, str], str]:
    fields, total = make_add(rng)
    return fields, json.dumps({"sum": int(total)})


def _sentiment_json(rng: random.Random) -> tuple[dict[str, str], str]:
    fields, label = make_sentiment(rng)
    return fields, json.dumps({"sentiment": label})


TWO_SKILL: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "sort_descending",
            (
                "Sort these numbers from largest to smallest: {c}",
                "sort descending, space separated: {s}",
                "Arrange in decreasing order, biggest first.\n{c}\n"
                "Reply with the numbers separated by single spaces.",
                "Numbers: {s}\nPut them in order from high to low.",
                "Can you list {c} from the largest down to the smallest? "
                "Separate them with spaces.",
                "I have {c}. Give them back ordered with the highest number first, "
                "one space between each.",
            ),
            _sort_descending,
        ),
        Task(
            "capital_json",
            (
                "What is the capital of {country}? "
                'Answer with a JSON object like {{"capital": "..."}}.',
                'capital of {country} as json, key "capital"',
                "Name the capital city of {country}. "
                'Reply only with JSON in the form {{"capital": "<city>"}}',
                '{country}: give its capital as a JSON object with the key "capital".',
                'Which city is the capital of {country}? Return JSON: {{"capital": ...}}',
                "Tell me the capital of {country}, please - formatted as a JSON object "
                'whose only key is "capital".',
            ),
            _capital_json,
            casefold=True,
        ),
        Task(
            "sum_json",
            (
                'What is {a} + {b}? Answer with a JSON object like {{"sum": ...}}.',
                'add {a} and {b}, reply as json with key "sum" (a number)',
                'Compute the sum of {a} and {b} and return it as JSON: {{"sum": <number>}}',
                '{a} plus {b} - give the result as a JSON object with the key "sum".',
                'Please add these two numbers: {a}, {b}\nOutput format (JSON): {{"sum": N}}',
                'Find the total of {a} and {b}. Respond only with JSON whose "sum" field '
                "holds the total as a number.",
            ),
            _sum_json,
        ),
        Task(
            "sentiment_json",
            (
                "Classify the sentiment of this review as positive or negative and answer "
                'with a JSON object like {{"sentiment": "positive"}}: {review}',
                "Review: {review}\nIs it positive or negative? "
                'Reply as JSON with the key "sentiment".',
                'sentiment as json ({{"sentiment": "positive"}} or {{"sentiment": "negative"}}): '
                "{review}",
                "Tell me whether this customer review is positive or negative. "
                'Return only the JSON {{"sentiment": "<label>"}}. {review}',
                'Here is what a buyer wrote: "{review}" Give the sentiment (positive/negative) '
                'as a JSON object with key "sentiment".',
                'Read this product review and output JSON of the form {{"sentiment": ...}}, '
                "the value being positive or negative.\n{review}",
            ),
            _sentiment_json,
        ),
    )
}

COMPOSED_OF: dict[str, tuple[str, str]] = {
    "sort_descending": ("sort_numbers", "reverse_words"),
    "capital_json": ("capital", "to_json"),
    "sum_json": ("add", "to_json"),
    "sentiment_json": ("sentiment", "to_json"),
}


SENTIMENT_LABELS = ("positive", "negative")
"""The sentiment task's labels: a reply naming both answers neither."""


def two_skill_parts(composition: str, reply: str, answer: str) -> tuple[bool, bool]:
    """Which half of a two-skill request a reply got right: `(content, form)`.

    *content* is the first skill's work, whatever the shape: the input's numbers, each
    once (`sort_descending`), or the right value (the capital, casefolded; the sum; the
    sentiment label) and no other: as the value of the asked key when the reply is a JSON
    object that has it (every value it gives that key, when the key repeats), else
    anywhere in the reply (a sentiment reply naming both labels has none).
    *form* is the second skill's shape, whatever the content: the numbers in
    non-increasing order (at least two of them), or a JSON object with the asked key once
    and no other. A reply that matches `answer` exactly has both; one with both can still
    miss it by spacing (`{"sum":5}`), which the exact-match score counts as wrong.
    """
    if composition not in COMPOSED_OF:
        raise ValueError(f"unknown composition {composition!r}; known: {', '.join(COMPOSED_OF)}")
    text = reply.strip().removesuffix(".")
    if composition == "sort_descending":
        want = [int(x) for x in answer.split()]
        try:
            got = [int(x) for x in text.replace(",", " ").split()]
        except ValueError:
            return False, False
        content = sorted(got) == sorted(want)
        form = len(got) >= 2 and all(a >= b for a, b in pairwise(got))
        return content, form
    ((key, value),) = json.loads(answer).items()
    try:
        pairs = json.loads(text, object_pairs_hook=lambda kv: kv)
    except ValueError:
        pairs = None
    is_object = isinstance(pairs, list) and all(isinstance(p, tuple) for p in pairs)
    form = is_object and [k for k, _ in pairs] == [key]
    given = [v for k, v in pairs if k == key] if is_object else []
    if given:
        content = all(_same_value(v, value) for v in given)
    elif isinstance(value, int):
        content = str(value) in re.findall(r"-?\d+", text)
    else:
        folded = text.casefold()
        content = value.casefold() in folded
        if value in SENTIMENT_LABELS:  # naming both labels answers nothing
            content = content and not any(w in folded for w in SENTIMENT_LABELS if w != value)
    return content, form


def _same_value(got: object, want: str | int) -> bool:
    if isinstance(want, int):
        return not isinstance(got, bool) and (
            got == want or (isinstance(got, str) and got.strip() == str(want))
        )
    return isinstance(got, str) and got.strip().casefold() == want.casefold()
