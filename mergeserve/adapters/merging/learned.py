"""Merge methods that learn from data: RegMean, RegMean++, Fisher merging, AdaMerging
(task-wise and layer-wise) and an evolutionary (CMA-ES) search of the coefficients.

Each runs the base model with the experts' deltas patched in (see `calibration.py`) on
the experts' `examples.jsonl` (a `MergeContext`), and is declared like the data-free
methods, so each is a `static:<method>` arm. Parameter defaults are in the declarations
(`mergeserve methods` lists them). What each learns:

* `regmean` (Jin et al., ICLR 2023): per linear layer, the W minimising
  Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖², closed form W = Σᵢ Wᵢ Gᵢ (Σⱼ Gⱼ)⁻¹ with Gᵢ = XᵢᵀXᵢ the Gram of the
  layer's inputs in expert i's model on expert i's examples (mean over tokens), its
  off-diagonal scaled by `alpha`. The base weight cancels, so Δ = Σᵢ Bᵢ (Aᵢ Gᵢ G⁻¹):
  on LoRA experts RegMean is *exact in low rank* (rank Σ rᵢ, no dense delta, no SVD).
* `regmean_pp` (RegMean++, Nguyen et al. 2025): the same solve, but a layer's Grams are
  taken with every earlier layer already merged (the inputs the merged model will see),
  sweeping the layers in order; the layer itself is expert i's.
* `fisher` (Matena & Raffel, NeurIPS 2022): Δ = Σᵢ Fᵢ ⊙ Δᵢ / Σᵢ Fᵢ with Fᵢ the diagonal
  empirical Fisher, E[(∂ log p(answer | prompt) / ∂W)²] per example in expert i's model,
  each Fᵢ scaled to mean 1 (experts weigh alike) and floored at 1e-6; dense, then SVD.
* `adamerging` / `adamerging_layer` (Yang et al., ICLR 2024): coefficients λᵢ (one per
  expert, or one per expert and module) in [0, 1], initialised to 0.3, that minimise the
  entropy of the next-token prediction at the end of unlabelled prompts (the experts'
  example prompts, answers unused), by Adam (`steps` steps of 8 prompts at `lr`); exact
  (λ scales each expert's B).
* `evolutionary`: CMA-ES (Hansen's (μ/μ_w, λ) rules) over one coefficient per expert,
  from 1/T each with σ 0.1, `steps` generations of `population`, minimising the mean
  answer loss (teacher forced) on `samples` dev examples (`MergeContext.dev`, default
  the experts' examples); the best candidate seen, the start included, wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mergeserve.adapters.calibration import (
    Batch,
    DeltaPatch,
    Example,
    ModuleTerms,
    Term,
    answer_logits,
    batches,
    decoder_layer,
    encode,
    expert_terms,
    load_base,
    module_terms,
    torch_threads,
)
from mergeserve.adapters.lowrank import (
    AdapterFactors,
    LowRank,
    ProgressBar,
    factor_layers,
    union_layout,
)
from mergeserve.adapters.merging.method import (
    Declarations,
    MergeContext,
    PerExperts,
    need,
    truncated,
)
from mergeserve.adapters.merging.options import MergeOptions
from mergeserve.errors import InvalidRequestError

declared = Declarations()

ALL_EXAMPLES = PerExperts("all", lambda n: None)
"""The default of `samples`: every example of each expert."""

ADAMERGING_INIT = 0.3
FISHER_FLOOR = 1e-6
DEV_CAP = 24
"""The evolutionary search scores candidates on at most this many dev examples (spread
evenly over the dev set): each candidate costs a forward pass over all of them."""
ADAMERGING_BATCH = 8


def _prepared(
    experts: Sequence[AdapterFactors], ctx: MergeContext | None
) -> tuple[MergeContext, Any, Any, list[ModuleTerms]]:
    """(context, base model, tokenizer, the experts' modules side by side)."""
    if ctx is None:  # merge() refuses first; this keeps the type checker honest
        raise ValueError("this method needs a MergeContext")
    model, tok = load_base(str(ctx.base_dir))
    return ctx, model, tok, module_terms(experts)


def _limit(rows: Sequence[Example], n: int | None) -> list[Example]:
    return list(rows if n is None else rows[:n])


def _evenly(rows: Sequence[Example], n: int) -> list[Example]:
    if len(rows) <= n:
        return list(rows)
    return [rows[(i * len(rows)) // n] for i in range(n)]


def _assemble(
    experts: Sequence[AdapterFactors],
    mods: Sequence[ModuleTerms],
    ab: dict[str, tuple[Tensor, Tensor]],
) -> AdapterFactors:
    """An adapter from per-module (A [R, in], B [out, R]), laid out like the experts'."""
    layout = union_layout(experts)
    by_kind: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    for m in mods:
        by_kind.setdefault(m.kind, {})[m.layer] = ab[m.path]
    groups = {}
    for kind, lay in layout.items():
        rows = [by_kind[kind][layer] for layer in lay]
        groups[kind] = LowRank(
            torch.stack([a for a, _ in rows]).contiguous(),
            torch.stack([b for _, b in rows]).contiguous(),
        )
    return AdapterFactors(groups, layout, experts[0].prefix)


def _scaled(
    experts: Sequence[AdapterFactors], mods: Sequence[ModuleTerms], coef: Callable[[int], Tensor]
) -> AdapterFactors:
    """Σᵢ cᵢ Δᵢ per module, exactly: module k's B columns times coef(k) [T]."""
    ab = {m.path: (m.a, m.b * m.coef(coef(k)).to(m.b.dtype)) for k, m in enumerate(mods)}
    return _assemble(experts, mods, ab)


# ------------------------------------------------------------------------------ RegMean


def reduce_off_diagonal(g: Tensor, alpha: float) -> Tensor:
    """alpha·G + (1 − alpha)·diag(G): RegMean's shrinkage of the Gram's off-diagonal."""
    return alpha * g + (1 - alpha) * torch.diag_embed(torch.diagonal(g))


def regmean_solve(a: Sequence[Tensor], grams: Sequence[Tensor], alpha: float) -> list[Tensor]:
    """RegMean for LoRA factors: Aᵢ' = Aᵢ Gᵢ (Σⱼ Gⱼ)⁻¹, so Σᵢ Bᵢ Aᵢ' is the closed-form
    merge of the deltas Bᵢ Aᵢ (float64; a tiny ridge keeps Σ G invertible)."""
    gs = [reduce_off_diagonal(g.double(), alpha) for g in grams]
    total = torch.stack(gs).sum(0)
    ridge = 1e-8 * (torch.trace(total) / total.shape[0]).clamp_min(1e-30)
    total = total + ridge * torch.eye(total.shape[0], dtype=total.dtype)
    return [
        torch.linalg.solve(total, (ai.double() @ gi).T).T.float()
        for ai, gi in zip(a, gs, strict=True)
    ]


def _regmean_module(m: ModuleTerms, grams: Sequence[Tensor], alpha: float) -> tuple[Tensor, Tensor]:
    a_new = regmean_solve([m.expert(i)[0] for i in range(len(m.ranks))], grams, alpha)
    return torch.cat(a_new), m.b


@declared.method(
    "regmean",
    kind="exact",
    params={"alpha": 0.9, "samples": ALL_EXAMPLES},
    source="Jin et al. 2023",
    needs_data=True,
    arm=MergeOptions(),
)
def regmean(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """RegMean (Jin et al.): per layer, the least-squares merge under each expert's inputs."""
    c, model, tok, mods = _prepared(experts, ctx)
    alpha = need(o.alpha)
    paths = [m.path for m in mods]
    grams: list[dict[str, Tensor]] = []
    with torch_threads(c.threads), DeltaPatch(model, paths) as patch:
        for i, ex in enumerate(c.examples):
            patch.set_terms(expert_terms(mods, i))
            grams.append(patch.input_grams(tok, _limit(ex, o.samples), paths))
            if progress is not None:
                progress.update(1)
    ab = {m.path: _regmean_module(m, [g[m.path] for g in grams], alpha) for m in mods}
    return truncated(_assemble(experts, mods, ab), o)


@declared.method(
    "regmean_pp",
    kind="exact",
    params={"alpha": 0.9, "samples": ALL_EXAMPLES},
    source="Nguyen et al. 2025",
    needs_data=True,
    arm=MergeOptions(),
)
def regmean_pp(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """RegMean++ (Nguyen et al.): RegMean with each layer's inputs from the merged layers
    before it, layer by layer."""
    c, model, tok, mods = _prepared(experts, ctx)
    alpha = need(o.alpha)
    examples = [_limit(ex, o.samples) for ex in c.examples]
    merged: dict[str, tuple[Tensor, Tensor]] = {}
    layers = sorted({m.layer for m in mods})
    with torch_threads(c.threads), DeltaPatch(model, [m.path for m in mods]) as patch:
        for layer in layers:
            here = [m for m in mods if m.layer == layer]
            block = decoder_layer(model, here[0])
            grams: list[dict[str, Tensor]] = []
            for i, ex in enumerate(examples):
                terms: dict[str, Term] = {}
                for m in mods:
                    if m.path in merged:
                        a, b = merged[m.path]
                        terms[m.path] = (a, b, torch.ones(a.shape[0]))
                    else:
                        terms[m.path] = (m.a, m.b, m.one_hot(i))
                patch.set_terms(terms)
                with patch.stopping_after(block):
                    grams.append(patch.input_grams(tok, ex, [m.path for m in here]))
            for m in here:
                merged[m.path] = _regmean_module(m, [g[m.path] for g in grams], alpha)
            if progress is not None:
                progress.update(1)
    return truncated(_assemble(experts, mods, merged), o)


# ------------------------------------------------------------------------------ Fisher


def _hidden(patch: DeltaPatch, batch: Batch) -> Tensor:
    out = patch.forward(batch)
    return out.last_hidden_state  # type: ignore[no-any-return]


def answer_nll(model: Any, hidden: Tensor, batch: Batch) -> tuple[Tensor, int]:
    """(Σ −log p of the answer tokens, their count)."""
    logits, target = answer_logits(model, hidden, batch.labels)
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    return nll, int(target.numel())


def fisher_diagonal(
    model: torch.nn.Module,
    patch: DeltaPatch,
    tokenizer: object,
    examples: Sequence[Example],
    paths: Sequence[str],
) -> dict[str, Tensor]:
    """{path: E[(∂ log p(answer | prompt) / ∂W)²]} over the examples, one per backward
    pass (a per-example gradient squared, not a squared batch gradient)."""
    weights = [patch.modules[p].weight for p in paths]
    fisher = [torch.zeros_like(w) for w in weights]
    labelled = [e for e in examples if e.answer]
    for w in weights:
        w.requires_grad_(True)
    try:
        for e in labelled:
            batch = encode(tokenizer, [e], answers=True)
            nll, _ = answer_nll(model, _hidden(patch, batch), batch)
            grads = torch.autograd.grad(nll, weights)
            for f, g in zip(fisher, grads, strict=True):
                f.add_(g.square())
    finally:
        for w in weights:
            w.requires_grad_(False)
    n = max(len(labelled), 1)
    return {p: f / n for p, f in zip(paths, fisher, strict=True)}


@declared.method(
    "fisher",
    kind="dense",
    params={"samples": ALL_EXAMPLES},
    source="Matena & Raffel 2022",
    needs_data=True,
    arm=MergeOptions(),
)
def fisher(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """Fisher merging (Matena & Raffel): deltas averaged by their diagonal Fisher; SVD."""
    c, model, tok, mods = _prepared(experts, ctx)
    paths = [m.path for m in mods]
    num: dict[str, Tensor] = {}
    den: dict[str, Tensor] = {}
    with torch_threads(c.threads), DeltaPatch(model, paths) as patch:
        for i, ex in enumerate(c.examples):
            patch.set_terms(expert_terms(mods, i))
            f = fisher_diagonal(model, patch, tok, _limit(ex, o.samples), paths)
            total = sum(float(v.sum()) for v in f.values())
            count = sum(v.numel() for v in f.values())
            mean = total / count if total > 0 else 1.0
            for m in mods:
                fi = (f.pop(m.path) / mean).clamp_min_(FISHER_FLOOR)
                a, b = m.expert(i)
                num[m.path] = num.get(m.path, 0) + fi * (b @ a)
                den[m.path] = den.get(m.path, 0) + fi
            if progress is not None:
                progress.update(1)
    layout = union_layout(experts)
    groups = {}
    for kind in layout:  # as dense_merge: rank Σ rᵢ of the kind, or o.rank
        here = sorted((m for m in mods if m.kind == kind), key=lambda m: m.layer)
        budget = o.rank or sum(e.groups[kind].rank for e in experts if kind in e.groups)
        cap = min(budget, here[0].b.shape[0], here[0].a.shape[1])
        merged = (num.pop(m.path) / den.pop(m.path) for m in here)
        groups[kind] = factor_layers(merged, cap, o.energy)
    return AdapterFactors(groups, layout, experts[0].prefix)


# ------------------------------------------------------------------------------ AdaMerging


def prediction_entropy(model: Any, hidden: Tensor, batch: Batch) -> Tensor:
    """Mean entropy of the next-token distribution at each prompt's last position."""
    h = hidden[torch.arange(hidden.shape[0]), batch.last]
    logp = torch.log_softmax(model.lm_head(h).float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


ADAMERGING_PARAMS = {"steps": 40, "lr": 0.01, "samples": ALL_EXAMPLES, "seed": 0}
"""Both AdaMerging methods' parameters and defaults."""


def adamerging_coefficients(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    ctx: MergeContext | None,
    layer_wise: bool,
    progress: ProgressBar | None = None,
) -> tuple[list[ModuleTerms], Tensor]:
    """(modules, λ) learned by entropy minimisation: λ is [T] or [T, modules], in [0, 1]."""
    c, model, tok, mods = _prepared(experts, ctx)
    t = len(experts)
    prompts = [e for ex in c.examples for e in _limit(ex, o.samples)]
    g = torch.Generator().manual_seed(need(o.seed))
    prompts = [prompts[i] for i in torch.randperm(len(prompts), generator=g).tolist()]
    encoded = list(batches(tok, prompts, answers=False, size=ADAMERGING_BATCH))
    shape = (t, len(mods)) if layer_wise else (t,)
    lam = torch.full(shape, ADAMERGING_INIT, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=need(o.lr))
    steps = need(o.steps)
    with torch_threads(c.threads), DeltaPatch(model, [m.path for m in mods]) as patch:
        for step in range(steps):
            lc = lam.clamp(0.0, 1.0)
            patch.set_terms(
                {
                    m.path: (m.a, m.b, m.coef(lc[:, k] if layer_wise else lc))
                    for k, m in enumerate(mods)
                }
            )
            batch = encoded[step % len(encoded)]
            loss = prediction_entropy(model, _hidden(patch, batch), batch)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if progress is not None:
                progress.update(1)
    return mods, lam.detach().clamp(0.0, 1.0)


@declared.method(
    "adamerging",
    kind="exact",
    params=ADAMERGING_PARAMS,
    source="Yang et al. 2024",
    needs_data=True,
    arm=MergeOptions(),
)
def adamerging(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """AdaMerging, task-wise (Yang et al.): one λ per expert, by entropy minimisation."""
    mods, lam = adamerging_coefficients(experts, o, ctx, False, progress)
    return truncated(_scaled(experts, mods, lambda k: lam), o)


@declared.method(
    "adamerging_layer",
    kind="exact",
    params=ADAMERGING_PARAMS,
    source="Yang et al. 2024",
    needs_data=True,
    arm=MergeOptions(),
)
def adamerging_layer(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """AdaMerging, layer-wise: one λ per expert and module, by entropy minimisation."""
    mods, lam = adamerging_coefficients(experts, o, ctx, True, progress)
    return truncated(_scaled(experts, mods, lambda k: lam[:, k]), o)


# ------------------------------------------------------------------------------ CMA-ES


def cma_population(n: int) -> int:
    """CMA-ES's default population for n coordinates: 4 + ⌊3 ln n⌋."""
    return 4 + int(3 * math.log(n))


def cma_es(
    f: Callable[[Tensor], float],
    x0: Tensor,
    sigma: float,
    generations: int,
    popsize: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, float, list[float]]:
    """Minimise f by CMA-ES (Hansen, "The CMA Evolution Strategy: A Tutorial", 2016:
    weighted recombination, cumulative step-size adaptation, rank-one and rank-μ updates).

    x0 is evaluated first, so the result is never worse than the starting point.
    Returns (best x seen, its f, the best f of each generation). float64 throughout.
    """
    n = x0.numel()
    lam = popsize or cma_population(n)
    mu = lam // 2
    w = torch.log(torch.tensor(mu + 0.5, dtype=torch.float64)) - torch.log(
        torch.arange(1, mu + 1, dtype=torch.float64)
    )
    w = w / w.sum()
    mueff = float(1 / (w**2).sum())
    cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
    cs = (mueff + 2) / (n + mueff + 5)
    c1 = 2 / ((n + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    damps = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
    gen = torch.Generator().manual_seed(seed)
    m = x0.double().flatten().clone()
    pc = torch.zeros(n, dtype=torch.float64)
    ps = torch.zeros(n, dtype=torch.float64)
    b = torch.eye(n, dtype=torch.float64)
    d = torch.ones(n, dtype=torch.float64)
    cov = torch.eye(n, dtype=torch.float64)
    best_x, best_f, history = m.clone(), f(m.clone()), []
    for g in range(generations):
        z = torch.randn(lam, n, generator=gen, dtype=torch.float64)
        y = (z * d) @ b.T
        xs = m + sigma * y
        fs = [f(x) for x in xs]
        order = sorted(range(lam), key=lambda k: fs[k])
        if fs[order[0]] < best_f:
            best_f, best_x = fs[order[0]], xs[order[0]].clone()
        history.append(fs[order[0]])
        y_sel = y[order[:mu]]
        y_w = (w[:, None] * y_sel).sum(0)
        m = m + sigma * y_w
        inv_sqrt = b @ torch.diag(1 / d) @ b.T
        ps = (1 - cs) * ps + math.sqrt(cs * (2 - cs) * mueff) * (inv_sqrt @ y_w)
        norm_ps = float(ps.norm())
        hsig = norm_ps / math.sqrt(1 - (1 - cs) ** (2 * (g + 1))) / chi_n < 1.4 + 2 / (n + 1)
        pc = (1 - cc) * pc + (math.sqrt(cc * (2 - cc) * mueff) * y_w if hsig else 0.0)
        rank_mu = (w[:, None, None] * y_sel[:, :, None] * y_sel[:, None, :]).sum(0)
        delta = 0.0 if hsig else cc * (2 - cc)
        cov = (1 - c1 - cmu) * cov + c1 * (torch.outer(pc, pc) + delta * cov) + cmu * rank_mu
        sigma *= math.exp((cs / damps) * (norm_ps / chi_n - 1))
        cov = (cov + cov.T) / 2
        evals, b = torch.linalg.eigh(cov)
        d = evals.clamp_min(1e-20).sqrt()
    return best_x, best_f, history


@declared.method(
    "evolutionary",
    kind="exact",
    params={
        "steps": 8,
        "population": PerExperts("4 + ⌊3 ln T⌋", cma_population),
        "samples": DEV_CAP,
        "seed": 0,
    },
    source="CMA-ES (Hansen)",
    needs_data=True,
    arm=MergeOptions(),
)
def evolutionary(
    experts: Sequence[AdapterFactors],
    o: MergeOptions,
    progress: ProgressBar | None = None,
    ctx: MergeContext | None = None,
) -> AdapterFactors:
    """CMA-ES over one coefficient per expert, minimising the answer loss on dev examples."""
    c, model, tok, mods = _prepared(experts, ctx)
    dev = _evenly(c.labelled_dev, need(o.samples))
    if not dev:
        raise InvalidRequestError("evolutionary needs labelled dev examples", param="experts")
    encoded = list(batches(tok, dev, answers=True, size=16))
    t = len(experts)
    with torch_threads(c.threads), DeltaPatch(model, [m.path for m in mods]) as patch:

        @torch.no_grad()
        def loss(x: Tensor) -> float:
            coef = x.float()
            patch.set_terms({m.path: (m.a, m.b, m.coef(coef)) for m in mods})
            total, count = 0.0, 0
            for batch in encoded:
                nll, n = answer_nll(model, _hidden(patch, batch), batch)
                total, count = total + float(nll), count + n
            if progress is not None:
                progress.update(1)
            return total / max(count, 1)

        best, _, _ = cma_es(
            loss,
            torch.full((t,), 1.0 / t, dtype=torch.float64),
            0.1,
            need(o.steps),
            need(o.population),
            need(o.seed),
        )
    coef = best.float()
    return truncated(_scaled(experts, mods, lambda k: coef), o)
