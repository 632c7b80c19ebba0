# Types of the C speedups (_speedups.c); see fastapi_ratelimit._accel.
from collections.abc import Callable, Generator, Sequence
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
    send: Callable[[Any], Any],
    app: Callable[[Any, Any, Any], Any],
    receive: Callable[[], Any],
    /,
) -> LaneRun | None: ...
def configure_context(context_type: type, descriptors: tuple[Any, ...], /) -> None: ...
def rate_limit_headers(
    decisions: Sequence[Any], style: Any, now: float, /
) -> list[tuple[bytes, bytes]] | None: ...
def configure_headers(
    policy_header: Callable[[Any], bytes],
    name_bytes: Callable[[str], bytes],
    policy_fields: Callable[[Any], Any],
    time: Callable[[], float],
    styles: tuple[Any, ...],
    names: tuple[frozenset[bytes], ...],
    python: Callable[[Any, Any, float], Any],
    names_by_style: dict[Any, frozenset[bytes]],
    /,
) -> None: ...
def configure_sender(send_denial: Callable[..., Any], nothing: Callable[[], Any], /) -> None: ...

class Sender:
    """``middleware._Responder.send`` in C, for lane requests (made by ``lane_admit``)."""

    status: int | None
    context: Any
    def __call__(self, message: Any, /) -> Any: ...

class Lane:
    """A request's lane (see ``middleware._Lane``): its decision inputs, converted once."""

    app: Any
    routes: list[Any]
    backend: Any
    ip: str
    endpoint: str
    route: Any
    cost: int
    checks: tuple[Any, ...]
    policy_header: bytes | None
    def __init__(
        self,
        app: Any,
        routes: list[Any],
        backend: Any,
        data: dict[str, list[Any]],
        now: Callable[[], int],
        divisor: int,
        store_new: Callable[..., Any],
        margin: int,
        ip: str,
        endpoint: str,
        route: Any,
        cost: int,
        checks: tuple[Any, ...],
        rows: tuple[tuple[Any, ...], ...],
        policy_header: bytes,
        /,
    ) -> None: ...
    def current(self, app: Any, /) -> bool: ...

class LaneRun:
    """A lane request's app call and after-response step, as one awaitable."""

    sender: Sender
    def __await__(self) -> Generator[Any]: ...
    def send(self, value: Any, /) -> Any: ...
    def throw(self, exception: BaseException, /) -> Any: ...
    def close(self) -> None: ...
