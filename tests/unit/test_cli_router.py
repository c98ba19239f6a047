"""`mergeserve train-router | route` in process, on the committed demo experts' examples."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from mergeserve.cli import main
from mergeserve.router.base import ROUTER_DIR
from mergeserve.router.mlp import MLP_META

DEMO = Path(__file__).resolve().parents[2] / "examples" / "experts"
NAMES = sorted(p.name for p in DEMO.iterdir() if (p / "examples.jsonl").is_file())
pytestmark = pytest.mark.skipif(
    not {"capital", "reverse_words", "sentiment"} <= set(NAMES), reason="no demo experts"
)


@pytest.fixture
def experts(tmp_path: Path) -> Path:
    """The demo experts, linked into a dir of our own (train-router writes beside them)."""
    root = tmp_path / "experts"
    root.mkdir()
    for n in NAMES:
        (root / n).symlink_to(DEMO / n)
    return root


def _route(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    lines: list[str],
    *args: str,
) -> list[dict[str, object]]:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{x}\n" for x in lines)))
    main(["route", "--threads", "2", *args])
    return [json.loads(x) for x in capsys.readouterr().out.splitlines()]


PROMPTS = [
    json.dumps({"prompt": "Which city is the seat of government of Kenya?"}),
    json.dumps({"prompt": "flip the order of the words: lamp ocean tiger"}),
    json.dumps({"prompt": "Was this buyer happy? 'Broke after one day, avoid.'"}),
]


def test_route_prototype(
    experts: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _route(monkeypatch, capsys, PROMPTS, "--experts-dir", str(experts))
    assert [o["top"] for o in out] == ["capital", "reverse_words", "sentiment"]
    for o in out:
        weights = o["weights"]
        assert isinstance(weights, dict)
        assert sum(weights.values()) == pytest.approx(1.0)
        assert set(weights) <= set(NAMES)


def test_route_a_request_of_no_expert_to_none(
    experts: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sleep = json.dumps({"prompt": "Give me three tips for better sleep."})
    (gated,) = _route(monkeypatch, capsys, [sleep], "--experts-dir", str(experts))
    assert (gated["route"], gated["weights"], gated["top"]) == ("none", {}, None)
    assert isinstance(gated["in_domain"], float)
    assert gated["in_domain"] < 0.5
    (closed,) = _route(
        monkeypatch, capsys, [sleep], "--experts-dir", str(experts), "--open-world", "off"
    )
    assert closed["route"] in ("expert", "blend")
    assert closed["in_domain"] == 1.0


def test_route_top_k_and_grid(
    experts: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _route(
        monkeypatch, capsys, PROMPTS[:1], "--experts-dir", str(experts),
        "--temperature", "100", "--top-k", "2", "--grid", "0.1",
    )  # fmt: skip
    (weights,) = [o["weights"] for o in out]
    assert isinstance(weights, dict)
    assert len(weights) == 2
    assert all(round(w * 10) == pytest.approx(w * 10) for w in weights.values())


def test_route_bad_lines_get_an_error_line_and_lose_nothing(
    experts: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [PROMPTS[0], "not json", '{"text": "x"}', PROMPTS[1]]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    with pytest.raises(SystemExit) as e:
        main(["route", "--experts-dir", str(experts)])
    assert e.value.code == 2
    captured = capsys.readouterr()
    out = [json.loads(x) for x in captured.out.splitlines()]
    assert len(out) == 4
    assert out[0]["top"] == "capital"
    assert out[1]["line"] == 2
    assert "not JSON" in str(out[1]["error"])
    assert out[2] == {"line": 3, "error": 'expected an object with a "prompt" string'}
    assert out[3]["top"] == "reverse_words"
    assert "2 input line(s) were not routed" in captured.err


def test_train_router_then_route_with_it(
    experts: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["train-router", "--experts-dir", str(experts), "--epochs", "40"])
    report = json.loads(capsys.readouterr().out)
    assert report["experts"] == NAMES
    meta = json.loads((experts / ROUTER_DIR / MLP_META).read_text())
    assert meta["experts"] == NAMES
    out = _route(monkeypatch, capsys, PROMPTS, "--experts-dir", str(experts), "--router", "mlp")
    assert [o["top"] for o in out] == ["capital", "reverse_words", "sentiment"]


def test_route_mlp_untrained_is_a_clear_error(
    experts: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPTS[0]))
    with pytest.raises(SystemExit):
        main(["route", "--experts-dir", str(experts), "--router", "mlp"])
    assert "run `mergeserve train-router` first" in capsys.readouterr().err
