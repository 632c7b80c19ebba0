"""Per-request state, kept in ``scope["fastapi_ratelimit"]`` (Starlette's advice for passing
data from middleware to endpoints), never on a shared object."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .backends.base import Check
from .decision import Decision

if TYPE_CHECKING:
    from .decision import Verdict
    from .tiers import Tier

__all__ = ["SCOPE_KEY", "RequestContext", "report_cost"]

SCOPE_KEY = "fastapi_ratelimit"
_NOTHING_HANDLED: frozenset[int] = frozenset()


@dataclass(slots=True, eq=False, init=False)
class RequestContext:
    """Who is calling, what it costs, and what was decided, for one request.

    ``api_key`` is the raw key: it only ever goes to the key builder, which hashes it.
    """

    #: The RateLimiter in charge. Typed loosely: the limiter sits above this module, which
    #: every step imports (see docs/architecture.md).
    limiter: Any
    ip: str
    api_key: str | None
    user: str | None
    tier: Tier | None
    endpoint: str
    route: Any
    cost: int
    #: A tier stored for the API key (it sets the API-key level's policy).
    key_tier: Tier | None = None
    # The five below start as shared empty tuples and are replaced, never edited in place:
    # a request then allocates no containers it does not use. That matters beyond their own
    # cost: every object alive while a request is in flight counts towards the garbage
    # collector's threshold, and at a few dozen concurrent requests a handful more each was
    # enough to trigger collections all the time (and full ones, the p99's pauses).
    #: Every level decided for this request, for the response headers.
    decisions: Sequence[Decision] = ()
    #: The shadow levels' decisions: announced in an admitted response's headers, never in
    #: a denial's (its Retry-After and ``t`` speak of enforced levels only).
    shadow: Sequence[Decision] = ()
    #: Checks charged with the request's cost (refunded or adjusted after the response).
    charged: Sequence[Check] = ()
    #: Route limits already charged (their ids), so a guard or decorator never counts twice.
    handled: frozenset[int] = frozenset()
    #: Route limits' checks refunded by status after the response, with their rule.
    refundable: tuple[tuple[Callable[[int], bool], Check], ...] = ()
    #: A cost the endpoint reported after running (see :func:`report_cost`).
    reported_cost: int | None = None
    #: Set by the middleware, so route guards know their headers will be added for them.
    middleware: bool = False
    #: A route guard's denial, so the middleware can answer it with problem+json.
    denial: Verdict | None = None
    #: Allow-listed: route guards do nothing.
    exempt: bool = False
    #: Load or an operator override shrank these levels' quotas for this request (``None``:
    #: nothing shrank, or the request was refused by what it used, not by the shrinking).
    reduced: set[str] | None = None

    # Written out rather than generated: one is built per request, and the generated
    # __init__ (keyword arguments) costs twice as much.
    def __init__(
        self,
        limiter: Any,
        ip: str,
        api_key: str | None,
        user: str | None,
        tier: Tier | None,
        endpoint: str,
        route: Any,
        cost: int,
        key_tier: Tier | None = None,
    ) -> None:
        self.limiter = limiter
        self.ip = ip
        self.api_key = api_key
        self.user = user
        self.tier = tier
        self.endpoint = endpoint
        self.route = route
        self.cost = cost
        self.key_tier = key_tier
        self.decisions = ()
        self.shadow = ()
        self.charged = ()
        self.handled = _NOTHING_HANDLED
        self.refundable = ()
        self.reported_cost = None
        self.middleware = False
        self.denial = None
        self.exempt = False
        self.reduced = None


def report_cost(request: Any, cost: int) -> None:
    """From an endpoint: the request really cost ``cost`` units. After the response, the
    difference to what was charged is refunded (or charged, where quota is left)."""
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
        raise ValueError(f"report_cost: cost must be a whole number >= 0, got {cost!r}")
    context = request.scope.get(SCOPE_KEY)
    if isinstance(context, RequestContext):
        context.reported_cost = cost
