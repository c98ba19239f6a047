"""The literature's merge methods (PCB, LiNeS, RegMean, RegMean++, Fisher, AdaMerging,
CMA-ES) against small independent references.

The references share no code with mergeserve: PCB is a NumPy port of its authors'
algorithm, RegMean a least-squares solve, the patched model is checked against PEFT, and
Fisher / entropy against a model with the deltas written into its weights.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from mergeserve.adapters.calibration import (
    DeltaPatch,
    Example,
    encode,
    expert_terms,
    load_base,
    module_terms,
    read_examples,
)
from mergeserve.adapters.lowrank import AdapterFactors, relative_error
from mergeserve.adapters.merging import METHODS, MergeContext, MergeOptions, merge
from mergeserve.adapters.merging.dense import pcb_combine
from mergeserve.adapters.merging.learned import (
    answer_nll,
    cma_es,
    fisher_diagonal,
    prediction_entropy,
    regmean_solve,
)
from mergeserve.adapters.peft_io import load_lora_factors
from mergeserve.errors import InvalidRequestError
from mergeserve.testing import make_random_lora, make_tiny_llama

PREFIX = "base_model.model.model"


def dense(a: AdapterFactors) -> dict[str, Tensor]:
    return {n: (b.double() @ a_.double()) for n, (a_, b) in a.modules().items()}


def rand_expert(seed: int, r: int = 3, layers: tuple[int, ...] = (0, 1, 2)) -> AdapterFactors:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i in layers:
        for kind, (o, n) in {"self_attn.q_proj": (10, 8), "mlp.up_proj": (12, 8)}.items():
            mods[f"{PREFIX}.layers.{i}.{kind}"] = (
                torch.randn(r, n, generator=g, dtype=torch.float64),
                torch.randn(o, r, generator=g, dtype=torch.float64) * 0.1,
            )
    return AdapterFactors.from_modules(mods)


# ------------------------------------------------------------------------------ PCB


def pcb_reference(tvs: np.ndarray, ratio: float, lam: float) -> np.ndarray:
    """PCB-merging's algorithm on flattened task vectors [T, n], written for NumPy."""

    def norm(x: np.ndarray) -> np.ndarray:
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        return (x - lo) / (hi - lo)

    def clip(x: np.ndarray, lo_r: float, hi_r: float) -> np.ndarray:
        d = x.shape[1]
        s = np.sort(x, axis=1)
        return np.clip(x, s[:, [int(d * lo_r)]], s[:, [int(d * (1 - hi_r) - 1)]])

    t = tvs.shape[0]
    mag = clip(np.abs(tvs), 1e-4, 1e-4)
    clipped = np.sign(tvs) * mag
    intra = np.exp(t * norm(mag) ** 2)
    inter = np.tanh(tvs * tvs.sum(axis=0))
    scale = norm(clip(intra * inter, 1 - ratio, 0))
    return lam * (clipped * scale).sum(0) / np.maximum(scale.sum(0), 1e-12)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 1.0])
def test_pcb_matches_the_authors_algorithm(ratio: float) -> None:
    g = torch.Generator().manual_seed(4)
    d = torch.randn(4, 30, 40, generator=g, dtype=torch.float64)
    d[1, :5] = -d[0, :5]  # some conflicts
    opts = METHODS.get("pcb").resolve(MergeOptions(density=ratio, scale=0.7), 4)
    got = pcb_combine(opts)(d, torch.ones(4), "k", 0)
    ref = pcb_reference(d.reshape(4, -1).numpy(), ratio, 0.7).reshape(30, 40)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_pcb_on_lora_experts_is_the_reference_per_module_at_full_rank() -> None:
    experts = [rand_expert(s) for s in (1, 2, 3)]
    out = merge("pcb", experts, MergeOptions(rank=8))  # min(out, in) = 8: no truncation
    ds = [dense(e) for e in experts]
    for name, got in dense(out).items():
        tv = np.stack([d[name].numpy().reshape(-1) for d in ds])
        ref = pcb_reference(tv, 0.2, 1.0).reshape(got.shape)
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)


# ------------------------------------------------------------------------------ LiNeS


def test_lines_scales_the_sum_linearly_with_depth() -> None:
    experts = [rand_expert(s) for s in (1, 2, 3)]
    w = (0.5, 1.0, 2.0)
    out = merge("lines", experts, MergeOptions(weights=w, alpha=0.2, beta=0.6))
    ds = [dense(e) for e in experts]
    for name, got in dense(out).items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        scale = 0.2 + 0.6 * layer / 2  # three layers: 0, 1, 2
        ref = scale * sum(wi * d[name] for wi, d in zip(w, ds, strict=True))
        assert torch.allclose(got, ref, atol=1e-12)
    default = merge("lines", experts)
    got = dense(default)[f"{PREFIX}.layers.0.mlp.up_proj"]
    ref = sum(d[f"{PREFIX}.layers.0.mlp.up_proj"] for d in ds) / 3  # alpha = 1/T at depth 0
    assert torch.allclose(got, ref, atol=1e-12)


# ------------------------------------------------------------------------------ RegMean


def test_regmean_solve_is_the_least_squares_merge() -> None:
    """Σ Bᵢ Aᵢ' minimises Σᵢ ‖Xᵢ Wᵀ − Xᵢ Δᵢᵀ‖² / nᵢ: checked by a stacked lstsq."""
    rng = np.random.default_rng(0)
    n_in, n_out, r = 6, 5, 2
    a = [rng.normal(size=(r, n_in)) for _ in range(3)]
    b = [rng.normal(size=(n_out, r)) for _ in range(3)]
    xs = [rng.normal(size=(n, n_in)) * rng.uniform(0.5, 2, size=n_in) for n in (9, 14, 20)]
    grams = [torch.tensor(x.T @ x / len(x)) for x in xs]
    a_new = regmean_solve([torch.tensor(ai) for ai in a], grams, alpha=1.0)
    got = sum(bi @ ai.double().numpy() for bi, ai in zip(b, a_new, strict=True))
    lhs = np.concatenate([x / math.sqrt(len(x)) for x in xs])
    rhs = np.concatenate(
        [x @ (bi @ ai).T / math.sqrt(len(x)) for x, ai, bi in zip(xs, a, b, strict=True)]
    )
    ref = np.linalg.lstsq(lhs, rhs, rcond=None)[0].T
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_regmean_shrinks_the_off_diagonal_by_alpha() -> None:
    rng = np.random.default_rng(1)
    a = [torch.tensor(rng.normal(size=(2, 4))) for _ in range(2)]
    grams = []
    for _ in range(2):
        x = rng.normal(size=(10, 4))
        grams.append(torch.tensor(x.T @ x / 10))
    got = regmean_solve(a, grams, alpha=0.5)
    red = [0.5 * g.numpy() + 0.5 * np.diag(np.diag(g.numpy())) for g in grams]
    inv = np.linalg.inv(sum(red))
    for gi, ai, ri in zip(got, a, red, strict=True):
        np.testing.assert_allclose(gi.numpy(), ai.numpy() @ ri @ inv, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ tiny llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("learned")
    base = make_tiny_llama(root / "base", hidden_size=64, intermediate_size=96, num_layers=3)
    experts = [
        make_random_lora(base, root / f"e{i}", rank=4, seed=i + 1, b_std=0.05) for i in range(3)
    ]
    return base, experts


EXAMPLES = (
    tuple(Example(f"what is {j} plus {j + 1}", str(2 * j + 1)) for j in range(5)),
    tuple(Example(f"sort {j} 3 1", f"1 3 {j}") for j in range(4)),
    tuple(Example(f"capital of france {j}", "paris") for j in range(6)),
)


def context(base: Path, dev: tuple[Example, ...] = ()) -> MergeContext:
    return MergeContext(base, EXAMPLES, dev)


def factors(paths: list[Path]) -> list[AdapterFactors]:
    return [load_lora_factors(p) for p in paths]


def test_the_patch_computes_what_peft_computes(tiny: tuple[Path, list[Path]]) -> None:
    from peft import PeftModel

    base, experts = tiny
    model, tok = load_base(str(base))
    mods = module_terms(factors(experts))
    batch = encode(tok, EXAMPLES[0], answers=True)
    peft = PeftModel.from_pretrained(copy.deepcopy(model), experts[1]).eval()
    with torch.no_grad():
        ref = peft(input_ids=batch.ids, attention_mask=batch.mask).logits
        with DeltaPatch(model, [m.path for m in mods]) as patch:
            patch.set_terms(expert_terms(mods, 1))
            got = model.lm_head(patch.forward(batch).last_hidden_state)
        plain = model(input_ids=batch.ids, attention_mask=batch.mask).logits
    keep = batch.mask.bool()
    assert torch.allclose(got[keep], ref[keep], atol=1e-4)
    assert not torch.allclose(plain[keep], ref[keep], atol=1e-3)  # the expert matters
    assert not model.model.layers[0].self_attn.q_proj._forward_hooks  # hooks are gone


def test_input_grams_are_the_inputs_gram_over_real_tokens(tiny: tuple[Path, list[Path]]) -> None:
    base, experts = tiny
    model, tok = load_base(str(base))
    mods = module_terms(factors(experts))
    path = "model.layers.1.self_attn.o_proj"
    seen: list[Tensor] = []

    def grab(_m: Any, inputs: tuple[Tensor, ...]) -> None:
        seen.append(inputs[0].detach().clone())

    with DeltaPatch(model, [m.path for m in mods]) as patch:
        patch.set_terms(expert_terms(mods, 2))
        grams = patch.input_grams(tok, EXAMPLES[2], [path])
        h = model.get_submodule(path).register_forward_pre_hook(grab)
        try:
            with torch.no_grad():
                batch = encode(tok, EXAMPLES[2], answers=True)
                patch.forward(batch)
        finally:
            h.remove()
    x = seen[0][batch.mask.bool()].double()
    assert torch.allclose(grams[path], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


def test_regmean_of_one_expert_is_that_expert_on_its_inputs(
    tiny: tuple[Path, list[Path]],
) -> None:
    """Alone, RegMean reproduces the expert's outputs on the expert's inputs: tr(E G Eᵀ)
    ≈ 0 for E = Δ' − Δ (Δ' itself is only fixed on the inputs' span: chat-template tokens
    repeat, so G is singular here)."""
    base, experts = tiny
    fs = factors(experts[:1])
    out = dense(
        merge("regmean", fs, MergeOptions(alpha=1.0), None, MergeContext(base, EXAMPLES[:1]))
    )
    model, tok = load_base(str(base))
    mods = module_terms(fs)
    with DeltaPatch(model, [m.path for m in mods]) as patch:
        patch.set_terms(expert_terms(mods, 0))
        grams = patch.input_grams(tok, EXAMPLES[0], [m.path for m in mods])
    ref = dense(fs[0])
    for m in mods:
        name = f"{PREFIX}.layers.{m.layer}.{m.kind}"
        err, d, g = out[name] - ref[name], ref[name], grams[m.path]
        assert float(torch.trace(err @ g @ err.T)) < 1e-6 * float(torch.trace(d @ g @ d.T))


def test_regmean_is_the_closed_form_over_each_experts_grams(tiny: tuple[Path, list[Path]]) -> None:
    base, experts = tiny
    fs = factors(experts)
    model, tok = load_base(str(base))
    mods = module_terms(fs)
    path = "model.layers.2.mlp.down_proj"
    with DeltaPatch(model, [m.path for m in mods]) as patch:
        grams = []
        for i in range(3):
            patch.set_terms(expert_terms(mods, i))
            g = patch.input_grams(tok, EXAMPLES[i], [path])[path].numpy()
            grams.append(0.9 * g + 0.1 * np.diag(np.diag(g)))
    ds = [dense(f)[f"{PREFIX}.layers.2.mlp.down_proj"].numpy() for f in fs]
    ref = sum(d @ g for d, g in zip(ds, grams, strict=True)) @ np.linalg.inv(sum(grams))
    out = merge("regmean", fs, None, None, context(base))
    got = dense(out)[f"{PREFIX}.layers.2.mlp.down_proj"].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-5)
    assert max(out.ranks.values()) == 12  # exact in low rank: Σ rᵢ


def test_regmean_pp_differs_from_regmean_only_after_the_first_layer(
    tiny: tuple[Path, list[Path]],
) -> None:
    base, experts = tiny
    fs = factors(experts)
    plain = dense(merge("regmean", fs, None, None, context(base)))
    pp = dense(merge("regmean_pp", fs, None, None, context(base)))
    q0 = f"{PREFIX}.layers.0.self_attn.q_proj"  # inputs from the embeddings: the same
    assert torch.allclose(plain[q0], pp[q0], atol=1e-6)
    q2 = f"{PREFIX}.layers.2.self_attn.q_proj"  # inputs through merged layers 0 and 1
    assert relative_error({"x": pp[q2]}, {"x": plain[q2]}) > 1e-4


# ------------------------------------------------------------------------------ Fisher


def test_fisher_diagonal_matches_a_model_with_the_delta_in_its_weights(
    tiny: tuple[Path, list[Path]],
) -> None:
    base, experts = tiny
    fs = factors(experts)
    model, tok = load_base(str(base))
    mods = module_terms(fs)
    paths = ["model.layers.0.self_attn.k_proj", "model.layers.2.mlp.gate_proj"]
    with DeltaPatch(model, [m.path for m in mods]) as patch:
        patch.set_terms(expert_terms(mods, 0))
        got = fisher_diagonal(model, patch, tok, EXAMPLES[0], paths)
    merged = copy.deepcopy(model)
    for m in mods:
        a, b = m.expert(0)
        merged.get_submodule(m.path).weight.data += b @ a
    weights = [merged.get_submodule(p).weight for p in paths]
    for w in weights:
        w.requires_grad_(True)
    ref = [torch.zeros_like(w) for w in weights]
    for e in EXAMPLES[0]:
        batch = encode(tok, [e], answers=True)
        logits = merged(input_ids=batch.ids).logits[0, :-1]
        target = batch.labels[0, 1:]
        keep = target != -100
        nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
        for r, g in zip(ref, torch.autograd.grad(nll, weights), strict=True):
            r += g.square() / len(EXAMPLES[0])
    for p, r in zip(paths, ref, strict=True):
        assert torch.allclose(got[p], r, rtol=1e-3, atol=1e-9)
        assert float(r.sum()) > 0


def test_fisher_merge_of_an_expert_with_itself_is_the_expert(
    tiny: tuple[Path, list[Path]],
) -> None:
    base, experts = tiny
    fs = factors(experts[:1]) * 2
    ctx = MergeContext(base, (EXAMPLES[0], EXAMPLES[1]))
    out = merge("fisher", fs, None, None, ctx)  # F-weighted average of equal deltas
    assert relative_error(dense(out), dense(fs[0])) < 1e-4


def test_fisher_weights_each_entry_by_the_experts_fisher(tiny: tuple[Path, list[Path]]) -> None:
    base, experts = tiny
    fs = factors(experts[:2])
    model, tok = load_base(str(base))
    mods = module_terms(fs)
    ctx = MergeContext(base, EXAMPLES[:2])
    out = dense(merge("fisher", fs, MergeOptions(rank=64), None, ctx))
    fishers = []
    with DeltaPatch(model, [m.path for m in mods]) as patch:
        for i in range(2):
            patch.set_terms(expert_terms(mods, i))
            f = fisher_diagonal(model, patch, tok, EXAMPLES[i], [m.path for m in mods])
            mean = sum(float(v.sum()) for v in f.values()) / sum(v.numel() for v in f.values())
            fishers.append({p: (v / mean).clamp_min(1e-6) for p, v in f.items()})
    p = "model.layers.1.self_attn.v_proj"
    name = f"{PREFIX}.layers.1.self_attn.v_proj"
    d = [dense(f)[name] for f in fs]
    ref = (fishers[0][p] * d[0] + fishers[1][p] * d[1]) / (fishers[0][p] + fishers[1][p])
    assert relative_error({"x": out[name].float()}, {"x": ref.float()}) < 1e-4


# ------------------------------------------------------------------------------ AdaMerging


def _entropy_with_weights(model: Any, tok: Any, lam: Tensor, fs: list[AdapterFactors]) -> float:
    merged = copy.deepcopy(model)
    mods = module_terms(fs)
    for m in mods:
        for i in range(len(fs)):
            a, b = m.expert(i)
            merged.get_submodule(m.path).weight.data += float(lam[i]) * (b @ a)
    prompts = [e for ex in EXAMPLES for e in ex]
    batch = encode(tok, prompts, answers=False)
    with torch.no_grad():
        logits = merged(input_ids=batch.ids, attention_mask=batch.mask).logits
    logp = torch.log_softmax(logits[torch.arange(len(prompts)), batch.last], -1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def test_prediction_entropy_matches_a_materialized_merge(tiny: tuple[Path, list[Path]]) -> None:
    base, experts = tiny
    fs = factors(experts)
    model, tok = load_base(str(base))
    mods = module_terms(fs)
    lam = torch.tensor([0.2, 0.7, 0.4])
    batch = encode(tok, [e for ex in EXAMPLES for e in ex], answers=False)
    with DeltaPatch(model, [m.path for m in mods]) as patch, torch.no_grad():
        patch.set_terms({m.path: (m.a, m.b, m.coef(lam)) for m in mods})
        got = float(prediction_entropy(model, patch.forward(batch).last_hidden_state, batch))
    assert got == pytest.approx(_entropy_with_weights(model, tok, lam, fs), rel=1e-4)


@pytest.mark.parametrize("name", ["adamerging", "adamerging_layer"])
def test_adamerging_lowers_the_prediction_entropy(tiny: tuple[Path, list[Path]], name: str) -> None:
    base, experts = tiny
    fs = factors(experts)
    model, tok = load_base(str(base))
    from mergeserve.adapters.merging.learned import adamerging_coefficients

    o = METHODS.get(name).resolve(MergeOptions(steps=30, lr=0.05), len(fs))
    mods, lam = adamerging_coefficients(fs, o, context(base), name == "adamerging_layer")
    assert lam.shape == ((3, len(mods)) if name == "adamerging_layer" else (3,))
    assert float(lam.min()) >= 0.0
    assert float(lam.max()) <= 1.0
    if name == "adamerging":
        before = _entropy_with_weights(model, tok, torch.full((3,), 0.3), fs)
        after = _entropy_with_weights(model, tok, lam, fs)
        assert after < before - 1e-3
        out = merge(name, fs, o, None, context(base))  # the same λ, as an adapter
        d, ds = dense(out), [dense(f) for f in fs]
        for k in d:
            ref = sum(float(lam[i]) * ds[i][k] for i in range(3))
            assert torch.allclose(d[k], ref, atol=1e-6)


# ------------------------------------------------------------------------------ CMA-ES


def test_cma_es_finds_the_minimum_of_an_ill_conditioned_quadratic() -> None:
    target = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5, -0.2], dtype=torch.float64)
    scales = torch.logspace(0, 3, 6, dtype=torch.float64)

    def f(x: Tensor) -> float:
        return float((scales * (x - target) ** 2).sum())

    best, fbest, history = cma_es(f, torch.zeros(6), 0.5, 250, seed=1)
    assert fbest < 1e-8
    assert torch.allclose(best, target, atol=1e-3)
    assert history[-1] < history[0]


def test_cma_es_solves_rosenbrock() -> None:
    def f(x: Tensor) -> float:
        return float((100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum())

    best, fbest, _ = cma_es(f, torch.zeros(4), 0.3, 400, seed=0)
    assert fbest < 1e-6
    assert torch.allclose(best, torch.ones(4, dtype=torch.float64), atol=1e-2)


def test_evolutionary_search_never_ends_worse_than_its_start(
    tiny: tuple[Path, list[Path]],
) -> None:
    base, experts = tiny
    fs = factors(experts)
    model, tok = load_base(str(base))
    dev = tuple(e for ex in EXAMPLES for e in ex[:2])
    out = merge("evolutionary", fs, MergeOptions(steps=4), None, context(base, dev))
    mods = module_terms(fs)

    def loss(adapter: AdapterFactors) -> float:
        terms = module_terms([adapter])
        batch = encode(tok, dev, answers=True)
        with DeltaPatch(model, [m.path for m in terms]) as patch, torch.no_grad():
            patch.set_terms(expert_terms(terms, 0))
            nll, n = answer_nll(model, patch.forward(batch).last_hidden_state, batch)
        return float(nll) / n

    start = merge("linear", fs)  # CMA-ES starts from 1/T each
    assert loss(out) <= loss(start) + 1e-6
    assert len(mods) == 21
    assert max(out.ranks.values()) == 12


# ------------------------------------------------------------------------------ errors


def test_data_methods_refuse_to_run_without_data(tiny: tuple[Path, list[Path]]) -> None:
    base, experts = tiny
    fs = factors(experts)
    for name in ("regmean", "regmean_pp", "fisher", "adamerging", "evolutionary"):
        assert METHODS.get(name).needs_data
        with pytest.raises(InvalidRequestError, match="needs the base model"):
            merge(name, fs)
    with pytest.raises(InvalidRequestError, match="2 example sets for 3 experts"):
        merge("regmean", fs, None, None, MergeContext(base, EXAMPLES[:2]))
    with pytest.raises(InvalidRequestError, match="expert #1 has none"):
        merge("fisher", fs, None, None, MergeContext(base, (EXAMPLES[0], (), EXAMPLES[2])))
    unlabelled = tuple(tuple(Example(e.prompt) for e in ex) for ex in EXAMPLES)
    with pytest.raises(InvalidRequestError, match="labelled dev"):
        merge("evolutionary", fs, MergeOptions(steps=1), None, MergeContext(base, unlabelled))


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (MergeOptions(steps=0), "steps must be >= 1"),
        (MergeOptions(population=1), "population must be >= 2"),
        (MergeOptions(lr=-1.0), "lr must be a positive"),
        (MergeOptions(alpha=math.nan), "alpha must be a finite"),
        (MergeOptions(beta=math.inf), "beta must be a finite"),
        (MergeOptions(samples=0), "samples must be >= 1"),
    ],
)
def test_bad_options_are_refused(opts: MergeOptions, match: str) -> None:
    m = METHODS.get("evolutionary") if opts.population else METHODS.get("adamerging")
    if opts.alpha is not None or opts.beta is not None:
        m = METHODS.get("lines")
    if opts.samples is not None:
        m = METHODS.get("regmean")
    with pytest.raises(InvalidRequestError, match=match):
        m.check(3, opts)


def test_options_a_method_does_not_use_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="regmean does not use steps"):
        METHODS.get("regmean").check(2, MergeOptions(steps=3))
    with pytest.raises(InvalidRequestError, match="pcb does not use alpha"):
        METHODS.get("pcb").check(2, MergeOptions(alpha=0.1))


def test_read_examples_names_the_bad_line(tmp_path: Path) -> None:
    p = tmp_path / "examples.jsonl"
    p.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c"}\n')
    assert read_examples(p) == (Example("a", "b"), Example("c", None))
    with pytest.raises(InvalidRequestError, match=r"examples.jsonl:3: needs an \"answer\""):
        read_examples(p, labelled=True)
    p.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(InvalidRequestError, match=r"examples\.jsonl:2: not JSON"):
        read_examples(p)
    p.write_text('{"prompt": ""}\n')
    with pytest.raises(InvalidRequestError, match='needs a non-empty "prompt"'):
        read_examples(p)
    p.write_text('{"prompt": "x", "answer": 3}\n')
    with pytest.raises(InvalidRequestError, match='"answer" must be a string'):
        read_examples(p)
    assert read_examples(tmp_path / "missing.jsonl") == ()
