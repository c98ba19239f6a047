"""End to end: an expert hot-added to the real server (real vLLM) answers at once, as
itself and inside dynamic merges, and is gone after its removal."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from mergeserve.server.admin import UPLOAD_FILES
from mergeserve.testing import make_random_lora
from tests.e2e.conftest import ADMIN_TOKEN, RealServer

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PROMPTS = ["Translate 'good night' into French.", "Write one sentence about the moon."]
FRESH_EXAMPLES = [
    "Translate 'good morning' into French.",
    "How do you say 'thank you' in German?",
    "Translate this to Spanish: the house is red.",
]


def greedy(server: RealServer, model: str, prompt: str, **extra: object) -> tuple[str, dict]:
    r = server.client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=12,
        temperature=0,
        extra_body=extra or None,
    )
    assert r.model_extra is not None
    return r.choices[0].message.content or "", r.model_extra["merge"]


def upload(server: RealServer, name: str, src: Path) -> httpx.Response:
    """POST /admin/experts with the three files of `src`, as `mergeserve add-expert`."""
    files = [("files", (f, (src / f).read_bytes())) for f in UPLOAD_FILES]
    return httpx.post(
        f"{server.base_url}/admin/experts",
        headers=AUTH,
        data={"name": name},
        files=files,
        timeout=300,
    )


def test_hot_added_expert_serves_at_once(real_server: RealServer, tmp_path: Path) -> None:
    src = make_random_lora(real_server.base, tmp_path / "fresh", rank=8, seed=11)
    (src / "examples.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in FRESH_EXAMPLES)
    )
    base = [greedy(real_server, "base", p)[0] for p in PROMPTS]
    r = upload(real_server, "fresh", src)
    assert r.status_code == 201, r.text
    try:
        alone = [greedy(real_server, "expert:fresh", p)[0] for p in PROMPTS]
        assert alone != base  # the random adapter changes what the model says
        # Σ w Δ with w = {fresh: 1} is Δ_fresh itself: vLLM runs the merged copy the same
        exact = [
            greedy(real_server, "dynamic:exact", p, merge_weights={"fresh": 1.0}) for p in PROMPTS
        ]
        assert [t for t, _ in exact] == alone
        assert all(m["weights"] == {"fresh": 1.0} for _, m in exact)
        # Twin: its exclusive against the current S, merged with S; served, not refused
        _, twin = greedy(real_server, "dynamic:twin", PROMPTS[0], merge_weights={"fresh": 1.0})
        assert twin["weights"] == {"fresh": 1.0}
        # routed by its examples alone
        _, routed = greedy(real_server, "dynamic", "Translate 'see you soon' into Italian.")
        assert max(routed["weights"], key=routed["weights"].get) == "fresh"
    finally:
        gone = httpx.delete(
            f"{real_server.base_url}/admin/experts/fresh", headers=AUTH, timeout=300
        )
        assert gone.status_code == 200, gone.text
    after = httpx.post(
        f"{real_server.base_url}/v1/chat/completions",
        json={"model": "expert:fresh", "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert after.status_code == 404
    assert [greedy(real_server, "base", p)[0] for p in PROMPTS] == base


def test_an_adapter_of_another_base_is_refused(real_server: RealServer, tmp_path: Path) -> None:
    """Fit to the base model is checked before anything is stored (the fast tier has no
    base model to check against)."""
    from mergeserve.testing import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", hidden_size=48, num_layers=3)
    src = make_random_lora(other, tmp_path / "alien", rank=4)
    (src / "examples.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    before = httpx.get(f"{real_server.base_url}/admin/experts", headers=AUTH).json()
    r = upload(real_server, "alien", src)
    assert r.status_code == 400, r.text
    assert httpx.get(f"{real_server.base_url}/admin/experts", headers=AUTH).json() == before
