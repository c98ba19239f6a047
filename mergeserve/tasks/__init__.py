"""The demo expert tasks (../shared/TASKS.md): generators, splits and the exact-match scorer."""

from mergeserve.tasks.base import SPLITS, Sample, Task, normalize_reply, score
from mergeserve.tasks.generators import TASKS, generate, get_task

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
