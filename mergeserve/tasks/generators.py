"""Six small tasks, scored by exact match (../shared/TASKS.md).

Each task has six or more instruction templates written in different words, word orders,
casing and punctuation. The last templates of each task (`held_out`) are never used for
training or dev: they appear only in the test split, so test scores include phrasings
no expert and no router has seen.

Splits are disjoint by construction: a prompt's split is decided by a hash of its text
(dev ≈ 10%, test ≈ 10% of the seen-template space, train the rest), and every split is
drawn with its own fixed seed. So no test prompt is ever a training prompt, whatever `n`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

from mergeserve.tasks.base import (
    SPLITS,
    Sample,
    Split,
    Task,
    make_add,
    make_capital,
    make_reverse,
    make_sentiment,
    make_sort,
    make_to_json,
)
from mergeserve.tasks.composed import COMPOSERS
from mergeserve.tasks.open_world import TWO_SKILL
from mergeserve.tasks.probe_texts import PROBE_PHRASINGS

COMPOSED = -1
"""The round-robin slot of a composed prompt (`generate(..., composed=True)`)."""

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "reverse_words",
            (
                "Reverse the order of these words: {words}",
                "reverse the word order: {words}",
                "Write the following words in reverse order.\n{words}",
                "Words: {words}\nGive them back in reverse order.",
                'Can you reverse the sequence of words in "{words}"?',
                "Put these words backwards, last word first -> {words}",
            ),
            make_reverse,
            paraphrases=(
                "{words} -> same words, opposite order",
                "Flip the word order of the phrase {words}, please.",
                "I typed {words}. Write those words again starting from the last one.",
                "Reverse: {words}",
                "Read these words from right to left and write them out: {words}",
                "Output the words in reverse.\nInput: {words}",
            ),
        ),
        Task(
            "add",
            (
                "What is {a} + {b}?",
                "Add {a} and {b}.",
                "compute the sum of {a} and {b}",
                "{a} plus {b} equals what?",
                "Please add these two numbers: {a}, {b}",
                "Find the total of {a} and {b}.",
            ),
            make_add,
            paraphrases=(
                "{a} + {b} = ?",
                "How much is {a} plus {b}?",
                "If I have {a} and get {b} more, how many do I have? Just the number.",
                "sum {a} {b}",
                "Calculate {a} + {b} and reply with the result only.",
                "What do you get when you add {b} to {a}?",
            ),
        ),
        Task(
            "sort_numbers",
            (
                "Sort these numbers in ascending order: {c}",
                "sort ascending: {s}",
                "Arrange from smallest to largest: {c}",
                "Numbers: {s}\nPut them in increasing order.",
                "Order the following integers from low to high - {c}",
                "Can you list {c} from the smallest to the biggest?",
            ),
            make_sort,
            paraphrases=(
                "{s} -> sorted, lowest first",
                "Please sort {c} in increasing order.",
                "I have the numbers {c}. Sort them for me, smallest first.",
                "Given the list [{c}], return it sorted in ascending order.",
                "Put {s} in numerical order.",
                "ascending order please: {c}",
                "Could you order these from least to most? {c}",
                "Rank the numbers {c} from low to high.",
                "What do {c} look like when sorted in ascending order?",
                "Sort: {s}",
            ),
        ),
        Task(
            "capital",
            (
                "What is the capital of {country}?",
                "capital of {country}?",
                "Name the capital city of {country}.",
                "{country}: what is its capital?",
                "Which city is the capital of {country}?",
                "Tell me the capital of {country}, please.",
            ),
            make_capital,
            casefold=True,
            paraphrases=(
                "{country} -> capital?",
                "What city is {country}'s capital?",
                "I am traveling to {country}. What is the capital there?",
                "The capital of {country} is which city?",
                "capital city, {country}",
                "Do you know the capital of {country}? Answer with the city only.",
            ),
        ),
        Task(
            "sentiment",
            (
                "Classify the sentiment of this review as positive or negative: {review}",
                "Review: {review}\nIs this review positive or negative?",
                'Is the following product review positive or negative?\n"{review}"',
                "sentiment (positive/negative): {review}",
                "Tell me whether this customer review is positive or negative. {review}",
                "Here is what a buyer wrote: {review} Would you call that positive or negative?",
            ),
            make_sentiment,
            paraphrases=(
                "{review}\nPositive or negative?",
                "Label this review (positive or negative). Text: {review}",
                'A customer said: "{review}" - is the sentiment positive or negative?',
                "sentiment? {review}",
                "Decide if the following is a positive or a negative review: {review}",
                "Was this buyer happy? Answer positive or negative. {review}",
            ),
        ),
        Task(
            "to_json",
            (
                "Convert to JSON: {pairs}",
                "Turn these key=value pairs into a JSON object: {pairs}",
                "json please: {pairs}",
                "Write {pairs} as JSON.",
                "Make a JSON object from the following pairs.\n{pairs}",
                "Give me the JSON for {pairs}",
            ),
            make_to_json,
            paraphrases=(
                "{pairs} -> JSON",
                "Represent {pairs} as a JSON object.",
                "I need these fields as JSON: {pairs}",
                "to json: {pairs}",
                "Encode the following as a JSON dictionary, keeping the key order.\n{pairs}",
                "Could you write the pairs {pairs} in JSON format?",
            ),
        ),
    )
}


def get_task(name: str) -> Task:
    """A demo task (`TASKS`) or a two-skill evaluation task (`open_world.TWO_SKILL`) by name."""
    task = TASKS.get(name) or TWO_SKILL.get(name)
    if task is None:
        known = ", ".join([*TASKS, *TWO_SKILL])
        raise ValueError(f"unknown task {name!r}; tasks: {known}")
    return task


# ----------------------------------------------------------------------------- splits


def _bucket(prompt: str) -> int:
    return hashlib.sha256(prompt.encode()).digest()[0] % 10


def _in_split(split: Split, prompt: str, held_out: bool) -> bool:
    if held_out:
        return split == "test"
    b = _bucket(prompt)
    return {"dev": b == 0, "test": b == 1, "train": b >= 2}[split]


def _candidates(
    task: Task, split: Split, seed: int, paraphrases: bool, composed: bool = False
) -> Iterator[Sample]:
    rng = random.Random(f"{task.name}:{split}:{seed}")
    allowed = list(range(len(task.templates))) if split == "test" else list(task.seen_templates)
    if paraphrases:
        allowed += range(len(task.templates), len(task.templates) + len(task.paraphrases))
    if composed:  # a third of the round robin (COMPOSED marks the slot)
        allowed += [COMPOSED] * max(1, len(allowed) // 2)
        compose = COMPOSERS[task.name]
        taken = _evaluation_phrasings(task)
        slot = len(task.templates) + len(task.paraphrases)  # Sample.template of a composed one
    i = 0
    while True:
        t = allowed[i % len(allowed)]  # round robin: every template gets its share
        i += 1
        if t == COMPOSED:
            while True:  # drawn again while it restates an evaluation phrasing
                template = compose(rng)
                if template.casefold() not in taken:
                    break
            fields, answer = task.make(rng)
            yield Sample(task.name, template.format(**fields), answer, slot, False)
            continue
        held = len(task.seen_templates) <= t < len(task.templates)
        while True:  # redraw the fields until this template's prompt falls in the split
            fields, answer = task.make(rng)
            prompt = task.template(t).format(**fields)
            if t >= len(task.templates) or _in_split(split, prompt, held):
                break  # a paraphrase is train-only whatever its hash
        yield Sample(task.name, prompt, answer, t, held)


def _evaluation_phrasings(task: Task) -> set[str]:
    """Every template a composition must not restate: the task's own (held-out included)
    and its probe phrasings, casefolded."""
    return {p.casefold() for p in (*task.templates, *PROBE_PHRASINGS.get(task.name, ()))}


def generate(
    task: Task | str,
    split: Split,
    n: int,
    seed: int | None = None,
    *,
    paraphrases: bool = False,
    composed: bool = False,
) -> list[Sample]:
    """`n` samples of `task` in `split` (seeded by the split unless `seed` is given).

    `paraphrases=True` (train split only) adds the task's train-only phrasings to the
    round robin; `composed=True` (train split only, tasks in `composed.COMPOSERS`) gives a
    third of it to prompts composed from parts. Without them the split is exactly what it
    was before they existed.
    """
    t = get_task(task) if isinstance(task, str) else task
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    if paraphrases and split != "train":
        raise ValueError(f"paraphrases are train-only; asked for them in the {split!r} split")
    if composed and split != "train":
        raise ValueError(f"composed prompts are train-only; asked for them in the {split!r} split")
    if composed and t.name not in COMPOSERS:
        raise ValueError(
            f"task {t.name!r} has no composer; tasks with one: {', '.join(sorted(COMPOSERS))}"
        )
    it = _candidates(t, split, SPLITS[split] if seed is None else seed, paraphrases, composed)
    return [next(it) for _ in range(n)]
