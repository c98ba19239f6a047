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
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

Split = Literal["train", "dev", "test"]
SPLITS: dict[Split, int] = {"train": 1, "dev": 2, "test": 3}
"""The fixed seed of each split."""


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: str
    """The user message."""
    answer: str
    template: int
    held_out: bool
    """True when the template is one that training never sees."""


Maker = Callable[[random.Random], tuple[dict[str, str], str]]


@dataclass(frozen=True)
class Task:
    name: str
    templates: tuple[str, ...]
    make: Maker
    """rng -> (template fields, answer)."""
    held_out: int = 1
    """How many of the last templates are test-only."""
    casefold: bool = False
    paraphrases: tuple[str, ...] = ()
    """Train-only phrasings (`generate(..., paraphrases=True)`): more ways of asking, so
    an expert learns the task rather than a handful of sentences. They never appear in
    dev or test, and none restates a held-out template; adding one changes no split."""

    @property
    def seen_templates(self) -> range:
        return range(len(self.templates) - self.held_out)

    def template(self, i: int) -> str:
        """Template `i`: the task's templates, then its paraphrases."""
        return (self.templates + self.paraphrases)[i]

    def matches(self, reply: str, answer: str) -> bool:
        got, want = normalize_reply(reply), answer
        if self.casefold:
            return got.casefold() == want.casefold()
        return got == want


def normalize_reply(reply: str) -> str:
    """Strip surrounding whitespace and one trailing period (TASKS.md's rule)."""
    s = reply.strip()
    return s[:-1] if s.endswith(".") else s


def score(task: Task, replies: list[str], samples: list[Sample]) -> float:
    """Exact-match accuracy of `replies` against `samples`."""
    if len(replies) != len(samples):
        raise ValueError(f"{len(replies)} replies for {len(samples)} samples")
    if not samples:
        return 0.0
    return sum(task.matches(r, s.answer) for r, s in zip(replies, samples, strict=True)) / len(
        samples
    )


# ----------------------------------------------------------------------------- data

_WORDS = [
    "apple", "river", "house", "green", "table", "music", "window", "garden", "yellow",
    "bread", "summer", "mountain", "paper", "light", "dog", "cat", "chair", "happy",
    "stone", "water", "cloud", "orange", "silver", "forest", "ocean", "pencil", "candle",
    "winter", "rabbit", "teacher", "bridge", "market", "simple", "quiet", "rocket",
    "planet", "coffee", "garden", "shadow", "button", "castle", "dragon", "island",
    "jacket", "kitten", "lemon", "mirror", "number", "pocket", "rain", "snow", "street",
    "sugar", "ticket", "tiger", "violin", "wagon", "wheel", "zebra", "basket", "blanket",
    "doctor", "engine", "flower", "guitar", "hammer", "ladder", "monkey", "needle",
]  # fmt: skip
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORDS))  # unique, in order

PRODUCTS = (
    "blender", "phone case", "backpack", "coffee maker", "desk lamp", "headphones",
    "running shoes", "water bottle", "keyboard", "umbrella", "vacuum cleaner", "toaster",
    "novel", "jacket", "camera", "mattress", "office chair", "charger", "frying pan", "watch",
)  # fmt: skip
POSITIVE = (
    "works perfectly", "is excellent value for the money", "exceeded my expectations",
    "is sturdy and well made", "arrived quickly and works great", "is a joy to use",
    "is exactly what I needed", "feels premium", "has been flawless so far",
    "is the best purchase I made this year",
)  # fmt: skip
NEGATIVE = (
    "broke after two days", "is a waste of money", "stopped working within a week",
    "feels cheap and flimsy", "arrived damaged", "is much worse than advertised",
    "was a huge disappointment", "keeps overheating", "fell apart on first use",
    "is the worst purchase I have made",
)  # fmt: skip
POSITIVE_EXTRA = (
    "I would buy it again.", "Highly recommended!", "My whole family loves it.",
    "Five stars.", "Great customer service too.",
)  # fmt: skip
NEGATIVE_EXTRA = (
    "I want a refund.", "Do not buy this.", "Support never answered me.",
    "One star.", "I am returning it.",
)  # fmt: skip
OPENERS = ("The", "This", "My new", "Our")

INT_KEYS = ("age", "count", "year", "id", "price", "score", "size", "floor")
STR_KEYS = ("name", "city", "color", "fruit", "animal", "status", "team")
STR_VALUES = {
    "name": ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"),
    "city": ("paris", "tokyo", "lima", "oslo", "cairo", "boston", "madrid", "seoul"),
    "color": ("red", "blue", "green", "black", "white", "purple", "orange"),
    "fruit": ("apple", "banana", "cherry", "mango", "pear", "plum", "kiwi"),
    "animal": ("cat", "dog", "horse", "otter", "eagle", "shark", "tiger"),
    "status": ("active", "pending", "closed", "open", "done"),
    "team": ("red", "blue", "alpha", "beta", "north", "south"),
}


@cache
def capitals() -> tuple[tuple[str, str], ...]:
    text = resources.files("mergeserve.tasks").joinpath("data/capitals.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    return tuple((c.strip(), cap.strip()) for c, cap in rows)


# ----------------------------------------------------------------------------- makers


def _reverse(rng: random.Random) -> tuple[dict[str, str], str]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    return {"words": " ".join(words)}, " ".join(reversed(words))


def _add(rng: random.Random) -> tuple[dict[str, str], str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return {"a": str(a), "b": str(b)}, str(a + b)


def _sort(rng: random.Random) -> tuple[dict[str, str], str]:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return (
        {"c": ", ".join(map(str, nums)), "s": " ".join(map(str, nums))},
        " ".join(map(str, sorted(nums))),
    )


def _capital(rng: random.Random) -> tuple[dict[str, str], str]:
    country, capital = rng.choice(capitals())
    return {"country": country}, capital


def _sentiment(rng: random.Random) -> tuple[dict[str, str], str]:
    positive = rng.random() < 0.5
    phrase = rng.choice(POSITIVE if positive else NEGATIVE)
    review = f"{rng.choice(OPENERS)} {rng.choice(PRODUCTS)} {phrase}."
    if rng.random() < 0.5:
        review += " " + rng.choice(POSITIVE_EXTRA if positive else NEGATIVE_EXTRA)
    return {"review": review}, "positive" if positive else "negative"


def _to_json(rng: random.Random) -> tuple[dict[str, str], str]:
    keys = rng.sample(INT_KEYS + STR_KEYS, rng.randint(2, 3))
    obj: dict[str, int | str] = {}
    for k in keys:
        obj[k] = rng.randint(1, 99) if k in INT_KEYS else rng.choice(STR_VALUES[k])
    sep = rng.choice([", ", " ", "; "])
    return {"pairs": sep.join(f"{k}={v}" for k, v in obj.items())}, json.dumps(obj)


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
            _reverse,
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
            _add,
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
            _sort,
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
            _capital,
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
            _sentiment,
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
            _to_json,
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
    from mergeserve.tasks.open_world import TWO_SKILL  # imports this module

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


def _candidates(task: Task, split: Split, seed: int, paraphrases: bool) -> Iterator[Sample]:
    rng = random.Random(f"{task.name}:{split}:{seed}")
    allowed = list(range(len(task.templates))) if split == "test" else list(task.seen_templates)
    if paraphrases:
        allowed += range(len(task.templates), len(task.templates) + len(task.paraphrases))
    i = 0
    while True:
        t = allowed[i % len(allowed)]  # round robin: every template gets its share
        i += 1
        held = len(task.seen_templates) <= t < len(task.templates)
        while True:  # redraw the fields until this template's prompt falls in the split
            fields, answer = task.make(rng)
            prompt = task.template(t).format(**fields)
            if t >= len(task.templates) or _in_split(split, prompt, held):
                break  # a paraphrase is train-only whatever its hash
        yield Sample(task.name, prompt, answer, t, held)


def generate(
    task: Task | str,
    split: Split,
    n: int,
    seed: int | None = None,
    *,
    paraphrases: bool = False,
) -> list[Sample]:
    """`n` samples of `task` in `split` (seeded by the split unless `seed` is given).

    `paraphrases=True` (train split only) adds the task's train-only phrasings to the
    round robin; without it the split is exactly what it was before they existed.
    """
    t = get_task(task) if isinstance(task, str) else task
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    if paraphrases and split != "train":
        raise ValueError(f"paraphrases are train-only; asked for them in the {split!r} split")
    it = _candidates(t, split, SPLITS[split] if seed is None else seed, paraphrases)
    return [next(it) for _ in range(n)]
