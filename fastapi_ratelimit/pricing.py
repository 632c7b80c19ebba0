"""Step 2 of a request: which endpoint it reaches (the route template plus method, see
:mod:`.routing`) and what it costs: the cost table, times the tier's multiplier, unless the
app's ``cost_function`` says otherwise."""

from __future__ import annotations

from collections.abc import Callable

from loguru import logger
from starlette.requests import HTTPConnection

from ._types import Scope
from .context import RequestContext
from .costs import CostTable, endpoint_key, run_time_cost
from .errors import ConfigurationError
from .levels import Levels
from .routing import UNMATCHED, RouteResolver, request_method

__all__ = ["Pricing"]

CostFunction = Callable[[HTTPConnection], int]


class Pricing:
    """Sets ``endpoint``, ``route`` and ``cost`` on a request's context."""

    def __init__(self, costs: CostTable, cost_function: CostFunction | None, levels: Levels):
        if cost_function is not None and not callable(cost_function):
            raise ConfigurationError("cost_function", cost_function, "must be a callable")
        self.costs = costs
        self._cost_function = cost_function
        self._levels = levels
        #: The route each request will reach, cached per app (see routing.py).
        self.routes = RouteResolver()
        self._warned_cost_function = False

    @property
    def has_cost_function(self) -> bool:
        """Whether the app's ``cost_function`` prices requests."""
        return self._cost_function is not None

    def price(self, context: RequestContext, scope: Scope) -> None:
        """Find the endpoint and work out the request's cost."""
        routes = getattr(scope.get("app"), "routes", None)
        if isinstance(routes, list):
            resolved = self.routes.resolve(routes, scope)
            endpoint, context.route = resolved.endpoint, resolved.route
        else:
            endpoint = endpoint_key(request_method(scope), UNMATCHED)
        context.endpoint = endpoint
        levels = self._levels
        cost = (levels.plans.get(endpoint) or levels.plan(endpoint)).cost
        tier = context.tier or context.key_tier
        multiplier = tier.cost_multiplier if tier is not None else 1.0
        if multiplier != 1.0:
            cost = self.costs.cost(endpoint, multiplier)
        if self._cost_function is not None:
            cost = self._custom_cost(HTTPConnection(scope), cost, multiplier)
        context.cost = cost

    def _custom_cost(self, connection: HTTPConnection, fallback: int, multiplier: float) -> int:
        assert self._cost_function is not None
        try:
            return run_time_cost(self._cost_function(connection), multiplier)
        except Exception as exc:
            if not self._warned_cost_function:
                self._warned_cost_function = True
                logger.warning("cost_function failed, using the cost table: {!r}", exc)
            return fallback
