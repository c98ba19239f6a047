from __future__ import annotations

import json
from pathlib import Path

import pytest


def write_fake_lora_dir(path: Path, rank: int = 8, **config: object) -> Path:
    """A PEFT-shaped dir whose weights file is a placeholder: enough for config-level code
    and for the FakeEngine, which never loads weights."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        **config,
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


@pytest.fixture
def experts_dir(tmp_path: Path) -> Path:
    root = tmp_path / "experts"
    write_fake_lora_dir(root / "alpha")
    write_fake_lora_dir(root / "beta", rank=4)
    return root
