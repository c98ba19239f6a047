"""Score served models on the demo tasks through the OpenAI API (the official client).

Greedy (temperature 0), a fixed test split (unseen templates included), a set number of
requests in flight. Writes `results.json`, `results.md` (the exact-match table) and
`results.png` (a bar chart). The normalized score of a model is its accuracy on each task
divided by that task's own expert's accuracy (`expert:<task>`), averaged over tasks; it is
left out when the experts were not evaluated.

Every reply is appended to a cache (`replies.jsonl` beside the results) as it arrives;
`resume=True` reads it back and sends only the requests it does not hold, so a long
table (LoRA generation on a CPU is slow) can be built over several runs. A cached reply
counts only for the same model, split, prompt index, prompt and max_tokens; failed
requests are not cached, so a resumed run retries them.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mergeserve.service.model_ids import EXPERT_PREFIX
from mergeserve.tasks.base import Sample
from mergeserve.tasks.generators import TASKS, generate, get_task


@dataclass(frozen=True)
class Cell:
    accuracy: float
    held_out_accuracy: float | None
    """Accuracy on the test-only (unseen) templates alone."""
    n: int
    errors: int
    """Requests that failed (counted wrong)."""


@dataclass(frozen=True)
class EvalResult:
    models: tuple[str, ...]
    tasks: tuple[str, ...]
    n: int
    split: str
    cells: dict[str, dict[str, Cell]]
    """model -> task -> Cell."""
    normalized: dict[str, float | None]
    examples: dict[str, dict[str, list[dict[str, str]]]]
    """model -> task -> a few (prompt, answer, reply) for reading the failures."""
    outcomes: dict[str, dict[str, list[bool]]] = field(default_factory=dict)
    """model -> task -> exact match of each prompt, in split order (paired across
    models: the same prompts): what confidence intervals are drawn from."""
    build_s: dict[str, float] = field(default_factory=dict)
    """model -> seconds its static merge took to build (as GET /v1/models reports)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "tasks": list(self.tasks),
            "n": self.n,
            "split": self.split,
            "accuracy": {
                m: {t: asdict(c) for t, c in row.items()} for m, row in self.cells.items()
            },
            "normalized": self.normalized,
            "build_s": self.build_s,
            "examples": self.examples,
        }


def expand_models(patterns: Sequence[str], served: Sequence[str]) -> list[str]:
    """'expert:*' (any 'prefix*') expands to the served ids with that prefix, in order."""
    out: list[str] = []
    for p in patterns:
        if p.endswith("*"):
            matches = [m for m in served if m.startswith(p[:-1])]
            if not matches:
                raise ValueError(f"{p!r} matches no served model; served: {', '.join(served)}")
            out += [m for m in matches if m not in out]
        else:
            if p not in served:
                raise ValueError(f"{p!r} is not served; served: {', '.join(served)}")
            if p not in out:
                out.append(p)
    return out


def normalized_scores(
    cells: dict[str, dict[str, Cell]], tasks: Sequence[str]
) -> dict[str, float | None]:
    """mean over tasks of acc(model, task) / acc(expert:task, task); None without experts."""
    refs: dict[str, float] = {}
    for t in tasks:
        ref = cells.get(f"{EXPERT_PREFIX}{t}", {}).get(t)
        if ref is not None and ref.accuracy > 0:
            refs[t] = ref.accuracy
    if not refs:
        return dict.fromkeys(cells)
    return {m: sum(row[t].accuracy / refs[t] for t in refs) / len(refs) for m, row in cells.items()}


REPLIES_FILE = "replies.jsonl"
ReplyKey = tuple[str, str | None, str, str, int, str, int]
"""(model, its content digest from /v1/models, task, split, prompt index, prompt,
max_tokens). The digest keeps a reply from being reused once the model behind a name
changes (a retrained expert, a new router); since equal digests give equal greedy
replies, a model with a digest is keyed by the digest alone (model ""), so `dynamic`
reuses the replies of the arm it is an alias of. A server that gives none keys by name."""


def load_reply_cache(path: Path) -> dict[ReplyKey, str]:
    """Replies cached by earlier runs (a torn last line from a killed run is skipped)."""
    cache: dict[ReplyKey, str] = {}
    if not path.is_file():
        return cache
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            digest = r.get("digest")
            key = (
                "" if digest else r["model"],
                digest,
                r["task"],
                r["split"],
                r["i"],
                r["prompt"],
                r["max_tokens"],
            )
            cache[key] = str(r["reply"])
        except (ValueError, KeyError, TypeError):
            continue
    return cache


def _open_cache(path: Path) -> TextIO:
    """Open the reply cache for appending, ending a line torn by a killed run first
    (the torn line is skipped on load; the reply after it must start a line of its own)."""
    torn = False
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    sink = path.open("a")
    if torn:
        sink.write("\n")
    return sink


async def _run(
    base_url: str,
    models: Sequence[str],
    samples: dict[str, list[Sample]],
    split: str,
    concurrency: int,
    max_tokens: int,
    api_key: str,
    timeout: float,  # noqa: ASYNC109 (the openai client's per-request timeout)
    cache: dict[ReplyKey, str],
    cache_file: Path | None,
    digests: dict[str, str | None],
) -> dict[tuple[str, str], list[str | None]]:
    import openai
    from tqdm import tqdm

    # A batch job: a server shedding load (503 + Retry-After) is waited for, patiently.
    client = openai.AsyncOpenAI(
        base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key, timeout=timeout, max_retries=8
    )
    sem = asyncio.Semaphore(concurrency)
    replies: dict[tuple[str, str], list[str | None]] = {}
    todo = []
    for m in models:
        for t, ss in samples.items():
            row = replies[(m, t)] = [None] * len(ss)
            for i, s in enumerate(ss):
                d = digests.get(m)
                cached = cache.get(("" if d else m, d, t, split, i, s.prompt, max_tokens))
                if cached is None:
                    todo.append((m, t, i, s.prompt))
                row[i] = cached
    bar = tqdm(total=len(todo), desc="eval", unit="req")
    sink = _open_cache(cache_file) if cache_file is not None else None

    async def one(model: str, task: str, i: int, prompt: str) -> None:
        async with sem:
            try:
                r = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=0,
                    max_tokens=max_tokens,
                )
                reply = r.choices[0].message.content or ""
                replies[(model, task)][i] = reply
                if sink is not None:
                    record = {
                        "model": model,
                        "digest": digests.get(model),
                        "task": task,
                        "split": split,
                        "i": i,
                        "prompt": prompt,
                        "max_tokens": max_tokens,
                        "reply": reply,
                    }
                    sink.write(json.dumps(record) + "\n")
                    sink.flush()
            except openai.APIError:
                replies[(model, task)][i] = None
            finally:
                bar.update(1)

    try:
        await asyncio.gather(*(one(*job) for job in todo))
    finally:
        bar.close()
        if sink is not None:
            sink.close()
        await client.close()
    return replies


def _collect(
    base_url: str,
    models: Sequence[str],
    samples: dict[str, list[Sample]],
    split: str,
    concurrency: int,
    max_tokens: int,
    api_key: str,
    timeout: float,
    cache_file: Path | None,
    resume: bool,
) -> tuple[list[str], dict[tuple[str, str], list[str | None]], dict[str, float]]:
    """(the models chosen, their replies by (model, task), each static merge's build s)."""
    import openai

    with openai.OpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key) as c:
        cards = c.models.list().data
    served = [m.id for m in cards]
    digests: dict[str, str | None] = {m.id: (m.model_extra or {}).get("digest") for m in cards}
    build_s = {
        m.id: float(b) for m in cards if (b := (m.model_extra or {}).get("build_s")) is not None
    }
    chosen = expand_models(models, served)
    cache: dict[ReplyKey, str] = {}
    if cache_file is not None:
        if resume:
            cache = load_reply_cache(cache_file)
        else:
            cache_file.unlink(missing_ok=True)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
    replies = asyncio.run(
        _run(
            base_url,
            chosen,
            samples,
            split,
            concurrency,
            max_tokens,
            api_key,
            timeout,
            cache,
            cache_file,
            digests,
        )
    )
    return chosen, replies, build_s


def evaluate(
    base_url: str,
    models: Sequence[str],
    tasks: Sequence[str] | None = None,
    n: int = 100,
    concurrency: int = 8,
    max_tokens: int = 48,
    split: str = "test",
    api_key: str = "unused",
    timeout: float = 600.0,
    cache_file: Path | None = None,
    resume: bool = False,
    phrasings: bool = False,
) -> EvalResult:
    """Score `models` ('expert:*' expands against GET /v1/models) on `tasks` (default all).

    With `cache_file`, replies are appended to it as they come; with `resume`, the replies
    it already holds are reused instead of asked again (without, it is started afresh).
    `phrasings=True` asks the demo tasks in the unseen phrasings of
    `mergeserve.tasks.phrasings` instead of the task templates.
    """
    task_names = list(tasks or TASKS)
    for t in task_names:
        get_task(t)
    if phrasings:
        from mergeserve.tasks.phrasings import generate_phrasings

        samples = {t: generate_phrasings(t, split, n) for t in task_names}  # type: ignore[arg-type]
    else:
        samples = {t: generate(t, split, n) for t in task_names}  # type: ignore[arg-type]
    chosen, replies, build_s = _collect(
        base_url, models, samples, split, concurrency, max_tokens, api_key, timeout,
        cache_file, resume,
    )  # fmt: skip
    cells: dict[str, dict[str, Cell]] = {}
    examples: dict[str, dict[str, list[dict[str, str]]]] = {}
    outcomes: dict[str, dict[str, list[bool]]] = {}
    for m in chosen:
        cells[m], examples[m], outcomes[m] = {}, {}, {}
        for t in task_names:
            task, ss, rs = get_task(t), samples[t], replies[(m, t)]
            ok = [r is not None and task.matches(r, s.answer) for r, s in zip(rs, ss, strict=True)]
            held = [o for o, s in zip(ok, ss, strict=True) if s.held_out]
            outcomes[m][t] = ok
            cells[m][t] = Cell(
                accuracy=sum(ok) / len(ok),
                held_out_accuracy=sum(held) / len(held) if held else None,
                n=len(ok),
                errors=sum(r is None for r in rs),
            )
            examples[m][t] = [
                {"prompt": s.prompt, "answer": s.answer, "reply": r if r is not None else "<error>"}
                for r, s in list(zip(rs, ss, strict=True))[:3]
            ]
    return EvalResult(
        tuple(chosen),
        tuple(task_names),
        n,
        split,
        cells,
        normalized_scores(cells, task_names),
        examples,
        outcomes,
        {m: build_s[m] for m in chosen if m in build_s},
    )


def markdown_table(result: EvalResult) -> str:
    """Exact match (%) per model and task, held-out-template accuracy, normalized score,
    and (when any model reports one) the seconds its static merge took to build."""
    timed = bool(result.build_s)
    head = ["model", *result.tasks, "mean", "unseen templates", "normalized"]
    head += ["build s"] if timed else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in result.models:
        row = result.cells[m]
        accs = [row[t].accuracy for t in result.tasks]
        held = [row[t].held_out_accuracy for t in result.tasks]
        held_v = [h for h in held if h is not None]
        norm = result.normalized.get(m)
        cols = [
            f"`{m}`",
            *(f"{100 * a:.0f}" for a in accs),
            f"{100 * sum(accs) / len(accs):.1f}",
            f"{100 * sum(held_v) / len(held_v):.1f}" if held_v else "–",
            f"{norm:.2f}" if norm is not None else "–",
        ]
        if timed:
            b = result.build_s.get(m)
            cols.append(f"{b:.1f}" if b is not None else "–")
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(result: EvalResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(result.tasks) + 3), 4.5))
    width = 0.8 / max(1, len(result.models))
    for i, m in enumerate(result.models):
        xs = [j + i * width for j in range(len(result.tasks))]
        ax.bar(xs, [100 * result.cells[m][t].accuracy for t in result.tasks], width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(result.tasks))], list(result.tasks))
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"mergeserve demo tasks, {result.split} split, n={result.n} per task")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ranking_chart(result: EvalResult, path: Path) -> Path:
    """Mean exact match of every model, best first, with each static merge's build time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = {
        m: 100 * sum(result.cells[m][t].accuracy for t in result.tasks) / len(result.tasks)
        for m in result.models
    }
    order = sorted(result.models, key=lambda m: means[m])
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(order) + 1.2))
    colors = [
        "tab:green"
        if m.startswith("dynamic")
        else "tab:blue"
        if m.startswith("static")
        else "tab:gray"
        for m in order
    ]
    ax.barh(range(len(order)), [means[m] for m in order], color=colors)
    for i, m in enumerate(order):
        b = result.build_s.get(m)
        label = f"{means[m]:.1f}" + (f"  (built in {b:.0f} s)" if b is not None else "")
        ax.text(means[m] + 0.5, i, label, va="center", fontsize=7)
    ax.set_yticks(range(len(order)), order, fontsize=8)
    ax.set_xlim(0, 115)
    ax.set_xlabel(f"mean exact match (%), {result.split} split, n={result.n} per task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(result: EvalResult, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "results.md",
        "chart": out_dir / "results.png",
        "ranking": out_dir / "ranking.png",
    }
    paths["json"].write_text(json.dumps(result.to_json(), indent=2))
    paths["markdown"].write_text(markdown_table(result))
    bar_chart(result, paths["chart"])
    ranking_chart(result, paths["ranking"])
    return paths


# ---------------------------------------------------------------------- general split

GENERAL_TASK = "general"
"""The task name the general split's replies are cached under."""


def token_f1(reply: str, reference: str) -> float:
    """Bag-of-words F1 of `reply` against `reference` (whitespace tokens, casefolded):
    a softer measure than equality of how much of base's reply a model kept."""
    a, b = reply.casefold().split(), reference.casefold().split()
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class HarmCell:
    same_as_base: float
    """Fraction of prompts whose reply equals base's greedy reply (whitespace-stripped)."""
    overlap: float
    """Mean token F1 against base's reply."""
    n: int
    errors: int
    by_category: dict[str, float]
    """same_as_base per category."""


def evaluate_general(
    base_url: str,
    models: Sequence[str],
    split: str = "test",
    concurrency: int = 8,
    max_tokens: int = 32,
    api_key: str = "unused",
    timeout: float = 600.0,
    cache_file: Path | None = None,
    resume: bool = False,
) -> dict[str, HarmCell]:
    """Score `models` on the general split (requests outside every skill) by harm: how
    often each model's reply is base's reply. `base` is asked too (the reference)."""
    from mergeserve.tasks.open_world import general_prompts

    prompts = general_prompts(split)  # type: ignore[arg-type]
    samples = {GENERAL_TASK: [Sample(GENERAL_TASK, g.prompt, "", 0, False) for g in prompts]}
    wanted = ["base", *(m for m in models if m != "base")]
    chosen, replies, _ = _collect(
        base_url, wanted, samples, split, concurrency, max_tokens, api_key, timeout,
        cache_file, resume,
    )  # fmt: skip
    ref = replies[("base", GENERAL_TASK)]
    out: dict[str, HarmCell] = {}
    for m in chosen:
        rs = replies[(m, GENERAL_TASK)]
        same = [
            r is not None and b is not None and r.strip() == b.strip()
            for r, b in zip(rs, ref, strict=True)
        ]
        f1 = [
            token_f1(r, b) if r is not None and b is not None else 0.0
            for r, b in zip(rs, ref, strict=True)
        ]
        cats: dict[str, list[bool]] = {}
        for g, ok in zip(prompts, same, strict=True):
            cats.setdefault(g.category, []).append(ok)
        out[m] = HarmCell(
            same_as_base=sum(same) / len(same),
            overlap=sum(f1) / len(f1),
            n=len(same),
            errors=sum(r is None for r in rs),
            by_category={c: sum(v) / len(v) for c, v in sorted(cats.items())},
        )
    return out


def harm_table(cells: Mapping[str, HarmCell]) -> str:
    lines = [
        "| model | same reply as base (%) | token F1 with base | n | errors |",
        "|---|---|---|---|---|",
    ]
    for m, c in cells.items():
        lines.append(
            f"| `{m}` | {100 * c.same_as_base:.1f} | {c.overlap:.3f} | {c.n} | {c.errors} |"
        )
    return "\n".join(lines) + "\n"
