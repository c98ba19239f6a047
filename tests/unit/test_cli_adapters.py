"""`mergeserve merge | decompose | extract-lora` on real PEFT dirs, in process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mergeserve.adapters.lowrank import relative_error
from mergeserve.adapters.peft_io import load_lora_factors
from mergeserve.adapters.twin import TwinDecomposition
from mergeserve.cli import main
from mergeserve.testing import make_random_lora, make_tiny_llama


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("cli")
    base = make_tiny_llama(root / "base", hidden_size=64, intermediate_size=96)
    experts = [make_random_lora(base, root / n, rank=4, seed=i) for i, n in enumerate("abc")]
    return base, experts


def _dense(path: Path) -> dict[str, torch.Tensor]:
    return {n: b @ a for n, (a, b) in load_lora_factors(path).modules().items()}


def test_merge_writes_the_exact_weighted_sum(
    setup: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, experts = setup
    out = tmp_path / "m"
    main(["merge", "--method", "linear", "--weights", "1,2,1", "--base", str(base)]
         + [str(e) for e in experts] + ["--out", str(out)])  # fmt: skip
    assert capsys.readouterr().out.strip() == str(out)
    ds = [_dense(e) for e in experts]
    ref = {k: (ds[0][k] + 2 * ds[1][k] + ds[2][k]) / 4 for k in ds[0]}
    assert relative_error(_dense(out), ref) < 1e-6


def test_merge_shows_progress_for_dense_methods(
    setup: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, experts = setup
    main(["merge", "--method", "dare_ties", "--density", "0.3", "--rank", "4"]
         + [str(e) for e in experts[:2]] + ["--out", str(tmp_path / "d")])  # fmt: skip
    err = capsys.readouterr().err
    assert "dare_ties" in err
    assert "14/14" in err  # 2 layers × 7 projections
    assert set(load_lora_factors(tmp_path / "d").ranks.values()) == {4}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "linear", "--weights", "1,2"], "2 weights for 3 experts"),
        (["--method", "linear", "--density", "0.2"], "linear does not use density"),
        (["--method", "slerp"], "slerp merges exactly 2 experts"),
    ],
)
def test_merge_errors_are_clear_and_write_nothing(
    setup: tuple[Path, list[Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    _, experts = setup
    with pytest.raises(SystemExit) as e:
        main(["merge", *argv, *(str(x) for x in experts), "--out", str(tmp_path / "m")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_decompose_writes_a_loadable_twin_and_reports(
    setup: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, experts = setup
    out = tmp_path / "twin"
    main(["decompose", *(str(e) for e in experts), "--out", str(out), "--exclusive-rank", "2"])
    text = capsys.readouterr().out
    for name in "abc":
        assert f"\n{name} " in text
    twin = TwinDecomposition.load(out)
    assert twin.names == ("a", "b", "c")
    assert {max(x.ranks.values()) for x in twin.exclusives.values()} == {2}
    assert [r.exclusive_rank for r in twin.report] == [2, 2, 2]


def test_extract_lora(
    setup: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = setup
    main(["extract-lora", "--base", str(base), "--finetuned", str(base), "--rank", "2",
          "--out", str(tmp_path / "x")])  # fmt: skip
    assert "relative error 0" in capsys.readouterr().out
    assert all(float(t.abs().max()) == 0.0 for t in _dense(tmp_path / "x").values())


def test_merge_with_a_learned_method_runs_the_base_on_the_examples(
    setup: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    base, experts = setup
    dirs = []
    for i, e in enumerate(experts):  # copies with examples.jsonl beside the adapter
        d = tmp_path / f"x{i}"
        shutil.copytree(e, d)
        rows = [{"prompt": f"tell me {i} {j}", "answer": f"{j}"} for j in range(3)]
        (d / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(str(d))
    out = tmp_path / "rm"
    main(["merge", "--method", "regmean", "--alpha", "0.5", "--base", str(base), *dirs,
          "--out", str(out), "--threads", "1"])  # fmt: skip
    assert capsys.readouterr().out.strip() == str(out)
    assert load_lora_factors(out).ranks["self_attn.q_proj"] == 12  # exact: 3 × rank 4
    with pytest.raises(SystemExit) as e:
        main(["merge", "--method", "fisher", *dirs, "--out", str(tmp_path / "f")])
    assert e.value.code == 2
    assert "give --base" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_split_writes_a_labelled_dev_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from mergeserve.adapters.calibration import read_examples
    from mergeserve.tasks.generators import generate

    out = tmp_path / "dev.jsonl"
    main(["split", "--split", "dev", "--n", "3", "--tasks", "add,capital", "--out", str(out)])
    assert "6 examples written" in capsys.readouterr().out
    rows = read_examples(out, labelled=True)
    want = generate("add", "dev", 3) + generate("capital", "dev", 3)
    assert [(r.prompt, r.answer) for r in rows] == [(s.prompt, s.answer) for s in want]
    assert json.loads(out.read_text().splitlines()[0])["task"] == "add"
    with pytest.raises(SystemExit):
        main(["split", "--tasks", "nope"])
