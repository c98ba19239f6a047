"""Reading PEFT LoRA directories (adapter_config.json + adapter_model.safetensors).

Only safetensors weights are accepted: a pickled `adapter_model.bin` can run code on load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from mergeserve.errors import AdapterError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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


def validate_adapter_name(name: str) -> str:
    if not _NAME.match(name):
        raise AdapterError(
            f"adapter name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def read_lora_dir(path: Path, name: str | None = None) -> LoraAdapterInfo:
    """Read and check a PEFT LoRA dir's config; raises AdapterError saying what is wrong."""
    name = validate_adapter_name(name or path.name)
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
    try:
        rank = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", rank))
        ranks = [rank, *(int(r) for r in (cfg.get("rank_pattern") or {}).values())]
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{cfg_file}: missing or invalid 'r'/'lora_alpha' ({e})") from e
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
    )


def discover_lora_dirs(root: Path) -> list[LoraAdapterInfo]:
    """Every PEFT LoRA dir directly under `root`, sorted by name (the dir name)."""
    if not root.is_dir():
        raise AdapterError(f"experts dir {root} does not exist")
    return [
        read_lora_dir(p)
        for p in sorted(root.iterdir())
        if p.is_dir() and (p / ADAPTER_CONFIG).is_file()
    ]
