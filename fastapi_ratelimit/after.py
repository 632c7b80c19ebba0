"""Step 7 of a request, after its response: the endpoint breaker's count, units given back
(a server error is never charged; ``refund_when`` by status) and the adjustment for a cost
the endpoint reported (:func:`~fastapi_ratelimit.report_cost`).

Every write here goes through the circuit breaker (``PollPolicy.write``): while the backend is
down, nothing waits on it after a response; on a Redis Cluster, through the breaker of each
master, so one master that is down neither delays the others' refunds nor stops them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .backends.base import Backend, Check
from .context import RequestContext
from .logs import log_limited

if TYPE_CHECKING:
    from .limiter import RateLimiter

__all__ = ["after_response", "needs_after_response", "refund_server_error"]


def needs_after_response(limiter: RateLimiter, context: RequestContext) -> bool:
    """Whether :func:`after_response` has anything to do for this request."""
    return bool(
        limiter.after_every_response or context.refundable or context.reported_cost is not None
    )


async def after_response(limiter: RateLimiter, context: RequestContext, status: int | None) -> None:
    """Refunds by status (every level, for a server error), the adjustment for a cost the
    endpoint reported, and the endpoint breaker's count."""
    if status is None:
        return
    if limiter.endpoint_breaker is not None:
        await limiter.endpoint_breaker.record(context.endpoint, status)
    backend: Backend = limiter.backend
    if status >= 500:
        # A server error is never charged: every level gives its units back.
        await refund_server_error(limiter, context.charged)
        return
    try:
        refunds: list[Check] = []
        # Route limits with a cost of their own are refunded by their own rule.
        charged = [c for c in context.charged if c.cost == context.cost]
        refund_when = limiter.refund_when
        if refund_when is not None and charged and refund_when(status):
            refunds.extend(charged)
            charged = []
        for limit_refund_when, check in context.refundable:
            if limit_refund_when(status):
                refunds.append(check)
        reported = context.reported_cost
        if reported is not None and charged and reported != context.cost:
            delta = reported - context.cost
            if delta < 0:
                refunds.extend(c._replace(cost=-delta) for c in charged)
            else:
                # Charged afterwards where quota is left; denied means nothing is taken.
                # Never more than a level admits at once: a cost beyond it could never be
                # charged, and the request would have cost nothing extra at all.
                extra = [
                    c._replace(cost=min(delta, c.policy.limit - c.cost))
                    for c in charged
                    if c.policy.limit > c.cost
                ]
                if extra:
                    await limiter.polling.write("charging a cost", extra, backend.hit)
        if refunds:
            await limiter.polling.write("a refund", refunds, backend.refund)
    except Exception as exc:  # a refund_when that raises: the response is already sent
        log_limited(
            "WARNING",
            "adjustment",
            "rate-limit adjustment after the response failed: {!r}",
            exc,
        )


async def refund_server_error(limiter: RateLimiter, checks: Sequence[Check]) -> None:
    """Give back what a request that ended in a server error was charged: a client never
    pays for the server's failure. Best effort, through the breaker: a failing backend is
    logged (at most once per 10 s), never raised."""
    if checks:
        await limiter.polling.write("a refund after a server error", checks, limiter.backend.refund)
