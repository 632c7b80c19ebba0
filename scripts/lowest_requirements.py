#!/usr/bin/env python3
"""Print the requirements for ``scripts/test.sh --lowest``.

The library's own dependency ranges (``[project] dependencies`` and the user-facing extras)
are what users install beside their own pins, so those are tested at their lowest: the
caller resolves this file with ``uv pip install --resolution lowest-direct``. The test
toolchain (the rest of the ``dev`` extra: pytest, hypothesis, schemathesis, uvicorn, ...)
reaches no user, so it stays at its locked version from ``uv.lock``.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USER_EXTRAS = ("fastapi", "redis", "prometheus", "dynamic")


def name_of(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    runtime = {name_of(r) for r in project["dependencies"]}
    runtime |= {name_of(r) for extra in USER_EXTRAS for r in extras[extra]}
    locked = {
        name_of(p["name"]): p["version"]
        for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]
        if "version" in p
    }
    lines = [f"-e .[{','.join(USER_EXTRAS)}]"]
    for requirement in extras["dev"]:
        name = name_of(requirement)
        if name not in runtime:
            extra = re.match(r"[A-Za-z0-9._-]+(\[[^\]]*\])?", requirement)
            spec = extra.group(0) if extra else name
            lines.append(f"{spec}=={locked[name]}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
