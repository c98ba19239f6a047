"""PEFT LoRA dirs <-> AdapterFactors, checked against PEFT's own delta weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mergeserve.adapters.lowrank import merge_adapters
from mergeserve.adapters.peft_io import (
    BaseModelSpec,
    load_checked,
    load_lora_factors,
    save_lora_factors,
)
from mergeserve.errors import AdapterError
from mergeserve.testing import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(
        tmp_path_factory.mktemp("tiny") / "llama", hidden_size=64, num_heads=2, intermediate_size=96
    )


def _peft_lora(base: Path, out: Path, seed: int, **cfg: object) -> PeftModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **cfg)  # type: ignore[arg-type]
    pm = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(out)
    return pm


def _peft_deltas(pm: PeftModel, adapter: str = "default") -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and adapter in getattr(mod, "lora_A", {}):
            out[name] = mod.get_delta_weight(adapter).detach()
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        {"r": 4, "lora_alpha": 8},
        {"r": 4, "lora_alpha": 8, "use_rslora": True},
        {"r": 4, "lora_alpha": 8, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3}},
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_loaded_factors_equal_peft_deltas(
    tiny: Path, tmp_path: Path, cfg: dict[str, object]
) -> None:
    pm = _peft_lora(tiny, tmp_path / "ad", seed=1, **cfg)
    factors = load_lora_factors(tmp_path / "ad")
    ours = factors.modules()
    ref = _peft_deltas(pm)
    assert set(ours) == set(ref)
    for name, (a, b) in ours.items():
        torch.testing.assert_close(b @ a, ref[name], rtol=1e-5, atol=1e-6)


def test_saved_merge_loads_in_peft_with_the_same_deltas(tiny: Path, tmp_path: Path) -> None:
    _peft_lora(tiny, tmp_path / "x", seed=1, r=4, lora_alpha=8)
    _peft_lora(tiny, tmp_path / "y", seed=2, r=2, lora_alpha=2)
    x, y = load_lora_factors(tmp_path / "x"), load_lora_factors(tmp_path / "y")
    merged = merge_adapters([x, y], [0.6, 0.4])
    out = save_lora_factors(merged, tmp_path / "merged", base_model_name_or_path=str(tiny))
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, out)
    ref = _peft_deltas(pm)
    for name, (a, b) in merged.modules().items():
        torch.testing.assert_close(ref[name], b @ a, rtol=1e-5, atol=1e-6)
    with pytest.raises(AdapterError, match="already exists"):
        save_lora_factors(merged, out)


def _corrupt(src: Path, dst: Path, edit: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    w = dst / "adapter_model.safetensors"
    tensors = load_file(str(w))
    key = sorted(tensors)[0]
    if edit == "nan":
        tensors[key][0, 0] = float("nan")
    elif edit == "extra":
        tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    elif edit == "missing_b":
        tensors = {k: v for k, v in tensors.items() if "lora_B" not in k}
    save_file(tensors, str(w))
    if edit == "dora":
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    return dst


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ("nan", "NaN or Inf"),
        ("extra", "unexpected tensor"),
        ("missing_b", "lacks lora_B"),
        ("dora", "DoRA"),
    ],
)
def test_bad_weights_are_refused(tiny: Path, tmp_path: Path, edit: str, match: str) -> None:
    _peft_lora(tiny, tmp_path / "ok", seed=1, r=2, lora_alpha=2)
    bad = _corrupt(tmp_path / "ok", tmp_path / "bad", edit)
    with pytest.raises(AdapterError, match=match):
        load_lora_factors(bad)


def test_size_limit(tiny: Path, tmp_path: Path) -> None:
    _peft_lora(tiny, tmp_path / "ok", seed=1, r=2, lora_alpha=2)
    with pytest.raises(AdapterError, match="over the limit"):
        load_lora_factors(tmp_path / "ok", max_bytes=100)


# ----------------------------------------------------------------------------- fit to the base


def _set_config(d: Path, **changes: object) -> Path:
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return d


def test_an_adapter_of_the_base_fits(tiny: Path, tmp_path: Path) -> None:
    _peft_lora(tiny, tmp_path / "ok", seed=1, r=2, lora_alpha=2)
    spec = BaseModelSpec.from_checkpoint(tiny)
    assert spec.num_layers == 2
    assert spec.shapes["self_attn.q_proj"] == (64, 64)
    assert spec.shapes["mlp.down_proj"] == (64, 96)
    factors = load_checked(tmp_path / "ok", spec)
    assert set(factors.groups) == {"self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"}


def test_adapters_that_do_not_fit_the_base_are_refused(
    tiny: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    spec = BaseModelSpec.from_checkpoint(tiny)
    root = tmp_path_factory.mktemp("others")
    wider = make_tiny_llama(root / "wider", hidden_size=64, num_heads=2, intermediate_size=128)
    deeper = make_tiny_llama(
        root / "deeper", hidden_size=64, num_heads=2, intermediate_size=96, num_layers=3
    )
    _peft_lora(wider, tmp_path / "wider", seed=1, r=2)
    with pytest.raises(AdapterError, match=r"down_proj is 64x128 .* a different base model"):
        load_checked(_set_config(tmp_path / "wider", base_model_name_or_path=str(tiny)), spec)
    _peft_lora(deeper, tmp_path / "deeper", seed=1, r=2)
    with pytest.raises(AdapterError, match=r"on layers \[2\], but .* has 2 layers"):
        load_checked(_set_config(tmp_path / "deeper", base_model_name_or_path=str(tiny)), spec)
    _peft_lora(tiny, tmp_path / "ok", seed=1, r=2)
    _set_config(tmp_path / "ok", target_modules=["q_proj", "v_proj", "down_proj", "attn_qkv"])
    with pytest.raises(AdapterError, match=r"target modules \['attn_qkv'\] do not exist"):
        load_checked(tmp_path / "ok", spec)
    _set_config(tmp_path / "ok", target_modules=["q_proj"], base_model_name_or_path="org/Other-7B")
    with pytest.raises(AdapterError, match="trained on 'org/Other-7B'"):
        load_checked(tmp_path / "ok", spec)
    # The same model under another spelling (hub id vs local dir) is accepted.
    _set_config(tmp_path / "ok", base_model_name_or_path=f"someorg/{tiny.name}")
    load_checked(tmp_path / "ok", spec)
