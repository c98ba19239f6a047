"""The base model run with LoRA deltas patched in: the data side of merging.

RegMean needs the Gram matrices of every adapted linear layer's inputs, Fisher merging
the squared gradients of each expert's log-likelihood, AdaMerging the gradient of the
prediction entropy with respect to the merge coefficients, and the evolutionary search
one loss per candidate. All of them run the Hugging Face base model with low-rank terms
added by forward hooks — y = W x + B diag(c) A x, what a served LoRA computes, with a
coefficient per rank column — so a candidate merge is never written into the weights,
and changing one costs nothing but the next forward pass.

Torch and transformers only (no vLLM); the model is loaded once per process and dir.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergeserve.adapters.lowrank import AdapterFactors, aligned_or_empty, union_layout
from mergeserve.errors import InvalidRequestError


@dataclass(frozen=True)
class Example:
    """One example of an expert's task: a user prompt and (when labelled) the answer."""

    prompt: str
    answer: str | None = None


PEFT_PREFIX = "base_model.model."
"""What PEFT puts before the model's own module names."""

IGNORE = -100


def read_examples(path: Path, *, labelled: bool = False) -> tuple[Example, ...]:
    """The examples of a JSONL file: one {"prompt": ..., "answer": ...} a line (answer
    optional unless `labelled`). A malformed line is an error that names it."""
    rows: list[Example] = []
    if not path.is_file():
        return ()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path}:{n}: not JSON ({e.msg})", param="examples") from e
        prompt, answer = (
            (obj.get("prompt"), obj.get("answer"))
            if isinstance(obj, dict)
            else (
                None,
                None,
            )
        )
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError(f'{path}:{n}: needs a non-empty "prompt"', param="examples")
        if answer is not None and not isinstance(answer, str):
            raise InvalidRequestError(f'{path}:{n}: "answer" must be a string', param="examples")
        if labelled and not answer:
            raise InvalidRequestError(f'{path}:{n}: needs an "answer"', param="examples")
        rows.append(Example(prompt, answer or None))
    return tuple(rows)


def module_path(prefix: str, kind: str, layer: int) -> str:
    """The HF module name of an adapter module: ('base_model.model.model', 'mlp.up_proj', 3)
    -> 'model.layers.3.mlp.up_proj'."""
    return f"{prefix.removeprefix(PEFT_PREFIX)}.layers.{layer}.{kind}"


@functools.lru_cache(maxsize=2)
def load_base(base_dir: str) -> tuple[Any, Any]:
    """(causal LM, tokenizer) of a HF dir: fp32, eval mode, no parameter requires grad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return model, tokenizer


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ batches


@dataclass(frozen=True)
class Batch:
    ids: Tensor
    """[N, S] right-padded token ids."""
    mask: Tensor
    """[N, S] 1 on real tokens."""
    labels: Tensor
    """[N, S] the answer's tokens, IGNORE elsewhere (all IGNORE for prompts alone)."""
    last: Tensor
    """[N] the position of each prompt's last token (it predicts the answer's first)."""


def chat_head(tokenizer: Any, prompt: str) -> str:
    """The rendered chat up to the assistant's turn, as the server renders a request."""
    user = [{"role": "user", "content": prompt}]
    return str(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True))


def encode_example(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one chat turn; labels are IGNORE except on the answer turn."""
    head = chat_head(tokenizer, prompt)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        tokenize=False,
    )
    if not full.startswith(head):
        raise ValueError("the chat template does not extend the prompt with the answer")
    head_ids = tokenizer.encode(head, add_special_tokens=False)
    tail_ids = tokenizer.encode(full[len(head) :].rstrip("\n"), add_special_tokens=False)
    return head_ids + tail_ids, [IGNORE] * len(head_ids) + tail_ids


def encode(tokenizer: Any, examples: Sequence[Example], answers: bool) -> Batch:
    """Chat-formatted examples as the server renders them: the prompt turn, and with
    `answers` the assistant's answer after it (labels on the answer only)."""
    rows: list[tuple[list[int], list[int], int]] = []
    for e in examples:
        head_ids = tokenizer.encode(chat_head(tokenizer, e.prompt), add_special_tokens=False)
        if answers and e.answer is not None:
            row_ids, row_labels = encode_example(tokenizer, e.prompt, e.answer)
        else:
            row_ids, row_labels = head_ids, [IGNORE] * len(head_ids)
        rows.append((row_ids, row_labels, len(head_ids) - 1))
    width = max(len(ids) for ids, _, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y, _) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return Batch(ids, mask, labels, torch.tensor([last for _, _, last in rows]))


def answer_logits(model: Any, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, targets) at the answer positions only: with a 49k vocabulary and prompts
    ~10x longer than answers, full-sequence logits would be a large share of a CPU step."""
    target = labels[:, 1:]
    keep = target != IGNORE
    return model.lm_head(hidden[:, :-1][keep]).float(), target[keep]


def batches(
    tokenizer: Any, examples: Sequence[Example], answers: bool, size: int = 8
) -> Iterator[Batch]:
    for i in range(0, len(examples), size):
        yield encode(tokenizer, examples[i : i + size], answers)


# ------------------------------------------------------------------------------ the patch


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (RegMean++ needs one layer's inputs)."""


Term = tuple[Tensor, Tensor, Tensor]
"""(A [R, in], B [out, R], coef [R]): adds B diag(coef) A x to a module's output."""


class DeltaPatch:
    """Low-rank terms added to a causal LM's linear modules by forward hooks, and the
    Gram matrices of those modules' inputs when asked. A context manager: the hooks
    exist inside `with`, and the model is left as it was."""

    def __init__(self, model: Any, paths: Sequence[str]):
        self.model = model
        self.paths = tuple(paths)
        self.modules: dict[str, nn.Linear] = {}
        for p in self.paths:
            m = model.get_submodule(p)
            if not isinstance(m, nn.Linear):
                raise InvalidRequestError(f"{p} is not a linear module of the base model")
            self.modules[p] = m
        self.terms: dict[str, Term] = {}
        self.capture: set[str] = set()
        self.grams: dict[str, Tensor] = {}
        self.tokens = 0
        self.token_mask: Tensor | None = None
        self.stop_at: nn.Module | None = None
        self._handles: list[Any] = []
        self._last: tuple[Tensor, Tensor] | None = None

    def __enter__(self) -> DeltaPatch:
        for p, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._hook(p)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, path: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
            x = inputs[0]
            if path in self.capture:
                self._accumulate(path, x)
            term = self.terms.get(path)
            if term is not None:
                a, b, c = term
                out = out + ((x @ a.T) * c) @ b.T
            return out

        return hook

    def _accumulate(self, path: str, x: Tensor) -> None:
        # q/k/v (and gate/up) see the same input tensor: its Gram is computed once. The
        # tensor itself is kept (not its address, which a later tensor may reuse).
        if self._last is None or self._last[0] is not x:
            flat = x.detach().reshape(-1, x.shape[-1])
            if self.token_mask is not None:
                flat = flat[self.token_mask.reshape(-1).bool()]
            self._last = (x, flat.T @ flat)
        g = self._last[1]
        self.grams[path] = self.grams[path] + g if path in self.grams else g.clone()

    def set_terms(self, terms: Mapping[str, Term]) -> None:
        self.terms = dict(terms)

    def forward(self, batch: Batch) -> Any:
        """The base model's body on a batch; StopForward (a stop layer) returns None."""
        self.token_mask = batch.mask
        self._last = None
        try:
            return self.model.model(input_ids=batch.ids, attention_mask=batch.mask)
        except StopForward:
            return None
        finally:
            self.token_mask = None
            self._last = None

    @contextmanager
    def stopping_after(self, module: nn.Module) -> Iterator[None]:
        """Forward passes end once `module` has run (its output is not needed)."""

        def stop(*_: object) -> None:
            raise StopForward

        h = module.register_forward_hook(stop)
        try:
            yield
        finally:
            h.remove()

    @torch.no_grad()
    def input_grams(
        self, tokenizer: Any, examples: Sequence[Example], paths: Sequence[str]
    ) -> dict[str, Tensor]:
        """{path: Xᵀ X / n} of every module in `paths` over the examples' tokens (prompt
        and answer, padding excluded), float64."""
        self.capture, self.grams, tokens = set(paths), {}, 0
        try:
            for batch in batches(tokenizer, examples, answers=True):
                self.forward(batch)
                tokens += int(batch.mask.sum())
        finally:
            self.capture = set()
        grams, self.grams = self.grams, {}
        return {p: g.double() / max(tokens, 1) for p, g in grams.items()}


# ------------------------------------------------------------------------------ terms


@dataclass(frozen=True)
class ModuleTerms:
    """Every expert's factors of one module, side by side (rank-concatenated)."""

    path: str
    kind: str
    layer: int
    a: Tensor
    """[Σ rᵢ, in]"""
    b: Tensor
    """[out, Σ rᵢ]"""
    ranks: tuple[int, ...]
    """rᵢ of each expert (its block of columns; an expert without the module has zeros)."""

    def expert(self, i: int) -> tuple[Tensor, Tensor]:
        lo = sum(self.ranks[:i])
        hi = lo + self.ranks[i]
        return self.a[lo:hi], self.b[:, lo:hi]

    def coef(self, c: Tensor) -> Tensor:
        """Per-column coefficients from per-expert ones c [T]."""
        return torch.repeat_interleave(c, torch.tensor(self.ranks))

    def one_hot(self, i: int) -> Tensor:
        c = torch.zeros(len(self.ranks), dtype=self.a.dtype)
        c[i] = 1.0
        return self.coef(c)


def module_terms(experts: Sequence[AdapterFactors]) -> list[ModuleTerms]:
    """Per adapted module (in layer order, then kind), the experts' factors side by side."""
    layout = union_layout(experts)
    prefix = experts[0].prefix
    out = []
    for kind, lay in layout.items():
        like = next(e.groups[kind] for e in experts if kind in e.groups)
        stacks = [aligned_or_empty(e, kind, lay, like) for e in experts]
        for j, layer in enumerate(lay):
            out.append(
                ModuleTerms(
                    module_path(prefix, kind, layer),
                    kind,
                    layer,
                    torch.cat([s.A[j] for s in stacks]).float(),
                    torch.cat([s.B[j] for s in stacks], dim=1).float(),
                    tuple(s.rank for s in stacks),
                )
            )
    out.sort(key=lambda m: (m.layer, m.kind))
    return out


def expert_terms(mods: Sequence[ModuleTerms], i: int) -> dict[str, Term]:
    """The patch that makes the base model expert i."""
    return {m.path: (m.a, m.b, m.one_hot(i)) for m in mods}


def decoder_layer(model: nn.Module, m: ModuleTerms) -> nn.Module:
    """The decoder block that holds module `m`."""
    return model.get_submodule(m.path[: -len(m.kind) - 1])
