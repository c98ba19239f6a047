"""The client of a running server's /admin API: `add-expert`, `remove-expert`,
`list-experts` and `rebuild`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from mergeserve.cli.common import Commands
from mergeserve.errors import MergeserveError


def register(commands: Commands) -> None:
    commands.add("add-expert", "hot-add an expert to a running server", _add_args, _add_expert)
    commands.add("remove-expert", "stop serving a hot-added expert", _remove_args, _remove_expert)
    commands.add("list-experts", "the experts a running server serves", _admin_args, _list_experts)
    commands.add(
        "rebuild", "recompute S, exclusives and static merges on a server", _admin_args, _rebuild
    )


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the expert's name (served as expert:NAME)")
    p.add_argument("dir", type=Path, help="PEFT LoRA dir with examples.jsonl")
    p.add_argument(
        "--by-path",
        action="store_true",
        help="send the dir's path (under the server's allowed roots) instead of its files",
    )
    _admin_args(p)


def _remove_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    _admin_args(p)


def _admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's URL")
    p.add_argument("--token", help="admin token (default: $MERGESERVE_ADMIN__TOKEN)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")


def _admin_request(args: argparse.Namespace, method: str, path: str, **kw: Any) -> Any:
    """Call the server's /admin API; its error message becomes ours."""
    import httpx

    token = args.token or os.environ.get("MERGESERVE_ADMIN__TOKEN")
    if not token:
        raise MergeserveError("give --token or set MERGESERVE_ADMIN__TOKEN")
    url = args.url.rstrip("/") + path
    try:
        r = httpx.request(
            method, url, headers={"Authorization": f"Bearer {token}"}, timeout=args.timeout, **kw
        )
    except httpx.HTTPError as e:
        raise MergeserveError(f"{url}: {e}") from None
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text[:500]}}
    if r.status_code >= 400:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        msg = err.get("message") if isinstance(err, dict) else None
        if r.status_code == 404 and path.startswith("/admin/experts") and method != "DELETE":
            msg = msg or "the admin API is off: start the server with MERGESERVE_ADMIN__TOKEN"
        raise MergeserveError(f"HTTP {r.status_code}: {msg or body}")
    return body


def _print_experts(body: dict[str, Any]) -> None:
    for e in body["experts"]:
        mark = "" if e["in_shared"] else "  (not in S/static yet: rebuild)"
        print(f"{e['name']:<24} {e['source']:<8} r={e['rank']:<3} {e['digest'][:12]}{mark}")
    print(f"generation {body['generation']}")


def _add_expert(args: argparse.Namespace) -> None:
    from mergeserve.server.admin import UPLOAD_FILES

    src: Path = args.dir
    if args.by_path:
        body = _admin_request(
            args, "POST", "/admin/experts", json={"name": args.name, "path": str(src.resolve())}
        )
    else:
        if not src.is_dir():
            raise MergeserveError(f"{src} is not a directory")
        present = [src / f for f in UPLOAD_FILES if (src / f).is_file()]
        handles = [p.open("rb") for p in present]
        try:
            files = [("files", (p.name, h)) for p, h in zip(present, handles, strict=True)]
            body = _admin_request(
                args, "POST", "/admin/experts", data={"name": args.name}, files=files
            )
        finally:
            for h in handles:
                h.close()
    _print_experts(body)
    print(f"added {body['added']} in {body['seconds']} s")


def _remove_expert(args: argparse.Namespace) -> None:
    body = _admin_request(args, "DELETE", f"/admin/experts/{args.name}")
    _print_experts(body)
    print(f"removed {body['removed']} in {body['seconds']} s")


def _list_experts(args: argparse.Namespace) -> None:
    _print_experts(_admin_request(args, "GET", "/admin/experts"))


def _rebuild(args: argparse.Namespace) -> None:
    body = _admin_request(args, "POST", "/admin/rebuild")
    _print_experts(body)
    print(f"rebuilt in {body['seconds']} s")
