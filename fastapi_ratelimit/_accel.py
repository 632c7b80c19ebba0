"""Which implementation of the hot path runs: the C speedups (``_speedups.c``, built at
install time when a compiler is present) or their pure-Python twins.

Set ``FASTAPI_RATELIMIT_PURE=1`` to run pure Python even where the extension is built (to
rule it out when debugging, or to compare the two). The answers are the same either way: the
tests hold every C function to its Python twin.
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["ACCELERATED", "speedups"]


def _load() -> ModuleType | None:
    if os.environ.get("FASTAPI_RATELIMIT_PURE", "").strip().lower() in ("1", "true", "yes"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    return _speedups


#: The C module, or ``None`` when the pure-Python twins run.
speedups: ModuleType | None = _load()
#: Whether the C speedups are in use.
ACCELERATED = speedups is not None
