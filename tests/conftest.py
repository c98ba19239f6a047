from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Test servers build their static arms before they serve, as tests ask them at once;
# tests/integration/test_background_builds.py turns background builds (the default) on.
os.environ.setdefault("MERGESERVE_MERGE__BACKGROUND_BUILDS", "false")

FAKE_DIM = 16
FAKE_LAYERS = 2


def write_fake_lora_dir(
    path: Path,
    rank: int = 8,
    *,
    examples: list[str] | None = None,
    seed: int | None = None,
    **config: object,
) -> Path:
    """A real PEFT LoRA dir of random weights for a model that is not there (16-wide,
    two layers): enough for the FakeEngine, which never loads weights, and for everything
    mergeserve derives from the experts (Twin, static merges). `examples` become its
    examples.jsonl (default: three prompts naming the expert, for the prototype router)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    targets = list(config.pop("target_modules", ["q_proj", "v_proj"]))  # type: ignore[call-overload]
    cfg = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": targets,
        **config,
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed if seed is not None else sum(map(ord, path.name)))
    tensors = {}
    for layer in range(FAKE_LAYERS):
        for t in targets:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, FAKE_DIM, generator=g)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(FAKE_DIM, rank, generator=g) * 0.1
    save_file(tensors, str(path / "adapter_model.safetensors"))
    if examples is None:
        examples = [f"a question for the {path.name} expert number {i}" for i in range(3)]
    (path / "examples.jsonl").write_text(
        "".join(json.dumps({"prompt": e}) + "\n" for e in examples)
    )
    return path


@pytest.fixture
def experts_dir(tmp_path: Path) -> Path:
    root = tmp_path / "experts"
    write_fake_lora_dir(root / "alpha", examples=ALPHA_PROMPTS)
    write_fake_lora_dir(root / "beta", rank=4, examples=BETA_PROMPTS)
    return root


ALPHA_PROMPTS = [
    "What is 12 plus 30?",
    "Add 7 and 5.",
    "Compute the sum of 41 and 18.",
    "How much is 3 + 9?",
]
"""Expert alpha's examples: arithmetic (the router sends sums here)."""
BETA_PROMPTS = [
    "What is the capital of France?",
    "Name the capital city of Japan.",
    "Which city is the capital of Peru?",
    "Tell me the capital of Kenya.",
]
"""Expert beta's examples: capitals."""
