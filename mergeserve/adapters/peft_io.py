"""Reading PEFT LoRA directories (adapter_config.json + adapter_model.safetensors).

Only safetensors weights are accepted: a pickled `adapter_model.bin` can run code on load.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeGuard

import regex
import torch

from mergeserve.adapters.lowrank import AdapterFactors
from mergeserve.errors import AdapterError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXAMPLES_FILE = "examples.jsonl"
"""Beside the adapter: example prompts of its task, one {"prompt": ...} a line (the
routers learn from them; `train-expert` writes them)."""
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""What mergeserve accepts as a name (an expert's, an experiment's): 1-64 characters of
letters, digits, '_', '.', '-', starting with a letter or digit."""


@dataclass(frozen=True)
class LoraAdapterInfo:
    """What the server needs to know about a LoRA dir before handing it to the engine."""

    name: str
    path: Path
    rank: int
    """Largest rank over all modules (rank_pattern included): it must fit an engine slot."""
    lora_alpha: float
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The parsed adapter_config.json."""


def validate_adapter_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise AdapterError(
            f"adapter name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def read_lora_dir(
    path: Path, name: str | None = None, *, check_name: bool = True
) -> LoraAdapterInfo:
    """Read and check a PEFT LoRA dir's config; raises AdapterError saying what is wrong.

    The name (default: the dir's name) must be a valid adapter name unless `check_name` is
    False, for callers that only need the config (a merge input may live in any dir).
    """
    name = name or path.name
    if check_name:
        validate_adapter_name(name)
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise AdapterError(f"{path}: no {ADAPTER_CONFIG}; not a PEFT adapter dir")
    if not (path / ADAPTER_WEIGHTS).is_file():
        if (path / "adapter_model.bin").exists():
            raise AdapterError(
                f"{path}: pickle weights (adapter_model.bin) are refused; "
                f"save with safetensors ({ADAPTER_WEIGHTS})"
            )
        raise AdapterError(f"{path}: no {ADAPTER_WEIGHTS}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    _check_config_types(cfg, cfg_file)
    rank = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", rank))
    ranks = [rank, *(int(r) for r in (cfg.get("rank_pattern") or {}).values())]
    if min(ranks) < 1:
        raise AdapterError(f"{cfg_file}: LoRA rank must be >= 1")
    targets = cfg.get("target_modules") or ()
    if isinstance(targets, str):  # PEFT allows a regex string here
        targets = (targets,)
    return LoraAdapterInfo(
        name=name,
        path=path.resolve(),
        rank=max(ranks),
        lora_alpha=alpha,
        target_modules=tuple(str(t) for t in targets),
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        config=cfg,
    )


MAX_DELTA_ENTRY = 1e4
"""Largest |ΔW| entry an expert may have (bounded by r·max|A|·max|B·scale|). Real LoRA
deltas are ~1e-2; far beyond, a merge's sums and SVDs overflow float32 into NaN."""
MAX_PATTERN_KEYS = 1024
MAX_PATTERN_KEY_LEN = 256


def is_int(x: object) -> TypeGuard[int]:
    """An int as JSON gives it: not a bool, not a float."""
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_config_types(cfg: Mapping[str, Any], where: Path) -> None:
    """The types of the config fields mergeserve reads, as PEFT writes them; raises
    AdapterError naming the field (a config that passes here is stored, and every later
    reader — the registry's manifest, vLLM — must be able to take it)."""

    def bad(field: str, want: str) -> AdapterError:
        return AdapterError(f"{where}: {field!r} must be {want}, not {cfg.get(field)!r}")

    if "r" not in cfg or not is_int(cfg["r"]):
        raise bad("r", "an integer")
    if "lora_alpha" in cfg and not _is_number(cfg["lora_alpha"]):
        raise bad("lora_alpha", "a finite number")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise bad("base_model_name_or_path", "a string or null")
    targets = cfg.get("target_modules")
    listed = isinstance(targets, list) and all(isinstance(t, str) for t in targets)
    if targets is not None and not isinstance(targets, str) and not listed:
        raise bad("target_modules", "a string or a list of strings")
    for key, ok, want in (
        ("rank_pattern", is_int, "integers"),
        ("alpha_pattern", _is_number, "finite numbers"),
    ):
        pats = cfg.get(key)
        if pats is None:
            continue
        if not isinstance(pats, dict) or len(pats) > MAX_PATTERN_KEYS:
            raise bad(key, f"an object of at most {MAX_PATTERN_KEYS} entries")
        if not all(isinstance(k, str) and 0 < len(k) <= MAX_PATTERN_KEY_LEN for k in pats):
            raise bad(key, f"keyed by names of 1..{MAX_PATTERN_KEY_LEN} characters")
        if not all(ok(v) for v in pats.values()):
            raise bad(key, f"an object of {want}")
    for flag in ("use_rslora", "use_dora"):
        if flag in cfg and not isinstance(cfg[flag], bool):
            raise bad(flag, "true or false")


def discover_lora_dirs(root: Path) -> list[LoraAdapterInfo]:
    """Every PEFT LoRA dir directly under `root`, sorted by name (the dir name)."""
    if not root.is_dir():
        raise AdapterError(f"experts dir {root} does not exist")
    return [
        read_lora_dir(p)
        for p in sorted(root.iterdir())
        if p.is_dir() and (p / ADAPTER_CONFIG).is_file()
    ]


# ------------------------------------------------------------------ factors in and out

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
DEFAULT_MAX_ADAPTER_BYTES = 2 << 30


PATTERN_TIMEOUT_S = 0.05
"""A rank/alpha pattern gets this long to match one module name: a crafted key (nested
quantifiers) would otherwise backtrack exponentially while the expert set is locked."""


@functools.lru_cache(maxsize=4096)
def _compiled_pattern(key: str) -> Any:
    try:
        return regex.compile(rf"(.*\.)?({key})$")
    except regex.error as e:
        raise AdapterError(f"pattern {key!r} is not a valid regular expression ({e})") from e


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any:
    """PEFT's rule: a pattern matches a module name that ends with it (after a dot); each
    match is bounded in time (PATTERN_TIMEOUT_S), else AdapterError."""
    for key, value in patterns.items():
        try:
            if _compiled_pattern(key).match(module, timeout=PATTERN_TIMEOUT_S):
                return value
        except TimeoutError:
            raise AdapterError(
                f"the pattern {key[:60]!r} takes too long to match a module name; "
                "use plain module names or simple patterns"
            ) from None
    return None


def lora_scaling(config: Mapping[str, Any], module: str) -> float:
    """The factor PEFT applies to B A for `module`: alpha/r, or alpha/√r under rsLoRA."""
    r = _pattern_value(config.get("rank_pattern") or {}, module) or config["r"]
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module) or config.get("lora_alpha", r)
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else float(r))


def load_lora_factors(
    path: Path, max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES, dtype: torch.dtype = torch.float32
) -> AdapterFactors:
    """A PEFT LoRA dir as AdapterFactors, with each module's scaling folded into B."""
    from safetensors.torch import load_file

    config = read_lora_dir(path, check_name=False).config  # parsed once, with its checks
    weights = path / ADAPTER_WEIGHTS
    size = weights.stat().st_size
    if size > max_bytes:
        raise AdapterError(f"{weights}: {size} bytes is over the limit of {max_bytes}")
    if config.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters are not LoRA deltas and are not supported")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{weights}: unreadable safetensors file ({e})") from e
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{weights}: unexpected tensor {key!r} (only lora_A/lora_B)")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{weights}: tensor {key!r} contains NaN or Inf")
        pairs.setdefault(m.group("module"), {})[m.group("ab")] = t.to(dtype)
    modules = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights}: {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        want = _pattern_value(config.get("rank_pattern") or {}, module) or config["r"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != want or b.shape[1] != want:
            raise AdapterError(
                f"{weights}: {module} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}; its config says rank {want}"
            )
        scaled = b * lora_scaling(config, module)
        bound = want * float(a.abs().max()) * float(scaled.abs().max())  # ≥ max |B A|
        if not torch.isfinite(scaled).all() or not bound <= MAX_DELTA_ENTRY:
            raise AdapterError(
                f"{weights}: {module} is not finite once scaled by lora_alpha/r "
                f"({lora_scaling(config, module):g}), or its delta's entries reach "
                f"{bound:.3g}, beyond {MAX_DELTA_ENTRY:g}: merges of it would overflow"
            )
        modules[module] = (a, scaled)
    if not modules:
        raise AdapterError(f"{weights}: no LoRA tensors")
    return AdapterFactors.from_modules(modules)


# ------------------------------------------------------------------ fit to the base model

_BLOCK_WEIGHT = re.compile(r"^(?:.*\.)?layers\.(?P<idx>\d+)\.(?P<kind>.+)\.weight$")
_DIGEST_SUFFIX = re.compile(r"-[0-9a-f]{8,}$")


def model_name(name_or_path: str) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct', '/cache/SmolLM2-135M-Instruct-1a2b3c4d'
    -> 'SmolLM2-135M-Instruct': the model's own name, without org or conversion digest."""
    return _DIGEST_SUFFIX.sub("", name_or_path.rstrip("/").rsplit("/", 1)[-1])


def _model_label(name_or_path: str) -> str:
    """What two spellings of one base model have in common (`model_name`, casefolded)."""
    return model_name(name_or_path).lower()


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the base's block linear layers, read from its checkpoint
    headers (no weights are loaded), so it holds for any architecture."""

    name: str
    num_layers: int
    shapes: Mapping[str, tuple[int, int]]
    """Module kind ('self_attn.q_proj') -> (out, in) of its weight."""
    labels: frozenset[str] = frozenset()
    """Normalized names this base goes by (see `_model_label`)."""

    @classmethod
    def from_checkpoint(cls, model_dir: Path) -> BaseModelSpec:
        from safetensors import safe_open

        from mergeserve.adapters.extract import checkpoint_files

        shapes: dict[str, tuple[int, int]] = {}
        layers = set()
        for f in checkpoint_files(model_dir):
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                    m = _BLOCK_WEIGHT.match(key)
                    if m is None:
                        continue
                    shape = sf.get_slice(key).get_shape()
                    if len(shape) == 2:
                        shapes[m.group("kind")] = (int(shape[0]), int(shape[1]))
                        layers.add(int(m.group("idx")))
        labels = {_model_label(str(model_dir))}
        cfg = model_dir / "config.json"
        if cfg.is_file():
            name = json.loads(cfg.read_text()).get("_name_or_path")
            if name:
                labels.add(_model_label(str(name)))
        return cls(model_dir.name, len(layers), MappingProxyType(shapes), frozenset(labels))

    def check(self, factors: AdapterFactors, info: LoraAdapterInfo) -> None:
        """Raise AdapterError unless the adapter fits: known targets, shapes, layers, name."""
        base_name = info.base_model_name_or_path
        if base_name and self.labels and _model_label(base_name) not in self.labels:
            raise AdapterError(
                f"{info.name}: trained on {base_name!r}, but the base model is {self.name!r}"
            )
        known = {k.rsplit(".", 1)[-1] for k in self.shapes}
        if isinstance(info.config.get("target_modules"), list):
            unknown = sorted(set(info.target_modules) - known - set(self.shapes))
            if unknown:
                raise AdapterError(
                    f"{info.name}: target modules {unknown} do not exist in {self.name} "
                    f"(it has {sorted(known)})"
                )
        for kind, lr in factors.groups.items():
            want = self.shapes.get(kind)
            if want is None:
                raise AdapterError(f"{info.name}: module {kind!r} does not exist in {self.name}")
            got = (lr.out_features, lr.in_features)
            if got != want:
                raise AdapterError(
                    f"{info.name}: {kind} is {got[0]}x{got[1]} (out x in) in the adapter "
                    f"but {want[0]}x{want[1]} in {self.name}; a different base model?"
                )
            bad = [i for i in factors.layers[kind] if i >= self.num_layers]
            if bad:
                raise AdapterError(
                    f"{info.name}: {kind} on layers {bad}, but {self.name} has "
                    f"{self.num_layers} layers"
                )


def load_checked(
    path: Path,
    base: BaseModelSpec | None = None,
    name: str | None = None,
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
) -> AdapterFactors:
    """`load_lora_factors` plus, given the base, every fit check (one call to validate)."""
    info = read_lora_dir(path, name, check_name=name is not None)
    factors = load_lora_factors(path, max_bytes=max_bytes)
    if base is not None:
        base.check(factors, info)
    return factors


def save_lora_factors(
    factors: AdapterFactors,
    out_dir: Path,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a PEFT LoRA dir whose scaling is exactly 1 for every module.

    Each module kind keeps its own rank (rank_pattern), with alpha = rank (alpha_pattern),
    so PEFT and vLLM both compute B A unscaled. Written into a temp dir, then renamed:
    a reader never sees a half-written adapter.
    """
    from safetensors.torch import save_file

    if out_dir.exists():
        raise AdapterError(f"{out_dir} already exists")
    ranks = {k: r for k, r in factors.ranks.items() if r > 0}
    if not ranks:
        raise AdapterError("the adapter is empty (rank 0 everywhere)")
    r = max(ranks.values())
    pattern = {k: v for k, v in ranks.items() if v != r}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted({k.rsplit(".", 1)[-1] for k in ranks}),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": base_model_name_or_path,
    }
    tensors = {}
    for name, (a, b) in factors.modules().items():
        if a.shape[0] == 0:
            continue
        tensors[f"{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{name}.lora_B.weight"] = b.to(dtype).contiguous()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
