"""`MLPRouter`: Twin-Merging's router, a small classifier on the request embeddings.

Two hidden layers with batch norm, LeakyReLU and dropout; cross-entropy on expert labels;
trained by `mergeserve train-router` and saved beside the expert set (`mlp_router_dir`).
Experts it was not trained on (added since, or whose examples changed) are routed by a
`PrototypeRouter` until it is retrained: when the prototypes' best match is such an
expert, that request's logits are the prototypes'; otherwise the MLP's, with those
experts at -inf.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mergeserve.adapters.lowrank import AdapterFactors
from mergeserve.errors import ConfigurationError
from mergeserve.router.base import ROUTER_DIR, examples_digest
from mergeserve.router.embedders import Embedder
from mergeserve.router.prototype import PrototypeRouter


def mlp_router_dir(experts_dir: Path) -> Path:
    """Where `train-router` saves the MLP of the experts under `experts_dir`."""
    return experts_dir / ROUTER_DIR


class RouterNet(nn.Module):
    """Twin-Merging's router: [Linear → BatchNorm → LeakyReLU → Dropout] × 2 → Linear."""

    def __init__(self, dim: int, n_experts: int, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_experts),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class MLPTrainConfig:
    hidden: int = 256
    dropout: float = 0.2
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("hidden", "epochs", "batch_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


MLP_WEIGHTS = "mlp.safetensors"
MLP_META = "mlp.json"


class MLPRouter:
    """A trained classifier over the experts it was trained on; prototypes for the rest."""

    def __init__(
        self,
        embedder: Embedder,
        net: RouterNet,
        classes: Mapping[str, str],
        config: MLPTrainConfig,
        fallback: PrototypeRouter | None = None,
        *,
        current: Collection[str] | None = None,
    ):
        """`classes`: the net's output columns in order, as expert name -> digest of the
        example prompts trained on. `current`: those classes whose examples are still the
        ones trained on (default: all); the others are routed as untrained."""
        self.embedder = embedder
        self.net = net.eval()
        self.classes = dict(classes)
        self.trained_experts = tuple(classes)
        self.trained = frozenset(self.trained_experts if current is None else current)
        self.config = config
        self.fallback = fallback
        if fallback is not None and fallback.embedder is not embedder:
            raise ValueError("the fallback prototype router must share the MLP's embedder")

    @property
    def name(self) -> str:
        return "mlp"

    @property
    def experts(self) -> tuple[str, ...]:
        return self.fallback.experts if self.fallback is not None else self.trained_experts

    @property
    def untrained(self) -> tuple[str, ...]:
        """Routed experts the MLP does not know: routed by the prototypes until retrained."""
        return tuple(e for e in self.experts if e not in self.trained)

    @torch.inference_mode()
    def with_expert(
        self, name: str, expert_dir: Path, factors: AdapterFactors | None = None
    ) -> MLPRouter:
        """Routes the new expert by its prototypes until the MLP is retrained."""
        if self.fallback is None:
            raise ConfigurationError("this MLP router has no prototypes to route a new expert")
        new = copy.copy(self)
        new.fallback = self.fallback.with_expert(name, expert_dir)
        return new

    def without_expert(self, name: str) -> MLPRouter:
        if self.fallback is None:
            raise ConfigurationError("this MLP router has no prototypes to drop an expert from")
        new = copy.copy(self)
        new.fallback = self.fallback.without_expert(name)
        new.trained = self.trained - {name}
        return new

    @torch.inference_mode()
    def logits(self, texts: Sequence[str]) -> Tensor:
        return self._logits(self.embedder.embed(texts))

    @torch.inference_mode()
    def scores(self, texts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """Logits, and the in-domain mass of the prototypes' gate (None without one)."""
        emb = self.embedder.embed(texts)
        gate = self.fallback.in_domain_for(emb) if self.fallback is not None else None
        return self._logits(emb), gate

    def _logits(self, emb: Tensor) -> Tensor:
        mlp: Tensor = self.net(emb)  # [n, T], columns in trained_experts order
        if self.fallback is None:
            known = [e in self.trained for e in self.trained_experts]
            return mlp.masked_fill(~torch.tensor(known), -math.inf)
        current = self.fallback.experts
        out = torch.full((emb.shape[0], len(current)), -math.inf)
        col = {e: i for i, e in enumerate(self.trained_experts)}
        for j, e in enumerate(current):
            if e in self.trained and e in col:
                out[:, j] = mlp[:, col[e]]
        fresh = [j for j, e in enumerate(current) if e not in self.trained]
        if fresh:
            proto = self.fallback.logits_for(emb)
            use_proto = torch.isin(proto.argmax(dim=1), torch.tensor(fresh))
            use_proto |= torch.isinf(out).all(dim=1)  # every trained expert has gone
            out[use_proto] = proto[use_proto]
        return out

    def save(self, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, out_dir / MLP_WEIGHTS)
        meta = {
            "format": 1,
            "embedder": self.embedder.name,
            "dim": self.embedder.dim,
            "experts": list(self.trained_experts),
            "examples_sha256": self.classes,
            "config": asdict(self.config),
        }
        tmp = out_dir / f".{MLP_META}.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(out_dir / MLP_META)

    @classmethod
    def load(
        cls,
        path: Path,
        embedder: Embedder,
        fallback: PrototypeRouter | None = None,
        examples: Mapping[str, Sequence[str]] | None = None,
    ) -> MLPRouter:
        """Load a saved router. With the experts' current `examples`, an expert whose
        examples differ from the ones it was trained on counts as untrained (routed by
        `fallback`'s prototypes, or excluded without one)."""
        from safetensors.torch import load_file

        meta_file = path / MLP_META
        if not meta_file.is_file():
            raise ConfigurationError(
                f"no trained MLP router in {path}; run `mergeserve train-router` first"
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("embedder") != embedder.name:
            raise ConfigurationError(
                f"{path}: the MLP router was trained on embedder {meta.get('embedder')!r}, "
                f"not {embedder.name!r}; retrain it or pick that embedder"
            )
        config = MLPTrainConfig(**meta["config"])
        net = RouterNet(embedder.dim, len(meta["experts"]), config.hidden, config.dropout)
        net.load_state_dict(load_file(path / MLP_WEIGHTS))
        classes = {e: meta["examples_sha256"][e] for e in meta["experts"]}
        current = None
        if examples is not None:
            current = [
                e for e, d in classes.items() if e in examples and examples_digest(examples[e]) == d
            ]
        return cls(embedder, net, classes, config, fallback, current=current)


def train_mlp_router(
    embedder: Embedder,
    examples: Mapping[str, Sequence[str]],
    config: MLPTrainConfig | None = None,
    fallback: PrototypeRouter | None = None,
) -> MLPRouter:
    """Train the Twin router on the experts' example prompts (cross-entropy on labels)."""
    config = config or MLPTrainConfig()
    names = list(examples)
    if len(names) < 2:
        raise ValueError("an MLP router needs at least two experts")
    texts, labels = [], []
    for i, n in enumerate(names):
        if not examples[n]:
            raise ValueError(f"expert {n!r}: no example prompts")
        texts += list(examples[n])
        labels += [i] * len(examples[n])
    x = embedder.embed(texts)
    y = torch.tensor(labels)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # dropout and init
    net = RouterNet(embedder.dim, len(names), config.hidden, config.dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    net.train()
    for _ in range(config.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), config.batch_size):
            idx = perm[i : i + config.batch_size]
            if len(idx) < 2:  # batch norm needs two rows
                continue
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    trained = {n: examples_digest(examples[n]) for n in names}
    return MLPRouter(embedder, net.eval(), trained, config, fallback)
