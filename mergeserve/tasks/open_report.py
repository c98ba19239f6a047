"""docs/results/open_world.md from what scripts/open_world_results.sh measured.

    python -m mergeserve.tasks.open_report docs/results/open_world > docs/results/open_world.md

Reads `<dir>/demo/results.*.json`, `<dir>/phrasings/results.*.json`,
`<dir>/two_skill/results.*.json` (exact match, from
`mergeserve eval --suite demo|phrasings|two-skill`), `<dir>/general/general.*.json` (harm, from
`--suite general`) and `<dir>/gates.test.json` (benchmarks/open_world.py), and writes the
table of every arm on the four splits, the oracle rows, the two-skill compositions, the
gates, and `<dir>/open_world.png`; `<dir>/NOTE.md`, when present, goes above the table
(what a partial re-run left stale).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mergeserve.tasks.open_world import COMPOSED_OF

ORACLE = "oracle single expert"
TWIN_SHARED = "dynamic:twin, S kept outside the experts"
"""The twin arm served with MERGESERVE_MERGE__TWIN_NONE=shared (pass C)."""


def _merged(paths: list[Path], key: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in sorted(paths):
        out.update(json.loads(p.read_text())[key])
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def load(root: Path) -> dict[str, Any]:
    demo = _merged(list((root / "demo").glob("results.*.json")), "accuracy")
    phrasings = _merged(list((root / "phrasings").glob("results.*.json")), "accuracy")
    two = _merged(list((root / "two_skill").glob("results.*.json")), "accuracy")
    general = _merged(list((root / "general").glob("general.*.json")), "models")
    shared = root / "twin_shared"
    for name, table, pattern, key in (
        ("demo", demo, "results.*.json", "accuracy"),
        ("phrasings", phrasings, "results.*.json", "accuracy"),
        ("two_skill", two, "results.*.json", "accuracy"),
        ("general", general, "general.*.json", "models"),
    ):
        extra = _merged(list((shared / name).glob(pattern)), key)
        if "dynamic:twin" in extra:
            table[TWIN_SHARED] = extra["dynamic:twin"]
    gates_file = root / "gates.test.json"
    gates = json.loads(gates_file.read_text()) if gates_file.is_file() else None
    blend = {}
    for split in ("dev", "test"):
        f = root.resolve().parents[2] / "benchmarks" / "results" / f"blend.{split}.cpu-2core.json"
        if f.is_file():
            blend[split] = json.loads(f.read_text())
    return {
        "demo": demo,
        "phrasings": phrasings,
        "two": two,
        "general": general,
        "gates": gates,
        "blend": blend,
    }


def rows(data: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """model -> demo mean, unseen-template mean, unseen-phrasings mean, two-skill mean,
    general same / F1."""
    demo, two, general = data["demo"], data["two"], data["general"]
    phr = data.get("phrasings", {})
    models = list(dict.fromkeys([*demo, *phr, *two, *general]))
    out: dict[str, dict[str, float | None]] = {}
    for m in models:
        d = demo.get(m)
        held = [c["held_out_accuracy"] for c in d.values()] if d else []
        out[m] = {
            "demo": _mean([c["accuracy"] for c in d.values()]) if d else None,
            "unseen": _mean([h for h in held if h is not None]) if held else None,
            "phrasings": _mean([c["accuracy"] for c in phr[m].values()]) if m in phr else None,
            "two": _mean([c["accuracy"] for c in two[m].values()]) if m in two else None,
            "general": general[m]["same_as_base"] if m in general else None,
            "f1": general[m]["overlap"] if m in general else None,
        }
    experts = [m for m in models if m.startswith("expert:")]
    tasks = [m.removeprefix("expert:") for m in experts]
    if experts and all(m in demo for m in experts):
        own = [demo[f"expert:{t}"][t] for t in tasks if t in demo[f"expert:{t}"]]
        oracle_two = None
        if two and all(m in two for m in experts):
            comps = list(next(iter(two.values())))
            oracle_two = _mean([max(two[e][c]["accuracy"] for e in experts) for c in comps])
        own_phr = [phr[f"expert:{t}"][t] for t in tasks if t in phr.get(f"expert:{t}", {})]
        out[ORACLE] = {
            "demo": _mean([c["accuracy"] for c in own]),
            "unseen": _mean([c["held_out_accuracy"] for c in own]),
            "phrasings": _mean([c["accuracy"] for c in own_phr]) if own_phr else None,
            "two": oracle_two,
            "general": 1.0,  # outside every skill the oracle picks no expert: base
            "f1": 1.0,
        }
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table(r: dict[str, dict[str, float | None]]) -> str:
    lines = [
        "| arm | demo skills (exact %) | unseen templates | unseen phrasings (exact %) "
        "| two-skill (exact %) | general: same reply as base (%) | general: token F1 with base |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, v in r.items():
        f1 = "–" if v["f1"] is None else f"{v['f1']:.3f}"
        name = m if m == ORACLE else f"`{m}`"
        lines.append(
            f"| {name} | {_pct(v['demo'])} | {_pct(v['unseen'])} | {_pct(v.get('phrasings'))} "
            f"| {_pct(v['two'])} "
            f"| {_pct(v['general'])} | {f1} |"
        )
    return "\n".join(lines) + "\n"


def two_skill_table(two: dict[str, Any]) -> str:
    comps = list(next(iter(two.values()))) if two else []
    head = ["arm", *(f"{c} ({' + '.join(COMPOSED_OF.get(c, ()))})" for c in comps)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, row in two.items():
        cells = [f"{100 * row[c]['accuracy']:.0f}" if c in row else "–" for c in comps]
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def blend_table(blend: dict[str, Any]) -> str:
    dev = blend["dev"]
    comps = list(dev["exact_match"])
    head = ["strategy", *(f"{c} (dev)" for c in comps), "mean (dev)", "mean (test)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    test = blend.get("test", {}).get("mean", {})
    for name, mean in dev["mean"].items():
        cells = [f"{100 * dev['exact_match'][c][name]:.0f}" for c in comps]
        t = test.get(name)
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {100 * mean:.1f} | {_pct(t)} |")
    return "\n".join(lines) + "\n"


def halves_table(blend: dict[str, Any]) -> str:
    """Per strategy and composition, `content / form` % on dev (two_skill_parts), and the
    share with both halves right; '' when the run predates the split into halves."""
    dev = blend["dev"]
    halves = dev.get("halves")
    if not halves:
        return ""
    comps = list(halves)
    head = ["strategy", *(f"{c}: content / form" for c in comps), "mean: content / form / both"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in halves[comps[0]]:
        cells = [halves[c][name] for c in comps]
        mean = {k: sum(h[k] for h in cells) / len(cells) for k in ("content", "form", "both")}
        row = [f"{100 * h['content']:.0f} / {100 * h['form']:.0f}" for h in cells]
        row.append(
            f"{100 * mean['content']:.0f} / {100 * mean['form']:.0f} / {100 * mean['both']:.0f}"
        )
        lines.append(f"| `{name}` | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def gates_table(gates: dict[str, Any]) -> str:
    lines = [
        "| gate | AUROC | general → none | general exactly base | skills kept | skills top-1 "
        "| unseen phrasings kept and routed | two-skill kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, g in gates["gates"].items():
        lines.append(
            f"| {name} | {g['auroc']:.4f} | {_pct(g['general_to_none'])} "
            f"| {_pct(g['general_exactly_base'])} | {_pct(g['in_domain_kept'])} "
            f"| {_pct(g['in_domain_top1'])} | {_pct(g.get('phrasings_kept_and_routed'))} "
            f"| {_pct(g['two_skill_kept'])} |"
        )
    lines.append(
        f"| energy of the closed-world prototypes (score only) | {gates['energy_auroc']:.4f} "
        "| – | – | – | – | – | – |"
    )
    return "\n".join(lines) + "\n"


def chart(r: dict[str, dict[str, float | None]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("demo", "demo skills"),
        ("phrasings", "unseen phrasings"),
        ("two", "two-skill"),
        ("general", "general (= base)"),
    ]
    models = list(r)
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(models) + 1.5))
    h = 0.8 / len(keys)
    for j, (k, label) in enumerate(keys):
        vals = [100 * (r[m].get(k) or 0.0) for m in models]
        ax.barh([i + j * h for i in range(len(models))], vals, h, label=label)
    ax.set_yticks([i + h for i in range(len(models))], models, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("%")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(root: Path) -> str:
    data = load(root)
    r = rows(data)
    chart(r, root / "open_world.png")
    parts = [
        "# Open traffic: every arm on the demo skills, unseen phrasings, two-skill requests and "
        "general requests",
        "",
        "Served by the real server (vLLM, fp32, CPU) and scored through the OpenAI API, greedy,",
        "32 new tokens. *demo skills*: the six tasks' test split (unseen templates included),",
        "exact match; *unseen phrasings*: the same six tasks asked in ten ways per task that",
        "no expert and no router was trained on (mergeserve.tasks.phrasings, test part),",
        "exact match. *two-skill*: requests that need two skills at once (mergeserve.tasks.",
        "open_world.TWO_SKILL, test split), exact match. *general*: requests outside every",
        "skill (the general split's test part), scored by harm: the share of replies equal to",
        "`base`'s greedy reply, and the token F1 with it. The oracle single expert picks, per",
        "prompt, its task's own expert (demo), the best single expert of each composition",
        "(two-skill), and no expert (general). Reproduce: `scripts/open_world_results.sh 50`.",
        "",
        *([(root / "NOTE.md").read_text().strip(), ""] if (root / "NOTE.md").is_file() else []),
        table(r),
        "![every arm on the four splits](open_world/open_world.png)",
        "",
        "## Two-skill compositions (exact %)",
        "",
        two_skill_table(data["two"]),
    ]
    if data["blend"].get("dev"):
        parts += [
            "## Blending on two-skill requests (exact %)",
            "",
            "`python benchmarks/blend.py --split dev` (then `--split test` once): each skill's",
            "expert alone, the routed arms, per-expert (multi-label) memberships pinned as",
            "weights, and the oracle pair of each composition's two skills pinned at λ each",
            "(`pair@λ`) or with one skill leading (`pair@λ₁/λ₂`: s₁ at λ₁, s₂ at λ₂).",
            "",
            blend_table(data["blend"]),
        ]
        if halves := halves_table(data["blend"]):
            parts += [
                "### Why the blends miss: the two halves of each request (dev, %)",
                "",
                "Each reply split into *content*, the first skill's work in any shape (the",
                "input's numbers, each once; the right capital, sum or label: the asked key's",
                "value in a JSON reply, else anywhere in it), and *form*, the second skill's",
                "shape with any content (numbers largest first; a JSON object with the asked",
                "key and no other): `mergeserve.tasks.open_world.two_skill_parts`. *both* can",
                'exceed exact match by spacing (`{"sum":5}`).',
                "",
                halves,
                *(
                    [(root / "BLEND_NOTE.md").read_text().strip(), ""]
                    if (root / "BLEND_NOTE.md").is_file()
                    else []
                ),
            ]
    if data["gates"] is not None:
        parts += [
            "## Open-world gates, test split",
            "",
            "`python benchmarks/open_world.py --split test` (chosen on `--split dev`; MiniLM",
            "int8, the served embedder; the router sees each expert's 20 examples and the",
            "general split's calibration part only). AUROC of the in-domain score, six skills",
            "against general requests; the rates at each candidate's margin and width.",
            "",
            gates_table(data["gates"]),
        ]
    return "\n".join(parts)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/results/open_world")
    print(report(root))


if __name__ == "__main__":
    main()
