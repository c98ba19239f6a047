"""Open-world routing: the gate's calibration, the none outcome in the policy, and the
routers that carry a gate (real MiniLM, the committed demo experts' examples and the
general split's calibration part; the dev and test parts are never used here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mergeserve.router.base import experts_examples, route
from mergeserve.router.embedders import SentenceEmbedder
from mergeserve.router.mlp import MLPTrainConfig, train_mlp_router
from mergeserve.router.open_world import (
    GateConfig,
    OpenWorldGate,
    Similarities,
    auroc,
    leave_one_out_centroid,
    leave_one_out_nearest,
    make_gate,
)
from mergeserve.router.policy import MergeKey, RoutingPolicy
from mergeserve.router.prototype import PrototypeRouter
from mergeserve.tasks.generators import TASKS, generate
from mergeserve.tasks.open_world import general_prompts
from tests.conftest import write_fake_lora_dir

EXPERTS_DIR = Path(__file__).resolve().parents[2] / "examples" / "experts"
DEMO = experts_examples(EXPERTS_DIR) if EXPERTS_DIR.is_dir() else {}
needs_demo = pytest.mark.skipif(len(DEMO) < 6, reason="demo experts not committed")
EXPERTS = ("add", "capital", "sentiment")


def unit(*rows: list[float]) -> torch.Tensor:
    return nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# ------------------------------------------------------------------------------ policy


def test_in_domain_mass_scales_the_weights_and_the_rest_is_none() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0]] * 4)
    mass = torch.tensor([1.0, 0.6, 0.01, 0.0])
    full, part, tiny, zero = RoutingPolicy(temperature=0.01).apply(EXPERTS, logits, mass)
    assert full.key == MergeKey((("add", 1.0),))
    assert full.outcome == "expert"
    assert part.key.as_dict() == {"add": 0.6}
    assert part.key.none == pytest.approx(0.4)
    assert str(part.key) == "add=0.6,none=0.4"
    # Below half a grid step, the request is routed to none: exactly the base model.
    for r in (tiny, zero):
        assert r.key == MergeKey.base()
        assert r.outcome == "none"
        assert r.key.top is None
    assert tiny.in_domain == pytest.approx(0.01)
    # The full distribution is still reported (metrics, the route CLI).
    assert zero.probs["add"] == pytest.approx(1.0)


def test_grid_rounding_keeps_weights_plus_none_at_one() -> None:
    logits = torch.tensor([[1.0, 1.0, -9.0]])
    (r,) = RoutingPolicy(top_k=2).apply(EXPERTS, logits, torch.tensor([0.77]))
    assert sum(r.key.as_dict().values()) + r.key.none == pytest.approx(1.0)
    assert all(abs(w / 0.05 - round(w / 0.05)) < 1e-9 for w in r.key.as_dict().values())
    assert r.outcome == "blend"
    (closed,) = RoutingPolicy(top_k=2).apply(EXPERTS, logits)
    assert closed.key.none == 0
    assert closed.in_domain == 1.0


@pytest.mark.parametrize("bad", [[1.5], [-0.1], [float("nan")]])
def test_bad_in_domain_masses_are_refused(bad: list[float]) -> None:
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        RoutingPolicy().apply(EXPERTS, torch.zeros(1, 3), torch.tensor(bad))
    with pytest.raises(ValueError, match="one per row"):
        RoutingPolicy().apply(EXPERTS, torch.zeros(1, 3), torch.tensor([0.5, 0.5]))


# -------------------------------------------------------------------------------- gate


def test_gate_config_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown gate"):
        GateConfig("magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        GateConfig(width=0)
    with pytest.raises(ValueError, match="quantile"):
        GateConfig(quantile=1.5)
    with pytest.raises(ValueError, match="needs general calibration prompts"):
        OpenWorldGate(GateConfig("centroid"))
    assert GateConfig(margin=0.0).mass(torch.tensor([0.0]))[0] == pytest.approx(0.5)
    assert GateConfig().mass(torch.tensor([0.005]))[0] == pytest.approx(0.5)  # the margin
    assert GateConfig(margin=0.1).mass(torch.tensor([0.0]))[0] < 1e-6


def test_leave_one_out_similarities() -> None:
    emb = unit([1, 0, 0], [1, 1, 0], [0, 1, 0])
    nearest = leave_one_out_nearest(emb)
    assert nearest.tolist() == pytest.approx([2**-0.5, 2**-0.5, 2**-0.5])
    # The first row's similarity to the centroid of the other two, computed directly.
    rest = nn.functional.normalize(emb[1:].mean(dim=0), dim=0)
    assert leave_one_out_centroid(emb)[0] == pytest.approx(float(emb[0] @ rest))


def test_centroid_threshold_lies_between_the_experts_and_the_general_prompts() -> None:
    general = unit([0, 0, 1], [0, 0.2, 1])
    gate = OpenWorldGate(GateConfig("centroid", quantile=0.0), general)
    examples = unit([1, 0.1, 0], [1, -0.1, 0], [1, 0, 0.1])
    tau = gate.threshold(examples)
    inner = float(leave_one_out_centroid(examples).min())
    c = nn.functional.normalize(examples.mean(dim=0), dim=0)
    outer = float((general @ c).max())
    assert tau == pytest.approx((inner + outer) / 2)
    assert outer < tau < inner
    # One example: no spread to measure, the general prompts' edge alone.
    assert gate.threshold(examples[:1]) == pytest.approx(float((general @ examples[0]).max()))
    # Scores: the best expert's similarity less its threshold.
    sims = Similarities(examples[:1], torch.tensor([[0.9, 0.2]]), torch.tensor([[0.9, 0.2]]))
    assert gate.scores(sims, torch.tensor([0.5, 0.0]))[0] == pytest.approx(0.4)


def test_auroc() -> None:
    assert auroc([2, 3], [0, 1]) == 1.0
    assert auroc([0], [1]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5
    with pytest.raises(ValueError, match="positives and negatives"):
        auroc([], [1])


# ------------------------------------------------------------------ routers with a gate


@pytest.fixture(scope="module")
def minilm() -> SentenceEmbedder:
    return SentenceEmbedder(quantize=True, threads=2)


@pytest.fixture(scope="module")
def gated(minilm: SentenceEmbedder) -> PrototypeRouter:
    gate = make_gate(GateConfig(), minilm)
    assert gate is not None
    return PrototypeRouter.from_examples(minilm, DEMO, gate=gate)


@needs_demo
def test_general_requests_go_to_none_and_the_skills_stay(gated: PrototypeRouter) -> None:
    """On the calibration part (what the gate was built from, so this checks the
    mechanism, not generalization: benchmarks/open_world.py measures dev and test)."""
    general = [g.prompt for g in general_prompts("calibration")]
    routed = route(gated, RoutingPolicy(), general)
    assert sum(r.key.is_base for r in routed) / len(routed) >= 0.9
    skills = [s.prompt for t in TASKS for s in generate(t, "train", 10)]
    kept = route(gated, RoutingPolicy(), skills)
    assert all(r.key.none == 0 for r in kept)
    assert [r.key.top for r in kept] == [t for t in TASKS for _ in range(10)]
    # The examples: a general question is the base model's to answer.
    sleep, hi, haiku, times = route(
        gated,
        RoutingPolicy(),
        [
            "Give me three tips for better sleep.",
            "Hi! How are you today?",
            "Write a haiku about autumn.",
            "What is 7 times 8?",
        ],
    )
    assert sleep.outcome == hi.outcome == haiku.outcome == "none"
    assert times.outcome in ("none", "expert")  # arithmetic, but not addition: near the edge


@needs_demo
def test_a_hot_added_expert_is_calibrated_from_its_own_examples(
    gated: PrototypeRouter, tmp_path: Path
) -> None:
    without = gated.without_expert("to_json")
    assert "to_json" not in without.thresholds  # type: ignore[attr-defined]
    prompts = [s.prompt for s in generate("to_json", "test", 30)]
    before = route(without, RoutingPolicy(), prompts)
    write_fake_lora_dir(tmp_path / "to_json", examples=DEMO["to_json"])
    back = without.with_expert("to_json", tmp_path / "to_json")
    assert isinstance(back, PrototypeRouter)
    assert back.thresholds["to_json"] == pytest.approx(gated.thresholds["to_json"], abs=1e-5)
    after = route(back, RoutingPolicy(), prompts)
    assert sum(r.key.top == "to_json" for r in after) / len(after) >= 0.95
    assert sum(r.key.top == "to_json" for r in before) == 0
    # The router it was copied from is untouched (copy on write).
    assert "to_json" not in without.thresholds  # type: ignore[attr-defined]


@needs_demo
def test_the_mlp_router_is_gated_by_its_prototypes(
    minilm: SentenceEmbedder, gated: PrototypeRouter
) -> None:
    mlp = train_mlp_router(minilm, DEMO, MLPTrainConfig(epochs=5), fallback=gated)
    logits, mass = mlp.scores(["Write a haiku about autumn.", "What is the capital of Peru?"])
    assert logits.shape == (2, len(DEMO))
    assert mass is not None
    assert mass[0] < 0.5 < mass[1]
    (r,) = route(mlp, RoutingPolicy(), ["Write a haiku about autumn."])
    assert r.key.is_base


def test_without_a_gate_the_router_is_closed_world(minilm: SentenceEmbedder) -> None:
    router = PrototypeRouter.from_examples(minilm, {"a": ["apples"], "b": ["stocks fell"]})
    assert router.scores(["hello"])[1] is None
    (r,) = route(router, RoutingPolicy(), ["hello"])
    assert not r.key.is_base
    assert r.in_domain == 1.0
    assert make_gate(GateConfig("off"), minilm) is None
