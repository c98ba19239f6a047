"""What every router is: the `Router` protocol, routing a batch through a policy, and the
example prompts (`examples.jsonl`) the data-driven routers learn from.

The routers, each able to take a new expert (`with_expert`) and drop one:
prototype.py (cosine to each expert's example prompts), mlp.py (Twin-Merging's trained
classifier, prototypes for experts it has not seen), arrow.py (no data: each expert's top
singular directions). factory.py builds the one `router.kind` names.

Logits are calibrated for the policy's temperature 1: the MLP's are its own, the
prototype router multiplies cosines by `scale`, Arrow returns log mean coefficients.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import Tensor

from mergeserve.adapters.lowrank import AdapterFactors
from mergeserve.adapters.peft_io import EXAMPLES_FILE, discover_lora_dirs
from mergeserve.errors import AdapterError, ConfigurationError
from mergeserve.router.policy import Routing, RoutingPolicy

ROUTER_DIR = "_router"
"""Under the experts dir: where `train-router` saves the MLP (not a LoRA dir, so the
expert discovery skips it)."""


@runtime_checkable
class Router(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def experts(self) -> tuple[str, ...]:
        """The columns of `logits`, in order."""
        ...

    def logits(self, texts: Sequence[str]) -> Tensor:
        """[len(texts), len(experts)] float32; -inf excludes an expert."""
        ...

    def with_expert(
        self, name: str, expert_dir: Path, factors: AdapterFactors | None = None
    ) -> Router:
        """A new router that also routes `name` (its PEFT dir, and its factors if loaded
        already); this one is left as it was, so a request routed by it keeps a
        consistent view. ConfigurationError if this router cannot take one."""
        ...

    def without_expert(self, name: str) -> Router:
        """A new router that no longer routes `name`; this one is left as it was."""
        ...


@runtime_checkable
class OpenWorldRouter(Router, Protocol):
    """A router that also says how much each request belongs to the experts at all."""

    def scores(self, texts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """(logits, in-domain mass [len(texts)] in [0, 1]); the mass is None when the
        router's gate is off."""
        ...


def router_scores(router: Router, texts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
    """Logits and, for an open-world router, the in-domain mass (None: closed world)."""
    if isinstance(router, OpenWorldRouter):
        return router.scores(texts)
    return router.logits(texts), None


def route(router: Router, policy: RoutingPolicy, texts: Sequence[str]) -> list[Routing]:
    """Route a batch of request texts to merge keys."""
    if not router.experts:
        raise ConfigurationError(f"the {router.name} router has no experts")
    logits, in_domain = router_scores(router, texts)
    return policy.apply(router.experts, logits, in_domain)


# ------------------------------------------------------------------------------ examples


def prompt_of(line: str) -> str:
    """The prompt of one JSON line {"prompt": ...}; ValueError saying what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    prompt = obj.get("prompt") if isinstance(obj, dict) else None
    if not isinstance(prompt, str):
        raise ValueError('expected an object with a "prompt" string')
    return prompt


def example_prompts(expert_dir: Path) -> list[str]:
    """The example prompts of an expert (`examples.jsonl`: one {"prompt": ...} a line)."""
    path = expert_dir / EXAMPLES_FILE
    if not path.is_file():
        raise AdapterError(
            f"{expert_dir.name}: no {EXAMPLES_FILE}; the prototype and MLP routers need "
            "example prompts of each expert (train-expert writes them)"
        )
    prompts = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = prompt_of(line)
        except ValueError as e:
            raise AdapterError(f"{path}:{lineno}: {e}") from None
        if prompt.strip():
            prompts.append(prompt)
    if not prompts:
        raise AdapterError(f"{path}: no example prompts")
    return prompts


def examples_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def experts_examples(experts_dir: Path) -> dict[str, list[str]]:
    """Example prompts of every expert under `experts_dir`, by expert name."""
    return {info.name: example_prompts(info.path) for info in discover_lora_dirs(experts_dir)}


def check_new_name(name: str, known: Sequence[str]) -> None:
    if not name or not isinstance(name, str):
        raise ValueError(f"expert name must be a non-empty string, got {name!r}")
    if name in known:
        raise ValueError(f"expert {name!r} is already routed; remove it first")
