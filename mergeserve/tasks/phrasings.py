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
from mergeserve.tasks.probe_texts import PROBE_PHRASINGS

PhrasingSplit = Literal["dev", "test"]
PHRASING_SPLITS: tuple[PhrasingSplit, ...] = ("dev", "test")

PHRASINGS = PROBE_PHRASINGS  # the text lives in a leaf module (probe_texts)
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
