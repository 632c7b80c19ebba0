# Types of the C speedups (_speedups.c); see fastapi_ratelimit._accel.
from collections.abc import Callable, Sequence
from typing import Any

def configure(sliding_window_counter: Any, decision: type, verdict: type, /) -> None: ...
def admit_sc(
    checks: Sequence[Any],
    now: int,
    data: dict[str, list[Any]],
    cached: dict[Any, str],
    key_fn: Callable[..., str],
    margin: int,
    fresh: list[tuple[str, list[Any]]],
    /,
) -> Any: ...
def rate_limit_headers(
    decisions: Sequence[Any], style: Any, now: float, /
) -> list[tuple[bytes, bytes]] | None: ...
def configure_headers(
    policy_header: Callable[[Any], bytes],
    name_bytes: Callable[[str], bytes],
    policy_fields: Callable[[Any], Any],
    styles: tuple[Any, ...],
    /,
) -> None: ...
