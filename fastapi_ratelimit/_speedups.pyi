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
def lane_admit(
    lanes: dict[tuple[Any, ...], Any],
    scope: Any,
    limiter: Any,
    api_key_header: bytes | None,
    api_key_query: bool,
    api_key_counted: bool,
    context_type: type,
    /,
) -> Any: ...
def rate_limit_headers(
    decisions: Sequence[Any],
    style: int,
    now: float,
    policy_header: Callable[[Any], bytes],
    name_bytes: Callable[[str], bytes],
    policy_fields: Callable[[Any], Any],
    /,
) -> list[tuple[bytes, bytes]] | None: ...
