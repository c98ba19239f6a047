"""The low-rank algebra against independent dense references on random tensors."""

from __future__ import annotations

import pytest
import torch

from mergeserve.adapters.lowrank import (
    AdapterFactors,
    LowRank,
    merge_adapters,
    relative_error,
    subtract,
    truncate,
    truncate_adapter,
    truncate_spectrum,
    weighted_sum,
)
from mergeserve.errors import AdapterError

L, OUT, IN = 3, 24, 40


def rand_lr(r: int, seed: int, dtype: torch.dtype = torch.float64) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(
        torch.randn(L, r, IN, generator=g, dtype=dtype),
        torch.randn(L, OUT, r, generator=g, dtype=dtype),
    )


def test_to_dense_is_b_times_a_per_layer() -> None:
    x = rand_lr(4, 0)
    dense = x.to_dense()
    for layer in range(L):
        torch.testing.assert_close(dense[layer], x.B[layer] @ x.A[layer])


def test_weighted_sum_is_exact_and_concatenates_ranks() -> None:
    terms = [rand_lr(r, s) for r, s in [(4, 1), (8, 2), (2, 3)]]
    w = [0.5, -1.25, 2.0]
    merged = weighted_sum(terms, w)
    ref = sum(wi * t.to_dense() for wi, t in zip(w, terms, strict=True))
    assert merged.rank == 14
    torch.testing.assert_close(merged.to_dense(), ref, rtol=1e-12, atol=1e-12)


def test_weighted_sum_is_not_the_product_of_summed_factors() -> None:
    # The anchor bug: Σ w B_i · Σ w A_i has cross terms. Ours must not equal it.
    a, b = rand_lr(4, 1), rand_lr(4, 2)
    wrong = torch.bmm(0.5 * a.B + 0.5 * b.B, 0.5 * a.A + 0.5 * b.A)
    right = weighted_sum([a, b], [0.5, 0.5]).to_dense()
    assert (wrong - right).abs().max() > 1e-3


def test_zero_weights_are_dropped_and_all_zero_is_rank_zero() -> None:
    a, b = rand_lr(4, 1), rand_lr(6, 2)
    assert weighted_sum([a, b], [0.0, 1.0]).rank == 6
    empty = weighted_sum([a, b], [0.0, 0.0])
    assert empty.rank == 0
    assert torch.count_nonzero(empty.to_dense()) == 0


def test_subtract_and_scale() -> None:
    a, b = rand_lr(3, 1), rand_lr(5, 2)
    torch.testing.assert_close(subtract(a, b).to_dense(), a.to_dense() - b.to_dense())
    torch.testing.assert_close(a.scaled(-0.3).to_dense(), -0.3 * a.to_dense())


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="do not compose"):
        LowRank(torch.zeros(L, 4, IN), torch.zeros(L, OUT, 5))
    other = LowRank(torch.zeros(L, 2, IN + 1), torch.zeros(L, OUT, 2))
    with pytest.raises(ValueError, match="cannot add"):
        weighted_sum([rand_lr(2, 0), other], [1.0, 1.0])


@pytest.mark.parametrize("k", [1, 3, 6, 12])
def test_truncate_matches_dense_svd(k: int) -> None:
    x = rand_lr(12, 7)
    dense = x.to_dense()
    u, s, vh = torch.linalg.svd(dense)
    ref = u[:, :, :k] @ torch.diag_embed(s[:, :k]) @ vh[:, :k, :]
    t = truncate(x, rank=k)
    assert t.rank == k
    torch.testing.assert_close(t.to_dense(), ref, rtol=1e-9, atol=1e-9)


def test_truncate_spectrum_gives_every_singular_value() -> None:
    x = rand_lr(12, 7)
    t, s = truncate_spectrum(x, rank=3)
    ref = torch.linalg.svdvals(x.to_dense())[:, :12]
    torch.testing.assert_close(s, ref, rtol=1e-9, atol=1e-9)
    # what the truncation drops is the tail of the spectrum (Eckart-Young)
    dropped = (x.to_dense() - t.to_dense()).pow(2).sum(dim=(1, 2))
    torch.testing.assert_close(dropped, s[:, 3:].pow(2).sum(1), rtol=1e-9, atol=1e-9)


def test_truncate_of_nothing_is_nothing() -> None:
    zero = LowRank(torch.zeros(L, 4, IN, dtype=torch.float64), torch.zeros(L, OUT, 4))
    t, s = truncate_spectrum(zero, rank=2)
    assert t.rank == 2
    assert not t.to_dense().any()
    assert not s.any()
    empty = LowRank(torch.zeros(L, 0, IN), torch.zeros(L, OUT, 0))
    t, s = truncate_spectrum(empty, rank=2)
    assert (t.rank, tuple(s.shape)) == (0, (L, 0))


def test_truncate_of_a_sum_of_low_rank_terms_is_exact_at_the_true_rank() -> None:
    # Rank 4 hidden in a rank-12 factorization: truncating to 4 loses nothing.
    base = rand_lr(4, 3)
    redundant = weighted_sum([base, base, base], [0.5, 0.25, 0.25])
    assert redundant.rank == 12
    t = truncate(redundant, rank=4)
    torch.testing.assert_close(t.to_dense(), base.to_dense(), rtol=1e-9, atol=1e-9)


def test_truncate_by_energy() -> None:
    g = torch.Generator().manual_seed(0)
    # Singular values 10, 1, 0.1, 0.01 in every layer.
    qa = torch.linalg.qr(torch.randn(L, IN, 4, generator=g, dtype=torch.float64))[0]
    qb = torch.linalg.qr(torch.randn(L, OUT, 4, generator=g, dtype=torch.float64))[0]
    s = torch.tensor([10.0, 1.0, 0.1, 0.01], dtype=torch.float64)
    x = LowRank(qa.transpose(1, 2), qb * s)
    assert truncate(x, energy=0.98).rank == 1  # 100/101.0101 = 0.990
    assert truncate(x, energy=0.9999).rank == 2
    assert truncate(x, energy=1.0).rank == 4
    assert truncate(x, rank=3, energy=1.0).rank == 3
    with pytest.raises(ValueError, match="energy"):
        truncate(x, energy=0.0)


def test_truncate_keeps_dtype_and_works_in_fp32() -> None:
    x = rand_lr(8, 5, dtype=torch.float32)
    t = truncate(x, rank=8)
    assert t.A.dtype == torch.float32
    assert relative_error({"m": t.to_dense()}, {"m": x.to_dense()}) < 1e-5


def _modules(
    seed: int, layers: list[int], r: int = 4
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        for kind, (o, n) in {"self_attn.q_proj": (16, 16), "mlp.up_proj": (32, 16)}.items():
            out[f"base_model.model.model.layers.{i}.{kind}"] = (
                torch.randn(r, n, generator=g, dtype=torch.float64),
                torch.randn(o, r, generator=g, dtype=torch.float64),
            )
    return out


def test_adapter_round_trip_and_rank_padding() -> None:
    mods = _modules(0, [0, 1, 2])
    a, b = mods["base_model.model.model.layers.1.self_attn.q_proj"]
    mods["base_model.model.model.layers.1.self_attn.q_proj"] = (a[:2], b[:, :2])  # rank 2
    f = AdapterFactors.from_modules(mods)
    assert f.ranks == {"mlp.up_proj": 4, "self_attn.q_proj": 4}
    back = f.modules()
    assert set(back) == set(mods)
    for name, (a, b) in mods.items():
        ba, bb = back[name]
        torch.testing.assert_close(bb @ ba, b @ a)


def test_merge_adapters_with_different_layer_sets_matches_dense() -> None:
    x = AdapterFactors.from_modules(_modules(1, [0, 1, 2]))
    y = AdapterFactors.from_modules(_modules(2, [1, 3]))
    merged = merge_adapters([x, y], [0.7, 0.3])
    assert merged.layers["self_attn.q_proj"] == (0, 1, 2, 3)
    got = merged.modules()
    xm, ym = x.modules(), y.modules()
    for name in set(xm) | set(ym):
        ref = sum(w * (m[name][1] @ m[name][0]) for w, m in [(0.7, xm), (0.3, ym)] if name in m)
        torch.testing.assert_close(got[name][1] @ got[name][0], ref)


def test_truncate_adapter_and_relative_error() -> None:
    x = AdapterFactors.from_modules(_modules(3, [0, 1], r=8))
    full = truncate_adapter(x, rank=8)
    assert relative_error(full.to_dense(), x.to_dense()) < 1e-10
    half = truncate_adapter(x, rank=4)
    err = relative_error(half.to_dense(), x.to_dense())
    assert 0.05 < err < 1.0


def test_module_names_outside_layers_are_refused() -> None:
    with pytest.raises(AdapterError, match="layers"):
        AdapterFactors.from_modules({"lm_head": (torch.zeros(2, 4), torch.zeros(4, 2))})
