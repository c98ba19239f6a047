"""docs/benchmarks.md's generator (benchmarks/report.py) and the merge-math benchmark's
bookkeeping: targets are judged on the spread as the page says, every kind of result file
lands where it belongs, and the 7B dense-SVD arm scales to exactly every layer and kind."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))

import report
from harness import Results


def harness_file(metric: str, a: list[float], b: list[float]) -> dict[str, Any]:
    res = Results(
        orders=[["a", "b"] if i % 2 == 0 else ["b", "a"] for i in range(len(a))],
        rounds={"a": [{metric: x} for x in a], "b": [{metric: x} for x in b]},
        warmup={"a": [{metric: a[0]}], "b": [{metric: b[0]}]},
        wall_s=1.0,
    )
    return {
        "benchmark": "serve_throughput",
        **res.summary(metric, {"mixture_over_static": ("a", "b")}),
    }


@pytest.mark.parametrize(
    ("a", "want"),
    [
        ([96.0, 97.0, 98.0, 99.0, 100.0], "met (every round)"),
        ([90.0, 96.0, 97.0, 98.0, 99.0], "met by the median; the spread straddles it"),
        ([90.0, 91.0, 92.0, 96.0, 97.0], "**not met**"),
    ],
)
def test_verdict_reads_the_paired_spread(a: list[float], want: str) -> None:
    data = harness_file("tokens_per_s", a, [100.0] * 5)
    r = data["ratios"]["mixture_over_static"]
    assert report.verdict("mixture_over_static", "serve_throughput", r) == f"≥ 0.95: {want}"
    assert report.verdict("unlisted", "serve_throughput", r) == ""


def test_report_places_harness_fresh_round_quality_and_older_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "serve_throughput.cpu-2core.json").write_text(
        json.dumps(harness_file("tokens_per_s", [96.0, 97, 98, 99, 100], [100.0] * 5))
    )
    (results / "load.cpu-2core.json").write_text(
        json.dumps(
            {
                "benchmark": "load",
                "rounds_n": 5,
                "summary": {"failed": {"median": 0.0, "min": 0.0, "max": 1.0}},
                "target": {"failed": 0},
                "met_in_every_round": False,
                "command": "python benchmarks/load.py --rounds 5",
            }
        )
    )
    (results / "startup.cpu-2core.json").write_text(
        json.dumps(
            {
                "figures": {"eager.first": {"first_chat_s": {"median": 85, "min": 82, "max": 93}}},
                "starts": [{"round": 0}, {"round": 4}],
                "targets": {"first_first_chat_s": 120},
                "meets": {"eager": {"first": True}},
            }
        )
    )
    (results / "routing.cpu-2core.json").write_text("{}")
    (results / "mystery.cpu-2core.json").write_text("{}")
    out = tmp_path / "docs" / "benchmarks.md"
    out.parent.mkdir()
    monkeypatch.setattr(sys, "argv", ["report.py", "--results", str(results), "--out", str(out)])
    report.main()
    page = out.read_text()
    assert "## serve_throughput.cpu-2core" in page
    assert "| mixture_over_static (`a` / `b`) | **0.98** |" in page
    assert "## load.cpu-2core" in page
    assert "| `eager.first` | **85** (82 – 93) |" in page
    assert "over 5 rounds" in page
    assert "eager first yes" in page
    assert report.DESCRIPTIONS["load"] in page
    assert report.DESCRIPTIONS["serve_throughput"] in page
    assert "**not met in every round** (5 rounds, each on a fresh server)" in page
    assert "Command: `python benchmarks/load.py --rounds 5`" in page
    quality, older = (
        page.split("## Accuracy and behaviour results")[1],
        page.split("## Timings not on the harness")[1],
    )
    assert "routing.cpu-2core.json" in quality
    assert "mystery.cpu-2core.json" in older.split("## Accuracy")[0]


def test_every_kind_of_section_names_the_cpu_and_the_code_it_measured(tmp_path: Path) -> None:
    """Results from two machines (and two codes) can sit on one page: each section says
    which, whichever renderer makes it."""
    machine = {
        "cpus": 2,
        "cpu_model": "AMD EPYC",
        "commit": "d5ac5d1",
        "processor": "x86_64",
        "versions": {"torch": "2.13.0+cpu"},
    }
    want = "Machine: 2 CPUs (AMD EPYC), code d5ac5d1; torch 2.13.0+cpu; wall 12.5 s."
    harness = {**harness_file("tokens_per_s", [1.0] * 5, [1.0] * 5), "machine": machine}
    harness["wall_s"] = 12.5
    fresh = {
        "benchmark": "load",
        "rounds_n": 5,
        "summary": {"failed": {"median": 0.0, "min": 0.0, "max": 0.0}},
        "machine": machine,
        "wall_s": 12.5,
    }
    startup = {
        "figures": {"eager.first": {"first_chat_s": {"median": 85, "min": 82, "max": 93}}},
        "starts": [{"round": 0}],
        "machine": machine,
        "wall_s": 12.5,
    }
    plots = tmp_path / "plots"
    plots.mkdir()
    assert want in report.section("serve_throughput", harness, plots, tmp_path / "b.md")
    assert want in report.fresh_rounds_section("load", fresh)
    assert want in report.startup_section("startup", startup)
    older = {**machine, "cpu_model": None, "commit": None}
    assert report.machine_line(older) == "Machine: 2 CPUs (x86_64); torch 2.13.0+cpu."


def test_ours_is_mergeserve_rows_and_arms_only() -> None:
    assert report.is_ours("7b/materialized")
    assert report.is_ours("dynamic:routed")
    assert not report.is_ours("7b/dense")
    assert not report.is_ours("stock8:rank8")
    assert not report.is_ours("smollm2/peft_svd")


def test_merge_math_dense_svd_plan_stands_for_every_layer_of_every_kind() -> None:
    import merge_math

    for shapes in (merge_math.SMOLLM2, merge_math.LLAMA_7B):
        for all_layers in (True, False):
            plan, how = merge_math.svd_plan(shapes, all_layers)
            assert sum(n for _, _, n in plan) == len(shapes.kinds) * shapes.layers, how
    plan, _ = merge_math.svd_plan(merge_math.LLAMA_7B, False)
    # q/k/v/o share 4096x4096, gate/up 11008x4096, down 4096x11008: three SVDs per round
    assert [(k, n) for k, _, n in plan] == [
        ("self_attn.q_proj", 128),
        ("mlp.gate_proj", 64),
        ("mlp.down_proj", 32),
    ]


def test_absolute_targets_read_each_arms_median_and_the_run_totals() -> None:
    data = {
        "arms": {"hot_add": {"first_token_s": {"median": 3.8}, "first_routed_s": 1.9}},
        "totals": {"failed": 0},
    }
    assert report.absolute_target(data, "first_token_s", "< 2").endswith("**not met**")
    assert report.absolute_target(data, "first_routed_s", "< 2").endswith(": met")
    assert report.absolute_target(data, "failed", 0) == "failed = 0 (got 0): met"
    data["arms"]["hot_add"]["first_token_s"] = {"median": 1.8, "min": 1.6, "max": 2.8}
    assert report.absolute_target(data, "first_token_s", "< 2").endswith(
        "met by the median; the spread straddles it"
    )
    data["arms"]["hot_add"]["first_token_s"] = {"median": 1.8, "min": 1.6, "max": 1.9}
    assert report.absolute_target(data, "first_token_s", "< 2").endswith("met (every round)")
    data["totals"] = {"failed": 3}
    assert report.absolute_target(data, "failed", 0).endswith("**not met**")
    assert report.absolute_target(data, "hung", 0).endswith("not measured")


@pytest.mark.parametrize("slots", [8, 16])
def test_fleet_benchmarks_give_both_sides_the_same_slots(slots: int) -> None:
    """remote_fleet.py and lora_slots.py: mergeserve's engine and the vLLM server in front
    of which it runs agree on the slots (mergeserve keeps its adapters in flight within
    its own count), and the profile reaches both sides."""
    import remote_fleet
    from profiles import mergeserve_env

    from mergeserve.config import EngineSettings

    env = mergeserve_env("deployed", 16, slots)
    args = remote_fleet.vllm_args(16, slots)
    assert env["MERGESERVE_ENGINE__MAX_LORAS"] == args[args.index("--max-loras") + 1]
    assert int(env["MERGESERVE_ENGINE__MAX_LORAS"]) == slots
    assert env["MERGESERVE_ENGINE__COMPILE"] == "true"
    # make-serve leaves the engine at what `make serve` gets: the default, eager
    assert "MERGESERVE_ENGINE__COMPILE" not in mergeserve_env("make-serve", 16, slots)
    assert EngineSettings().compile is False
    assert remote_fleet.plugin_env("deployed")["MERGESERVE_LORA_COMPILE"] == "1"
    assert remote_fleet.plugin_env("make-serve")["MERGESERVE_LORA_COMPILE"] == "0"
    assert remote_fleet.plugin_env("make-serve")["MERGESERVE_MIXTURE_PLUGIN"] == "1"


def test_bundle_engine_params_carry_one_weighting_per_prompt() -> None:
    """lora_engine.py / sparse_mixture.py: `params` gives greedy ignore_eos params, one per
    prompt, each carrying its own weighting as the mixture (none without weightings); a
    wrong count is refused; `random_weightings` is one seeded draw per prompt."""
    import lora_engine

    from mergeserve.runtime.mixture import MixtureSpec

    class Bundle:  # the part of MixtureBundle params reads: names and spec()
        names = ("a", "b")

        def spec(self, weights: dict[str, float]) -> MixtureSpec:
            return MixtureSpec((8, 8), tuple(weights.get(n, 0.0) for n in self.names))

    def engine() -> Any:
        return lora_engine.BundleEngine(None, Bundle(), Path(), Path(), ["p0", "p1", "p2"])

    eng = engine()
    ws = eng.random_weightings()
    assert len(ws) == 3
    assert all(set(w) == {"a", "b"} for w in ws)
    assert all(0.05 <= v <= 1.0 for w in ws for v in w.values())
    assert len({tuple(w.values()) for w in ws}) == 3  # distinct per prompt
    assert engine().random_weightings() == ws  # seeded: the same sequence run after run
    plain = eng.params(7)
    assert [(p.max_tokens, p.ignore_eos, p.temperature, p.extra_args) for p in plain] == [
        (7, True, 0.0, None)
    ] * 3
    mixed = eng.params(7, ws)
    got = [MixtureSpec.from_extra_args(p.extra_args) for p in mixed]
    assert [s.weights if s else None for s in got] == [
        pytest.approx((w["a"], w["b"]), rel=1e-6)
        for w in ws  # float32 on the way
    ]
    with pytest.raises(ValueError, match="2 weightings for 3 prompts"):
        eng.params(7, ws[:2])


def bench_sh_benchmarks() -> list[str]:
    """The benchmarks scripts/bench.sh runs by default (its `all=(...)` list)."""
    import re

    text = (Path(__file__).resolve().parents[2] / "scripts" / "bench.sh").read_text()
    m = re.search(r"^all=\(([^)]*)\)", text, re.M)
    assert m is not None, "scripts/bench.sh has no all=(...) list"
    return m.group(1).split()


def stdout_prints(source: str) -> list[int]:
    """Lines of `print(...)` calls that write to stdout something other than one
    `json.dumps(...)` (a `file=` keyword sends a print elsewhere)."""
    import ast

    bad = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"):
            continue
        if any(k.arg == "file" for k in node.keywords):
            continue
        arg = node.args[0] if node.args else None
        dumps = (
            isinstance(arg, ast.Call)
            and isinstance(arg.func, ast.Attribute)
            and arg.func.attr == "dumps"
        )
        if not dumps:
            bad.append(node.lineno)
    return bad


def test_stdout_print_check_tells_json_from_progress() -> None:
    assert stdout_prints('print(json.dumps({"a": 1}, indent=2))') == []
    assert stdout_prints('print("round 1", file=sys.stderr)') == []
    assert stdout_prints('x = 1\nprint(f"idle CPU: {x}", flush=True)') == [2]


def stdout_result_benchmarks() -> list[str]:
    """Every benchmark whose result file is its stdout: bench.sh's, and any other that
    prints its JSON there with no `--out` to write it elsewhere (prefix_isolation.py)."""
    names = set(bench_sh_benchmarks())
    for f in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py"):
        src = f.read_text()
        if "print(json.dumps(" in src and '"--out"' not in src:
            names.add(f.stem)
    return sorted(names)


def test_every_benchmark_of_bench_sh_and_the_isolation_one_prints_its_result() -> None:
    assert {"prefix_isolation", "serve_throughput", "routing"} <= set(stdout_result_benchmarks())


@pytest.mark.parametrize("name", stdout_result_benchmarks())
def test_bench_sh_benchmarks_print_nothing_but_their_json(name: str) -> None:
    """A benchmark's stdout is its result file (bench.sh, or `> FILE`): a progress line on
    stdout makes the file unreadable and report.py (and `make bench`) fail — threads.py
    printed its idle-CPU line there, prefix_isolation.py its rounds."""
    src = (Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py").read_text()
    assert stdout_prints(src) == [], f"{name}.py prints to stdout at these lines"


def test_section_says_what_routing_cost_where_the_arms_measured_it(tmp_path: Path) -> None:
    res = Results(
        orders=[["a", "b"], ["b", "a"]],
        rounds={
            "a": [
                {"tokens_per_s": 90.0, "router_busy_share": 0.01, "router_wait_mean_s": 0.02},
                {"tokens_per_s": 92.0, "router_busy_share": 0.03, "router_wait_mean_s": 0.04},
            ],
            "b": [{"tokens_per_s": 100.0}, {"tokens_per_s": 100.0}],
        },
        warmup={"a": [], "b": []},
        wall_s=1.0,
    )
    data = {"benchmark": "serve_throughput", **res.summary("tokens_per_s")}
    text = "\n".join(report.section("x", data, tmp_path, tmp_path / "page.md"))
    assert "`a` 2.0% of the round's wall time, 30 ms a request." in text
    assert "`b`" not in text.split("What routing cost")[1]
    del data["arms"]["a"]["router_busy_share"]
    text = "\n".join(report.section("x", data, tmp_path, tmp_path / "page.md"))
    assert "What routing cost" not in text
