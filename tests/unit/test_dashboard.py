"""The Grafana dashboard (deploy/grafana): valid PromQL on metric names the server exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mergeserve.server.metrics import Metrics

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "mergeserve-dashboard.json"
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
}


def exported_names() -> set[str]:
    out = set()
    for fam in Metrics("test").registry.collect():
        out |= {fam.name + s for s in SUFFIXES[fam.type]}
    return out


def queries() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in d["annotations"]["list"] if "expr" in a]
    return exprs


def test_every_query_names_exported_metrics() -> None:
    names = exported_names()
    used = {m for e in queries() for m in re.findall(r"\bmergeserve_[a-z_]+", e)}
    assert used, "no queries found"
    assert not used - names, f"not exported: {sorted(used - names)}"
    # the dashboard shows what the issue asks for
    for needed in (
        "mergeserve_request_latency_seconds_bucket",
        "mergeserve_experiment_requests_total",
        "mergeserve_feedback_score_sum",
        "mergeserve_expert_weight_bucket",
        "mergeserve_merge_latency_seconds_count",
        "mergeserve_tokens_total",
        "mergeserve_routing_outcomes_total",
    ):
        assert needed in used


def test_layout_is_consistent() -> None:
    d = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
    assert {v["name"] for v in d["templating"]["list"]} == {"datasource", "experiment"}


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="Debian's prometheus (make test installs it)"
)
def test_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [
        {
            "record": f"dashboard:q{i}",
            "expr": e.replace("$__rate_interval", "5m").replace("$experiment", "ab"),
        }
        for i, e in enumerate(queries())
    ]
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    check = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
