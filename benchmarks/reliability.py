"""Bad input, case by case: every one gets a 4xx OpenAI-shaped error and changes nothing.

For each case it records the HTTP status, the error's type and code, whether the body is
OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`), whether the registry
dir (every file's bytes, the manifest included) is byte-identical afterwards, and whether
`/v1/models` is unchanged. Prints a markdown table and writes JSON; exits 1 if a row fails.

By default it starts its own server (`mergeserve serve`, real vLLM, a tiny llama built in
code with two experts, the admin API on, a registry and an allowed root in a temp dir):

    python benchmarks/reliability.py [--out benchmarks/results/reliability.json]

`tests/e2e/test_reliability.py` runs the same cases against the e2e servers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import load_file, save_file

from mergeserve.server.admin import UPLOAD_FILES
from mergeserve.testing import make_random_lora, make_tiny_llama, server_process

TOKEN = "reliability-admin"


@dataclass(frozen=True)
class Target:
    """A running server and what the cases need to know of it."""

    base_url: str
    token: str
    registry: Path
    allowed_root: Path
    """MERGESERVE_ADMIN__ALLOWED_ROOTS of the server (one dir)."""
    base_model: Path
    work: Path
    """A scratch dir outside the allowed root."""
    existing_expert: str
    """A name the server already serves."""
    max_upload_bytes: int


@dataclass(frozen=True)
class Row:
    case: str
    request: str
    status: int
    error_type: str | None
    error_code: str | None
    openai_shaped: bool
    state_unchanged: bool
    models_unchanged: bool
    expected: int
    message: str

    @property
    def ok(self) -> bool:
        return (
            self.status == self.expected
            and self.openai_shaped
            and self.state_unchanged
            and self.models_unchanged
        )


Send = Callable[[httpx.Client, Target], httpx.Response]


@dataclass(frozen=True)
class Case:
    name: str
    request: str
    expected: int
    send: Send


# ------------------------------------------------------------------ requests


def chat(body: Any) -> Send:
    def send(c: httpx.Client, t: Target) -> httpx.Response:
        return c.post("/v1/chat/completions", json=body)

    return send


def chat_raw(content: bytes) -> Send:
    def send(c: httpx.Client, t: Target) -> httpx.Response:
        return c.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )

    return send


def chat_chunked(content: bytes) -> Send:
    """The body sent in 64 KiB chunks without a Content-Length (Transfer-Encoding:
    chunked): the server must count it as it arrives."""

    def send(c: httpx.Client, t: Target) -> httpx.Response:
        def chunks() -> Any:
            for i in range(0, len(content), 64 << 10):
                yield content[i : i + (64 << 10)]

        return c.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )

    return send


def _big_chat() -> bytes:
    """A chat body of 5 MiB: over the server's default max_body_bytes (4 MiB)."""
    text = "x" * (5 << 20)
    return json.dumps({"model": "base", "messages": [{"role": "user", "content": text}]}).encode()


USER = [{"role": "user", "content": "hi"}]


EXISTING = "<existing>"
"""Stands for the name of an expert the server already serves."""


def upload(name: str, make: Callable[[Target, Path], Path]) -> Send:
    """POST /admin/experts with the files of the dir `make` builds."""

    def send(c: httpx.Client, t: Target) -> httpx.Response:
        src = make(t, t.work / f"case-{os.urandom(4).hex()}")
        files = []
        for f in (*UPLOAD_FILES, "adapter_model.bin"):
            if (src / f).is_file():
                files.append(("files", (f, (src / f).read_bytes())))
        given = t.existing_expert if name == EXISTING else name
        return c.post("/admin/experts", headers=_auth(t), data={"name": given}, files=files)

    return send


def by_path(name: str, where: Callable[[Target], str]) -> Send:
    def send(c: httpx.Client, t: Target) -> httpx.Response:
        body = {"name": name, "path": where(t)}
        return c.post("/admin/experts", headers=_auth(t), json=body)

    return send


def _auth(t: Target) -> dict[str, str]:
    return {"Authorization": f"Bearer {t.token}"}


# ------------------------------------------------------------------ bad adapters


def good(t: Target, d: Path) -> Path:
    make_random_lora(t.base_model, d, rank=4, seed=7)
    (d / "examples.jsonl").write_text(json.dumps({"prompt": "a question"}) + "\n")
    return d


def edited(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Target, Path], Path]:
    def make(t: Target, d: Path) -> Path:
        good(t, d)
        tensors = load_file(d / "adapter_model.safetensors")
        edit(tensors)
        save_file(tensors, d / "adapter_model.safetensors")
        return d

    return make


def configured(**changes: Any) -> Callable[[Target, Path], Path]:
    """A good adapter whose adapter_config.json gets `changes`."""

    def make(t: Target, d: Path) -> Path:
        good(t, d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps(cfg | changes))
        return d

    return make


def linked_file_under_root(t: Target) -> str:
    """A dir under the allowed root whose examples.jsonl links to a file outside it."""
    outside = t.work / f"secret-{os.urandom(3).hex()}.jsonl"
    outside.write_text(json.dumps({"prompt": "a secret"}) + "\n")
    d = good(t, t.allowed_root / f"linked-{os.urandom(3).hex()}")
    (d / "examples.jsonl").unlink()
    (d / "examples.jsonl").symlink_to(outside)
    return str(d)


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    k = next(k for k in tensors if "lora_B" in k)
    tensors[k][0, 0] = float("nan")


def _reshape(tensors: dict[str, torch.Tensor]) -> None:
    k = next(k for k in tensors if "lora_A" in k)
    tensors[k] = torch.zeros(tensors[k].shape[0], tensors[k].shape[1] + 3)


def pickled(t: Target, d: Path) -> Path:
    """The weights as a pickle (`adapter_model.bin`), which is never loaded."""
    good(t, d)
    tensors = load_file(d / "adapter_model.safetensors")
    torch.save(tensors, d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    return d


def other_base(t: Target, d: Path) -> Path:
    """A LoRA of another base model (another hidden size)."""
    other = t.work / "other-base"
    if not other.exists():
        make_tiny_llama(other, hidden_size=96, num_layers=1, num_heads=2, intermediate_size=128)
    make_random_lora(other, d, rank=4)
    (d / "examples.jsonl").write_text(json.dumps({"prompt": "a question"}) + "\n")
    return d


def oversize(t: Target, d: Path) -> Path:
    good(t, d)
    with (d / "examples.jsonl").open("a") as f:  # pushes the upload past the limit
        f.write(json.dumps({"prompt": "x" * (t.max_upload_bytes + 1)}) + "\n")
    return d


def no_config(t: Target, d: Path) -> Path:
    good(t, d)
    (d / "adapter_config.json").unlink()
    return d


def pickle_under_root(t: Target) -> str:
    d = t.allowed_root / f"pickled-{os.urandom(3).hex()}"
    pickled(t, d)
    return str(d)


def escape_dotdot(t: Target) -> str:
    d = good(t, t.work / "outside-dotdot")
    return str(t.allowed_root / ".." / os.path.relpath(d, t.allowed_root.parent))


def escape_symlink(t: Target) -> str:
    d = t.work / "outside-link-target"
    if not d.exists():
        good(t, d)
    link = t.allowed_root / f"link-{os.urandom(3).hex()}"
    link.symlink_to(d, target_is_directory=True)
    return str(link)


CASES: list[Case] = [
    Case("malformed JSON", "POST /v1/chat/completions {not json", 400, chat_raw(b"{not json")),
    Case("messages not a list", "messages: 'hi'", 400, chat({"model": "base", "messages": "hi"})),
    Case(
        "temperature wrong type",
        "temperature: 'hot'",
        400,
        chat({"model": "base", "messages": USER, "temperature": "hot"}),
    ),
    Case(
        "max_tokens negative",
        "max_tokens: -1",
        400,
        chat({"model": "base", "messages": USER, "max_tokens": -1}),
    ),
    Case(
        "max_tokens fractional",
        "max_tokens: 1.5",
        400,
        chat({"model": "base", "messages": USER, "max_tokens": 1.5}),
    ),
    Case("empty messages", "messages: []", 400, chat({"model": "base", "messages": []})),
    Case("missing messages", "{model} only", 400, chat({"model": "base"})),
    Case("unknown model", "model: 'gpt-9'", 404, chat({"model": "gpt-9", "messages": USER})),
    Case(
        "prompt over the context",
        "content: 20 000 words",
        400,
        chat({"model": "base", "messages": [{"role": "user", "content": "word " * 20_000}]}),
    ),
    Case(
        "max_tokens too large",
        "max_tokens: 1 000 000",
        400,
        chat({"model": "base", "messages": USER, "max_tokens": 1_000_000}),
    ),
    Case("n > 1", "n: 2", 400, chat({"model": "base", "messages": USER, "n": 2})),
    Case(
        "seed past int64",
        "seed: 2**64",
        400,
        chat({"model": "base", "messages": USER, "seed": 2**64}),
    ),
    Case(
        "unsupported parameter",
        "tools: [...]",
        400,
        chat({"model": "base", "messages": USER, "tools": [{"type": "function"}]}),
    ),
    Case(
        "unknown role",
        "role: 'wizard'",
        400,
        chat({"model": "base", "messages": [{"role": "wizard", "content": "hi"}]}),
    ),
    Case("pickle .bin adapter", "upload adapter_model.bin", 400, upload("pkl", pickled)),
    Case(
        "pickle .bin adapter by path",
        "path: <root>/dir with only adapter_model.bin",
        400,
        by_path("pkl2", pickle_under_root),
    ),
    Case("NaN in tensors", "upload, lora_B[0,0]=NaN", 400, upload("nan", edited(_nan))),
    Case("wrong shapes", "upload, lora_A 3 columns wider", 400, upload("shape", edited(_reshape))),
    Case("another base model", "upload, hidden 96 vs 64", 400, upload("otherbase", other_base)),
    Case("path escapes via ..", "path: <root>/../outside", 403, by_path("dd", escape_dotdot)),
    Case(
        "path escapes via symlink",
        "path: <root>/link -> outside",
        403,
        by_path("ln", escape_symlink),
    ),
    Case(
        "file symlinked out of the root",
        "path: <root>/dir with examples.jsonl -> outside",
        400,
        by_path("lnf", linked_file_under_root),
    ),
    Case(
        "base model not a string",
        "upload, base_model_name_or_path: false",
        400,
        upload("basefalse", configured(base_model_name_or_path=False)),
    ),
    Case(
        "lora_alpha overflowing",
        "upload, lora_alpha: 1e39",
        400,
        upload("hugealpha", configured(lora_alpha=1e39)),
    ),
    Case(
        "r unlike the tensors", "upload, r: 3 (tensors rank 4)", 400, upload("r3", configured(r=3))
    ),
    Case(
        "backtracking rank_pattern",
        "upload, rank_pattern key (.*?)*(.*?)*(.*?)*(.*?)*\\d{3}",
        400,
        upload("redos", configured(rank_pattern={r"(.*?)*(.*?)*(.*?)*(.*?)*\d{3}": 4})),
    ),
    Case(
        "merge_weights huge",
        "dynamic, merge_weights: {<existing>: 1e308}",
        400,
        lambda c, t: c.post(
            "/v1/chat/completions",
            json={
                "model": "dynamic",
                "messages": USER,
                "merge_weights": {t.existing_expert: 1e308},
            },
        ),
    ),
    Case("oversize upload", "upload > MAX_UPLOAD_BYTES", 413, upload("big", oversize)),
    Case("duplicate name", "upload as a served name", 409, upload(EXISTING, good)),
    Case("bad name", "name: '../x'", 400, upload("../x", good)),
    Case("empty name", "name: ''", 400, upload("", good)),
    Case("missing file", "upload without adapter_config.json", 400, upload("nocfg", no_config)),
    Case(
        "chat body over the limit",
        "POST /v1/chat/completions, 5 MiB body (Content-Length)",
        413,
        chat_raw(_big_chat()),
    ),
    Case(
        "chunked chat body over the limit",
        "POST /v1/chat/completions, 5 MiB body, chunked (no Content-Length)",
        413,
        chat_chunked(_big_chat()),
    ),
    Case(
        "feedback score huge",
        "POST /v1/feedback score: 1e300",
        400,
        lambda c, t: c.post("/v1/feedback", json={"id": "chatcmpl-x", "score": 1e300}),
    ),
    Case(
        "feedback for no response",
        "POST /v1/feedback id: 'chatcmpl-nope'",
        404,
        lambda c, t: c.post("/v1/feedback", json={"id": "chatcmpl-nope", "score": 1}),
    ),
    Case(
        "no admin token",
        "POST /admin/experts without Authorization",
        401,
        lambda c, t: c.post("/admin/experts", json={"name": "x", "path": "/"}),
    ),
]


# ------------------------------------------------------------------ running


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256), hidden lock files included."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def models(c: httpx.Client) -> list[str]:
    return sorted(m["id"] for m in c.get("/v1/models").json()["data"])


def openai_shaped(r: httpx.Response) -> tuple[bool, str | None, str | None, str]:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False, None, None, r.text[:200]
    shaped = (
        isinstance(err, dict)
        and {"message", "type", "param", "code"} <= err.keys()
        and isinstance(err["message"], str)
        and bool(err["message"])
    )
    message = str(err.get("message", "")) if isinstance(err, dict) else ""
    return shaped, err.get("type"), err.get("code"), message[:200]


def run_cases(t: Target, cases: list[Case] = CASES) -> list[Row]:
    rows = []
    t.work.mkdir(parents=True, exist_ok=True)
    with httpx.Client(base_url=t.base_url, timeout=120) as c:
        for case in cases:
            before, served = tree_digest(t.registry), models(c)
            r = case.send(c, t)
            shaped, etype, ecode, message = openai_shaped(r)
            rows.append(
                Row(
                    case.name,
                    case.request,
                    r.status_code,
                    etype,
                    ecode,
                    shaped,
                    tree_digest(t.registry) == before,
                    models(c) == served,
                    case.expected,
                    message,
                )
            )
    return rows


def table(rows: list[Row]) -> str:
    yes = {True: "yes", False: "**NO**"}
    lines = [
        "| case | request | status (expected) | error type / code | OpenAI-shaped | "
        "registry + manifest unchanged | /v1/models unchanged |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = f"{r.status}" + ("" if r.status == r.expected else f" (**{r.expected}**)")
        lines.append(
            f"| {r.case} | {r.request} | {status} | {r.error_type} / {r.error_code} | "
            f"{yes[r.openai_shaped]} | {yes[r.state_unchanged]} | {yes[r.models_unchanged]} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reliability.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mergeserve-reliability-") as tmp_s:
        tmp = Path(tmp_s)
        base = make_tiny_llama(tmp / "tiny-llama")
        for i, name in enumerate(("alpha", "beta"), start=1):
            d = make_random_lora(base, tmp / "experts" / name, rank=4, seed=i)
            (d / "examples.jsonl").write_text(json.dumps({"prompt": f"ask {name}"}) + "\n")
        (tmp / "allowed").mkdir()
        limit = 4 << 20
        env = {
            "MERGESERVE_ADMIN__TOKEN": TOKEN,
            "MERGESERVE_ADMIN__REGISTRY_DIR": str(tmp / "registry"),
            "MERGESERVE_ADMIN__ALLOWED_ROOTS": json.dumps([str(tmp / "allowed")]),
            "MERGESERVE_ADMIN__MAX_UPLOAD_BYTES": str(limit),
            "MERGESERVE_ENGINE__MAX_MODEL_LEN": "1024",
            "MERGESERVE_ENGINE__MAX_LORA_RANK": "16",
            "MERGESERVE_CACHE": str(tmp / "cache"),
        }
        args_ = ["--model", str(base), "--experts-dir", str(tmp / "experts")]
        with server_process(args_, tmp / "server.log", env) as p:
            target = Target(
                p.base_url,
                TOKEN,
                tmp / "registry",
                tmp / "allowed",
                base,
                tmp / "work",
                "alpha",
                limit,
            )
            rows = run_cases(target)
    print(table(rows))
    result = {
        "engine": "vllm (real), tiny llama",
        "cases": [asdict(r) | {"ok": r.ok} for r in rows],
        "all_ok": all(r.ok for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"all_ok": result["all_ok"], "cases": len(rows)}))
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
