"""The ``Depends`` guard: ``dependencies=[Depends(RateLimit("10/second", scope="ip"))]`` on a
route, an ``APIRouter`` or the whole ``FastAPI`` app.

The guard is a dependency with ``yield``, so that an error escaping the endpoint (or a later
dependency) passes back through it: without the middleware, it gives back what it charged
when another route limit refuses the request or it ends in a server error, as ``@rate_limit``
does (:func:`~fastapi_ratelimit.guards.after_endpoint`; under the middleware, the middleware
does it for every level). A guard cannot see a status the endpoint returns rather than raises.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection
from starlette.responses import Response

from .guards import after_endpoint, enforce
from .policy import Algorithm, Policy
from .rate import Rate
from .route_limits import KeyFunc, RouteLimit

if TYPE_CHECKING:
    from .limiter import RateLimiter

__all__ = ["RateLimit"]


class RateLimit:
    """A FastAPI dependency that enforces one limit.

    Args:
        rate: ``"10/minute"``, a :class:`Rate` or a :class:`Policy`.
        scope: whose quota: ``"ip"``, ``"user"``, ``"api_key"``, ``"global"``, or a combination
            (``"user+ip"``). Quotas are per route: the route template is part of the key.
        cost: units per request (default: the request's cost from the limiter's table).
        key: ``(connection) -> str | None`` for a custom identity (``scope`` is then a label).
        name: policy name shown in headers (default derived from scope and rate).
        algorithm: default: the limiter's ``algorithm``.
        limiter: the :class:`RateLimiter` to use (default: the middleware's).
        refund_when: ``(status) -> bool``; matching responses give the units back. Only
            under :class:`~fastapi_ratelimit.RateLimitMiddleware`, which sees the status a
            response goes out with; without it, a warning says so (server errors are given
            back either way).
        user: a FastAPI dependency returning the current user (for example the app's
            ``get_current_user``); its result is the identity of the ``user`` part. Such a
            guard runs after that dependency, in its own backend call.
    """

    def __init__(
        self,
        rate: str | Rate | Policy,
        *,
        scope: str = "ip",
        cost: int | None = None,
        key: KeyFunc | None = None,
        name: str | None = None,
        algorithm: Algorithm | str | None = None,
        limiter: RateLimiter | None = None,
        refund_when: Callable[[int], bool] | None = None,
        user: Callable[..., Any] | None = None,
    ) -> None:
        self.limit = RouteLimit.build(
            rate,
            scope=scope,
            cost=cost,
            key=key,
            name=name,
            algorithm=algorithm,
            limiter=limiter,
            refund_when=refund_when,
            where="RateLimit",
        )
        self.user_dependency = user
        parameters = [
            inspect.Parameter(
                "connection", inspect.Parameter.KEYWORD_ONLY, annotation=HTTPConnection
            ),
            inspect.Parameter("response", inspect.Parameter.KEYWORD_ONLY, annotation=Response),
        ]
        if user is not None:
            from fastapi import Depends

            parameters.append(
                inspect.Parameter(
                    "user", inspect.Parameter.KEYWORD_ONLY, default=Depends(user), annotation=Any
                )
            )
        # FastAPI reads the signature to know what to inject.
        self.__signature__ = inspect.Signature(parameters)

    async def __call__(
        self, *, connection: HTTPConnection, response: Response, user: Any = None
    ) -> AsyncIterator[None]:
        user = user if self.user_dependency is not None else None
        charged = await enforce(self.limit, connection, user=user, response=response)
        try:
            yield
        except Exception as exc:
            await after_endpoint(self.limit, connection, charged, error=exc)
            raise

    def __repr__(self) -> str:
        return f"RateLimit({self.limit.policy.rate}, scope={self.limit.scope!r})"
