"""The operator API under /admin: list, hot-add, remove experts, rebuild the merges.

Mounted only when `MERGESERVE_ADMIN__TOKEN` is set; every route then needs
`Authorization: Bearer <token>` (401 without it or with another one). The work runs in a
worker thread (copies, SVDs, embeddings); LiveSet serializes changes, so two admin calls
never interleave, and requests keep being served throughout.

* `GET    /admin/experts`         the served experts, their source, and the generation
* `POST   /admin/experts`         multipart: a `name` field and the files
                                  adapter_config.json, adapter_model.safetensors and
                                  examples.jsonl (as file parts, named by their file names);
                                  or JSON `{"name", "path"}` for a dir under an allowed root
* `DELETE /admin/experts/{name}`  stop serving it; waits for its in-flight requests
* `POST   /admin/rebuild`         recompute S, the exclusives and the static merges
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from pathlib import Path, PurePath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from mergeserve.adapters.peft_io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXAMPLES_FILE,
    validate_adapter_name,
)
from mergeserve.errors import (
    AdapterError,
    AuthenticationError,
    InvalidRequestError,
    PayloadTooLargeError,
    PermissionDeniedError,
)
from mergeserve.failpoints import failpoint
from mergeserve.server.state import AppState, get_state
from mergeserve.service.live import LiveSet
from mergeserve.service.served_set import ServedSet

UPLOAD_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXAMPLES_FILE)
"""The files an upload may carry (file parts are named by these file names)."""

_CHUNK = 1 << 20


def _live(request: Request, state: Annotated[AppState, Depends(get_state)]) -> LiveSet:
    token = state.live.settings.admin.token
    assert token is not None  # the router is mounted only with a token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise AuthenticationError("the admin API needs 'Authorization: Bearer <token>'")
    if not secrets.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise AuthenticationError("wrong admin token")
    return state.live


Live = Annotated[LiveSet, Depends(_live)]
router = APIRouter(prefix="/admin")


def describe(served: ServedSet) -> dict[str, Any]:
    """The served experts as the admin API and `mergeserve add-expert` show them."""
    experts = [
        {
            "name": name,
            "source": served.sources[name],
            "digest": served.experts.digests[name],
            "rank": info.rank,
            "target_modules": list(info.target_modules),
            "path": str(info.path),
            "in_shared": name in served.basis,
        }
        for name, info in served.experts.infos.items()
    ]
    return {
        "generation": served.generation,
        "experts": experts,
        "stale": list(served.stale),
        "models": [m.id for m in served.catalog],
    }


@router.get("/experts")
async def list_experts(live: Live) -> JSONResponse:
    return JSONResponse(describe(live.current))


@router.post("/experts")
async def add_expert(request: Request, live: Live) -> JSONResponse:
    t0 = time.perf_counter()
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        name, served = await _add_upload(request, live)
    elif ctype.startswith("application/json"):
        name, served = await _add_path(request, live)
    else:
        raise InvalidRequestError(
            "send the expert as multipart/form-data (name + files) or as JSON "
            '{"name": ..., "path": ...}'
        )
    body = describe(served) | {"added": name, "seconds": round(time.perf_counter() - t0, 3)}
    return JSONResponse(body, status_code=201)


@router.delete("/experts/{name}")
async def remove_expert(name: str, live: Live) -> JSONResponse:
    t0 = time.perf_counter()
    served = await asyncio.to_thread(live.remove, name)
    body = describe(served) | {"removed": name, "seconds": round(time.perf_counter() - t0, 3)}
    return JSONResponse(body)


@router.post("/rebuild")
async def rebuild(live: Live) -> JSONResponse:
    t0 = time.perf_counter()
    served = await asyncio.to_thread(live.rebuild)
    return JSONResponse(describe(served) | {"seconds": round(time.perf_counter() - t0, 3)})


# ------------------------------------------------------------------------- helpers


def _name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError("give the expert's name", param="name")
    try:
        return validate_adapter_name(value)
    except AdapterError as e:
        raise InvalidRequestError(e.message, param="name") from None


FORM_SLACK = 64 << 10
"""Bytes of multipart framing and the name field allowed above the files' own limit."""


async def _add_upload(request: Request, live: Live) -> tuple[str, ServedSet]:
    limit = live.settings.admin.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FORM_SLACK:
        # Refused before a byte of the body is parsed (spooled to disk) or stored.
        raise PayloadTooLargeError(
            f"the upload is {declared} bytes, over {limit} (MERGESERVE_ADMIN__MAX_UPLOAD_BYTES)",
            param="files",
        )
    # Room for a few stray files, so that one is refused by name below.
    async with request.form(max_files=len(UPLOAD_FILES) + 5, max_fields=4) as form:
        name = _name(form.get("name"))
        uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        with tempfile.TemporaryDirectory(prefix="mergeserve-upload-") as tmp:
            src = Path(tmp) / name
            src.mkdir()
            total = 0
            for up in uploads:
                fname = PurePath(up.filename or "").name
                if fname not in UPLOAD_FILES:
                    raise InvalidRequestError(
                        f"unexpected file {up.filename!r}; an upload carries "
                        f"{', '.join(UPLOAD_FILES)}",
                        param="files",
                    )
                if (src / fname).exists():
                    raise InvalidRequestError(f"{fname} sent twice", param="files")
                with (src / fname).open("wb") as out:
                    while chunk := await up.read(_CHUNK):
                        total += len(chunk)
                        if total > limit:
                            raise PayloadTooLargeError(
                                f"the upload is larger than {limit} bytes "
                                "(MERGESERVE_ADMIN__MAX_UPLOAD_BYTES)",
                                param="files",
                            )
                        out.write(chunk)
            missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (src / f).is_file()]
            if missing:
                raise InvalidRequestError(f"the upload has no {', '.join(missing)}", param="files")
            failpoint("hot_add.received")
            try:
                served = await asyncio.to_thread(live.add, name, src)
            except AdapterError as e:  # name the upload, not this server's temp dir
                e.message = e.message.replace(f"{src}/", "").replace(str(src), f"upload {name!r}")
                e.args = (e.message,)
                raise
    return name, served


async def _add_path(request: Request, live: Live) -> tuple[str, ServedSet]:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidRequestError("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequestError('expected {"name": ..., "path": ...}')
    name = _name(body.get("name"))
    raw = body.get("path")
    if not isinstance(raw, str) or not raw:
        raise InvalidRequestError("give the expert dir's path", param="path")
    served = await asyncio.to_thread(_add_allowed_path, live, name, raw)
    return name, served


def _add_allowed_path(live: LiveSet, name: str, raw: str) -> ServedSet:
    roots = [r.resolve() for r in live.settings.admin.allowed_roots]
    path = Path(raw).resolve()  # symlinks and .. resolved before the check
    if not any(path.is_relative_to(r) for r in roots):
        raise PermissionDeniedError(
            f"{raw} is not under an allowed root "
            f"({', '.join(map(str, roots)) or 'none set: MERGESERVE_ADMIN__ALLOWED_ROOTS'}); "
            "upload the files instead",
            param="path",
        )
    if not path.is_dir():
        raise InvalidRequestError(f"{raw} is not a directory", param="path")
    failpoint("hot_add.received")
    return live.add(name, path, follow_symlinks=False)  # a link could reach any file
