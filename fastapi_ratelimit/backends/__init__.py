"""Storage backends. ``MemoryBackend`` is the embedded default; ``RedisBackend`` needs the
``redis`` extra and is imported lazily so that the package works without it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Backend, Check
from .memory import MemoryBackend

if TYPE_CHECKING:
    from .redis import RedisBackend

__all__ = ["Backend", "Check", "MemoryBackend", "RedisBackend"]


def __getattr__(name: str) -> Any:
    if name == "RedisBackend":
        from .redis import RedisBackend

        return RedisBackend
    raise AttributeError(name)
