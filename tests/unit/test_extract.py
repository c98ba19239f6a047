"""LoRA extraction from full fine-tunes, checked against dense SVDs and against the model."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeserve.adapters.extract import dense_deltas, extract_lora
from mergeserve.adapters.lowrank import top_singular
from mergeserve.adapters.peft_io import save_lora_factors
from mergeserve.errors import AdapterError
from mergeserve.testing import make_tiny_llama


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(
        tmp_path_factory.mktemp("ex") / "base", hidden_size=64, intermediate_size=96
    )


def finetune(base: Path, out: Path, rank: int | None, seed: int = 0, embed: bool = False) -> Path:
    """A 'full fine-tune' of `base`: each block linear weight plus a rank-`rank` (or dense) τ."""
    shutil.copytree(base, out)
    w = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for k, t in w.items():
        if ".layers." in k and t.dim() == 2:
            o, n = t.shape
            if rank is None:
                tau = torch.randn(o, n, generator=g) * 0.05
            else:
                tau = torch.randn(o, rank, generator=g) @ torch.randn(rank, n, generator=g) * 0.05
            w[k] = t + tau
    if embed:
        w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"] + 0.01
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_low_rank_fine_tune_is_recovered_and_runs_like_the_fine_tune(
    base: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ft = finetune(base, tmp_path / "ft", rank=3, embed=True)
    ex = extract_lora(base, ft, rank=3)
    assert ex.relative_error < 1e-5
    assert ex.skipped == ("model.embed_tokens.weight",)
    assert set(ex.factors.ranks.values()) == {3}
    # Served as a LoRA on the base it computes what the fine-tune computes (embeddings aside).
    out = save_lora_factors(ex.factors, tmp_path / "lora", str(base))
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    ft_model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32)
    with torch.no_grad():
        ft_model.model.embed_tokens.weight -= 0.01
        want = ft_model(ids).logits
        lora = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out
        )
        got = lora(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dense_fine_tune_error_is_the_svd_tail(base: Path, tmp_path: Path) -> None:
    ft = finetune(base, tmp_path / "ft", rank=None, seed=1)
    delta, _ = dense_deltas(base, ft)
    ex = extract_lora(base, ft, rank=4)
    tail = total = 0.0
    for t in delta.groups.values():
        s = torch.linalg.svdvals(t.double())
        tail += float(s[:, 4:].pow(2).sum())
        total += float(s.pow(2).sum())
    assert ex.relative_error == pytest.approx(math.sqrt(tail / total), rel=1e-4)
    by_energy = extract_lora(base, ft, rank=None, energy=0.5)
    assert 1 <= max(by_energy.factors.ranks.values()) < 64
    assert by_energy.relative_error <= math.sqrt(0.5) + 1e-6


def test_randomized_svd_matches_the_exact_one_on_a_low_rank_plus_noise_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(300, 6, generator=g) @ torch.randn(6, 200, generator=g)
    m += 1e-4 * torch.randn(300, 200, generator=g)
    u, s, vh = top_singular(m, 6, randomized_min_dim=100)
    ue, se, vhe = top_singular(m, 6)
    torch.testing.assert_close(s, se, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((u * s) @ vh, (ue * se) @ vhe, rtol=1e-3, atol=1e-3)


def test_mismatched_checkpoints_are_refused(base: Path, tmp_path: Path) -> None:
    other = make_tiny_llama(tmp_path / "other", hidden_size=64, intermediate_size=128)
    with pytest.raises(AdapterError, match="is this a fine-tune of that base"):
        dense_deltas(base, other)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="pickle"):
        dense_deltas(base, pickled)
