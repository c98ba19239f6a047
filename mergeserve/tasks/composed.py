"""Composed phrasings: training prompts assembled from parts, thousands of ways of asking.

A task's templates and paraphrases are a few dozen sentences; an expert trained on them can
learn the sentences rather than the task and stumble on a phrasing it never saw (after
three stages `expert:sort_numbers` scored 0.99 on the dev phrasings of
`mergeserve.tasks.phrasings` but 0.91 on its held-out template, ordering the numbers
wrongly). A composer draws a frame, a verb, a noun and a direction (and how the numbers
are written) independently, so the combinations far outnumber the prompts a training run
sees and none is seen often enough to be learned as a sentence.

Composed prompts are train-only (`generate(..., composed=True)` with the train split), like
paraphrases. They never restate an evaluation phrasing: a composition equal to a template,
a held-out template or a probe phrasing (`mergeserve.tasks.phrasings`), compared
case-insensitively as templates (before the numbers go in), is drawn again. The parts were written
without the words of the task's held-out template ("list", "biggest"), so that template
still measures wording the expert never saw.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Composer = Callable[[random.Random], str]
"""rng -> a template with the task's fields (`{c}`, `{s}`), like `Task.templates`."""

_SORT_VERBS = ("sort", "order", "arrange", "rearrange", "reorder", "rank", "organize", "put")
_SORT_NOUNS = (
    "these numbers",
    "the numbers",
    "the following numbers",
    "these values",
    "the integers",
    "these integers",
    "the following values",
    "this sequence",
)
_SORT_DIRECTIONS = (
    "in ascending order",
    "in increasing order",
    "from smallest to largest",
    "from lowest to highest",
    "from least to greatest",
    "smallest first",
    "lowest first",
    "from low to high",
    "from small to large",
    "in order of size, smallest first",
    "so that the numbers go up",
    "in numerical order, starting with the smallest",
)
_SORT_LISTS = ("{c}", "{s}", "[{c}]", "({c})")
_SORT_FRAMES = (
    "{Verb} {noun} {dir}: {L}",
    "{Verb} {L} {dir}.",
    "{L}\n{Verb} them {dir}.",
    "Please {verb} {L} {dir}.",
    "Could you {verb} {noun} {dir}? {L}",
    "Would you {verb} {L} {dir}?",
    "{Noun}: {L}. {Verb} them {dir}.",
    "I have {L}. {Verb} them {dir}, please.",
    "Help me {verb} {L} {dir}.",
    "{L} - {verb} them {dir}",
    "Task: {verb} {noun} {dir}. Input: {L}",
    "Here are {noun}: {L}. Can they be {verb}ed {dir}?",
    "{dir_cap}, {verb} {L}",
    "My numbers are {L}; {verb} them {dir}.",
    "{Verb} {dir}: {L}",
    "Return {L} sorted {dir}.",
)


def _past(verb: str) -> str:
    if verb == "put":
        return "put"
    return verb + ("d" if verb.endswith("e") else "ed")


def compose_sort(rng: random.Random) -> str:
    """A sort_numbers template: frame × verb × noun × direction × list format."""
    verb, noun, direction = (
        rng.choice(_SORT_VERBS),
        rng.choice(_SORT_NOUNS),
        rng.choice(_SORT_DIRECTIONS),
    )
    frame = rng.choice(_SORT_FRAMES).replace("{verb}ed", _past(verb))
    return frame.format(
        Verb=verb.capitalize(),
        verb=verb,
        Noun=noun.capitalize(),
        noun=noun,
        dir=direction,
        dir_cap=direction.capitalize(),
        L=rng.choice(_SORT_LISTS),  # its {c} / {s} stay fields: format does not recurse
    )


COMPOSERS: dict[str, Composer] = {"sort_numbers": compose_sort}
"""Tasks with a composer (`generate(..., composed=True)`)."""
