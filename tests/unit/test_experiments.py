"""A/B assignment (deterministic, sticky, split by weight), config parsing, feedback book."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest

from mergeserve.errors import AuthenticationError, ConfigurationError, InvalidRequestError
from mergeserve.service.experiments import (
    Answered,
    Arm,
    Experiment,
    FeedbackBook,
    FeedbackConflictError,
    FeedbackNotFoundError,
    check_arms,
    load_experiments,
    parse_experiments,
    read_feedback,
)

TOML = """
[experiments.ties-vs-dynamic]
arms = { "static:ties" = 3, "dynamic" = 7 }

[experiments.three]
arms = { "base" = 1, "dynamic" = 1, "static:linear" = 2 }
header = "X-User-Id"
"""


def test_assignment_is_a_pure_function_of_name_arms_and_key(tmp_path: Path) -> None:
    path = tmp_path / "ab.toml"
    path.write_text(TOML)
    a = load_experiments(path)["ties-vs-dynamic"]
    b = load_experiments(path)["ties-vs-dynamic"]  # a restart reads the file again
    keys = [f"user-{i}" for i in range(500)]
    assert [a.assign(k) for k in keys] == [b.assign(k) for k in keys]
    renamed = Experiment("other-name", a.arms)
    assert [a.assign(k) for k in keys] != [renamed.assign(k) for k in keys]  # salted by name


@pytest.mark.parametrize("name", ["ties-vs-dynamic", "three"])
def test_traffic_split_matches_the_weights(tmp_path: Path, name: str) -> None:
    exp = parse_experiments(tomllib.loads(TOML))[name]
    n = 20_000
    counts: dict[str, int] = {}
    for i in range(n):
        arm = exp.assign(f"k{i}")
        counts[arm] = counts.get(arm, 0) + 1
    assert set(counts) == {a.model for a in exp.arms}
    for arm, p in exp.shares.items():
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts[arm] / n - p) < 4 * sigma, (arm, counts[arm] / n, p)


def test_changing_weights_moves_only_the_shifted_share() -> None:
    even = Experiment("e", (Arm("a", 1), Arm("b", 1)))
    tilted = Experiment("e", (Arm("a", 6), Arm("b", 4)))
    keys = [f"k{i}" for i in range(10_000)]
    moved = sum(even.assign(k) != tilted.assign(k) for k in keys) / len(keys)
    assert moved == pytest.approx(0.1, abs=0.015)
    off = Experiment("e", (Arm("a", 1), Arm("b", 0)))
    assert {off.assign(k) for k in keys[:500]} == {"a"}


def test_sticky_key_order() -> None:
    exp = Experiment("e", (Arm("a", 1), Arm("b", 1)), header="x-user-id")
    assert exp.sticky_key("alice", {"x-user-id": "bob"}) == ("alice", "user")
    assert exp.sticky_key(None, {"x-user-id": "bob"}) == ("bob", "header")
    k1, how = exp.sticky_key(None, {})
    k2, _ = exp.sticky_key("", {"other": "x"})
    assert how == "random"
    assert k1 != k2


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[experiments.x]\narms = { "a" = -1 }', "weight -1"),
        ('[experiments.x]\narms = { "a" = 0, "b" = 0 }', "every weight is zero"),
        ('[experiments.x]\narms = { "a" = "1" }', "must be a number"),
        ('[experiments.x]\narms = { "a" = true }', "must be a number"),
        ("[experiments.x]\narms = {}", "must be a table"),
        ('[experiments.x]\narms = { "a" = 1 }\nsticky = "user"', "unknown keys"),
        ('[experiments."expert:x"]\narms = { "a" = 1 }', "not a served model's name"),
        ('[experiments.dynamic]\narms = { "a" = 1 }', "not a served model's name"),
        ('[experiments."a b"]\narms = { "a" = 1 }', "1-64 letters"),
        ('[experiments.x]\narms = { "a" = 1 }\nheader = 3', "header must be a string"),
        ("experiments = 3", "must be a table"),
    ],
)
def test_bad_experiment_files_are_refused(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "ab.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=words):
        load_experiments(path)


def test_unreadable_files_and_unknown_arms(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="No such file"):
        load_experiments(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[experiments\n")
    with pytest.raises(ConfigurationError, match=r"bad\.toml"):
        load_experiments(tmp_path / "bad.toml")
    exps = parse_experiments(tomllib.loads(TOML))
    check_arms(exps.values(), ["base", "dynamic", "static:ties", "static:linear"])
    with pytest.raises(ConfigurationError, match=r"arms \['static:ties'\] are not served"):
        check_arms(exps.values(), ["base", "dynamic", "static:linear"])
    with pytest.raises(ConfigurationError, match="name of a served model"):
        check_arms([Experiment("base2", (Arm("base", 1),))], ["base", "base2"])


def test_feedback_book(tmp_path: Path) -> None:
    log = tmp_path / "fb" / "feedback.jsonl"
    book = FeedbackBook(log, window=2)
    with pytest.raises(FeedbackNotFoundError):
        book.record("chatcmpl-1", 1.0)
    book.answered("chatcmpl-1", Answered("ab", "static:ties", "ab", 0.0))
    book.answered("chatcmpl-2", Answered("base", "base", None, 0.0))
    got = book.record("chatcmpl-1", 0.5, "fine")
    assert (got.arm, got.experiment) == ("static:ties", "ab")
    with pytest.raises(FeedbackConflictError):
        book.record("chatcmpl-1", 1.0)
    for bad in (float("inf"), float("nan"), 1e300, -100.5):
        with pytest.raises(InvalidRequestError, match=r"in \[-100, 100\]"):
            book.record("chatcmpl-2", bad)
    book.answered("chatcmpl-3", Answered("ab", "dynamic:exact", "ab", 0.0))  # evicts 1
    with pytest.raises(FeedbackNotFoundError, match="last 2"):
        book.record("chatcmpl-1", 1.0)
    book.record("chatcmpl-3", 1.0)
    book.flush()
    with log.open("a") as f:
        f.write('{"torn')  # a killed writer
    lines = [json.loads(x) for x in log.read_text().splitlines()[:2]]
    assert [(x["id"], x["arm"], x["score"]) for x in lines] == [
        ("chatcmpl-1", "static:ties", 0.5),
        ("chatcmpl-3", "dynamic:exact", 1.0),
    ]
    assert lines[0]["comment"] == "fine"
    assert [r["id"] for r in read_feedback(log, "ab")] == ["chatcmpl-1", "chatcmpl-3"]
    assert read_feedback(log, "other") == []
    assert read_feedback(tmp_path / "none.jsonl") == []

    book.close()


def test_the_feedback_log_rotates_and_is_read_whole(tmp_path: Path) -> None:
    log = tmp_path / "feedback.jsonl"
    book = FeedbackBook(log, max_bytes=4096, keep=2)
    for i in range(120):  # ~150 bytes a line: several rotations
        book.answered(f"chatcmpl-{i}", Answered("ab", "base", "ab", 0.0))
        book.record(f"chatcmpl-{i}", float(i % 7))
    book.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["feedback.jsonl", "feedback.jsonl.1", "feedback.jsonl.2"]
    assert all((tmp_path / f).stat().st_size <= 4096 for f in files)
    ids = [r["id"] for r in read_feedback(log)]
    assert ids == [f"chatcmpl-{i}" for i in range(120 - len(ids), 120)]  # newest kept, in order
    assert len(ids) < 120  # the oldest went with the dropped file


def test_feedback_can_require_a_token(tmp_path: Path) -> None:
    book = FeedbackBook(tmp_path / "f.jsonl", token="s3cret")
    with pytest.raises(AuthenticationError):
        book.check_token("")
    with pytest.raises(AuthenticationError):
        book.check_token("Bearer nope")
    book.check_token("Bearer s3cret")
    FeedbackBook(tmp_path / "g.jsonl").check_token("")  # no token set: open
