"""`mergeserve ab-report`: compare an A/B experiment's arms, with bootstrap intervals.

Two sources, either or both:

* offline (labelled prompts): every arm answers the same test-split prompts of the demo
  tasks through the server (the evaluation harness, `evaluate`), so arms are compared
  *paired*: the interval of a difference resamples prompts, the same ones for both arms,
  within each task (stratified);
* feedback: the scores clients sent with `POST /v1/feedback`, read from the server's
  append-only log, per arm (independent samples: each arm resampled on its own).
  `online=N` sends N labelled prompts per task through the experiment itself (sticky
  users, real assignment) and posts each reply's exact match as its feedback: the online
  path end to end, with a known-correct scorer standing in for users.

Writes `ab-report.md`, `ab-report.json` and `ab-report.png`, and says plainly which arm
wins, or that the data cannot tell.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeserve.tasks.evaluate import evaluate
from mergeserve.tasks.generators import TASKS, generate, get_task

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        v, lo, hi = (round(x * scale, digits) for x in (self.value, self.low, self.high))
        return f"{v} [{lo}, {hi}]"

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _quantiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    a = (1 - CONFIDENCE) / 2
    lo = xs[int(a * (len(xs) - 1))]
    hi = xs[int((1 - a) * (len(xs) - 1) + 0.5)]
    return lo, hi


def _intervals(
    point: Mapping[str, float], samples: Mapping[str, list[float]]
) -> tuple[dict[str, Interval], dict[tuple[str, str], Interval]]:
    """Percentile intervals of each arm and of each difference a − b, from bootstrap
    samples drawn together (sample i of every arm comes from the same resample)."""
    each = {a: Interval(point[a], *_quantiles(samples[a])) for a in point}
    diffs = {}
    for a in point:
        for b in point:
            if a != b:
                d = [x - y for x, y in zip(samples[a], samples[b], strict=True)]
                diffs[(a, b)] = Interval(point[a] - point[b], *_quantiles(d))
    return each, diffs


def paired_bootstrap(
    outcomes: Mapping[str, Mapping[str, Sequence[bool]]],
    arms: Sequence[str],
    boot: int = 2000,
    seed: int = 0,
) -> tuple[dict[str, Interval], dict[tuple[str, str], Interval]]:
    """Accuracy of each arm over every prompt, and of each difference a − b, with
    percentile intervals from resampling prompts within each task (the same resample
    for every arm: the comparison is paired)."""
    tasks = list(next(iter(outcomes.values())))
    rng = random.Random(seed)
    sizes = {t: len(outcomes[arms[0]][t]) for t in tasks}
    total = sum(sizes.values())

    def acc(arm: str, picks: Mapping[str, Sequence[int]]) -> float:
        return sum(outcomes[arm][t][i] for t in tasks for i in picks[t]) / total

    full = {t: range(sizes[t]) for t in tasks}
    point = {a: acc(a, full) for a in arms}
    samples: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(boot):
        picks = {t: [rng.randrange(sizes[t]) for _ in range(sizes[t])] for t in tasks}
        for a in arms:
            samples[a].append(acc(a, picks))
    return _intervals(point, samples)


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


TRIM = 0.1
"""The share of scores cut from each end for the trimmed mean."""


def trimmed_mean(xs: Sequence[float], trim: float = TRIM) -> float:
    """The mean of `xs` without its `trim` lowest and `trim` highest shares: a few
    extreme scores cannot move it far."""
    k = int(len(xs) * trim)
    ys = sorted(xs)[k : len(xs) - k] or sorted(xs)
    return sum(ys) / len(ys)


def independent_bootstrap(
    scores: Mapping[str, Sequence[float]],
    boot: int = 2000,
    seed: int = 0,
    stat: Callable[[Sequence[float]], float] = mean,
) -> tuple[dict[str, Interval], dict[tuple[str, str], Interval]]:
    """`stat` (default: the mean) of each arm's scores and of each difference, arms
    resampled independently."""
    rng = random.Random(seed)
    arms = [a for a, s in scores.items() if s]
    point = {a: stat(scores[a]) for a in arms}
    samples: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(boot):
        for a in arms:
            s = scores[a]
            samples[a].append(stat([s[rng.randrange(len(s))] for _ in s]))
    return _intervals(point, samples)


def verdict(
    each: Mapping[str, Interval], diffs: Mapping[tuple[str, str], Interval], what: str, unit: str
) -> str:
    """One plain sentence: the best arm and whether the data can tell it apart."""
    if len(each) < 2:
        return f"{what}: one arm only, nothing to compare."
    best = max(each, key=lambda a: each[a].value)
    others = [a for a in each if a != best]
    clear = [a for a in others if diffs[(best, a)].excludes_zero()]
    parts = []
    for a in others:
        d = diffs[(best, a)]
        parts.append(f"`{best}` − `{a}` = {d.fmt(*unit_scale(unit))} {unit}")
    if len(clear) == len(others):
        return (
            f"{what}: **`{best}` is better** than "
            + ", ".join(f"`{a}`" for a in others)
            + f" ({'; '.join(parts)}; {int(CONFIDENCE * 100)}% intervals exclude 0)."
        )
    return (
        f"{what}: **no clear winner**: `{best}` scores highest, but "
        + ", ".join(f"`{a}`" for a in others if a not in clear)
        + f" cannot be told apart from it ({'; '.join(parts)}; the interval includes 0)."
    )


def unit_scale(unit: str) -> tuple[float, int]:
    return (100.0, 1) if unit == "points" else (1.0, 3)


# ---------------------------------------------------------------------------- online


def online_feedback(
    base_url: str,
    experiment: str,
    tasks: Sequence[str],
    n: int,
    concurrency: int,
    max_tokens: int,
    api_key: str = "unused",
) -> int:
    """Send n labelled test prompts per task through the experiment, each from its own
    user, and post each reply's exact match (1 or 0) as its feedback. Returns how many
    feedbacks were recorded."""
    import asyncio

    import httpx
    import openai

    async def run() -> int:
        client = openai.AsyncOpenAI(
            base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key, max_retries=8, timeout=600
        )
        sem = asyncio.Semaphore(concurrency)
        sent = 0
        async with httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=60) as http:

            async def one(task: str, i: int, prompt: str, answer: str) -> None:
                nonlocal sent
                async with sem:
                    r = await client.chat.completions.create(
                        model=experiment,
                        messages=[{"role": "user", "content": prompt}],
                        temperature=0,
                        max_tokens=max_tokens,
                        user=f"ab-report-{task}-{i}",
                    )
                    ok = get_task(task).matches(r.choices[0].message.content or "", answer)
                    fb = await http.post("/v1/feedback", json={"id": r.id, "score": float(ok)})
                    fb.raise_for_status()
                    sent += 1

            jobs = [
                one(t, i, s.prompt, s.answer)
                for t in tasks
                for i, s in enumerate(generate(t, "dev", n))
            ]
            await asyncio.gather(*jobs)
        await client.close()
        return sent

    return asyncio.run(run())


# ---------------------------------------------------------------------------- report


def experiment_arms(base_url: str, experiment: str, api_key: str = "unused") -> dict[str, float]:
    import openai

    from mergeserve.errors import InvalidRequestError

    with openai.OpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key) as c:
        try:
            card = c.models.retrieve(experiment)
        except openai.NotFoundError:
            raise InvalidRequestError(f"{base_url} serves no model {experiment!r}") from None
    arms = (card.model_extra or {}).get("arms")
    if not arms:
        raise InvalidRequestError(f"{experiment!r} is a model, not an A/B experiment")
    return {str(k): float(v) for k, v in arms.items()}


def ab_report(
    base_url: str,
    experiment: str,
    out_dir: Path,
    *,
    tasks: Sequence[str] | None = None,
    n: int = 50,
    offline: bool = True,
    feedback_log: Path | None = None,
    concurrency: int = 8,
    max_tokens: int = 32,
    reply_cache: Path | None = None,
    resume: bool = True,
    boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    from mergeserve.service.experiments import read_feedback

    arms = experiment_arms(base_url, experiment)
    names = list(arms)
    task_names = list(tasks or TASKS)
    report: dict[str, Any] = {
        "experiment": experiment,
        "arms": arms,
        "confidence": CONFIDENCE,
        "bootstrap": {"resamples": boot, "seed": seed},
    }
    if offline:
        result = evaluate(
            base_url,
            names,
            task_names,
            n=n,
            concurrency=concurrency,
            max_tokens=max_tokens,
            cache_file=reply_cache or out_dir / "replies.jsonl",
            resume=resume,
        )
        each, diffs = paired_bootstrap(result.outcomes, names, boot, seed)
        per_task = {}
        for t in task_names:
            sub = {a: {t: result.outcomes[a][t]} for a in names}
            e, _ = paired_bootstrap(sub, names, boot, seed)
            per_task[t] = {a: e[a].__dict__ for a in names}
        report["offline"] = {
            "split": "test",
            "tasks": task_names,
            "n_per_task": n,
            "accuracy": {a: each[a].__dict__ for a in names},
            "difference": {f"{a} - {b}": d.__dict__ for (a, b), d in diffs.items()},
            "per_task": per_task,
            "verdict": verdict(each, diffs, "Offline (labelled test prompts)", "points"),
        }
    if feedback_log is not None:
        scores, dropped = feedback_scores(read_feedback(feedback_log, experiment), names)
        each_f, diffs_f = independent_bootstrap(scores, boot, seed)
        each_t, diffs_t = independent_bootstrap(scores, boot, seed, trimmed_mean)
        said = verdict(each_f, diffs_f, "Feedback", "score")
        if each_f and said != (robust := verdict(each_t, diffs_t, "Feedback", "score")):
            said += (
                f" **Read with care**: on {int(TRIM * 100)}%-trimmed means the verdict differs"
                f" ({robust.removeprefix('Feedback: ')}): a few extreme scores move the means."
            )
        report["feedback"] = {
            "log": str(feedback_log),
            "count": {a: len(s) for a, s in scores.items()},
            "dropped": dropped,
            "mean": {a: i.__dict__ for a, i in each_f.items()},
            "trimmed_mean": {a: i.__dict__ for a, i in each_t.items()},
            "difference": {f"{a} - {b}": d.__dict__ for (a, b), d in diffs_f.items()},
            "verdict": said if each_f else "Feedback: none recorded for this experiment.",
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ab-report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "ab-report.md").write_text(markdown(report))
    plot(report, out_dir / "ab-report.png")
    return report


def feedback_scores(
    records: Sequence[Mapping[str, object]], arms: Sequence[str]
) -> tuple[dict[str, list[float]], int]:
    """Each arm's scores (by the arm as the experiment names it), and how many records
    were dropped: no arm, or a score that is not a finite number in SCORE_RANGE (a log
    written by an older server, or edited by hand, may hold anything)."""
    from mergeserve.service.experiments import SCORE_RANGE

    lo, hi = SCORE_RANGE
    scores: dict[str, list[float]] = {a: [] for a in arms}
    dropped = 0
    for r in records:
        arm, score = r.get("choice") or r.get("arm"), r.get("score")
        number = isinstance(score, int | float) and not isinstance(score, bool)
        s = float(score) if number else math.nan  # type: ignore[arg-type]
        if isinstance(arm, str) and math.isfinite(s) and lo <= s <= hi:
            scores.setdefault(arm, []).append(s)
        else:
            dropped += 1
    return scores, dropped


def markdown(report: dict[str, Any]) -> str:
    from mergeserve.service.experiments import SCORE_RANGE

    exp, arms = report["experiment"], report["arms"]
    pct = int(100 * report["confidence"])
    lines = [
        f"# A/B report: `{exp}`",
        "",
        "Arms (traffic share): " + ", ".join(f"`{a}` {100 * w:.0f}%" for a, w in arms.items()),
        "",
    ]
    off = report.get("offline")
    if off:
        lines += [
            "## Offline: labelled prompts",
            "",
            f"Every arm answered the same {off['n_per_task']} test-split prompts per task "
            f"({len(off['tasks'])} tasks, unseen templates included), greedy, through the "
            f"server. Exact match (%), {pct}% bootstrap intervals (prompts resampled within "
            "each task; differences paired).",
            "",
            "| arm | " + " | ".join(off["tasks"]) + " | all |",
            "|---|" + "---|" * (len(off["tasks"]) + 1),
        ]
        for a in arms:
            cells = [f"{100 * off['per_task'][t][a]['value']:.0f}" for t in off["tasks"]]
            total = Interval(**off["accuracy"][a]).fmt()
            lines.append(f"| `{a}` | " + " | ".join(cells) + f" | {total} |")
        lines += ["", "| difference | points |", "|---|---|"]
        for k, d in off["difference"].items():
            if Interval(**d).value >= 0:
                lines.append(f"| {k} | {Interval(**d).fmt()} |")
        lines += ["", off["verdict"], ""]
    fb = report.get("feedback")
    if fb:
        lines += [
            "## Feedback",
            "",
            f"Scores posted to `/v1/feedback` for this experiment ({fb['log']}), mean and "
            f"{int(TRIM * 100)}%-trimmed mean per arm, {pct}% bootstrap intervals"
            + (
                f"; {fb['dropped']} records dropped (no arm, or a score outside "
                f"[{SCORE_RANGE[0]:g}, {SCORE_RANGE[1]:g}])."
                if fb.get("dropped")
                else "."
            ),
            "",
            "| arm | feedbacks | mean score | trimmed mean |",
            "|---|---|---|---|",
        ]
        for a in fb["count"]:
            m, t = fb["mean"].get(a), fb.get("trimmed_mean", {}).get(a)
            lines.append(
                f"| `{a}` | {fb['count'][a]} | {Interval(**m).fmt(1.0, 3) if m else '–'} "
                f"| {Interval(**t).fmt(1.0, 3) if t else '–'} |"
            )
        lines += ["", fb["verdict"], ""]
    lines += ["![per-arm results](ab-report.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(report["arms"])
    off, fb = report.get("offline"), report.get("feedback")
    panels = [p for p in (off, fb) if p]
    grid = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
    fig, axes = grid[0], list(grid[1][0])
    i = 0
    if off:
        ax = axes[i]
        i += 1
        groups = [*off["tasks"], "all"]
        width = 0.8 / len(arms)
        for j, a in enumerate(arms):
            vals, los, his = [], [], []
            for t in groups:
                c = off["accuracy"][a] if t == "all" else off["per_task"][t][a]
                vals.append(100 * c["value"])
                los.append(100 * (c["value"] - c["low"]))
                his.append(100 * (c["high"] - c["value"]))
            xs = [g + j * width for g in range(len(groups))]
            ax.bar(xs, vals, width, yerr=[los, his], capsize=2, label=a)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=30)
        ax.set_ylim(0, 105)
        ax.set_ylabel("exact match (%)")
        ax.set_title("offline, labelled test prompts")
        ax.legend(fontsize=8)
    if fb:
        ax = axes[i]
        present = [a for a in arms if a in fb["mean"]]
        vals = [fb["mean"][a]["value"] for a in present]
        err = [
            [fb["mean"][a]["value"] - fb["mean"][a]["low"] for a in present],
            [fb["mean"][a]["high"] - fb["mean"][a]["value"] for a in present],
        ]
        ax.bar(present, vals, yerr=err, capsize=4, color=["C0", "C1", "C2", "C3"][: len(present)])
        ax.set_ylabel("mean feedback score")
        ax.set_title("feedback, " + ", ".join(f"{a}: n={fb['count'][a]}" for a in present))
    fig.suptitle(f"A/B: {report['experiment']} ({int(100 * report['confidence'])}% bootstrap CIs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
