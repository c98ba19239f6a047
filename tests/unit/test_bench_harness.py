"""The benchmark harness (benchmarks/harness.py) on fake arms: its order is balanced, its
warm-up is not counted, its statistics and paired ratios are what they claim."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))

from harness import (
    Results,
    Spread,
    add_workload_args,
    balanced_orders,
    command_line,
    machine_facts,
    run_arms,
    williams_block,
)


@pytest.mark.parametrize("n", range(1, 9))
def test_williams_block_puts_every_arm_in_every_position(n: int) -> None:
    rows = williams_block(n)
    assert len(rows) == n
    assert len(williams_block(n, carryover=True)) == (n if n % 2 == 0 or n == 1 else 2 * n)
    for row in rows:
        assert sorted(row) == list(range(n))
    per_position = [Counter(row[p] for row in rows) for p in range(n)]
    assert all(set(c.values()) == {len(rows) // n} for c in per_position)


@pytest.mark.parametrize("n", range(2, 9))
def test_williams_block_balances_who_follows_whom(n: int) -> None:
    rows = williams_block(n, carryover=True)
    follows = Counter(pair for row in rows for pair in itertools.pairwise(row))
    want = 1 if n % 2 == 0 else 2
    assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert set(follows.values()) == {want}


def test_balanced_orders_are_whole_blocks_of_at_least_min_rounds() -> None:
    names = ["a", "b", "c", "d", "e", "f"]
    orders = balanced_orders(names, min_rounds=5)
    assert len(orders) == 6  # one block of six reaches five rounds
    assert len(balanced_orders(names, min_rounds=7)) == 12
    assert len(balanced_orders(["x", "y"], min_rounds=5)) == 6
    assert len(balanced_orders(["x", "y", "z"], min_rounds=5)) == 6  # two squares
    assert len(balanced_orders(list("abcde"), min_rounds=5)) == 5
    assert len(balanced_orders(list("abcde"), min_rounds=5, carryover=True)) == 10
    with pytest.raises(ValueError, match="repeat"):
        balanced_orders(["a", "a"])


def test_run_arms_runs_warmup_first_then_balanced_rounds_and_counts_only_those() -> None:
    calls: list[tuple[str, int]] = []

    def arm(name: str, value: float):  # type: ignore[no-untyped-def]
        async def run(r: int) -> dict[str, float]:
            calls.append((name, r))
            # warm-up rounds are slow: they must not reach the statistics
            return {"tps": value / 10 if r < 0 else value + r, "ttft": 1.0}

        return run

    lines: list[str] = []
    res = asyncio.run(
        run_arms(
            {"a": arm("a", 100.0), "b": arm("b", 50.0)},
            min_rounds=5,
            warmup=2,
            log=lines.append,
            metric="tps",
        )
    )
    assert lines[0] == "warm-up 0 a: tps=10.00"
    assert len(lines) == 4 + 12
    assert calls[:4] == [("a", -1), ("b", -1), ("a", -2), ("b", -2)]
    assert len(res.orders) == 6
    assert calls[4:] == [(a, r) for r, o in enumerate(res.orders) for a in o]
    assert res.values("a", "tps") == [100.0 + r for r in range(6)]
    assert res.warmup["a"] == [{"tps": 10.0, "ttft": 1.0}] * 2
    s = res.spread("a", "tps")
    assert (s.median, s.min, s.max, s.n) == (102.5, 100.0, 105.0, 6)
    assert res.machine["cpus"]


def _results(a: list[float], b: list[float]) -> Results:
    return Results(
        orders=[["a", "b"]] * len(a),
        rounds={"a": [{"tps": x} for x in a], "b": [{"tps": x} for x in b]},
        warmup={"a": [{"tps": 1.0}], "b": [{"tps": 2.0}]},
        wall_s=1.0,
    )


def test_ratios_are_paired_by_round_not_medians_of_each_side() -> None:
    # b is slow in the rounds where a is slow (the machine was busy): paired ratios see
    # a constant 2x; the ratio of medians happens to agree here, the spread does not.
    res = _results([200.0, 100.0, 300.0, 220.0, 180.0], [100.0, 50.0, 150.0, 110.0, 90.0])
    r = res.ratio("a", "b", "tps")
    assert (r.median, r.min, r.max) == (2.0, 2.0, 2.0)
    # unpaired, the same numbers would claim a spread of 100/150 .. 300/50
    assert res.ratio_of_medians("a", "b", "tps") == pytest.approx(2.0)
    skew = _results([100.0, 100.0, 100.0, 100.0, 300.0], [100.0, 100.0, 100.0, 100.0, 100.0])
    assert skew.ratio("a", "b", "tps").max == 3.0
    assert skew.ratio("a", "b", "tps").median == 1.0


def test_summary_reports_spread_ratios_warmup_and_first_round() -> None:
    res = _results([90.0, 100.0, 100.0, 110.0, 120.0], [50.0, 50.0, 50.0, 50.0, 50.0])
    out = res.summary("tps", {"a_over_b": ("a", "b")})
    assert out["arms"]["a"]["tps"] == {"median": 100.0, "min": 90.0, "max": 120.0, "n": 5}
    assert out["ratios"]["a_over_b"]["median"] == 2.0
    assert out["ratios"]["a_over_b"]["min"] == 1.8
    assert out["ratios"]["a_over_b"]["max"] == 2.4
    assert out["first_round_over_median"] == {"a": 0.9, "b": 1.0}
    assert out["warmup"] == {"a": [1.0], "b": [2.0]}
    assert out["rounds"] == 5


def test_spread_straddles() -> None:
    s = Spread.of([0.93, 0.96, 0.97])
    assert s.straddles(0.95)
    assert not Spread.of([0.96, 0.99]).straddles(0.95)
    assert s.median == statistics.median([0.93, 0.96, 0.97])
    with pytest.raises(ValueError, match="no values"):
        Spread.of([])


def test_command_line_reproduces_the_arguments() -> None:
    p = argparse.ArgumentParser()
    add_workload_args(p, requests=16)
    p.add_argument("--no-stock", action="store_true")
    p.add_argument("--cache", default="/tmp/x")
    p.add_argument("--threads", type=int, default=None)  # unset: left out, parses back to None
    args = p.parse_args(["--rounds", "7", "--no-stock"])
    line = command_line("cpu_lora.py", args, skip=("cache",))
    assert line == (
        "python benchmarks/cpu_lora.py --concurrency 16 --requests 16 --max-tokens 32 "
        "--rounds 7 --no-stock"
    )
    again = p.parse_args(line.split()[2:])
    assert vars(again) == vars(args)


def test_machine_facts_name_the_commit_measured_and_the_cpu() -> None:
    root = Path(__file__).resolve().parents[2]
    facts = machine_facts(threads=2)
    if (root / ".git").exists():
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert facts["head"] == head
        # the code measured: HEAD or an ancestor of it (the last commit changing code)
        code = facts["commit"].removesuffix("+dirty")
        subprocess.run(
            ["git", "-C", str(root), "merge-base", "--is-ancestor", code, head], check=True
        )
    assert facts["threads"] == 2
    assert facts["cpus"] >= 1
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        assert facts["cpu_model"]


def test_serve_throughput_reads_what_routing_cost_from_the_metrics() -> None:
    from serve_throughput import router_cost

    d = {
        "mergeserve_router_compute_seconds_total": 0.5,
        "mergeserve_router_latency_seconds_sum": 2.0,
        "mergeserve_router_latency_seconds_count": 16.0,
    }
    assert router_cost(d, 10.0) == pytest.approx(
        {"router_busy_share": 0.05, "router_wait_mean_s": 0.125}
    )
    # a round that routed nothing (or a server without the counter)
    assert router_cost({}, 10.0) == {"router_busy_share": 0.0, "router_wait_mean_s": 0.0}


def test_blend_rescore_scores_the_stored_replies_again(tmp_path: Path) -> None:
    import json

    from blend import rescore

    from mergeserve.tasks import generate

    ss = generate("sum_json", "dev", 4)
    right = [s.answer for s in ss]
    bare = [str(next(iter(json.loads(s.answer).values()))) for s in ss]  # add alone
    f = tmp_path / "blend.dev.json"
    f.write_text(
        json.dumps(
            {
                "split": "dev",
                "n_per_composition": 4,
                "exact_match": {"sum_json": {"a": 0.0, "b": 0.0}},
                "halves": {"sum_json": {}},
                "replies": {"sum_json": {"a": right, "b": bare}},
            }
        )
    )
    out = rescore(f)
    assert out["exact_match"] == {"sum_json": {"a": 1.0, "b": 0.0}}
    assert out["mean"] == {"a": 1.0, "b": 0.0}
    assert out["halves"]["sum_json"]["a"] == {"content": 1.0, "form": 1.0, "both": 1.0}
    assert out["halves"]["sum_json"]["b"] == {"content": 1.0, "form": 0.0, "both": 0.0}
    f.write_text(json.dumps({"split": "dev", "n_per_composition": 4}))
    with pytest.raises(SystemExit, match="stores no replies"):
        rescore(f)


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def _repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for f in ("mergeserve/a.py", "benchmarks/results/x.json", "docs/benchmarks.md"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("v1\n")
    _git(root, "init", "-q")
    _commit_all(root, "one")
    return root


def _commit_all(root: Path, message: str) -> str:
    _git(root, "add", ".")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)
    return _git(root, "rev-parse", "--short", "HEAD")


def test_the_commit_measured_is_dirty_for_code_changes_not_for_results(tmp_path: Path) -> None:
    from harness import _commit

    root = _repo(tmp_path)
    head = _git(root, "rev-parse", "--short", "HEAD")
    assert _commit(str(root)) == head
    # a benchmark run writes its results and the report: the code it measured is clean
    (root / "benchmarks/results/x.json").write_text("v2\n")
    (root / "docs/benchmarks.md").write_text("v2\n")
    assert _commit(str(root)) == head
    (root / "mergeserve/a.py").write_text("v2\n")
    assert _commit(str(root)) == head + "+dirty"


def test_the_commit_measured_is_the_last_one_that_changed_code(tmp_path: Path) -> None:
    from harness import _commit, _head

    root = _repo(tmp_path)
    code = _git(root, "rev-parse", "--short", "HEAD")
    # committing results, the report, tests or the README changes no figure
    (root / "benchmarks/results/x.json").write_text("v2\n")
    (root / "docs/benchmarks.md").write_text("v2\n")
    (root / "tests").mkdir()
    (root / "tests/test_a.py").write_text("v1\n")
    (root / "README.md").write_text("v1\n")
    later = _commit_all(root, "results")
    assert later != code
    assert _head(str(root)) == later
    assert _commit(str(root)) == code
    # a commit that changes code is what later results measure
    (root / "mergeserve/a.py").write_text("v2\n")
    newer = _commit_all(root, "code")
    assert _commit(str(root)) == newer
    (root / "scripts").mkdir()
    (root / "scripts/bench.sh").write_text("v1\n")  # scripts are code too
    newest = _commit_all(root, "script")
    assert _commit(str(root)) == newest


BENCH_STUB_PYTHON = """#!/usr/bin/env bash
# stands in for .venv/bin/python: the harness's `commit`, the benchmarks, report.py
if [[ "$1" == benchmarks/harness.py ]]; then
    if [[ $# -eq 2 ]]; then echo "$FAKE_COMMIT"; else
        sed -n 's/.*"commit": "\\([^"]*\\)".*/\\1/p' "$3"; fi
    exit 0
fi
echo "$*" >> "$CALLS"
echo '{"machine": {"commit": "'"$FAKE_COMMIT"'"}}'
"""


@pytest.mark.parametrize("commit", ["abc1234", "abc1234+dirty"])
def test_bench_sh_resumes_only_what_this_clean_commit_measured(tmp_path: Path, commit: str) -> None:
    root = Path(__file__).resolve().parents[2]
    fake = tmp_path / "clone"
    (fake / "scripts").mkdir(parents=True)
    (fake / ".venv/bin").mkdir(parents=True)
    (fake / "benchmarks/results").mkdir(parents=True)
    (fake / "scripts/bench.sh").write_text((root / "scripts/bench.sh").read_text())
    (fake / "scripts/bench_deps.sh").write_text("#!/usr/bin/env bash\n")
    (fake / ".venv/bin/python").write_text(BENCH_STUB_PYTHON)
    for f in ("scripts/bench.sh", "scripts/bench_deps.sh", ".venv/bin/python"):
        (fake / f).chmod(0o755)
    results = fake / "benchmarks/results"
    # hot_add was measured on this commit, load on an older one, lora_op never
    (results / "hot_add.cpu-2core.json").write_text('{"machine": {"commit": "abc1234"}}')
    (results / "load.cpu-2core.json").write_text('{"machine": {"commit": "0ld0ld0"}}')
    calls = tmp_path / "calls"
    env = {"PATH": "/usr/bin:/bin", "FAKE_COMMIT": commit, "CALLS": str(calls), "RESUME": "1"}
    run = subprocess.run(
        ["bash", "scripts/bench.sh", "hot_add", "load", "lora_op"],
        cwd=fake,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    ran = [line.split()[0] for line in calls.read_text().splitlines()]
    if commit.endswith("+dirty"):  # the code is not what was measured: nothing is kept
        assert ran == [
            "benchmarks/hot_add.py",
            "benchmarks/load.py",
            "benchmarks/lora_op.py",
            "benchmarks/report.py",
        ]
        assert "kept" not in run.stderr
    else:
        assert ran == ["benchmarks/load.py", "benchmarks/lora_op.py", "benchmarks/report.py"]
        assert "bench: hot_add kept (measured on abc1234)" in run.stderr
    # every result now records a run; nothing half-written is left
    assert not list(results.glob("*.part"))
    assert '"abc1234' in (results / "load.cpu-2core.json").read_text()
