"""The package's module map: per file, its lines and its longest function (by `ast`).

    python scripts/module_map.py          # the working tree
    python scripts/module_map.py REV      # a git revision (e.g. HEAD~3)

Tab-separated rows `path  lines  function (lines)`, then a TOTAL line.
"""

from __future__ import annotations

import ast
import subprocess
import sys


def files(rev: str | None) -> list[str]:
    cmd = (
        ["git", "ls-tree", "-r", "--name-only", rev, "mergeserve"]
        if rev
        else ["git", "ls-files", "-co", "--exclude-standard", "mergeserve"]
    )
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    return sorted(f for f in out if f.endswith(".py"))


def text(path: str, rev: str | None) -> str:
    if rev:
        cmd = ["git", "show", f"{rev}:{path}"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    with open(path) as f:
        return f.read()


def longest(source: str) -> tuple[int, str]:
    best = (0, "-")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            best = max(best, (n, node.name))
    return best


def main() -> None:
    rev = sys.argv[1] if len(sys.argv) > 1 else None
    total = 0
    paths = files(rev)
    for path in paths:
        source = text(path, rev)
        n, name = longest(source)
        lines = len(source.splitlines())
        total += lines
        print(f"{path}\t{lines}\t{name} ({n})")
    print(f"TOTAL\t{len(paths)} files\t{total} lines")


if __name__ == "__main__":
    main()
