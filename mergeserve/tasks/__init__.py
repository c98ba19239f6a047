"""The demo expert tasks (../shared/TASKS.md): generators, splits and the exact-match scorer."""

from mergeserve.tasks.generators import (
    SPLITS,
    TASKS,
    Sample,
    Task,
    generate,
    get_task,
    normalize_reply,
    score,
)

__all__ = [
    "SPLITS",
    "TASKS",
    "Sample",
    "Task",
    "generate",
    "get_task",
    "normalize_reply",
    "score",
]
