"""Loads the Lua sources (package data) and assembles the one multi-level script."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

#: Concatenation order: helpers, one file per algorithm (same stems as ``algorithms/``), entry.
PARTS = (
    "_prelude",
    "fixed_window",
    "sliding_window_log",
    "sliding_window_counter",
    "token_bucket",
    "gcra",
    "_main",
)


def lua_source(stem: str) -> str:
    return files("fastapi_ratelimit.backends").joinpath("lua", f"{stem}.lua").read_text("utf-8")


@cache
def multi_level_script() -> str:
    """The full script text; every part is wrapped in ``do ... end`` so its locals stay local."""
    chunks = []
    for stem in PARTS:
        body = lua_source(stem)
        # The prelude's helpers and the entry point's locals must stay visible to what follows.
        chunks.append(body if stem.startswith("_") else f"do\n{body}\nend")
    return "\n".join(chunks)
