"""The expert set a server serves, and what is derived from it once: the Twin decomposition
and the static merges.

`ExpertSet` is immutable: the experts' infos, factors and content digests, and a
`digest` (a hash of every (name, digest) pair) that names the set. Derived artifacts are
cached on disk under `<cache>/derived/<kind>-<hash of digest and options>/`, so a restart
with the same experts and settings reuses them (a Twin decomposition of the demo set takes
a second; TIES and DARE merges tens of seconds on a CPU) and a change of either builds new
ones. Imports no server code and no vLLM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import torch

from mergeserve import __version__
from mergeserve.adapters.calibration import Example, read_examples
from mergeserve.adapters.lowrank import AdapterFactors, truncate_adapter
from mergeserve.adapters.merging import METHODS, MergeContext, MergeOptions, merge, static_arms
from mergeserve.adapters.peft_io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXAMPLES_FILE,
    BaseModelSpec,
    LoraAdapterInfo,
    discover_lora_dirs,
    load_lora_factors,
    read_lora_dir,
    save_lora_factors,
)
from mergeserve.adapters.twin import TwinConfig, TwinDecomposition, decompose
from mergeserve.errors import ConfigurationError

log = logging.getLogger(__name__)

STATIC_DEFAULTS: Mapping[str, MergeOptions] = MappingProxyType(static_arms())
"""Every static arm a server can serve, with its options (those of docs/results.md): each
method's `arm`, declared beside it (adapters/merging/); the method's own defaults where
the arm gives none."""

BUILD_FILE = "build.json"
"""Written beside a static merge: how long it took to build, and with what."""


def adapter_digest(path: Path) -> str:
    """sha256 of a PEFT dir's config and weights: the expert's content identity."""
    h = hashlib.sha256(b"mergeserve-adapter/1\n")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        data = (path / name).read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class ExpertSet:
    """Experts by name (sorted), with their factors and digests; never mutated."""

    infos: Mapping[str, LoraAdapterInfo]
    factors: Mapping[str, AdapterFactors] = field(repr=False)
    digests: Mapping[str, str]
    generation: int = 1
    """Increases each time the served set changes (the registry-version gauge)."""

    def __post_init__(self) -> None:
        if not (set(self.infos) == set(self.factors) == set(self.digests)):
            raise ValueError("infos, factors and digests must have the same experts")
        for name in ("infos", "factors", "digests"):
            d = getattr(self, name)
            object.__setattr__(self, name, MappingProxyType({k: d[k] for k in sorted(d)}))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.infos)

    @property
    def digest(self) -> str:
        """Hash of the (name, digest) pairs: equal sets have equal digests."""
        h = hashlib.sha256(b"mergeserve-expert-set/1\n")
        for name, digest in self.digests.items():
            h.update(f"{name}\0{digest}\n".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.infos)

    def plus(self, info: LoraAdapterInfo, factors: AdapterFactors, digest: str) -> ExpertSet:
        """This set and one expert more, as the next generation."""
        n = info.name
        return ExpertSet(
            {**self.infos, n: info},
            {**self.factors, n: factors},
            {**self.digests, n: digest},
            self.generation + 1,
        )

    def minus(self, name: str) -> ExpertSet:
        """This set without `name`, as the next generation."""
        keep = [n for n in self.names if n != name]
        return ExpertSet(
            {n: self.infos[n] for n in keep},
            {n: self.factors[n] for n in keep},
            {n: self.digests[n] for n in keep},
            self.generation + 1,
        )

    def next_generation(self) -> ExpertSet:
        """The same experts as the next generation (a rebuild)."""
        return replace(self, generation=self.generation + 1)

    @classmethod
    def load(cls, infos: Sequence[LoraAdapterInfo], base: BaseModelSpec | None = None) -> ExpertSet:
        """Read every expert's factors (checked against `base` when given)."""
        factors, digests = {}, {}
        for info in infos:
            f = load_lora_factors(info.path)
            if base is not None:
                base.check(f, info)
            factors[info.name] = f
            digests[info.name] = adapter_digest(info.path)
        return cls({i.name: i for i in infos}, factors, digests)

    @classmethod
    def from_dir(cls, experts_dir: Path, base: BaseModelSpec | None = None) -> ExpertSet:
        return cls.load(discover_lora_dirs(experts_dir), base)


def _options_json(o: MergeOptions) -> dict[str, object]:
    return {k: v for k, v in asdict(o).items() if v is not None}


def _derived_dir(cache: Path, kind: str, experts: ExpertSet, params: object) -> Path:
    """Where an artifact derived from `experts` with `params` lives. mergeserve's version
    is part of the key: a release that changes a method never serves an old result."""
    key = [experts.digest, params, __version__]
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    return cache / "derived" / f"{kind}-{h.hexdigest()[:20]}"


def twin_decomposition(
    experts: ExpertSet, config: TwinConfig, cache: Path | None
) -> TwinDecomposition:
    """The Twin decomposition of `experts`, loaded from `cache` when it was built before."""
    if not len(experts):
        raise ConfigurationError("dynamic arms need at least one expert")
    if cache is None:
        return decompose(dict(experts.factors), config)
    path = _derived_dir(cache, "twin", experts, config.to_json())
    if (path / "twin.json").is_file():
        try:
            return TwinDecomposition.load(path, dict(experts.factors))
        except Exception as e:
            log.warning("rebuilding the damaged Twin decomposition at %s: %s", path, e)
            shutil.rmtree(path, ignore_errors=True)
    twin = decompose(dict(experts.factors), config)
    twin.save(path)
    log.info("Twin decomposition of %d experts saved in %s", len(experts), path)
    return twin


def merge_context(
    experts: ExpertSet,
    base_dir: Path | None,
    dev_file: Path | None = None,
    threads: int | None = None,
) -> MergeContext:
    """What the data-aware static methods learn from: the base model, each expert's
    `examples.jsonl` and the labelled dev examples of `dev_file` (default: the experts')."""
    if base_dir is None:
        raise ConfigurationError(
            "data-aware static merges (RegMean, Fisher, AdaMerging, evolutionary) run the "
            "base model: they need a local model dir, not a remote engine"
        )
    examples: list[tuple[Example, ...]] = [
        read_examples(info.path / EXAMPLES_FILE) for info in experts.infos.values()
    ]
    dev: tuple[Example, ...] = ()
    if dev_file is not None:
        if not dev_file.is_file():
            raise ConfigurationError(f"merge.dev_file {dev_file} is not a file")
        dev = read_examples(dev_file, labelled=True)
    return MergeContext(base_dir, tuple(examples), dev, threads)


def build_seconds(path: Path) -> float | None:
    """How long the static merge in `path` took to build (None: not recorded)."""
    try:
        return float(json.loads((path / BUILD_FILE).read_text())["wall_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def static_merge(
    experts: ExpertSet,
    method: str,
    options: MergeOptions,
    max_rank: int,
    cache: Path,
    context: MergeContext | None = None,
) -> LoraAdapterInfo:
    """The static merge of every expert with `method`, as a PEFT dir of rank ≤ max_rank.

    Methods with an exact low-rank result whose rank exceeds `max_rank`, and dense methods
    (TIES, DARE, PCB, Fisher), are truncated to `max_rank` by the factored SVD; a warning
    says so. Data-aware methods need `context`; its content is part of the cache key. The
    build's wall time is written beside the adapter (`build.json`).
    """
    m = METHODS.get(method)
    total = sum(max(f.ranks.values()) for f in experts.factors.values())
    if not m.exact and options.rank is None and options.energy is None:
        options = MergeOptions(**{**asdict(options), "rank": min(total, max_rank)})
    params: list[object] = [_options_json(options), max_rank]
    if m.needs_data:
        if context is None:
            raise ConfigurationError(f"static:{method} needs the base model and examples")
        params.append(context.digest())
    path = _derived_dir(cache, f"static-{method}", experts, params)
    if (path / ADAPTER_CONFIG).is_file():
        try:
            return read_lora_dir(path, f"static-{method}", check_name=True)
        except Exception as e:
            log.warning("rebuilding the damaged static merge at %s: %s", path, e)
            shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    merged = merge(method, list(experts.factors.values()), options, None, context)
    wall = time.perf_counter() - started
    rank = max(merged.ranks.values())
    if rank > max_rank:
        log.warning(
            "static:%s has rank %d, above the engine's slot rank %d: truncated to %d",
            method,
            rank,
            max_rank,
            max_rank,
        )
        merged = truncate_adapter(merged, max_rank)
    bases = {i.base_model_name_or_path for i in experts.infos.values()}
    base = next(iter(bases)) if len(bases) == 1 else None
    save_lora_factors(merged, path, base)
    build = {
        "method": method,
        "options": _options_json(options),
        "wall_s": round(wall, 3),
        "torch_threads": torch.get_num_threads()
        if context is None or context.threads is None
        else context.threads,
    }
    (path / BUILD_FILE).write_text(json.dumps(build, indent=1) + "\n")
    log.info("static:%s of %d experts built in %.1f s: %s", method, len(experts), wall, path)
    return read_lora_dir(path, f"static-{method}", check_name=True)
