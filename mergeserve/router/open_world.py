"""Open-world routing: how much a request belongs to the experts at all.

A closed-world router hands every request to some expert, so a request outside every
expert's task ("Give me three tips for better sleep") is answered by a merge of adapters
that each learned one narrow skill, and the base model's own answer is lost. The gate
here scores each request's *in-domain* evidence and turns it into a mass m ∈ [0, 1]; the
policy gives m to the experts and 1 − m to *none*, the base model (router/policy.py).

Every gate is calibrated from data the project ships, with no training, so that a
hot-added expert is calibrated from its own `examples.jsonl` the moment it is added:

- `centroid` (the default): the request's cosine similarity to each expert's centroid,
  less the expert's threshold τₑ; score = maxₑ (cos(x, cₑ) − τₑ). τₑ lies midway between
  how close the expert's own phrasings come to its centroid (the `quantile` of its
  examples' leave-one-out similarities to the centroid of the others) and how close
  requests outside every skill come (the 1 − `quantile` quantile of the general
  calibration prompts' similarities to cₑ).
- `threshold`: the same with the nearest example instead of the centroid, and τₑ from
  the expert's examples alone (the `quantile` of each example's similarity to its
  nearest other example).
- `knn`: the similarity to the nearest expert example less the similarity to the
  nearest general calibration prompt: general requests are a class of their own.

The general calibration prompts are the calibration part of the general split
(`mergeserve.tasks.open_world`, shipped in the package); its dev and test parts are
never seen by a gate.

m = sigmoid((score − margin) / width): `width` → 0 is a hard gate. `benchmarks/
open_world.py` compares the gates on the dev splits (AUROC of the score, six skills
against general requests, and the routed-to-none rates at the operating point).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mergeserve.router.embedders import Embedder

GateKind = Literal["off", "centroid", "threshold", "knn"]
GATES: tuple[GateKind, ...] = ("off", "centroid", "threshold", "knn")


@dataclass(frozen=True)
class GateConfig:
    kind: GateKind = "centroid"
    margin: float = 0.005
    """Subtracted from the score: > 0 routes more requests to none. 0.005 was chosen on
    the dev splits once add learned paraphrases (its examples ask in more ways, so its
    centroid reaches further): against 0 it sends 96.2% of general requests to none
    instead of 95.5% (exactly base: 96.2% instead of 93.9%), for one in-domain prompt
    of 300 and no unseen phrasing; 0.01 and 0.02 lose phrasings
    (benchmarks/open_world.py)."""
    width: float = 0.001
    """Softness of the gate, in cosine units: m = sigmoid((score - margin) / width).
    Near-hard by default: on the dev splits a softer gate (0.005, 0.02) only added
    partial merges, fewer general requests served exactly by base and fewer unseen
    phrasings kept at full weight (benchmarks/open_world.py)."""
    quantile: float = 0.05
    """`centroid` and `threshold`: the quantile of the experts' own similarities that
    marks their in-domain edge (and 1 - it, of the general prompts', the outer edge)."""

    def __post_init__(self) -> None:
        if self.kind not in GATES:
            raise ValueError(f"unknown gate {self.kind!r}; gates: {', '.join(GATES)}")
        if not self.width > 0:
            raise ValueError(f"width must be > 0, got {self.width}")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")

    @property
    def needs_general(self) -> bool:
        return self.kind in ("centroid", "knn")

    def mass(self, score: Tensor) -> Tensor:
        """In-domain mass of raw scores (the margin is applied here)."""
        return torch.sigmoid((score - self.margin) / self.width)


def _quantile(x: Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q))


def leave_one_out_nearest(emb: Tensor) -> Tensor:
    """Each example's cosine similarity to its nearest other example (unit rows)."""
    sims = emb @ emb.T
    sims.fill_diagonal_(-2.0)
    return sims.max(dim=1).values


def leave_one_out_centroid(emb: Tensor) -> Tensor:
    """Each example's cosine similarity to the centroid of the others (unit rows)."""
    n = emb.shape[0]
    rest = (emb.sum(dim=0, keepdim=True) - emb) / (n - 1)
    return (emb * torch.nn.functional.normalize(rest, dim=-1)).sum(dim=-1)


@dataclass(frozen=True)
class Similarities:
    """One batch of requests against the experts: what every gate scores from."""

    emb: Tensor
    """[n, d] the requests' unit embeddings."""
    centroid: Tensor
    """[n, E] cosine similarity to each expert's centroid."""
    nearest: Tensor
    """[n, E] cosine similarity to each expert's nearest example."""


class OpenWorldGate:
    """In-domain scores of requests. Holds its configuration and the general
    calibration prompts' embeddings; the per-expert thresholds live with the router's
    examples (copied on write with them)."""

    def __init__(self, config: GateConfig, general: Tensor | None = None):
        if config.needs_general and (general is None or general.shape[0] == 0):
            raise ValueError(f"the {config.kind} gate needs general calibration prompts")
        self.config = config
        self.general = general

    def threshold(self, emb: Tensor) -> float:
        """τ of an expert from its example embeddings (unit rows): no training. An
        expert of one example has no spread to measure: its τ is the general prompts'
        outer edge alone (centroid), or -1 (every request passes; threshold)."""
        q, kind = self.config.quantile, self.config.kind
        if kind == "centroid":
            assert self.general is not None
            centroid = torch.nn.functional.normalize(emb.mean(dim=0), dim=-1)
            outer = _quantile(self.general @ centroid, 1.0 - q)
            if emb.shape[0] < 2:
                return outer
            return (_quantile(leave_one_out_centroid(emb), q) + outer) / 2
        if kind == "threshold":
            return _quantile(leave_one_out_nearest(emb), q) if emb.shape[0] >= 2 else -1.0
        return 0.0

    def scores(self, sims: Similarities, thresholds: Tensor) -> Tensor:
        """Raw in-domain scores ([n]) given the experts' τ [E]."""
        n, e = sims.centroid.shape
        if e == 0:
            return torch.full((n,), -1.0)
        kind = self.config.kind
        if kind == "centroid":
            return (sims.centroid - thresholds.to(sims.centroid.dtype)).max(dim=1).values
        if kind == "threshold":
            return (sims.nearest - thresholds.to(sims.nearest.dtype)).max(dim=1).values
        if kind == "knn":
            assert self.general is not None
            to_general = (sims.emb @ self.general.T).max(dim=1).values
            return sims.nearest.max(dim=1).values - to_general
        return torch.full((n,), 1.0)

    def in_domain(self, sims: Similarities, thresholds: Tensor) -> Tensor | None:
        """The in-domain mass of each request; None when the gate is off (closed world)."""
        if self.config.kind == "off":
            return None
        return self.config.mass(self.scores(sims, thresholds))


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a positive > a negative's), ties count ½."""
    if not positive or not negative:
        raise ValueError("AUROC needs positives and negatives")
    pos = torch.tensor(positive, dtype=torch.float64)
    neg = torch.tensor(negative, dtype=torch.float64)
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def general_calibration_prompts() -> list[str]:
    """The general prompts the knn gate compares against: the calibration part of the
    general split (never its dev or test part)."""
    from mergeserve.tasks.open_world import general_prompts

    return [g.prompt for g in general_prompts("calibration")]


def make_gate(config: GateConfig, embedder: Embedder) -> OpenWorldGate | None:
    """The gate `config` names, over `embedder` (None when it is off: closed world)."""
    if config.kind == "off":
        return None
    general = embedder.embed(general_calibration_prompts()) if config.needs_general else None
    return OpenWorldGate(config, general)
