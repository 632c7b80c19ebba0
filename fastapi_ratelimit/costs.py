"""What a request costs: a table keyed by ``"<METHOD> <route template>"``, a default, and an
optional callable, validated once at construction."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from .errors import ConfigurationError
from .rate import MAX_COUNT

__all__ = ["CostTable", "endpoint_key"]

_ENDPOINT_RE = re.compile(r"(GET|POST|PUT|PATCH|DELETE|OPTIONS|WEBSOCKET|\*) (/\S*|<unmatched>)")
MAX_COST = 1_000_000


def endpoint_key(method: str, template: str) -> str:
    """``("HEAD", "/users/{id}")`` -> ``"GET /users/{id}"``: HEAD counts like GET."""
    if method == "HEAD":
        method = "GET"
    return f"{method} {template}"


def check_cost(field: str, cost: object) -> int:
    if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= MAX_COST:
        raise ConfigurationError(field, cost, f"must be a whole number from 1 to {MAX_COST}")
    return cost


#: The most a request may be charged at run time: above any limit a level can have (whose
#: limits are at most MAX_COUNT), so a request costing it is refused for good, never admitted.
MAX_RUN_TIME_COST = MAX_COUNT + 1


def run_time_cost(cost: object, multiplier: float = 1.0) -> int:
    """A cost worked out per request (``cost_function()``), times a tier's ``multiplier``: a
    whole number >= 1. A larger one than any limit is kept at :data:`MAX_RUN_TIME_COST`, so
    that it gets the 403 of a cost no wait would help, whatever its size."""
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        raise ConfigurationError("cost_function()", cost, "must return a whole number >= 1")
    if multiplier != 1.0:
        cost = max(1, math.ceil(min(cost, MAX_RUN_TIME_COST) * multiplier))
    return min(cost, MAX_RUN_TIME_COST)


def check_endpoint(field: str, endpoint: object) -> str:
    if not isinstance(endpoint, str) or not _ENDPOINT_RE.fullmatch(endpoint):
        raise ConfigurationError(
            field, endpoint, "must be '<METHOD> <route template>', such as 'POST /ocr/process'"
        )
    return endpoint


class CostTable:
    """Costs per endpoint. ``"* /path"`` matches every method of a route."""

    __slots__ = ("_costs", "_default")

    def __init__(self, costs: Mapping[str, int] | None = None, *, default: int = 1) -> None:
        if costs is not None and not isinstance(costs, Mapping):
            raise ConfigurationError("costs", costs, "must be a mapping of endpoint to cost")
        self._default = check_cost("costs default", default)
        self._costs: dict[str, int] = {
            check_endpoint("costs", endpoint): check_cost(f"costs[{endpoint!r}]", cost)
            for endpoint, cost in (costs or {}).items()
        }

    def entries(self) -> dict[str, int]:
        """Every endpoint's cost as given, plus ``"<default>"``: the cost of any other."""
        return {**self._costs, "<default>": self._default}

    def cost(self, endpoint: str, multiplier: float = 1.0) -> int:
        """The cost of ``endpoint`` (``"POST /ocr/process"``), times a tier multiplier."""
        base = self._costs.get(endpoint)
        if base is None:
            _, _, template = endpoint.partition(" ")
            base = self._costs.get(f"* {template}", self._default)
        if multiplier == 1.0:
            return base
        return max(1, math.ceil(base * multiplier))
