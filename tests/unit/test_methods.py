"""Static merge methods against dense references written here, and against PEFT.

The references work on flattened per-module deltas with plain loops and the formulas of
the papers / mergekit, sharing no code with mergeserve.adapters.merging.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from mergeserve.adapters.lowrank import AdapterFactors, relative_error
from mergeserve.adapters.merging import (
    METHODS,
    PARAMS,
    MergeOptions,
    MethodTable,
    merge,
    merge_dirs,
    methods_markdown,
)
from mergeserve.adapters.merging.dense import module_generator
from mergeserve.errors import InvalidRequestError

PREFIX = "base_model.model.model"
SHAPES = {"self_attn.q_proj": (16, 12), "mlp.up_proj": (20, 12)}


def expert(seed: int, r: int = 4, layers: tuple[int, ...] = (0, 1)) -> AdapterFactors:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i in layers:
        for kind, (o, n) in SHAPES.items():
            mods[f"{PREFIX}.layers.{i}.{kind}"] = (
                torch.randn(r, n, generator=g, dtype=torch.float64),
                torch.randn(o, r, generator=g, dtype=torch.float64) * 0.5,
            )
    return AdapterFactors.from_modules(mods)


def deltas(a: AdapterFactors) -> dict[str, Tensor]:
    return {name: b @ a_ for name, (a_, b) in a.modules().items()}


def dense_of(merged: AdapterFactors) -> dict[str, Tensor]:
    return deltas(merged)


EXPERTS = [expert(1), expert(2), expert(3)]
W = (0.5, 0.3, 0.2)


def ref_svd_truncate(m: Tensor, k: int) -> Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


# ----------------------------------------------------------------------------- registry


def test_the_table_refuses_duplicates_and_names_the_known_methods() -> None:
    m = METHODS.get("linear")
    with pytest.raises(ValueError, match="declared twice"):
        MethodTable([m, m])
    with pytest.raises(InvalidRequestError, match=r"known: .*dare_ties.*ties"):
        METHODS.get("nope")
    assert set(METHODS.names()) >= {
        "linear",
        "task_arithmetic",
        "slerp",
        "ties",
        "dare_linear",
        "dare_ties",
        "cat",
    }


# ----------------------------------------------------------------------------- exact ones


def test_task_arithmetic_is_exact_and_truncates_like_a_dense_svd() -> None:
    out = merge("task_arithmetic", EXPERTS, MergeOptions(weights=W, scale=0.3))
    refs = {
        n: 0.3 * sum(w * deltas(e)[n] for w, e in zip(W, EXPERTS, strict=True))
        for n in deltas(EXPERTS[0])
    }
    assert set(out.ranks.values()) == {12}
    for name, d in dense_of(out).items():
        torch.testing.assert_close(d, refs[name], rtol=1e-12, atol=1e-12)
    low = merge("task_arithmetic", EXPERTS, MergeOptions(weights=W, scale=0.3, rank=3))
    assert set(low.ranks.values()) == {3}
    for name, d in dense_of(low).items():
        torch.testing.assert_close(d, ref_svd_truncate(refs[name], 3), rtol=1e-9, atol=1e-9)


def test_linear_is_the_weighted_average() -> None:
    out = merge("linear", EXPERTS, MergeOptions(weights=(2.0, 1.0, 1.0)))
    for name, d in dense_of(out).items():
        ref = (
            2 * deltas(EXPERTS[0])[name] + deltas(EXPERTS[1])[name] + deltas(EXPERTS[2])[name]
        ) / 4
        torch.testing.assert_close(d, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(InvalidRequestError, match="sum to 0"):
        merge("linear", EXPERTS[:2], MergeOptions(weights=(1.0, -1.0)))


def test_cat_keeps_the_summed_rank_and_refuses_truncation() -> None:
    out = merge("cat", [expert(1, r=2), expert(2, r=5)], MergeOptions(weights=(1.0, -0.5)))
    assert set(out.ranks.values()) == {7}
    with pytest.raises(InvalidRequestError, match="full concatenated rank"):
        merge("cat", EXPERTS, MergeOptions(rank=4))


def ref_slerp(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """mergekit's slerp on flattened tensors (normalized copies for the angle)."""
    a, b = v0.flatten(), v1.flatten()
    dot = float((a / a.norm()) @ (b / b.norm()))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp_matches_mergekit_per_module(t: float) -> None:
    x, y = EXPERTS[0], EXPERTS[1]
    out = merge("slerp", [x, y], MergeOptions(t=t))
    for name, d in dense_of(out).items():
        ref = ref_slerp(t, deltas(x)[name], deltas(y)[name])
        torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-10)


def test_slerp_of_parallel_deltas_falls_back_to_lerp_and_takes_no_weights() -> None:
    x = EXPERTS[0]
    out = merge("slerp", [x, x.scaled(3.0)], MergeOptions(t=0.5))
    for name, d in dense_of(out).items():
        torch.testing.assert_close(d, 2.0 * deltas(x)[name], rtol=1e-10, atol=1e-10)
    with pytest.raises(InvalidRequestError, match="slerp does not use weights"):
        merge("slerp", [x, x], MergeOptions(weights=(1.0, 1.0)))
    with pytest.raises(InvalidRequestError, match="exactly 2"):
        merge("slerp", EXPERTS)


# ----------------------------------------------------------------------------- dense ones


def ref_ties(ds: list[Tensor], w: tuple[float, ...], density: float, normalize: bool) -> Tensor:
    """TIES on flattened vectors, entry by entry, after mergekit (weighted sign vote)."""
    flat = [d.flatten() for d in ds]
    n = flat[0].numel()
    k = int(density * n)
    trimmed = []
    for v in flat:
        keep = set(sorted(range(n), key=lambda i: -abs(float(v[i])))[:k])
        trimmed.append(
            torch.tensor([float(v[i]) if i in keep else 0.0 for i in range(n)], dtype=v.dtype)
        )
    out = torch.zeros(n, dtype=flat[0].dtype)
    for i in range(n):
        vote = sum(wj * float(tj[i]) for wj, tj in zip(w, trimmed, strict=True))
        sign = 1.0 if vote >= 0 else -1.0
        num = sum(
            wj * float(tj[i]) for wj, tj in zip(w, trimmed, strict=True) if float(tj[i]) * sign > 0
        )
        den = sum(wj for wj, tj in zip(w, trimmed, strict=True) if float(tj[i]) * sign > 0)
        out[i] = num / den if normalize and abs(den) > 1e-12 else num
    return out.reshape(ds[0].shape)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_the_reference_at_full_rank(normalize: bool) -> None:
    opts = MergeOptions(weights=W, density=0.3, normalize=normalize, rank=12)
    out = merge("ties", EXPERTS, opts)
    for name, d in dense_of(out).items():
        ref = ref_ties([deltas(e)[name] for e in EXPERTS], W, 0.3, normalize)
        torch.testing.assert_close(d, ref, rtol=1e-9, atol=1e-9)


def test_ties_truncated_is_the_best_rank_k_of_the_dense_merge() -> None:
    out = merge("ties", EXPERTS, MergeOptions(weights=W, density=0.5, rank=2))
    assert set(out.ranks.values()) == {2}
    for name, d in dense_of(out).items():
        ref = ref_ties([deltas(e)[name] for e in EXPERTS], W, 0.5, True)
        torch.testing.assert_close(d, ref_svd_truncate(ref, 2), rtol=1e-9, atol=1e-9)


def _module_key(name: str) -> tuple[str, int]:
    rest = name.split(".layers.", 1)[1]
    idx, kind = rest.split(".", 1)
    return kind, int(idx)


def ref_dare(
    name: str, ds: list[Tensor], w: tuple[float, ...], p: float, seed: int, ties: bool
) -> Tensor:
    """DARE with the documented mask stream: one draw of [T, out, in] per (seed, kind, layer)."""
    kind, layer = _module_key(name)
    u = torch.rand(
        (len(ds), *ds[0].shape), generator=module_generator(seed, kind, layer), dtype=torch.float64
    )
    dropped = [d * (u[i] < p) / p for i, d in enumerate(ds)]
    if not ties:
        return sum((wi * di for wi, di in zip(w, dropped, strict=True)), torch.zeros_like(ds[0]))
    vote = sum(wi * di for wi, di in zip(w, dropped, strict=True))
    sign = torch.where(vote >= 0, 1.0, -1.0).to(ds[0].dtype)
    out = torch.zeros_like(ds[0])
    for wi, di in zip(w, dropped, strict=True):
        out += wi * di * (di * sign > 0)
    return out


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_matches_the_reference_and_is_seeded(name: str) -> None:
    opts = MergeOptions(weights=W, density=0.4, seed=7, rank=12)
    out = merge(name, EXPERTS, opts)
    for mod, d in dense_of(out).items():
        ref = ref_dare(mod, [deltas(e)[mod] for e in EXPERTS], W, 0.4, 7, ties=name == "dare_ties")
        torch.testing.assert_close(d, ref, rtol=1e-9, atol=1e-9)
    again = merge(name, EXPERTS, opts)
    other = merge(name, EXPERTS, MergeOptions(weights=W, density=0.4, seed=8, rank=12))
    assert relative_error(dense_of(again), dense_of(out)) == 0.0
    assert relative_error(dense_of(other), dense_of(out)) > 0.1


def test_dare_linear_at_density_one_is_task_arithmetic() -> None:
    dare = merge("dare_linear", EXPERTS, MergeOptions(weights=W, density=1.0, rank=12))
    ta = merge("task_arithmetic", EXPERTS, MergeOptions(weights=W))
    assert relative_error(dense_of(dare), dense_of(ta)) < 1e-10


def test_dense_merge_by_energy_and_experts_on_different_layers() -> None:
    a, b = expert(1, layers=(0, 1)), expert(2, layers=(1, 2))
    out = merge("ties", [a, b], MergeOptions(density=0.5, energy=0.9))
    assert out.layers["self_attn.q_proj"] == (0, 1, 2)
    full = merge("ties", [a, b], MergeOptions(density=0.5, rank=12))
    assert max(out.ranks.values()) < 12
    assert relative_error(dense_of(out), dense_of(full)) < math.sqrt(0.1) + 1e-9


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("method", "opts", "param"),
    [
        ("linear", MergeOptions(density=0.2), "density"),
        ("task_arithmetic", MergeOptions(weights=(1.0,)), "weights"),
        ("ties", MergeOptions(density=0.0), "density"),
        ("ties", MergeOptions(density=1.5), "density"),
        ("task_arithmetic", MergeOptions(rank=0), "rank"),
        ("task_arithmetic", MergeOptions(weights=(1.0, math.nan, 1.0)), "weights"),
        ("dare_ties", MergeOptions(energy=1.2), "energy"),
        ("task_arithmetic", MergeOptions(t=0.3), "t"),
    ],
)
def test_bad_options_are_refused_with_the_param(
    method: str, opts: MergeOptions, param: str
) -> None:
    with pytest.raises(InvalidRequestError) as e:
        merge(method, EXPERTS, opts)
    assert e.value.param == param


def test_experts_of_different_bases_are_refused() -> None:
    g = torch.Generator().manual_seed(0)
    odd = AdapterFactors.from_modules(
        {
            f"{PREFIX}.layers.0.self_attn.q_proj": (
                torch.randn(4, 13, generator=g),
                torch.randn(16, 4, generator=g),
            )
        }
    )
    with pytest.raises(InvalidRequestError, match="same base model"):
        merge("task_arithmetic", [EXPERTS[0].astype(torch.float32), odd])


# ----------------------------------------------------------------------------- against PEFT


@pytest.fixture(scope="module")
def peft_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, list[Path], Path]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergeserve.testing import make_random_lora, make_tiny_llama

    root = tmp_path_factory.mktemp("peftmerge")
    base = make_tiny_llama(root / "base", hidden_size=64, num_heads=2, intermediate_size=96)
    targets = ("q_proj", "v_proj", "down_proj")
    dirs = [
        make_random_lora(
            base, root / f"e{i}", rank=4, alpha=8, target_modules=targets, seed=i, b_std=0.3
        )
        for i in range(3)
    ]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    pm = PeftModel.from_pretrained(model, dirs[0], adapter_name="e0")
    for i, d in enumerate(dirs[1:], start=1):
        pm.load_adapter(d, adapter_name=f"e{i}")
    return pm, dirs, base


def _peft_merged(pm: object, name: str, **kw: object) -> dict[str, Tensor]:
    pm.add_weighted_adapter(["e0", "e1", "e2"], adapter_name=name, **kw)  # type: ignore[attr-defined]
    out = {}
    for mod_name, mod in pm.named_modules():  # type: ignore[attr-defined]
        if hasattr(mod, "get_delta_weight") and name in getattr(mod, "lora_A", {}):
            out[mod_name] = mod.get_delta_weight(name).detach()
    return out


def _ours(dirs: list[Path], method: str, opts: MergeOptions) -> dict[str, Tensor]:
    from mergeserve.adapters.peft_io import load_lora_factors

    experts = [load_lora_factors(d, dtype=torch.float64) for d in dirs]
    return dense_of(merge(method, experts, opts))


def test_against_peft_cat_svd_and_ties_svd(peft_model: tuple[object, list[Path], Path]) -> None:
    pm, dirs, _ = peft_model
    w = [0.5, 0.3, 0.2]
    # cat: exact, same rank.
    ref = _peft_merged(pm, "cat", weights=w, combination_type="cat")
    ours = _ours(dirs, "task_arithmetic", MergeOptions(weights=tuple(w)))
    assert relative_error(ours, ref) < 1e-10
    # svd: task arithmetic, then the best rank-5 approximation.
    ref = _peft_merged(pm, "svd5", weights=w, combination_type="svd", svd_rank=5)
    ours = _ours(dirs, "task_arithmetic", MergeOptions(weights=tuple(w), rank=5))
    assert relative_error(ours, ref) < 1e-6
    # ties at full rank, equal weights (where PEFT's and mergekit's conventions agree).
    ref = _peft_merged(
        pm,
        "ties",
        weights=[1.0, 1.0, 1.0],
        combination_type="ties_svd",
        density=0.4,
        svd_rank=64,
        svd_full_matrices=False,
    )
    ours = _ours(dirs, "ties", MergeOptions(density=0.4, rank=64))
    assert relative_error(ours, ref) < 1e-6


def test_peft_linear_is_not_a_merge_of_the_deltas(
    peft_model: tuple[object, list[Path], Path],
) -> None:
    # Documented difference: PEFT's "linear" mixes A and B separately (cross terms).
    pm, dirs, _ = peft_model
    w = [0.5, 0.3, 0.2]
    ref = _peft_merged(pm, "lin", weights=w, combination_type="linear")
    ours = _ours(dirs, "task_arithmetic", MergeOptions(weights=tuple(w)))
    assert relative_error(ref, ours) > 0.1


def test_merge_dirs_writes_a_peft_dir_with_the_merged_deltas(
    peft_model: tuple[object, list[Path], Path], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, dirs, base = peft_model

    class Bar:
        n = 0

        def update(self, n: int = 1) -> None:
            Bar.n += n

    out = merge_dirs(
        "ties",
        dirs,
        tmp_path / "m",
        MergeOptions(density=0.5, rank=6),
        progress=lambda total: Bar(),
    )
    assert Bar.n == 2 * 3  # 2 layers × 3 target kinds, one step each
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out
    )
    got = {
        n: m.get_delta_weight("default").detach()
        for n, m in model.named_modules()
        if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})
    }
    ours = _ours(dirs, "ties", MergeOptions(density=0.5, rank=6))
    assert relative_error({k: v.double() for k, v in got.items()}, ours) < 1e-5
    with pytest.raises(InvalidRequestError, match="already exists"):
        merge_dirs("ties", dirs, out)


# -------------------------------------------------------------------------- declarations


def test_each_default_is_declared_once_and_applied_when_not_given() -> None:
    # A method's defaults come from its declaration alone: resolving fills exactly the
    # parameters it reads, each with the declared value, and keeps what was given.
    for m in METHODS:
        got = m.resolve(MergeOptions(), 3)
        for name in PARAMS:
            want = m.default(name, 3) if name in m.params else None
            assert getattr(got, name) == want, (m.name, name)
    ties = METHODS.get("ties").resolve(MergeOptions(density=0.9), 2)
    assert ties.density == 0.9
    assert ties.normalize is True
    assert ties.weights == (1.0, 1.0)
    assert METHODS.get("pcb").resolve(MergeOptions(), 2).density == 0.2
    assert METHODS.get("lines").resolve(MergeOptions(), 4).alpha == 0.25


def test_an_undeclared_parameter_is_refused_and_a_bad_value_named() -> None:
    with pytest.raises(InvalidRequestError, match="slerp does not use density"):
        METHODS.get("slerp").check(2, MergeOptions(density=0.5))
    with pytest.raises(InvalidRequestError, match=r"density must be in \(0, 1\], got 1.5"):
        METHODS.get("ties").check(2, MergeOptions(density=1.5))
    with pytest.raises(InvalidRequestError, match="3 weights for 2 experts"):
        METHODS.get("linear").check(2, MergeOptions(weights=(1.0, 1.0, 1.0)))
    with pytest.raises(InvalidRequestError, match="majority_sign must be"):
        METHODS.get("ties").check(2, MergeOptions(majority_sign="most"))  # type: ignore[arg-type]


def test_the_readme_methods_table_is_the_declarations() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    start = readme.index("<!-- methods:")
    block = readme[readme.index("\n", start) + 1 : readme.index("<!-- /methods -->")]
    assert block == methods_markdown(), "regenerate the README table: mergeserve methods"
    for m in METHODS:
        assert f"| `{m.name}` |" in block


def test_static_arms_are_the_declared_arms() -> None:
    from mergeserve.runtime.expert_set import STATIC_DEFAULTS

    assert dict(STATIC_DEFAULTS) == {m.name: m.arm for m in METHODS if m.arm is not None}
    # the arms docs/results.md reports, with the options it reports them at
    assert STATIC_DEFAULTS["task_arithmetic"] == MergeOptions(scale=0.5)
    assert STATIC_DEFAULTS["dare_ties"] == MergeOptions(density=0.5, scale=0.5, seed=0)
    assert "cat" not in STATIC_DEFAULTS
