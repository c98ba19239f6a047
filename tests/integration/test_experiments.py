"""A/B experiments through the app: the experiment is a model, arms are sticky (across
restarts too), the split follows the weights, per-arm metrics and feedback."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mergeserve.config import ExperimentSettings, Settings
from mergeserve.errors import ConfigurationError
from mergeserve.runtime.engine import FakeEngine
from tests.integration.conftest import Served, metric_samples, serve, uvicorn_in_thread

AB = """
[experiments.ab]
arms = { "static:ties" = 1, "dynamic" = 1 }
header = "x-user-id"
"""


@pytest.fixture
def ab_settings(settings: Settings, tmp_path: Path) -> Settings:
    path = tmp_path / "ab.toml"
    path.write_text(AB)
    exp = ExperimentSettings(file=path, feedback_log=tmp_path / "feedback.jsonl")
    return settings.model_copy(update={"experiments": exp})


@pytest.fixture
async def ab(ab_settings: Settings) -> AsyncIterator[Served]:
    async for s in serve(ab_settings, FakeEngine(context_len=256)):
        yield s


async def ask(s: Served, user: str | None = None, **headers: str) -> tuple[str, dict, str]:
    """(x-mergeserve-arm header, merge object, response id) of one request to `ab`."""
    body: dict[str, object] = {
        "model": "ab",
        "messages": [{"role": "user", "content": "What is 2 plus 2?"}],
        "max_tokens": 8,
    }
    if user is not None:
        body["user"] = user
    r = await s.http.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["model"] == "ab"  # the name the client asked for
    return r.headers["x-mergeserve-arm"], data["merge"], data["id"]


async def test_the_experiment_is_a_model_with_its_arms(ab: Served) -> None:
    cards = {m.id: m for m in (await ab.client.models.list()).data}
    assert cards["ab"].model_extra["arms"] == {"static:ties": 0.5, "dynamic": 0.5}
    one = await ab.client.models.retrieve("ab")
    assert one.model_extra["arms"] == {"static:ties": 0.5, "dynamic": 0.5}


async def test_assignment_is_sticky_and_reported(ab: Served) -> None:
    arms = {}
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        header, merge, _ = await ask(ab, user)
        assert merge["experiment"] == "ab"
        assert header == merge["arm"] in {"static:ties", "dynamic:exact"}
        arms[user] = header
        for _ in range(3):
            assert (await ask(ab, user))[0] == header
    assert set(arms.values()) == {"static:ties", "dynamic:exact"}  # six users, both arms
    # the header is the key when there is no user field
    by_header = {(await ask(ab, None, **{"x-user-id": u}))[0] for _ in range(3) for u in ["alice"]}
    assert by_header == {arms["alice"]}
    # streaming: the first chunk carries the arm and the experiment
    stream = await ab.client.chat.completions.create(
        model="ab",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        user="alice",
        stream=True,
    )
    first = None
    async for chunk in stream:
        first = first or chunk.model_extra.get("merge")
    assert first is not None
    assert (first["arm"], first["experiment"]) == (arms["alice"], "ab")


async def test_assignment_survives_a_restart(ab_settings: Settings) -> None:
    users = [f"user-{i}" for i in range(20)]
    runs = []
    for _ in range(2):
        async for s in serve(ab_settings, FakeEngine(context_len=256)):
            runs.append([(await ask(s, u))[0] for u in users])
    assert runs[0] == runs[1]


async def test_split_follows_the_weights_and_per_arm_metrics(ab: Served) -> None:
    n = 400
    counts = Counter([(await ask(ab, f"u{i}"))[0] for i in range(n)])
    sigma = math.sqrt(0.25 / n)
    assert abs(counts["static:ties"] / n - 0.5) < 4 * sigma, counts
    text = (await ab.http.get("/metrics")).text
    got = metric_samples(text, "mergeserve_experiment_requests_total")
    for arm, c in counts.items():
        assert got[(("arm", arm), ("experiment", "ab"), ("status", "ok"))] == c
    ttft = metric_samples(text, "mergeserve_experiment_time_to_first_token_seconds_count")
    assert ttft[(("arm", "static:ties"), ("experiment", "ab"))] == counts["static:ties"]
    tokens = metric_samples(text, "mergeserve_experiment_tokens_total")
    assert tokens[(("arm", "dynamic:exact"), ("experiment", "ab"), ("kind", "completion"))] > 0
    # the arms' own per-arm metrics count them too (direct use and experiments together)
    direct = metric_samples(text, "mergeserve_requests_total")
    assert direct[(("arm", "static:ties"), ("status", "ok"))] == counts["static:ties"]
    errors = await ab.http.post(
        "/v1/chat/completions",
        json={"model": "ab", "messages": [{"role": "user", "content": "x" * 400}], "user": "u1"},
    )
    assert errors.status_code == 400  # over the context window: an error of its arm
    text = (await ab.http.get("/metrics")).text
    got = metric_samples(text, "mergeserve_experiment_requests_total")
    arm = (await ask(ab, "u1"))[0]
    assert got[(("arm", arm), ("experiment", "ab"), ("status", "client_error"))] == 1
    check = await asyncio.to_thread(
        subprocess.run, ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


async def test_feedback_is_recorded_per_arm(ab: Served, ab_settings: Settings) -> None:
    arm, _, rid = await ask(ab, "alice")
    r = await ab.http.post("/v1/feedback", json={"id": rid, "score": 0.75})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "id": rid,
        "model": "ab",
        "arm": arm,
        "experiment": "ab",
        "score": 0.75,
    }
    again = await ab.http.post("/v1/feedback", json={"id": rid, "score": 1})
    assert again.status_code == 409
    unknown = await ab.http.post("/v1/feedback", json={"id": "chatcmpl-nope", "score": 1})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "id"
    bad = await ab.http.post("/v1/feedback", json={"id": rid, "score": "great"})
    assert bad.status_code == 400
    # a direct request can be rated too (experiment: none)
    direct = await ab.client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert (
        await ab.http.post("/v1/feedback", json={"id": direct.id, "score": 0})
    ).status_code == 200
    huge = await ab.http.post("/v1/feedback", json={"id": direct.id, "score": 1e300})
    assert huge.status_code == 400
    ab.app.state.mergeserve.chat.feedback.flush()  # the log is written by its own thread
    log = [json.loads(x) for x in ab_settings.experiments.feedback_log.read_text().splitlines()]
    assert [(x["id"], x["arm"], x["experiment"], x["score"]) for x in log] == [
        (rid, arm, "ab", 0.75),
        (direct.id, "base", None, 0.0),
    ]
    text = (await ab.http.get("/metrics")).text
    fb = metric_samples(text, "mergeserve_feedback_score_sum")
    assert fb[(("arm", arm), ("experiment", "ab"))] == 0.75
    assert fb[(("arm", "base"), ("experiment", "none"))] == 0.0


async def test_an_experiment_with_an_unserved_arm_refuses_to_start(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "ab.toml"
    path.write_text('[experiments.ab]\narms = { "static:ties" = 1, "expert:nobody" = 1 }\n')
    bad = settings.model_copy(update={"experiments": ExperimentSettings(file=path)})
    with pytest.raises(ConfigurationError, match="expert:nobody"):
        async for _ in serve(bad, FakeEngine(context_len=256)):
            pass


def test_ab_report_end_to_end(
    ab_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mergeserve ab-report` over HTTP: offline eval of both arms, online feedback through
    the experiment, intervals and a verdict (static:ties answers right, dynamic wrong)."""
    from mergeserve.cli import main
    from mergeserve.server.app import create_app
    from mergeserve.tasks import TASKS, generate

    answers = {
        s.prompt: s.answer
        for t in ("add", "capital")
        for split in ("test", "dev")
        for s in generate(t, split, 20)  # type: ignore[arg-type]
    }

    def reply(adapter: str | None, prompt: str) -> str:
        good = adapter == "static:ties"
        return answers.get(prompt, "?") if good else "I do not know"

    app = create_app(ab_settings, FakeEngine(context_len=512, reply_fn=reply))
    out = tmp_path / "report"
    with uvicorn_in_thread(app) as url:
        main(
            [
                "ab-report",
                "--experiment", "ab",
                "--base-url", url,
                "--tasks", "add,capital",
                "--n", "20",
                "--online", "10",
                "--feedback", str(ab_settings.experiments.feedback_log),
                "--out", str(out),
                "--boot", "300",
            ]
        )  # fmt: skip
    printed = capsys.readouterr().out
    assert "online: 20 labelled requests" in printed
    report = json.loads((out / "ab-report.json").read_text())
    off = report["offline"]
    assert off["accuracy"]["static:ties"]["value"] == 1.0
    assert off["accuracy"]["dynamic"]["value"] == 0.0
    assert "**`static:ties` is better**" in off["verdict"]
    fb = report["feedback"]
    assert sum(fb["count"].values()) == 20
    assert fb["count"]["static:ties"] > 0  # 20 users: both arms got some
    assert fb["mean"]["static:ties"]["value"] == 1.0
    assert fb["mean"]["dynamic"]["value"] == 0.0
    assert set(fb["count"]) == {"static:ties", "dynamic"}
    md = (out / "ab-report.md").read_text()
    assert "| `static:ties` | 100 | 100 | 100.0 [100.0, 100.0] |" in md
    assert (out / "ab-report.png").stat().st_size > 1000
    assert set(TASKS) >= set(off["tasks"])
