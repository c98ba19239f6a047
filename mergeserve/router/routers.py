"""Routers: request texts -> logits over the experts (the policy turns them into weights).

Three routers behind one protocol, each able to take a new expert:

- `PrototypeRouter`: each expert is the embeddings of its example prompts (the
  `examples.jsonl` its training wrote). A request scores the cosine similarity to each
  expert's centroid (`aggregate="mean"`) or to its nearest example (`"max"`). Adding an
  expert is embedding its examples: no training, nothing else changes.
- `MLPRouter`: Twin-Merging's router, a small classifier on the embeddings (two hidden
  layers with batch norm, LeakyReLU and dropout; cross-entropy on expert labels), trained
  by `mergeserve train-router` and saved beside the expert set. Experts it was not
  trained on (added since, or whose examples changed) are routed by a `PrototypeRouter`
  until it is retrained: when the prototypes' best match is such an expert, that
  request's logits are the prototypes'; otherwise the MLP's, with those experts at -inf.
- `ArrowRouter`: no data at all (Arrow, Ostapenko et al. 2024, as in PEFT's
  `ArrowLoraLinearLayer`): each expert's prototype in a module is the top right singular
  vector of its ΔW = B·A, the input direction it amplifies most. The base model runs on
  the request; per token and module, the |cosine| of the module's input with each
  prototype, softmaxed over experts at `token_temperature`, gives that token's
  coefficients; the request's weights are their mean over tokens and modules.

Logits are calibrated for the policy's temperature 1: the MLP's are its own, the
prototype router multiplies cosines by `scale`, Arrow returns log mean coefficients.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mergeserve.adapters.lowrank import AdapterFactors, truncate
from mergeserve.adapters.peft_io import discover_lora_dirs, load_lora_factors
from mergeserve.errors import AdapterError, ConfigurationError
from mergeserve.router.embedders import Embedder, HiddenStateEmbedder, decoder_layers
from mergeserve.router.open_world import OpenWorldGate, Similarities
from mergeserve.router.policy import Routing, RoutingPolicy

EXAMPLES_FILE = "examples.jsonl"
ROUTER_DIR = "_router"
"""Under the experts dir: where `train-router` saves the MLP (not a LoRA dir, so the
expert discovery skips it)."""


@runtime_checkable
class Router(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def experts(self) -> tuple[str, ...]:
        """The columns of `logits`, in order."""
        ...

    def logits(self, texts: Sequence[str]) -> Tensor:
        """[len(texts), len(experts)] float32; -inf excludes an expert."""
        ...


@runtime_checkable
class OpenWorldRouter(Router, Protocol):
    """A router that also says how much each request belongs to the experts at all."""

    def scores(self, texts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """(logits, in-domain mass [len(texts)] in [0, 1]); the mass is None when the
        router's gate is off."""
        ...


def router_scores(router: Router, texts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
    """Logits and, for an open-world router, the in-domain mass (None: closed world)."""
    if isinstance(router, OpenWorldRouter):
        return router.scores(texts)
    return router.logits(texts), None


def route(router: Router, policy: RoutingPolicy, texts: Sequence[str]) -> list[Routing]:
    """Route a batch of request texts to merge keys."""
    if not router.experts:
        raise ConfigurationError(f"the {router.name} router has no experts")
    logits, in_domain = router_scores(router, texts)
    return policy.apply(router.experts, logits, in_domain)


# ------------------------------------------------------------------------------ examples


def prompt_of(line: str) -> str:
    """The prompt of one JSON line {"prompt": ...}; ValueError saying what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    prompt = obj.get("prompt") if isinstance(obj, dict) else None
    if not isinstance(prompt, str):
        raise ValueError('expected an object with a "prompt" string')
    return prompt


def read_examples(expert_dir: Path) -> list[str]:
    """The example prompts of an expert (`examples.jsonl`: one {"prompt": ...} a line)."""
    path = expert_dir / EXAMPLES_FILE
    if not path.is_file():
        raise AdapterError(
            f"{expert_dir.name}: no {EXAMPLES_FILE}; the prototype and MLP routers need "
            "example prompts of each expert (train-expert writes them)"
        )
    prompts = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = prompt_of(line)
        except ValueError as e:
            raise AdapterError(f"{path}:{lineno}: {e}") from None
        if prompt.strip():
            prompts.append(prompt)
    if not prompts:
        raise AdapterError(f"{path}: no example prompts")
    return prompts


def examples_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def experts_examples(experts_dir: Path) -> dict[str, list[str]]:
    """Example prompts of every expert under `experts_dir`, by expert name."""
    return {info.name: read_examples(info.path) for info in discover_lora_dirs(experts_dir)}


def _check_name(name: str, known: Sequence[str]) -> None:
    if not name or not isinstance(name, str):
        raise ValueError(f"expert name must be a non-empty string, got {name!r}")
    if name in known:
        raise ValueError(f"expert {name!r} is already routed; remove it first")


# ----------------------------------------------------------------------------- prototype


@dataclass(frozen=True)
class _ProtoState:
    experts: tuple[str, ...]
    centroids: Tensor  # [E, d], unit rows
    examples: Tensor  # [N, d], unit rows
    owner: Tensor  # [N], the expert index of each example
    thresholds: Tensor  # [E], each expert's open-world threshold (router/open_world.py)


class PrototypeRouter:
    """Cosine similarity to each expert's example prompts; experts come and go in O(1).

    With a `gate` (router/open_world.py) it is open-world: `scores` also gives each
    request's in-domain mass, calibrated from the same examples (and, for the knn gate,
    the general prompts the gate holds)."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        scale: float = 20.0,
        aggregate: Literal["mean", "max"] = "mean",
        gate: OpenWorldGate | None = None,
    ):
        if aggregate not in ("mean", "max"):
            raise ValueError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.embedder = embedder
        self.scale = scale
        self.aggregate = aggregate
        self.gate = gate
        d = embedder.dim
        self._state = _ProtoState(
            (), torch.empty(0, d), torch.empty(0, d), torch.empty(0).long(), torch.empty(0)
        )
        self._lock = threading.Lock()  # writers only: readers take the current state

    @classmethod
    def from_examples(
        cls, embedder: Embedder, examples: Mapping[str, Sequence[str]], **kwargs: Any
    ) -> PrototypeRouter:
        router = cls(embedder, **kwargs)
        for name, prompts in examples.items():
            router.add_expert(name, prompts)
        return router

    @classmethod
    def from_experts_dir(cls, embedder: Embedder, root: Path, **kwargs: Any) -> PrototypeRouter:
        return cls.from_examples(embedder, experts_examples(root), **kwargs)

    @property
    def name(self) -> str:
        return "prototype"

    @property
    def experts(self) -> tuple[str, ...]:
        return self._state.experts

    def add_expert(self, name: str, prompts: Sequence[str]) -> None:
        """Route to `name` from now on, by the embeddings of its example prompts."""
        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            raise ValueError(f"expert {name!r}: no example prompts")
        emb = self.embedder.embed(prompts)
        tau = self.gate.threshold(emb) if self.gate is not None else -1.0
        with self._lock:
            s = self._state
            _check_name(name, s.experts)
            centroid = nn.functional.normalize(emb.mean(dim=0, keepdim=True), dim=-1)
            owner = torch.full((len(prompts),), len(s.experts), dtype=torch.long)
            self._state = _ProtoState(
                (*s.experts, name),
                torch.cat([s.centroids, centroid]),
                torch.cat([s.examples, emb]),
                torch.cat([s.owner, owner]),
                torch.cat([s.thresholds, torch.tensor([tau])]),
            )

    def remove_expert(self, name: str) -> None:
        with self._lock:
            s = self._state
            if name not in s.experts:
                raise KeyError(f"expert {name!r} is not routed")
            i = s.experts.index(name)
            keep = s.owner != i
            owner = s.owner[keep]
            self._state = _ProtoState(
                s.experts[:i] + s.experts[i + 1 :],
                torch.cat([s.centroids[:i], s.centroids[i + 1 :]]),
                s.examples[keep],
                owner - (owner > i).long(),
                torch.cat([s.thresholds[:i], s.thresholds[i + 1 :]]),
            )

    @staticmethod
    def _nearest(emb: Tensor, s: _ProtoState) -> Tensor:
        """[n, E] cosine similarity of unit rows `emb` to each expert's nearest example."""
        sims = emb @ s.examples.T  # [n, N]
        out = torch.full((emb.shape[0], len(s.experts)), -1.0)
        return out.scatter_reduce(1, s.owner.expand(emb.shape[0], -1), sims, reduce="amax")

    def similarities(self, emb: Tensor) -> Tensor:
        """[n, E] cosine similarity of unit rows `emb` to each expert."""
        s = self._state
        if self.aggregate == "mean":
            return emb @ s.centroids.T
        return self._nearest(emb, s)

    def logits_for(self, emb: Tensor) -> Tensor:
        return self.similarities(emb) * self.scale

    def logits(self, texts: Sequence[str]) -> Tensor:
        return self.logits_for(self.embedder.embed(texts))

    def _sims(self, emb: Tensor, s: _ProtoState) -> Similarities:
        return Similarities(emb, emb @ s.centroids.T, self._nearest(emb, s))

    @property
    def thresholds(self) -> dict[str, float]:
        """Each expert's open-world threshold τ (router/open_world.py)."""
        s = self._state
        return dict(zip(s.experts, s.thresholds.tolist(), strict=True))

    def in_domain_score(self, emb: Tensor) -> Tensor:
        """The gate's raw in-domain score of each request (unit rows `emb`)."""
        if self.gate is None:
            raise ConfigurationError("this prototype router has no open-world gate")
        s = self._state
        return self.gate.scores(self._sims(emb, s), s.thresholds)

    def in_domain_for(self, emb: Tensor) -> Tensor | None:
        """The in-domain mass of each request; None without a gate (closed world)."""
        if self.gate is None:
            return None
        s = self._state
        return self.gate.in_domain(self._sims(emb, s), s.thresholds)

    def scores(self, texts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """Logits and in-domain mass from one embedding and one set of similarities."""
        emb = self.embedder.embed(texts)
        s = self._state
        sims = self._sims(emb, s)
        logits = (sims.centroid if self.aggregate == "mean" else sims.nearest) * self.scale
        mass = self.gate.in_domain(sims, s.thresholds) if self.gate is not None else None
        return logits, mass


# ----------------------------------------------------------------------------------- MLP


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


# --------------------------------------------------------------------------------- Arrow


def _module(layer: nn.Module, kind: str) -> nn.Module | None:
    """The module a kind names inside a decoder layer ('self_attn.q_proj', 'mlp.down_proj')."""
    try:
        return layer.get_submodule(kind)
    except AttributeError:
        return None


class ArrowRouter:
    """Zero-data routing from each expert's top right singular vectors (Arrow)."""

    def __init__(
        self,
        runner: HiddenStateEmbedder,
        *,
        token_temperature: float = 0.05,
        top_k: int | None = None,
        kinds: Sequence[str] | None = None,
    ):
        """`runner` must keep every layer the experts touch (`HiddenStateEmbedder(layer=None)`).
        `kinds` limits the module kinds used (default: every kind an expert targets)."""
        if not token_temperature > 0:
            raise ValueError(f"token_temperature must be > 0, got {token_temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.runner = runner
        self.token_temperature = token_temperature
        self.top_k = top_k
        self.kinds = tuple(kinds) if kinds is not None else None
        self._layers = decoder_layers(runner.model)
        self._experts: tuple[str, ...] = ()
        self._protos: dict[tuple[str, int], Tensor] = {}  # (kind, layer) -> [E, in]
        self._lock = threading.Lock()

    @classmethod
    def from_experts_dir(
        cls, runner: HiddenStateEmbedder, root: Path, **kwargs: Any
    ) -> ArrowRouter:
        router = cls(runner, **kwargs)
        for info in discover_lora_dirs(root):
            router.add_expert(info.name, load_lora_factors(info.path))
        return router

    @property
    def name(self) -> str:
        return "arrow"

    @property
    def experts(self) -> tuple[str, ...]:
        return self._experts

    def add_expert(self, name: str, adapter: AdapterFactors) -> None:
        """Route to `name` from its adapter's own weights: no examples, no training."""
        new: dict[tuple[str, int], Tensor] = {}
        for kind, lr in adapter.groups.items():
            if self.kinds is not None and kind not in self.kinds:
                continue
            top = truncate(lr, rank=1).A[:, 0, :].float()  # [L, in] = σ₁^½ v₁ᵀ
            unit = nn.functional.normalize(top, dim=-1)
            for row, layer in zip(unit, adapter.layers[kind], strict=True):
                if layer >= len(self._layers) or _module(self._layers[layer], kind) is None:
                    raise AdapterError(
                        f"expert {name!r}: {kind} of layer {layer} is not in the base model"
                    )
                new[(kind, layer)] = row
        if not new:
            raise AdapterError(f"expert {name!r}: no module of the kinds {self.kinds}")
        with self._lock:
            _check_name(name, self._experts)
            e = len(self._experts)
            protos = {}
            for key in set(self._protos) | set(new):
                old = self._protos.get(key)
                if old is None:
                    old = torch.zeros(e, new[key].shape[0])
                row = new.get(key, torch.zeros(old.shape[1]))
                protos[key] = torch.cat([old, row[None]])
            self._protos = protos
            self._experts = (*self._experts, name)

    def remove_expert(self, name: str) -> None:
        with self._lock:
            if name not in self._experts:
                raise KeyError(f"expert {name!r} is not routed")
            i = self._experts.index(name)
            protos = {k: torch.cat([p[:i], p[i + 1 :]]) for k, p in self._protos.items()}
            self._protos = {k: p for k, p in protos.items() if p.abs().sum() > 0}
            self._experts = self._experts[:i] + self._experts[i + 1 :]

    def _coefficients(self, x: Tensor, protos: Tensor) -> Tensor:
        """Per-token Arrow coefficients: softmax over the top-k of |cos(x, prototype)|."""
        sim = (nn.functional.normalize(x.float(), dim=-1) @ protos.T).abs()  # [n, T, E]
        # An expert without this module scores 0; that is its honest similarity here.
        if self.top_k is not None and self.top_k < protos.shape[0]:
            kth = sim.topk(self.top_k, dim=-1).values[..., -1:]
            sim = sim.masked_fill(sim < kth, -math.inf)
        return torch.softmax(sim / self.token_temperature, dim=-1)

    @torch.inference_mode()
    def logits(self, texts: Sequence[str]) -> Tensor:
        with self._lock:  # the hooks go on the one shared model: one pass at a time
            return self._logits(texts)

    def _logits(self, texts: Sequence[str]) -> Tensor:
        experts, protos = self._experts, self._protos
        if not texts:
            return torch.empty(0, len(experts))
        acc = torch.zeros(len(texts), len(experts))
        mask_box: list[Tensor] = []
        offset = [0]

        def hook_for(p: Tensor) -> Any:
            def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
                mask = mask_box[0].unsqueeze(-1).float()  # [n, T, 1]
                coeff = self._coefficients(args[0], p) * mask
                per_text = coeff.sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
                acc[offset[0] : offset[0] + per_text.shape[0]] += per_text

            return hook

        hooks = []
        for (kind, layer), p in protos.items():
            mod = _module(self._layers[layer], kind)
            assert mod is not None  # checked in add_expert
            hooks.append(mod.register_forward_pre_hook(hook_for(p)))
        try:
            for i in range(0, len(texts), self.runner.batch_size):
                chunk = list(texts[i : i + self.runner.batch_size])
                enc = self.runner.tokenize(chunk)
                mask_box[:] = [enc["attention_mask"]]
                offset[0] = i
                self.runner.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        finally:
            for h in hooks:
                h.remove()
        return torch.log((acc / max(len(protos), 1)).clamp_min(1e-12))


# ------------------------------------------------------------------------------- loading

ROUTERS = ("prototype", "mlp", "arrow")


def mlp_router_dir(experts_dir: Path) -> Path:
    return experts_dir / ROUTER_DIR


def router_for(
    kind: str,
    experts: Mapping[str, Path],
    *,
    factors: Mapping[str, AdapterFactors] | None = None,
    embedder: Embedder | None = None,
    base_dir: Path | None = None,
    mlp_dir: Path | None = None,
    gate: OpenWorldGate | None = None,
) -> Router:
    """The `kind` router over `experts` (name -> PEFT dir): prototypes from each dir's
    examples.jsonl, the MLP saved in `mlp_dir` (prototypes for the experts it has not
    seen), or Arrow from the adapters' `factors`. `gate` makes the prototype and MLP
    routers open-world (Arrow has no examples to calibrate one from: closed world)."""
    if kind in ("prototype", "mlp"):
        if embedder is None:
            raise ConfigurationError(f"the {kind} router needs an embedder")
        examples = {n: read_examples(p) for n, p in experts.items()}
        proto = PrototypeRouter.from_examples(embedder, examples, gate=gate)
        if kind == "prototype":
            return proto
        if mlp_dir is None:
            raise ConfigurationError("the mlp router needs the dir of its trained weights")
        return MLPRouter.load(mlp_dir, embedder, proto, examples)
    if kind == "arrow":
        if base_dir is None:
            raise ConfigurationError("the arrow router needs the base model dir")
        router = ArrowRouter(HiddenStateEmbedder(base_dir, layer=None))
        for name, path in experts.items():
            router.add_expert(name, factors[name] if factors else load_lora_factors(path))
        return router
    raise ConfigurationError(f"unknown router {kind!r}; routers: {', '.join(ROUTERS)}")


def router_with(
    router: Router, name: str, expert_dir: Path, factors: AdapterFactors | None = None
) -> Router:
    """A new router that also routes `name`; `router` is left as it was (a request routed
    by it keeps a consistent view). The MLP routes a new expert by its prototypes."""
    new = copy.copy(router)
    if isinstance(new, MLPRouter):
        if new.fallback is None:
            raise ConfigurationError("this MLP router has no prototypes to route a new expert")
        new.fallback = copy.copy(new.fallback)
        new.fallback.add_expert(name, read_examples(expert_dir))
    elif isinstance(new, PrototypeRouter):
        new.add_expert(name, read_examples(expert_dir))
    elif isinstance(new, ArrowRouter):
        new.add_expert(name, factors if factors is not None else load_lora_factors(expert_dir))
    else:
        raise ConfigurationError(f"the {router.name} router cannot take a new expert")
    return new


def router_without(router: Router, name: str) -> Router:
    """A new router that no longer routes `name`; `router` is left as it was."""
    new = copy.copy(router)
    if isinstance(new, MLPRouter):
        if new.fallback is None:
            raise ConfigurationError("this MLP router has no prototypes to drop an expert from")
        new.fallback = copy.copy(new.fallback)
        new.fallback.remove_expert(name)
        new.trained = new.trained - {name}
    elif isinstance(new, PrototypeRouter | ArrowRouter):
        new.remove_expert(name)
    else:
        raise ConfigurationError(f"the {router.name} router cannot drop an expert")
    return new


def load_router(
    name: str,
    experts_dir: Path,
    *,
    embedder: Embedder | None = None,
    base_dir: Path | None = None,
    gate: OpenWorldGate | None = None,
) -> Router:
    """The named router over the experts under `experts_dir`.

    prototype and mlp need `embedder` (the MLP the one it was trained on, and it falls
    back to prototypes for experts it has not seen); arrow needs the base model dir.
    `gate` makes prototype and mlp open-world.
    """
    if name in ("prototype", "mlp"):
        if embedder is None:
            raise ConfigurationError(f"the {name} router needs an embedder")
        examples = experts_examples(experts_dir)
        proto = PrototypeRouter.from_examples(embedder, examples, gate=gate)
        if name == "prototype":
            return proto
        return MLPRouter.load(mlp_router_dir(experts_dir), embedder, proto, examples)
    if name == "arrow":
        if base_dir is None:
            raise ConfigurationError("the arrow router needs the base model dir")
        return ArrowRouter.from_experts_dir(HiddenStateEmbedder(base_dir, layer=None), experts_dir)
    raise ConfigurationError(f"unknown router {name!r}; routers: {', '.join(ROUTERS)}")
