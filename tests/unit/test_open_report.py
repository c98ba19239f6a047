"""docs/results/open_world.md's assembly: the rows, the oracle, the twin variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergeserve.tasks.open_report import ORACLE, TWIN_SHARED, load, report, rows


def _cell(acc: float, held: float | None = None) -> dict[str, object]:
    return {"accuracy": acc, "held_out_accuracy": held, "n": 10, "errors": 0}


def _write(path: Path, key: str, payload: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({key: payload}))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "docs" / "results" / "open_world"
    demo = {
        "base": {"add": _cell(0.0, 0.0), "capital": _cell(0.0, 0.0)},
        "expert:add": {"add": _cell(0.9, 0.8), "capital": _cell(0.0, 0.0)},
        "expert:capital": {"add": _cell(0.1, 0.0), "capital": _cell(1.0, 1.0)},
        "dynamic:exact": {"add": _cell(0.9, 0.8), "capital": _cell(1.0, 1.0)},
    }
    _write(root / "demo" / "results.a.json", "accuracy", demo)
    two = {
        "expert:add": {"sum_json": _cell(0.2), "capital_json": _cell(0.0)},
        "expert:capital": {"sum_json": _cell(0.0), "capital_json": _cell(0.6)},
        "dynamic:exact": {"sum_json": _cell(0.5), "capital_json": _cell(0.5)},
    }
    _write(root / "two_skill" / "results.a.json", "accuracy", two)
    phrasings = {
        "expert:add": {"add": _cell(0.7, 0.7), "capital": _cell(0.0, 0.0)},
        "expert:capital": {"add": _cell(0.0, 0.0), "capital": _cell(0.9, 0.9)},
        "dynamic:exact": {"add": _cell(0.7, 0.7), "capital": _cell(0.8, 0.8)},
    }
    _write(root / "phrasings" / "results.a.json", "accuracy", phrasings)
    general = {
        "base": {"same_as_base": 1.0, "overlap": 1.0},
        "dynamic:exact": {"same_as_base": 0.95, "overlap": 0.97},
    }
    _write(root / "general" / "general.a.json", "models", general)
    _write(
        root / "twin_shared" / "general" / "general.c.json",
        "models",
        {"dynamic:twin": {"same_as_base": 0.1, "overlap": 0.4}},
    )
    return root


def test_rows_oracle_and_the_twin_variant(root: Path) -> None:
    r = rows(load(root))
    assert r["dynamic:exact"]["demo"] == pytest.approx(0.95)
    assert r["dynamic:exact"]["two"] == pytest.approx(0.5)
    assert r["dynamic:exact"]["general"] == pytest.approx(0.95)
    # The oracle: each task's own expert; the best single expert per composition; base.
    assert r[ORACLE]["demo"] == pytest.approx((0.9 + 1.0) / 2)
    assert r[ORACLE]["unseen"] == pytest.approx((0.8 + 1.0) / 2)
    assert r[ORACLE]["two"] == pytest.approx((0.2 + 0.6) / 2)
    assert r[ORACLE]["phrasings"] == pytest.approx((0.7 + 0.9) / 2)
    assert r["dynamic:exact"]["phrasings"] == pytest.approx(0.75)
    assert r["base"]["phrasings"] is None
    assert r[ORACLE]["general"] == 1.0
    assert r[TWIN_SHARED]["general"] == pytest.approx(0.1)
    assert r[TWIN_SHARED]["demo"] is None


def test_report_writes_the_table_and_the_chart(root: Path) -> None:
    text = report(root)
    assert "| `dynamic:exact` | 95.0 | 90.0 | 75.0 | 50.0 | 95.0 | 0.970 |" in text
    assert f"| {ORACLE} | 95.0 | 90.0 | 80.0 | 40.0 | 100.0 | 1.000 |" in text
    assert "| `base` | 0.0 | 0.0 | – | – | 100.0 | 1.000 |" in text
    assert (root / "open_world.png").read_bytes()[:4] == b"\x89PNG"


def _blend(halves: bool) -> dict[str, object]:
    out: dict[str, object] = {
        "exact_match": {
            "sum_json": {"expert:s1": 0.0, "pair@0.5": 0.25},
            "sort_descending": {"expert:s1": 0.0, "pair@0.5": 0.0},
        },
        "mean": {"expert:s1": 0.0, "pair@0.5": 0.125},
    }
    if halves:
        out["halves"] = {
            "sum_json": {
                "expert:s1": {"content": 1.0, "form": 0.0, "both": 0.0},
                "pair@0.5": {"content": 0.5, "form": 0.5, "both": 0.25},
            },
            "sort_descending": {
                "expert:s1": {"content": 0.9, "form": 0.1, "both": 0.0},
                "pair@0.5": {"content": 0.2, "form": 0.6, "both": 0.0},
            },
        }
    return out


def test_report_explains_the_blends_by_their_halves(root: Path) -> None:
    results = root.parents[2] / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "blend.dev.cpu-2core.json").write_text(json.dumps(_blend(halves=True)))
    text = report(root)
    assert "| `pair@0.5` | 25 | 0 | 12.5 | – |" in text
    assert "| strategy | sum_json: content / form | sort_descending: content / form |" in text
    assert "| `expert:s1` | 100 / 0 | 90 / 10 | 95 / 5 / 0 |" in text
    assert "| `pair@0.5` | 50 / 50 | 20 / 60 | 35 / 55 / 12 |" in text
    # a run from before the halves: the exact-match table only
    (results / "blend.dev.cpu-2core.json").write_text(json.dumps(_blend(halves=False)))
    text = report(root)
    assert "| `pair@0.5` | 25 | 0 | 12.5 | – |" in text
    assert "content / form" not in text
