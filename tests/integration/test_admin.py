"""The admin API: auth, hot-add (upload and path), validation that changes nothing,
remove (waiting for in-flight requests), rebuild, and persistence across restarts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeserve.config import AdminSettings, Settings
from mergeserve.runtime.engine import FakeEngine
from tests.conftest import write_fake_lora_dir
from tests.integration.conftest import Served, metric_samples, serve, uvicorn_in_thread

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

GAMMA_PROMPTS = [
    "Translate 'good morning' into French.",
    "How do you say 'thank you' in Spanish?",
    "Translate this sentence to German: the cat sleeps.",
    "What is the Italian word for 'house'?",
]
GAMMA_ASK = "Please translate 'see you tomorrow' into Portuguese."


@pytest.fixture
def admin_settings(settings: Settings, tmp_path: Path) -> Settings:
    allowed = tmp_path / "incoming"
    allowed.mkdir()
    return settings.model_copy(
        update={"admin": AdminSettings(token=TOKEN, allowed_roots=[allowed])}
    )


@pytest.fixture
async def admin(admin_settings: Settings) -> AsyncIterator[Served]:
    async for s in serve(admin_settings, FakeEngine(context_len=256)):
        yield s


def upload_parts(src: Path, name: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    files = [
        ("files", (f.name, f.read_bytes(), "application/octet-stream"))
        for f in sorted(src.iterdir())
        if f.name not in skip
    ]
    return {"data": {"name": name}, "files": files}


async def state_of(s: Served) -> dict[str, Any]:
    """Everything a change could touch, as a client and an operator see it."""
    experts = (await s.http.get("/admin/experts", headers=AUTH)).json()
    models = [
        (m["id"], m["root"], m.get("digest"))
        for m in (await s.http.get("/v1/models")).json()["data"]
    ]
    reply = await s.client.chat.completions.create(
        model="dynamic", messages=[{"role": "user", "content": GAMMA_ASK}], max_tokens=64
    )
    merge = reply.model_extra["merge"] if reply.model_extra else None
    return {
        "experts": experts,
        "models": models,
        "reply": reply.choices[0].message.content,
        "weights": merge["weights"] if merge else None,
        "alpha_id": await adapter_id(s, "expert:alpha"),
        "ties_id": await adapter_id(s, "static:ties"),
    }


async def adapter_id(s: Served, model: str) -> int:
    reply = await s.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert reply.model_extra is not None
    return int(reply.model_extra["merge"]["adapter_id"])


def manifest(settings: Settings) -> bytes | None:
    path = settings.cache / "registry" / "manifest.json"
    return path.read_bytes() if path.exists() else None


# ------------------------------------------------------------------------------- auth


async def test_admin_is_off_without_a_token(served: Served) -> None:
    r = await served.http.get("/admin/experts", headers=AUTH)
    assert r.status_code == 404


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}],
)
async def test_admin_needs_the_bearer_token(admin: Served, headers: dict[str, str]) -> None:
    for method, url in [
        ("GET", "/admin/experts"),
        ("POST", "/admin/rebuild"),
        ("DELETE", "/admin/experts/alpha"),
    ]:
        r = await admin.http.request(method, url, headers=headers)
        assert r.status_code == 401, (method, url)
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
    ok = await admin.http.get("/admin/experts", headers=AUTH)
    assert ok.status_code == 200
    assert [(e["name"], e["source"]) for e in ok.json()["experts"]] == [
        ("alpha", "seed"),
        ("beta", "seed"),
    ]


# ---------------------------------------------------------------------------- hot-add


async def test_upload_serves_a_new_expert_at_once(
    admin: Served, admin_settings: Settings, tmp_path: Path
) -> None:
    before = await state_of(admin)
    assert "gamma" not in before["weights"]
    src = write_fake_lora_dir(tmp_path / "up" / "gamma", examples=GAMMA_PROMPTS)
    r = await admin.http.post("/admin/experts", headers=AUTH, **upload_parts(src, "gamma"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["added"] == "gamma"
    assert body["generation"] == 2
    assert body["stale"] == ["gamma"]  # not in S nor in the static merges until a rebuild
    gamma = next(e for e in body["experts"] if e["name"] == "gamma")
    assert gamma["source"] == "registry"
    assert not gamma["in_shared"]

    ids = [m["id"] for m in (await admin.http.get("/v1/models")).json()["data"]]
    assert "expert:gamma" in ids
    after = await state_of(admin)
    assert max(after["weights"], key=after["weights"].get) == "gamma"  # routed by its examples
    one = await admin.client.chat.completions.create(
        model="expert:gamma", messages=[{"role": "user", "content": "hi"}], max_tokens=20
    )
    assert one.choices[0].message.content.startswith("[expert:gamma]")
    for mode in ("twin", "exact"):
        pinned = await admin.client.chat.completions.create(
            model=f"dynamic:{mode}",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=20,
            extra_body={"merge_weights": {"gamma": 1.0, "alpha": 1.0}},
        )
        assert pinned.model_extra["merge"]["weights"] == {"alpha": 1.0, "gamma": 1.0}
    metrics = (await admin.http.get("/metrics")).text
    assert metric_samples(metrics, "mergeserve_registry_version")[()] == 2
    assert metric_samples(metrics, "mergeserve_experts")[()] == 3
    # unchanged models keep their engine ids: only the new adapter is new to the engine
    alpha_id = await adapter_id(admin, "expert:alpha")
    assert alpha_id == before["alpha_id"]


async def test_add_by_path_under_an_allowed_root(admin: Served, admin_settings: Settings) -> None:
    root = admin_settings.admin.allowed_roots[0]
    write_fake_lora_dir(root / "gamma", examples=GAMMA_PROMPTS)
    r = await admin.http.post(
        "/admin/experts", headers=AUTH, json={"name": "gamma", "path": str(root / "gamma")}
    )
    assert r.status_code == 201, r.text
    stored = Path(next(e["path"] for e in r.json()["experts"] if e["name"] == "gamma"))
    assert stored.is_relative_to(admin_settings.cache / "registry")  # copied, not referenced
    (root / "gamma" / "adapter_model.safetensors").unlink()  # the source may go away
    reply = await admin.client.chat.completions.create(
        model="expert:gamma", messages=[{"role": "user", "content": "hi"}], max_tokens=20
    )
    assert reply.choices[0].message.content.startswith("[expert:gamma]")


def _nan(src: Path) -> None:
    w = load_file(str(src / "adapter_model.safetensors"))
    k = next(iter(w))
    w[k][0, 0] = float("nan")
    save_file(w, str(src / "adapter_model.safetensors"))


def _config(src: Path, **changes: Any) -> None:
    cfg = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps(cfg | changes))


REJECTIONS: dict[str, tuple[Any, int, str]] = {
    # case: (how to spoil the dir or the request, status, words the error must contain)
    "nan weights": (_nan, 400, "nan"),
    "no examples": (lambda p: (p / "examples.jsonl").unlink(), 400, "examples.jsonl"),
    "empty examples": (lambda p: (p / "examples.jsonl").write_text("\n"), 400, "no example"),
    "rank above the slot": (None, 400, "slot rank"),
    "module the engine has no layer for": (None, 400, "lm_head"),
    "config not json": (
        lambda p: (p / "adapter_config.json").write_text("{"),
        400,
        "adapter_config.json",
    ),
    "not lora": (lambda p: _config(p, peft_type="IA3"), 400, "lora"),
    "no weights": ("skip:adapter_model.safetensors", 400, "adapter_model.safetensors"),
    "a stray file": ("extra:notes.txt", 400, "unexpected file"),
    "bad name": ("name:../evil", 400, "adapter name"),
    "seed name": ("name:alpha", 409, "experts dir"),
    "outside the allowed roots": ("path:/etc", 403, "allowed root"),
    "path not a dir": ("path:missing", 400, "not a directory"),
    "factors that do not compose": (None, 400, "config says rank 8"),
    "base model false": (lambda p: _config(p, base_model_name_or_path=False), 400, "null"),
    "alpha overflowing float32": (lambda p: _config(p, lora_alpha=1e39), 400, "not finite"),
    "r unlike the tensors": (lambda p: _config(p, r=3), 400, "config says rank 3"),
    "backtracking pattern": (
        lambda p: _config(p, rank_pattern={r"(.*?)*(.*?)*(.*?)*(.*?)*\d{3}": 8}),
        400,
        "too long to match",
    ),
    "invalid pattern": (lambda p: _config(p, alpha_pattern={"(": 4}), 400, "regular expression"),
    "a link in a dir added by path": ("link:", 400, "symbolic link"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
async def test_a_rejected_expert_changes_nothing(
    admin: Served, admin_settings: Settings, tmp_path: Path, case: str
) -> None:
    spoil, status, words = REJECTIONS[case]
    src = tmp_path / "up" / "gamma"
    if case == "rank above the slot":
        write_fake_lora_dir(src, rank=32, examples=GAMMA_PROMPTS)
    elif case == "module the engine has no layer for":
        write_fake_lora_dir(src, examples=GAMMA_PROMPTS, target_modules=["q_proj", "lm_head"])
    elif case == "factors that do not compose":
        write_fake_lora_dir(src, examples=GAMMA_PROMPTS)
        w = load_file(str(src / "adapter_model.safetensors"))
        save_file(
            {k: torch.cat([v, v], dim=-1) for k, v in w.items()},
            str(src / "adapter_model.safetensors"),
        )
    else:
        write_fake_lora_dir(src, examples=GAMMA_PROMPTS)
    before, before_manifest = await state_of(admin), manifest(admin_settings)

    name, kwargs = "gamma", upload_parts(src, "gamma")
    if callable(spoil):
        spoil(src)
        kwargs = upload_parts(src, name)
    elif isinstance(spoil, str):
        how, _, arg = spoil.partition(":")
        if how == "skip":
            kwargs = upload_parts(src, name, skip=(arg,))
        elif how == "extra":
            (src / arg).write_text("hello")
            kwargs = upload_parts(src, name)
        elif how == "name":
            kwargs = upload_parts(src, arg)
        elif how == "path":
            path = arg if arg.startswith("/") else str(admin_settings.admin.allowed_roots[0] / arg)
            kwargs = {"json": {"name": name, "path": path}}
        elif how == "link":  # inside the allowed root, pointing at a file outside it
            inside = admin_settings.admin.allowed_roots[0] / "linked"
            write_fake_lora_dir(inside, examples=GAMMA_PROMPTS)
            (inside / "examples.jsonl").unlink()
            (inside / "examples.jsonl").symlink_to(src / "examples.jsonl")
            kwargs = {"json": {"name": name, "path": str(inside)}}
    r = await admin.http.post("/admin/experts", headers=AUTH, **kwargs)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"]["message"].lower(), r.text

    assert manifest(admin_settings) == before_manifest
    assert await state_of(admin) == before
    objects = admin_settings.cache / "registry" / "objects"
    assert not [p for p in objects.iterdir()] if objects.exists() else True


async def test_adding_a_served_name_again_is_a_conflict(admin: Served, tmp_path: Path) -> None:
    src = write_fake_lora_dir(tmp_path / "up" / "gamma", examples=GAMMA_PROMPTS)
    assert (
        await admin.http.post("/admin/experts", headers=AUTH, **upload_parts(src, "gamma"))
    ).status_code == 201
    before = await state_of(admin)
    other = write_fake_lora_dir(tmp_path / "up2" / "gamma", seed=5, examples=GAMMA_PROMPTS)
    r = await admin.http.post("/admin/experts", headers=AUTH, **upload_parts(other, "gamma"))
    assert r.status_code == 409
    assert "already served" in r.json()["error"]["message"]
    assert await state_of(admin) == before


# ---------------------------------------------------------------------- remove, rebuild


async def test_remove_waits_for_in_flight_requests(
    admin: Served, admin_settings: Settings, tmp_path: Path
) -> None:
    src = write_fake_lora_dir(tmp_path / "up" / "gamma", examples=GAMMA_PROMPTS)
    r = await admin.http.post("/admin/experts", headers=AUTH, **upload_parts(src, "gamma"))
    stored = Path(next(e["path"] for e in r.json()["experts"] if e["name"] == "gamma"))
    admin.engine.token_delay_s = 0.02  # ~0.5 s for the reply below

    async def long_request() -> str:
        reply = await admin.client.chat.completions.create(
            model="expert:gamma", messages=[{"role": "user", "content": "x" * 20}], max_tokens=40
        )
        return reply.choices[0].message.content or ""

    task = asyncio.create_task(long_request())
    while not admin.engine.in_flight:
        await asyncio.sleep(0.005)
    removal = await admin.http.delete("/admin/experts/gamma", headers=AUTH)
    assert removal.status_code == 200, removal.text
    assert not admin.engine.in_flight  # the DELETE returned only after generation ended
    assert (await task).startswith("[expert:gamma]")  # and the request finished whole
    assert not await asyncio.to_thread(stored.exists)  # files deleted once unused
    admin.engine.token_delay_s = 0.0

    body = removal.json()
    assert [e["name"] for e in body["experts"]] == ["alpha", "beta"]
    assert body["generation"] == 3
    assert body["stale"] == []
    gone = await admin.http.post(
        "/v1/chat/completions",
        json={"model": "expert:gamma", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert gone.status_code == 404
    pinned = await admin.http.post(
        "/v1/chat/completions",
        json={
            "model": "dynamic",
            "messages": [{"role": "user", "content": "hi"}],
            "merge_weights": {"gamma": 1.0},
        },
    )
    assert pinned.status_code == 400
    assert "gamma" in pinned.text


@pytest.mark.parametrize(("name", "status"), [("alpha", 409), ("nobody", 404)])
async def test_remove_refusals(admin: Served, name: str, status: int) -> None:
    before = await state_of(admin)
    r = await admin.http.delete(f"/admin/experts/{name}", headers=AUTH)
    assert r.status_code == status, r.text
    assert await state_of(admin) == before


async def test_rebuild_takes_the_new_expert_into_shared_and_static(
    admin: Served, tmp_path: Path
) -> None:
    src = write_fake_lora_dir(tmp_path / "up" / "gamma", examples=GAMMA_PROMPTS)
    await admin.http.post("/admin/experts", headers=AUTH, **upload_parts(src, "gamma"))
    before = await state_of(admin)
    pin = {"model": "dynamic:twin", "max_tokens": 5, "merge_weights": {"gamma": 1.0}}
    pin["messages"] = [{"role": "user", "content": "hi"}]
    first = (await admin.http.post("/v1/chat/completions", json=pin)).json()["merge"]
    again = (await admin.http.post("/v1/chat/completions", json=pin)).json()["merge"]
    assert (first["cache"], again["cache"]) == ("miss", "hit")
    r = await admin.http.post("/admin/rebuild", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["generation"] == 3
    assert r.json()["stale"] == []
    assert all(e["in_shared"] for e in r.json()["experts"])
    after = await state_of(admin)
    assert after["ties_id"] != before["ties_id"]  # a new static merge, of three experts
    assert after["alpha_id"] == before["alpha_id"]
    rebuilt = (await admin.http.post("/v1/chat/completions", json=pin)).json()["merge"]
    assert rebuilt["cache"] == "miss"  # S changed, so did every Twin merge
    assert rebuilt["adapter_id"] != first["adapter_id"]


async def test_hot_added_experts_survive_a_restart(
    admin_settings: Settings, tmp_path: Path
) -> None:
    src = write_fake_lora_dir(tmp_path / "up" / "gamma", examples=GAMMA_PROMPTS)
    async for s in serve(admin_settings, FakeEngine(context_len=256)):
        r = await s.http.post("/admin/experts", headers=AUTH, **upload_parts(src, "gamma"))
        assert r.status_code == 201
    async for s in serve(admin_settings, FakeEngine(context_len=256)):
        listed = (await s.http.get("/admin/experts", headers=AUTH)).json()
        assert [(e["name"], e["source"]) for e in listed["experts"]] == [
            ("alpha", "seed"),
            ("beta", "seed"),
            ("gamma", "registry"),
        ]
        assert listed["stale"] == []  # a start decomposes everything it serves
        after = await state_of(s)
        assert max(after["weights"], key=after["weights"].get) == "gamma"


async def test_requests_keep_flowing_during_a_change(admin: Served, tmp_path: Path) -> None:
    """Streams started before an add and a remove finish whole; nothing fails."""
    admin.engine.token_delay_s = 0.005
    stop = asyncio.Event()
    results: list[int] = []

    async def client() -> None:
        while not stop.is_set():
            r = await admin.http.post(
                "/v1/chat/completions",
                json={
                    "model": "dynamic",
                    "messages": [{"role": "user", "content": GAMMA_ASK}],
                    "max_tokens": 30,
                },
            )
            results.append(r.status_code)

    clients = [asyncio.create_task(client()) for _ in range(4)]
    src = write_fake_lora_dir(tmp_path / "up" / "gamma", examples=GAMMA_PROMPTS)
    await asyncio.sleep(0.2)
    assert (
        await admin.http.post("/admin/experts", headers=AUTH, **upload_parts(src, "gamma"))
    ).status_code == 201
    await asyncio.sleep(0.2)
    assert (await admin.http.delete("/admin/experts/gamma", headers=AUTH)).status_code == 200
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*clients)
    assert len(results) > 8
    assert set(results) == {200}


def test_admin_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGESERVE_ADMIN__TOKEN", "abc")
    monkeypatch.setenv("MERGESERVE_ADMIN__ALLOWED_ROOTS", '["/srv/experts"]')
    s = Settings()
    assert s.admin.token is not None
    assert s.admin.token.get_secret_value() == "abc"
    assert "abc" not in repr(s)  # a secret, never logged
    assert s.admin.allowed_roots == [Path("/srv/experts")]


def test_cli_add_list_rebuild_remove(
    admin_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mergeserve.cli import main
    from mergeserve.server.app import create_app

    src = write_fake_lora_dir(tmp_path / "up" / "gamma", examples=GAMMA_PROMPTS)
    app = create_app(admin_settings, FakeEngine(context_len=256))
    with uvicorn_in_thread(app) as url:
        common = ["--url", url, "--token", TOKEN]
        main(["add-expert", "gamma", str(src), *common])
        out = capsys.readouterr().out
        assert "added gamma" in out
        assert "not in S/static yet" in out
        main(["list-experts", *common])
        assert "gamma" in capsys.readouterr().out
        main(["rebuild", *common])
        assert "not in S/static" not in capsys.readouterr().out
        with pytest.raises(SystemExit) as exit_:
            main(["add-expert", "gamma", str(src), *common])
        assert exit_.value.code == 2
        assert "HTTP 409" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["list-experts", "--url", url, "--token", "nope"])
        assert "HTTP 401" in capsys.readouterr().err
        main(["remove-expert", "gamma", *common])
        assert "removed gamma" in capsys.readouterr().out


async def test_the_first_expert_of_an_empty_server(
    admin_settings: Settings, tmp_path: Path
) -> None:
    """No experts at start: base only; the first one added brings every arm with it."""
    empty = tmp_path / "none"
    empty.mkdir()
    settings = admin_settings.model_copy(update={"experts_dir": empty})
    async for s in serve(settings, FakeEngine(context_len=256)):
        ids = [m["id"] for m in (await s.http.get("/v1/models")).json()["data"]]
        assert ids == ["base"]
        src = write_fake_lora_dir(tmp_path / "up" / "gamma", examples=GAMMA_PROMPTS)
        r = await s.http.post("/admin/experts", headers=AUTH, **upload_parts(src, "gamma"))
        assert r.status_code == 201, r.text
        assert r.json()["stale"] == []
        ids = [m["id"] for m in (await s.http.get("/v1/models")).json()["data"]]
        assert {"expert:gamma", "dynamic", "dynamic:twin", "static:ties"} <= set(ids)
        reply = await s.client.chat.completions.create(
            model="dynamic", messages=[{"role": "user", "content": GAMMA_ASK}], max_tokens=10
        )
        assert reply.model_extra["merge"]["weights"] == {"gamma": 1.0}
