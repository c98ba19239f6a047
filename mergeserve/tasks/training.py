"""Train one LoRA expert on one task, on a CPU, with PEFT.

The recipe: the chat template applied exactly as the server applies it, loss on the
answer tokens (and the end-of-turn token) only, AdamW with warm-up and linear decay,
fixed seed, fp32. The output dir is a PEFT LoRA dir (fp16 safetensors) plus
`examples.jsonl` (training prompts: the router's prototypes) and `card.json` (how it
was trained and how it scored on the dev split).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeserve.adapters.calibration import Example, answer_logits, chat_head, encode
from mergeserve.adapters.peft_io import model_name
from mergeserve.config import LLAMA_PROJECTIONS
from mergeserve.tasks.base import Sample, Task, score
from mergeserve.tasks.composed import COMPOSERS
from mergeserve.tasks.generators import generate, get_task


@dataclass(frozen=True)
class TrainConfig:
    task: str
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 10
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LLAMA_PROJECTIONS
    seed: int = 0
    threads: int | None = None
    dev_n: int = 50
    n_examples: int = 20
    base_model_name: str | None = None
    """Written as base_model_name_or_path (default: the base dir's name)."""
    init_from: str | None = None
    """An expert dir to continue training from (same rank and targets); its card's steps
    and wall time are carried into the new card's totals."""
    paraphrases: bool = False
    """Train on the task's train-only paraphrases too (`Task.paraphrases`)."""
    composed: bool = False
    """Give a third of the training prompts to phrasings composed from parts
    (`mergeserve.tasks.composed`; tasks with a composer only)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse what training would refuse, before a base model is loaded."""
        get_task(self.task)  # ValueError: an unknown task, naming the known ones
        if self.composed and self.task not in COMPOSERS:
            raise ValueError(
                f"task {self.task!r} has no composer (--composed); tasks with one: "
                f"{', '.join(sorted(COMPOSERS))}"
            )


def _batch(
    tokenizer: Any, samples: Sequence[Sample]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = encode(tokenizer, [Example(s.prompt, s.answer) for s in samples], answers=True)
    return b.ids, b.labels, b.mask


def answer_loss(
    causal_lm: Any, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) positions: the same value
    as `causal_lm(..., labels=labels).loss`, with the vocabulary projection on the answer
    positions only (`answer_logits`)."""
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits, target = answer_logits(causal_lm, hidden, labels)
    return torch.nn.functional.cross_entropy(logits, target)


@torch.no_grad()
def greedy_replies(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 32, batch: int = 16
) -> list[str]:
    """Greedy completions of chat prompts (left-padded batches)."""
    out: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i in range(0, len(prompts), batch):
        rows = [
            tokenizer.encode(chat_head(tokenizer, p), add_special_tokens=False)
            for p in prompts[i : i + batch]
        ]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def train_expert(
    base_dir: Path, out_dir: Path, config: TrainConfig, progress: bool = True
) -> dict[str, Any]:
    """Train, evaluate on dev, write the expert dir atomically; returns the card."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task: Task = get_task(config.task)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.targets),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    prior: dict[str, Any] = {}
    if config.init_from is not None:
        from peft import PeftModel

        init = Path(config.init_from)
        pm = PeftModel.from_pretrained(model, init, is_trainable=True)
        got = pm.peft_config["default"]
        if got.r != config.rank or set(got.target_modules) != set(config.targets):
            raise ValueError(
                f"{init}: rank {got.r} on {sorted(got.target_modules)}; this run asks for "
                f"rank {config.rank} on {sorted(config.targets)}"
            )
        card_path = init / "card.json"
        if card_path.is_file():
            prior = json.loads(card_path.read_text())
    else:
        pm = get_peft_model(model, lora)
    train = generate(
        task,
        "train",
        config.steps * config.batch_size,
        seed=1000 + config.seed,
        paraphrases=config.paraphrases,
        composed=config.composed,
    )
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=config.lr)

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        rest = max(1, config.steps - config.warmup_steps)
        return max(0.05, 1.0 - (step - config.warmup_steps) / rest)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    pm.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc=f"train {task.name}", disable=not progress)
    for step in bar:
        chunk = train[step * config.batch_size : (step + 1) * config.batch_size]
        ids, labels, mask = _batch(tokenizer, chunk)
        loss = answer_loss(pm.base_model.model, ids, labels, mask)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {step}")
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(value)
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    train_s = time.perf_counter() - t0
    pm.eval()
    dev = generate(task, "dev", config.dev_n)
    replies = greedy_replies(pm, tokenizer, [s.prompt for s in dev])
    dev_acc = score(task, replies, dev)
    card = {
        "task": task.name,
        "base": config.base_model_name or model_name(str(base_dir.resolve())),
        "config": {k: v for k, v in asdict(config).items() if k not in ("extra",)} | config.extra,
        "steps": config.steps,
        "train_wall_s": round(train_s, 1),
        "total_steps": config.steps + int(prior.get("total_steps", prior.get("steps", 0))),
        "total_train_wall_s": round(
            train_s + float(prior.get("total_train_wall_s", prior.get("train_wall_s", 0.0))), 1
        ),
        "final_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 5),
        "dev_accuracy": dev_acc,
        "dev_n": len(dev),
        "torch_threads": torch.get_num_threads(),
    }
    card = dict(json.loads(json.dumps(card)))  # exactly what card.json will hold
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        pm.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
        weights = tmp / "adapter_model.safetensors"
        save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights))
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = card["base"]
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        with (tmp / "examples.jsonl").open("w") as f:
            for s in train[: config.n_examples]:
                f.write(json.dumps({"prompt": s.prompt, "answer": s.answer}) + "\n")
        (tmp / "card.json").write_text(json.dumps(card, indent=2))
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card
