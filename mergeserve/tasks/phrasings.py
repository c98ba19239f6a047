"""Unseen phrasings: the six demo tasks asked in words no expert and no router saw.

Each demo task's test split holds one held-out template (`Task.held_out`), about eight
prompts per task: too few to tell 0.875 from 0.95. This probe set asks the same tasks in
ten more ways per task, written apart from the templates and the train-only paraphrases
(different wording, order, register, framing; chatty, terse, with context or constraints).
They are evaluation-only, never trained on and never routed against:

* `dev`: the first five phrasings of each task, for decisions (how long to train, which
  recipe);
* `test`: the last five, reported once.

The fields and answers come from the task's own maker (`Task.make`), seeded by task and
split, so every draw is deterministic and the two parts share no phrasing. A probe prompt
is never a training prompt: no probe phrasing equals a template or a paraphrase
(`tests/unit/test_phrasings.py` checks the rendered prompts too).
"""

from __future__ import annotations

import random
from typing import Literal

from mergeserve.tasks.base import Sample, Task
from mergeserve.tasks.generators import TASKS

PhrasingSplit = Literal["dev", "test"]
PHRASING_SPLITS: tuple[PhrasingSplit, ...] = ("dev", "test")

PHRASINGS: dict[str, tuple[str, ...]] = {
    "reverse_words": (
        # dev
        "Take the words {words} and say them backwards (word by word, not letters).",
        "Backwards word order, please: {words}",
        "Here's a list of words: {words}. What's that list in reverse?",
        "reverse these words for me -> {words}",
        "Starting with the final word and ending with the first, repeat: {words}",
        # test
        "Could you flip this around so the last word comes first? {words}",
        "Words in, reversed words out. {words}",
        "My teacher wants these words in the opposite order: {words}",
        "Rewrite the sequence {words} from end to beginning.",
        "What are the words {words} in reverse order?",
    ),
    "add": (
        # dev
        "What's {a} and {b} added together?",
        "Quick math: {a} + {b}",
        "Total up {a} and {b} for me.",
        "I bought something for {a} dollars and another thing for {b} dollars. How much did I spend in total? Just the number.",  # noqa: E501
        "Add up: {a}, {b}",
        # test
        "What does {a} plus {b} come to?",
        "Can you work out the sum of {a} and {b}?",
        "{a} and {b} - what's the sum?",
        "Please tell me what {a} + {b} is.",
        "Adding {b} to {a} gives what number?",
    ),
    "sort_numbers": (
        # dev
        "Order these from lowest to highest: {c}",
        "Put the following in ascending order, please: {s}",
        "Smallest first, sort {c}",
        "Can you rearrange {c} so they go up in value?",
        "sort these numbers small to large: {c}",
        # test
        "List {c} in increasing order.",
        "Here are some numbers: {c}. Sort them from least to greatest.",
        "What is {c} sorted from smallest to largest?",
        "Arrange in ascending order -> {s}",
        "I need {c} ordered from the lowest value to the highest.",
    ),
    "capital": (
        # dev
        "What's the capital city of {country}?",
        "Tell me {country}'s capital.",
        "Which city serves as the capital of {country}?",
        "Quick question: capital of {country}?",
        "Name {country}'s capital city, nothing else.",
        # test
        "In {country}, which city is the capital?",
        "What city is the seat of government of {country}?",
        "I'm writing a quiz. What is the capital of {country}?",
        "The capital city of {country} - what is it?",
        "{country}'s capital is?",
    ),
    "sentiment": (
        # dev
        "Is this review positive or negative? {review}",
        "Someone left this feedback: {review} Positive or negative?",
        "Judge the tone of this review (positive/negative): {review}",
        "Would you say the following review is positive or negative? {review}",
        "Product review: {review}\nSentiment - positive or negative?",
        # test
        "Read this review and tell me if it's positive or negative: {review}",
        "Thumbs up or thumbs down? Answer positive or negative for: {review}",
        "What is the sentiment of this customer review, positive or negative? {review}",
        "A shopper wrote: {review} Is that a positive or a negative review?",
        "Classify as positive or negative.\n{review}",
    ),
    "to_json": (
        # dev
        "Turn {pairs} into a JSON object.",
        "Please format these as JSON: {pairs}",
        "Convert the following key=value pairs to JSON, same order: {pairs}",
        "JSON object for: {pairs}",
        "Can you give me {pairs} in JSON?",
        # test
        "Output a JSON object with these fields: {pairs}",
        "I have {pairs}. Write it as a JSON object.",
        "Serialize {pairs} to JSON.",
        "Express these pairs as JSON -> {pairs}",
        "What is the JSON form of {pairs}?",
    ),
}
"""Ten phrasings per demo task: the first five are `dev`, the last five `test`."""

_PER_SPLIT = 5
_SEEDS: dict[PhrasingSplit, int] = {"dev": 11, "test": 13}


def phrasings(task: str, split: PhrasingSplit) -> tuple[str, ...]:
    """The phrasings of one task in one part."""
    if split not in PHRASING_SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(PHRASING_SPLITS)}")
    if task not in PHRASINGS:
        raise ValueError(f"no phrasings for {task!r}; tasks: {', '.join(PHRASINGS)}")
    all_ = PHRASINGS[task]
    return all_[:_PER_SPLIT] if split == "dev" else all_[_PER_SPLIT:]


def generate_phrasings(task: Task | str, split: PhrasingSplit, n: int) -> list[Sample]:
    """`n` samples of a demo task in unseen phrasings, round robin over the part's
    phrasings. `Sample.template` is the phrasing's index in `PHRASINGS[task]`;
    `held_out` is True (no expert trained on any of them)."""
    name = task if isinstance(task, str) else task.name
    if name not in TASKS:
        raise ValueError(f"{name!r} is not a demo task; tasks: {', '.join(TASKS)}")
    t = TASKS[name]
    texts = phrasings(t.name, split)
    offset = 0 if split == "dev" else _PER_SPLIT
    rng = random.Random(f"phrasings:{t.name}:{split}:{_SEEDS[split]}")
    out: list[Sample] = []
    for i in range(n):
        fields, answer = t.make(rng)
        k = i % len(texts)
        out.append(Sample(t.name, texts[k].format(**fields), answer, offset + k, True))
    return out
