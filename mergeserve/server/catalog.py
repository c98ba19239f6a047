"""What each `model` name in a request means: the base model alone, or one expert adapter."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from mergeserve.adapters.peft_io import LoraAdapterInfo
from mergeserve.errors import ConfigurationError, ModelNotFoundError
from mergeserve.runtime.engine import LoRATarget

BASE = "base"
EXPERT_PREFIX = "expert:"


@dataclass(frozen=True)
class ServedModel:
    id: str
    """The name clients put in `model`; also the `arm` label of metrics."""
    lora: LoRATarget | None
    root: str


class ModelCatalog:
    """An immutable name → ServedModel map, built once at start-up."""

    def __init__(self, models: Iterable[ServedModel]):
        self._models: Mapping[str, ServedModel] = MappingProxyType({m.id: m for m in models})

    @classmethod
    def build(
        cls, base_dir: Path, experts: Iterable[LoraAdapterInfo], max_lora_rank: int
    ) -> ModelCatalog:
        models = [ServedModel(BASE, None, str(base_dir))]
        too_big = []
        for int_id, info in enumerate(sorted(experts, key=lambda e: e.name), start=1):
            if info.rank > max_lora_rank:
                too_big.append(f"{info.name} (r={info.rank})")
            target = LoRATarget(name=f"{EXPERT_PREFIX}{info.name}", int_id=int_id, path=info.path)
            models.append(ServedModel(target.name, target, str(info.path)))
        if too_big:
            raise ConfigurationError(
                f"experts of rank above max_lora_rank={max_lora_rank}: {', '.join(too_big)}; "
                "raise MERGESERVE_ENGINE__MAX_LORA_RANK"
            )
        return cls(models)

    def resolve(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(name) from None

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)
