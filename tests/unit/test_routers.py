"""Embedders and routers on real models: MiniLM from its wheel, a tiny llama built in code,
and the committed demo experts' example prompts (the routers' only data)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from mergeserve.adapters.lowrank import AdapterFactors, LowRank
from mergeserve.errors import AdapterError, ConfigurationError
from mergeserve.router.arrow import ArrowRouter
from mergeserve.router.base import Router, example_prompts, examples_digest, experts_examples, route
from mergeserve.router.embedders import (
    Embedder,
    HiddenStateEmbedder,
    SentenceEmbedder,
    decoder_layers,
)
from mergeserve.router.factory import load_router
from mergeserve.router.mlp import MLPRouter, MLPTrainConfig, train_mlp_router
from mergeserve.router.policy import RoutingPolicy
from mergeserve.router.prototype import PrototypeRouter
from mergeserve.tasks.generators import generate
from mergeserve.testing import make_tiny_llama

EXPERTS_DIR = Path(__file__).resolve().parents[2] / "examples" / "experts"
DEMO = experts_examples(EXPERTS_DIR) if EXPERTS_DIR.is_dir() else {}
needs_demo = pytest.mark.skipif(len(DEMO) < 3, reason="demo experts not committed")


class Memo:
    """Real MiniLM vectors, each text embedded once per test module (the routers under test
    re-embed the same examples and test prompts many times)."""

    def __init__(self, inner: SentenceEmbedder):
        self.inner = inner
        self.name, self.dim = inner.name, inner.dim
        self.cache: dict[str, Tensor] = {}

    def embed(self, texts: Sequence[str]) -> Tensor:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:
            self.cache.update(zip(todo, self.inner.embed(todo), strict=True))
        return torch.stack([self.cache[t] for t in texts]) if texts else self.inner.embed([])


@pytest.fixture(scope="module")
def sentence() -> SentenceEmbedder:
    return SentenceEmbedder(threads=2)


@pytest.fixture(scope="module")
def minilm(sentence: SentenceEmbedder) -> Memo:
    return Memo(sentence)


def top1(router: Router, prompts: Sequence[str]) -> list[str]:
    return [router.experts[i] for i in router.logits(prompts).argmax(dim=1).tolist()]


def accuracy(router: Router, experts: Sequence[str], split: str = "test", n: int = 40) -> float:
    samples = [s for e in experts for s in generate(e, split, n)]  # type: ignore[arg-type]
    preds = top1(router, [s.prompt for s in samples])
    return sum(p == s.task for p, s in zip(preds, samples, strict=True)) / len(samples)


# ------------------------------------------------------------------------------ embedders


def test_minilm_embeddings(sentence: SentenceEmbedder) -> None:
    minilm = sentence
    texts = [
        "What is the capital of France?",
        "Which city is France's capital?",
        "Sort these numbers: 5 3 9",
    ]
    emb = minilm.embed(texts)
    assert emb.shape == (3, 384)
    assert emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.3  # paraphrases are close, other tasks far
    # Batching and padding do not change a text's embedding.
    alone = torch.cat([minilm.embed([t]) for t in texts])
    assert torch.allclose(alone, emb, atol=1e-5)
    assert minilm.embed([]).shape == (0, 384)
    with pytest.raises(TypeError, match="not one string"):
        minilm.embed("one string")


def test_minilm_trace_matches_the_eager_model(sentence: SentenceEmbedder) -> None:
    eager = SentenceEmbedder(trace=False)
    for texts in (
        ["a"],
        ["one short", "and a much longer text, padded against the first one in its batch"],
        [" ".join(["word"] * 300)],  # truncated at max_length
    ):
        assert torch.allclose(sentence.embed(texts), eager.embed(texts), atol=1e-5)


def test_minilm_int8_stays_close(sentence: SentenceEmbedder) -> None:
    q = SentenceEmbedder(quantize=True)
    texts = ["Add 12 and 30.", "Convert to JSON: a=1, b=2"]
    cos = (q.embed(texts) * sentence.embed(texts)).sum(dim=1)
    assert q.name == "minilm-int8"
    assert bool((cos > 0.85).all())
    # A text's vector does not depend on the texts embedded with it (dynamic int8 scales
    # a whole batch at once: batched, the same prompt moved to cosine 0.967 of itself).
    alone = q.embed(["Find the total of 577 and 364."])
    others = [f"a much longer neighbour number {i}, padded against the rest" for i in range(9)]
    batched = q.embed([*others, "Find the total of 577 and 364."])[-1:]
    assert torch.equal(alone, batched)


def test_hidden_state_embedder(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "tiny", num_layers=3)
    emb = HiddenStateEmbedder(base, layer=2)
    assert len(decoder_layers(emb.model)) == 2  # only the layers up to the pooled one run
    out = emb.embed(["hello world", "a b c d e f"])
    assert out.shape == (2, 128)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    # The pooled state is layer 2's own output: the full model's hidden_states[2].
    from transformers import AutoModel

    full = AutoModel.from_pretrained(base).eval()
    enc = emb.tokenize(["hello world"])
    with torch.no_grad():
        h = full(**enc, output_hidden_states=True).hidden_states[2]
    want = torch.nn.functional.normalize(h.mean(dim=1), dim=-1)
    assert torch.allclose(out[:1], want, atol=1e-4)
    with pytest.raises(ValueError, match=r"layer must be in 1\.\.3"):
        HiddenStateEmbedder(base, layer=4)
    with pytest.raises(ConfigurationError):
        HiddenStateEmbedder(tmp_path / "nowhere")


# ------------------------------------------------------------------------------ examples


def test_example_prompts_errors(tmp_path: Path) -> None:
    d = tmp_path / "e"
    d.mkdir()
    with pytest.raises(AdapterError, match=r"no examples\.jsonl"):
        example_prompts(d)
    (d / "examples.jsonl").write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(AdapterError, match=r"examples\.jsonl:2: not JSON"):
        example_prompts(d)
    (d / "examples.jsonl").write_text('{"prompt": 3}\n')
    with pytest.raises(AdapterError, match=':1: expected an object with a "prompt"'):
        example_prompts(d)
    (d / "examples.jsonl").write_text("\n")
    with pytest.raises(AdapterError, match="no example prompts"):
        example_prompts(d)
    (d / "examples.jsonl").write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c"}\n')
    assert example_prompts(d) == ["a", "c"]


# ----------------------------------------------------------------------------- prototype


@needs_demo
def test_prototype_router_on_unseen_phrasings(minilm: Memo) -> None:
    router = PrototypeRouter.from_examples(minilm, DEMO)
    assert set(router.experts) == set(DEMO)
    assert accuracy(router, list(DEMO)) >= 0.98
    (r,) = route(router, RoutingPolicy(), ["What is the capital of Peru?"])
    assert r.key.top == "capital"
    assert r.key.as_dict()["capital"] >= 0.9


@needs_demo
def test_prototype_max_aggregate(minilm: Memo) -> None:
    router = PrototypeRouter.from_examples(minilm, DEMO, aggregate="max")
    assert accuracy(router, list(DEMO)) >= 0.98
    # max: a request identical to an example scores cosine 1 for its expert.
    name = next(iter(DEMO))
    sims = router.similarities(minilm.embed([DEMO[name][0]]))
    assert sims[0, router.experts.index(name)] == pytest.approx(1.0, abs=1e-5)


@needs_demo
@pytest.mark.parametrize("left_out", sorted(DEMO))
def test_prototype_leave_one_out_and_add_back(minilm: Memo, left_out: str) -> None:
    """An expert added with its 20 example prompts is routed to, with no training."""
    others = {e: p for e, p in DEMO.items() if e != left_out}
    router = PrototypeRouter.from_examples(minilm, others)
    assert left_out not in router.experts
    router.add_expert(left_out, DEMO[left_out])
    assert accuracy(router, [left_out]) >= 0.95
    assert accuracy(router, list(DEMO), n=20) >= 0.95


def test_prototype_add_remove(minilm: Memo) -> None:
    router = PrototypeRouter.from_examples(
        minilm,
        {"a": ["apples and pears", "fruit salad"], "b": ["the stock market fell"]},
        aggregate="max",
    )
    router.add_expert("c", ["football results", "the match ended in a draw"])
    with pytest.raises(ValueError, match="already routed"):
        router.add_expert("c", ["x"])
    with pytest.raises(ValueError, match="no example prompts"):
        router.add_expert("d", ["  "])
    assert top1(router, ["who won the match?", "shares dropped today"]) == ["c", "b"]
    router.remove_expert("b")
    assert router.experts == ("a", "c")
    assert top1(router, ["who won the match?", "a bowl of fruit"]) == ["c", "a"]
    with pytest.raises(KeyError):
        router.remove_expert("b")


def test_with_and_without_expert_leave_the_original_as_it_was(minilm: Memo, tmp_path: Path) -> None:
    """Copy-on-write: a request routed by the old router keeps a consistent view."""
    base = {"a": ["apples and pears", "fruit salad"], "b": ["the stock market fell"]}
    router = PrototypeRouter.from_examples(minilm, base)
    before = router.logits(["who won the match?"]).clone()
    c = tmp_path / "c"
    c.mkdir()
    (c / "examples.jsonl").write_text(
        '{"prompt": "football results"}\n{"prompt": "the match ended in a draw"}\n'
    )
    grown = router.with_expert("c", c)
    assert router.experts == ("a", "b")
    assert torch.equal(router.logits(["who won the match?"]), before)
    assert grown.experts == ("a", "b", "c")
    assert top1(grown, ["who won the match?"]) == ["c"]
    shrunk = grown.without_expert("a")
    assert shrunk.experts == ("b", "c")
    assert grown.experts == ("a", "b", "c")
    (c / "examples.jsonl").write_text("\n")
    with pytest.raises(AdapterError, match="no example prompts"):
        router.with_expert("c", c)
    assert router.experts == ("a", "b")


@needs_demo
def test_with_expert_on_an_mlp_routes_the_new_expert_by_prototypes(
    minilm: Memo, tmp_path: Path
) -> None:
    left_out = "to_json"
    others = {e: p for e, p in DEMO.items() if e != left_out}
    mlp = train_mlp_router(
        minilm,
        others,
        MLPTrainConfig(epochs=60),
        fallback=PrototypeRouter.from_examples(minilm, others),
    )
    d = tmp_path / left_out
    d.mkdir()
    (d / "examples.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in DEMO[left_out])
    )
    grown = mlp.with_expert(left_out, d)
    assert left_out not in mlp.experts  # the original is untouched
    assert isinstance(grown, MLPRouter)
    assert grown.untrained == (left_out,)
    assert accuracy(grown, [left_out]) >= 0.95
    shrunk = grown.without_expert(sorted(others)[0])
    assert sorted(others)[0] not in shrunk.experts
    assert sorted(others)[0] in grown.experts


# ----------------------------------------------------------------------------------- MLP


@needs_demo
def test_mlp_router_trains_saves_loads(
    minilm: Memo, sentence: SentenceEmbedder, tmp_path: Path
) -> None:
    config = MLPTrainConfig(epochs=60, seed=0)
    router = train_mlp_router(minilm, DEMO, config)
    assert accuracy(router, list(DEMO)) >= 0.98
    router.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "mlp.json").read_text())
    assert meta["embedder"] == "minilm"
    assert meta["experts"] == list(DEMO)
    loaded = MLPRouter.load(tmp_path / "r", minilm)
    prompts = [s.prompt for s in generate(next(iter(DEMO)), "test", 8)]
    assert torch.allclose(loaded.logits(prompts), router.logits(prompts), atol=1e-5)
    # on the embedder itself, whose vectors are inference tensors (benchmarks/routing.py
    # calls logits() outside any inference_mode: it used to fail in autograd)
    raw = MLPRouter.load(tmp_path / "r", sentence)
    assert torch.allclose(raw.logits(prompts), router.logits(prompts), atol=1e-4)
    # Another embedder's vectors mean nothing to it.
    with pytest.raises(ConfigurationError, match="trained on embedder 'minilm'"):
        MLPRouter.load(tmp_path / "r", SentenceEmbedder(quantize=True))
    with pytest.raises(ConfigurationError, match="train-router"):
        MLPRouter.load(tmp_path / "nothing", minilm)


@needs_demo
@pytest.mark.parametrize("left_out", sorted(DEMO)[:3])
def test_mlp_falls_back_to_prototypes_for_a_new_expert(minilm: Memo, left_out: str) -> None:
    others = {e: p for e, p in DEMO.items() if e != left_out}
    proto = PrototypeRouter.from_examples(minilm, others)
    mlp = train_mlp_router(minilm, others, MLPTrainConfig(epochs=60), fallback=proto)
    proto.add_expert(left_out, DEMO[left_out])  # hot-added: the MLP never saw it
    assert mlp.untrained == (left_out,)
    assert set(mlp.experts) == set(DEMO)
    assert accuracy(mlp, [left_out]) >= 0.95
    assert accuracy(mlp, list(DEMO), n=20) >= 0.95


@needs_demo
def test_mlp_changed_examples_count_as_untrained(minilm: Memo, tmp_path: Path) -> None:
    train_mlp_router(minilm, DEMO, MLPTrainConfig(epochs=5)).save(tmp_path / "r")
    changed = dict(DEMO)
    name = next(iter(DEMO))
    changed[name] = [*DEMO[name][:-1], "a different example"]
    proto = PrototypeRouter.from_examples(minilm, changed)
    loaded = MLPRouter.load(tmp_path / "r", minilm, proto, changed)
    assert loaded.untrained == (name,)
    assert examples_digest(DEMO[name]) == loaded.classes[name]


def test_mlp_needs_two_experts(minilm: Memo) -> None:
    with pytest.raises(ValueError, match="at least two"):
        train_mlp_router(minilm, {"a": ["x", "y"]})
    with pytest.raises(ValueError, match="epochs"):
        MLPTrainConfig(epochs=0)


def test_load_router_errors(tmp_path: Path, minilm: Memo) -> None:
    with pytest.raises(ConfigurationError, match="unknown router 'nope'"):
        load_router("nope", tmp_path, embedder=minilm)
    with pytest.raises(ConfigurationError, match="needs an embedder"):
        load_router("prototype", tmp_path)
    with pytest.raises(ConfigurationError, match="base model dir"):
        load_router("arrow", tmp_path)


# --------------------------------------------------------------------------------- Arrow


def _module_inputs(emb: HiddenStateEmbedder, kind: str, layer: int, text: str) -> Tensor:
    got: list[Tensor] = []
    mod = decoder_layers(emb.model)[layer].get_submodule(kind)
    h = mod.register_forward_pre_hook(lambda _m, args: got.append(args[0][0].clone()))
    try:
        with torch.no_grad():
            emb.model(**emb.tokenize([text]))
    finally:
        h.remove()
    return got[0]  # [T, in]


def _expert_along(direction: Tensor, kind: str, layer: int, out: int, seed: int) -> AdapterFactors:
    """A rank-2 adapter whose top right singular vector is `direction`."""
    g = torch.Generator().manual_seed(seed)
    second = torch.randn(direction.shape[0], generator=g)
    second -= (second @ direction) / (direction @ direction) * direction
    a = torch.stack([direction / direction.norm(), second / second.norm()])[None]  # [1, 2, in]
    b = torch.randn(1, out, 2, generator=g)
    b[..., 0] *= 10 / b[..., 0].norm()  # σ₁ ≫ σ₂
    b[..., 1] *= 0.1 / b[..., 1].norm()
    return AdapterFactors({kind: LowRank(a, b)}, {kind: (layer,)})


def test_arrow_prototypes_route_by_module_inputs(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "tiny", num_layers=2)
    runner = HiddenStateEmbedder(base, layer=None)
    kind, layer = "mlp.down_proj", 1
    texts = ["zzz qqq xxx zzz qqq", "the cat sat on the mat"]
    directions = [_module_inputs(runner, kind, layer, t).mean(dim=0) for t in texts]
    arrow = ArrowRouter(runner, token_temperature=0.05)
    for i, d in enumerate(directions):
        arrow.add_expert(f"e{i}", _expert_along(d, kind, layer, out=128, seed=i))
    assert top1(arrow, texts) == ["e0", "e1"]
    # Its request weights are mean per-token coefficients: a distribution.
    assert torch.allclose(arrow.logits(texts).exp().sum(dim=1), torch.ones(2), atol=1e-5)
    # The prototype is the top right singular vector of B·A (up to sign).
    lr = _expert_along(directions[0], kind, layer, out=128, seed=0).groups[kind]
    v = torch.linalg.svd(lr.to_dense()[0]).Vh[0]
    proto = arrow._protos[(kind, layer)][0]
    assert abs(float(proto @ v)) == pytest.approx(1.0, abs=1e-4)
    arrow.remove_expert("e0")
    assert arrow.experts == ("e1",)
    assert arrow._protos[(kind, layer)].shape[0] == 1
    with pytest.raises(ValueError, match="already routed"):
        arrow.add_expert("e1", _expert_along(directions[1], kind, layer, out=128, seed=1))
    bad = AdapterFactors(
        {kind: LowRank(torch.randn(1, 2, 256), torch.randn(1, 128, 2))}, {kind: (5,)}
    )
    with pytest.raises(AdapterError, match="layer 5 is not in the base model"):
        arrow.add_expert("e9", bad)


def test_embedder_protocol(sentence: SentenceEmbedder, minilm: Memo) -> None:
    assert isinstance(sentence, Embedder)
    assert isinstance(minilm, Embedder)


def test_the_router_kinds_a_server_accepts_are_the_factory_table() -> None:
    from typing import get_args

    from mergeserve.config import RouterSettings
    from mergeserve.router.factory import ROUTERS

    assert set(get_args(RouterSettings.model_fields["kind"].annotation)) == set(ROUTERS)
