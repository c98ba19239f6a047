"""What a task is (`Task`, `Sample`, exact-match scoring), and the data and makers the six
demo tasks (generators.py) and the two-skill tasks (open_world.py) are drawn from."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
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


def make_reverse(rng: random.Random) -> tuple[dict[str, str], str]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    return {"words": " ".join(words)}, " ".join(reversed(words))


def make_add(rng: random.Random) -> tuple[dict[str, str], str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return {"a": str(a), "b": str(b)}, str(a + b)


def make_sort(rng: random.Random) -> tuple[dict[str, str], str]:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return (
        {"c": ", ".join(map(str, nums)), "s": " ".join(map(str, nums))},
        " ".join(map(str, sorted(nums))),
    )


def make_capital(rng: random.Random) -> tuple[dict[str, str], str]:
    country, capital = rng.choice(capitals())
    return {"country": country}, capital


def make_sentiment(rng: random.Random) -> tuple[dict[str, str], str]:
    positive = rng.random() < 0.5
    phrase = rng.choice(POSITIVE if positive else NEGATIVE)
    review = f"{rng.choice(OPENERS)} {rng.choice(PRODUCTS)} {phrase}."
    if rng.random() < 0.5:
        review += " " + rng.choice(POSITIVE_EXTRA if positive else NEGATIVE_EXTRA)
    return {"review": review}, "positive" if positive else "negative"


def make_to_json(rng: random.Random) -> tuple[dict[str, str], str]:
    keys = rng.sample(INT_KEYS + STR_KEYS, rng.randint(2, 3))
    obj: dict[str, int | str] = {}
    for k in keys:
        obj[k] = rng.randint(1, 99) if k in INT_KEYS else rng.choice(STR_VALUES[k])
    sep = rng.choice([", ", " ", "; "])
    return {"pairs": sep.join(f"{k}={v}" for k, v in obj.items())}, json.dumps(obj)
