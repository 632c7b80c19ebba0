"""Loads the Lua sources (package data) and assembles the one multi-level script."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from ..policy import Algorithm

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
    """The full script text.

    Each algorithm's file becomes the body of its loader (``LOADERS[code]``, see
    ``_prelude.lua``), which the script runs the first time a call needs that algorithm: a
    script's top level runs on every call, and making all five algorithms' functions each
    time cost the server about as much as the commands of a one-level request
    (``bench/results/redis-script-cost.md``).
    """
    chunks = []
    for stem in PARTS:
        body = lua_source(stem)
        if stem.startswith("_"):
            # The prelude's helpers and the entry point's locals must stay visible to what
            # follows.
            chunks.append(body)
        else:
            chunks.append(f"LOADERS['{Algorithm(stem).code}'] = function()\n{body}\nend")
    return "\n".join(chunks)
