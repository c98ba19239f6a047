"""The command line's shape: every subcommand registers and shows its help, and the
top-level help loads none of what the commands need (torch), so it answers at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mergeserve.cli import build_parser


def subcommands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sub.choices is not None
    return list(sub.choices)


def test_every_command_group_registers_its_commands() -> None:
    assert set(subcommands()) == {
        "serve",
        "prepare-model",
        "merge",
        "decompose",
        "extract-lora",
        "methods",
        "split",
        "train-expert",
        "eval",
        "ab-report",
        "train-router",
        "route",
        "add-expert",
        "remove-expert",
        "list-experts",
        "rebuild",
    }


@pytest.mark.parametrize("command", subcommands())
def test_each_subcommand_shows_its_arguments(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    assert f"usage: mergeserve {command}" in capsys.readouterr().out


def test_arguments_are_added_when_the_command_parses() -> None:
    args = build_parser().parse_args(["merge", "a", "b", "--method", "ties", "--out", "o"])
    assert args.method == "ties"
    assert [str(d) for d in args.dirs] == ["a", "b"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["merge", "a", "--method", "no-such", "--out", "o"])


def test_top_level_help_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from mergeserve.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = ('torch', 'transformers', 'vllm', 'fastapi')\n"
        "print('loaded:', ','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "statically merge LoRA experts" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "loaded:"


def test_train_expert_refuses_composed_for_a_task_without_a_composer_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mergeserve.runtime.base_model as base_model
    from mergeserve.cli import main

    def loaded(*args: object) -> None:
        raise AssertionError("the base model was resolved before the flags were checked")

    monkeypatch.setattr(base_model, "resolve_base_model", loaded)
    out = tmp_path / "expert"
    with pytest.raises(SystemExit) as e:
        main(["train-expert", "--task", "capital", "--composed", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "task 'capital' has no composer (--composed)" in err
    assert "sort_numbers" in err
    assert not out.exists()
