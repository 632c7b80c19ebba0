"""Step 4 of a request: the limiter's own levels as checks (global, IP, endpoint, API key,
user and composite levels). The limits attached to the route join them in
:mod:`.route_limits`. Everything that does not change between requests to one endpoint is
worked out once, in an :class:`EndpointPlan`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .backends.base import Check, new_check
from .context import RequestContext
from .costs import CostTable, check_endpoint
from .errors import ConfigurationError
from .limit_overrides import target_key
from .policy import Algorithm, Policy
from .rate import Rate, parse_rate
from .route_limits import RouteLimit
from .tiers import Tier

__all__ = ["COMPOSITE_PARTS", "CompositeLimit", "EndpointPlan", "Levels", "RateLike"]

RateLike = str | Rate | Policy
COMPOSITE_PARTS = ("ip", "user", "api_key", "endpoint")
_MAX_PLANS = 4096


@dataclass(frozen=True, slots=True)
class CompositeLimit:
    """A level keyed on several parts at once, as in the seed's ``CompositeRateLimiter``:
    ``CompositeLimit(("user", "endpoint"), "20/minute")`` (per user per endpoint),
    ``("user", "ip")`` (one account from many addresses), ``("api_key", "endpoint")``.
    The level applies only when every part is known (no user: no user+ip level)."""

    parts: tuple[str, ...]
    rate: RateLike
    name: str | None = None
    algorithm: Algorithm | str | None = None


class EndpointPlan(NamedTuple):
    """What does not change between requests to one endpoint, worked out once."""

    #: The cost from the cost table, before tier multipliers and the cost function.
    cost: int
    #: The endpoint level's policy, if it has one.
    policy: Policy | None
    #: The global and endpoint checks at that cost (checks are immutable: shared safely).
    global_check: Check | None
    endpoint_check: Check | None
    #: Per-client limits of this endpoint (``endpoint_limits`` given as ``(rate, scope)``).
    client_limits: tuple[RouteLimit, ...] = ()


class Levels:
    """The configured levels, parsed once, and the checks they make for one request."""

    def __init__(
        self,
        *,
        algorithm: Algorithm,
        global_limit: RateLike | None,
        ip_limit: RateLike | None,
        api_key_limit: RateLike | None,
        user_limit: RateLike | None,
        endpoint_limits: Mapping[str, RateLike | tuple[RateLike, str]] | None,
        composite_limits: Sequence[CompositeLimit],
        tiers: Mapping[str, Tier] | None,
        costs: CostTable,
    ) -> None:
        self.global_ = _policy("global_limit", "global", global_limit, algorithm)
        self.ip = _policy("ip_limit", "ip", ip_limit, algorithm)
        self.api_key = _policy("api_key_limit", "api_key", api_key_limit, algorithm)
        if tiers is not None and user_limit is not None:
            raise ConfigurationError("user_limit", user_limit, "give either user_limit or tiers")
        self.user = _policy("user_limit", "user", user_limit, algorithm)
        self.tiers = tiers
        self.endpoints: dict[str, Policy] = {}
        self._client_endpoints: dict[str, RouteLimit] = {}
        if endpoint_limits is not None and not isinstance(endpoint_limits, Mapping):
            raise ConfigurationError(
                "endpoint_limits", endpoint_limits, "must map '<METHOD> <route>' to a rate"
            )
        for endpoint, rate in (endpoint_limits or {}).items():
            check_endpoint("endpoint_limits", endpoint)
            if isinstance(rate, tuple):
                self._client_endpoints[endpoint] = _client_endpoint_limit(endpoint, rate, algorithm)
                continue
            policy = _policy(f"endpoint_limits[{endpoint!r}]", "endpoint", rate, algorithm)
            assert policy is not None
            self.endpoints[endpoint] = policy
        if isinstance(composite_limits, CompositeLimit) or not isinstance(
            composite_limits, (list, tuple)
        ):
            raise ConfigurationError(
                "composite_limits", composite_limits, "must be a list of CompositeLimit objects"
            )
        self._composites = [_composite(composite, algorithm) for composite in composite_limits]
        seen: set[tuple[str, str, str]] = set()
        for _, scope, policy in self._composites:
            if (scope, policy.bucket, policy.code) in seen:
                # One stored state for both: every request would be refused as a duplicate.
                raise ConfigurationError(
                    "composite_limits",
                    policy.name,
                    f"is the name of two limits on {scope!r}: give each its own name=",
                )
            seen.add((scope, policy.bucket, policy.code))
        self.costs = costs
        self._check_costs()
        # endpoint -> its plan; bounded, since a client can send any method string.
        self.plans: dict[str, EndpointPlan] = {}

    @property
    def has_composites(self) -> bool:
        """Whether any :class:`CompositeLimit` is configured."""
        return bool(self._composites)

    def overridable(self) -> dict[str, Policy]:
        """The levels an operator may change at run time, by target key."""
        levels = {
            level: policy
            for level, policy in (
                ("global", self.global_),
                ("ip", self.ip),
                ("api_key", self.api_key),
                ("user", self.user),
            )
            if policy is not None
        }
        for endpoint, policy in self.endpoints.items():
            levels[target_key("endpoint", endpoint)] = policy
        return levels

    def plan(self, endpoint: str) -> EndpointPlan:
        """The plan of ``endpoint``, built on first use."""
        plan = self.plans.get(endpoint)
        if plan is not None:
            return plan
        cost = self.costs.cost(endpoint)
        policy = self.endpoints.get(endpoint)
        every_method = "* " + endpoint.partition(" ")[2]
        if policy is None:
            # "* /path": the limit of every method of the route, each method counted apart.
            policy = self.endpoints.get(every_method)
        clients = self._client_endpoints
        client_limit = clients.get(endpoint) or clients.get(every_method) if clients else None
        plan = EndpointPlan(
            cost,
            policy,
            Check(self.global_, "global", "", cost) if self.global_ is not None else None,
            Check(policy, "endpoint", endpoint, cost) if policy is not None else None,
            (client_limit,) if client_limit is not None else (),
        )
        if len(self.plans) >= _MAX_PLANS:
            self.plans.clear()
        self.plans[endpoint] = plan
        return plan

    def checks(self, context: RequestContext) -> list[Check]:
        """The checks for the limiter's own levels (not the route limits)."""
        cost = context.cost
        plan = self.plans.get(context.endpoint) or self.plan(context.endpoint)
        # At the table's cost (the usual case) the global and endpoint checks are prebuilt.
        base = cost == plan.cost
        checks: list[Check] = []
        if base and plan.global_check is not None:
            checks.append(plan.global_check)
        elif self.global_ is not None:
            checks.append(new_check((self.global_, "global", "", cost)))
        if self.ip is not None:
            checks.append(new_check((self.ip, "ip", context.ip, cost)))
        if base and plan.endpoint_check is not None:
            checks.append(plan.endpoint_check)
        elif plan.policy is not None:
            checks.append(new_check((plan.policy, "endpoint", context.endpoint, cost)))
        for limit in plan.client_limits:
            client_check = limit.check(context)
            if client_check is not None:
                checks.append(client_check)
        if context.api_key is not None:
            key_policy = context.key_tier.key_policy if context.key_tier else self.api_key
            if key_policy is not None:
                checks.append(new_check((key_policy, "api_key", context.api_key, cost)))
        if context.user is not None:
            user_policy = context.tier.policy if context.tier is not None else self.user
            if user_policy is not None:
                checks.append(new_check((user_policy, "user", context.user, cost)))
        for parts, scope, policy in self._composites:
            identity = _composite_identity(parts, context)
            if identity is not None:
                checks.append(new_check((policy, scope, identity, cost)))
        return checks

    def _check_costs(self) -> None:
        """Refuse a cost that a level could never admit (times every tier's multiplier): each
        such request would be refused for ever, with nothing to tell the client why."""
        shared = [p for p in (self.global_, self.ip, self.api_key, self.user) if p]
        shared += [policy for _, _, policy in self._composites]
        # (cost table entry, its cost, the levels it meets)
        rows = [
            (endpoint, cost, [*shared, *self._endpoint_policies(endpoint)])
            for endpoint, cost in self.costs.entries().items()
        ]
        # An endpoint limit without a cost entry of its own meets the default cost.
        rows += [(key, self.costs.cost(key), [p]) for key, p in self._endpoint_rules()]
        tiers: list[Tier | None] = [None]
        tiers += list(self.tiers.values()) if self.tiers is not None else []
        for endpoint, base, policies in rows:
            for tier in tiers:
                cost, levels = base, policies
                if tier is not None:
                    cost = self.costs.cost(endpoint, tier.cost_multiplier)
                    levels = [*policies, tier.policy, tier.key_policy]
                for policy in levels:
                    if cost > policy.limit:
                        where = f" in tier {tier.name!r}" if tier is not None else ""
                        raise ConfigurationError(
                            f"costs[{endpoint!r}]",
                            base,
                            f"a request costs {cost} units{where}, more than policy "
                            f"{policy.name!r} admits at once ({policy.limit}): it could never "
                            "pass",
                        )

    def _endpoint_rules(self) -> list[tuple[str, Policy]]:
        """Every endpoint limit, shared or per client, with its endpoint."""
        return [
            *self.endpoints.items(),
            *((key, limit.policy) for key, limit in self._client_endpoints.items()),
        ]

    def _endpoint_policies(self, endpoint: str) -> list[Policy]:
        """The endpoint limits a cost table entry meets (``"* /path"`` on either side)."""
        method, _, path = endpoint.partition(" ")
        return [
            policy
            for key, policy in self._endpoint_rules()
            if (key.partition(" ")[2] == path and "*" in (method, key.partition(" ")[0]))
            or key == endpoint
        ]


def _policy(field: str, name: str, rate: RateLike | None, algorithm: Algorithm) -> Policy | None:
    if rate is None:
        return None
    if isinstance(rate, Policy):
        return rate
    if isinstance(rate, str):
        rate = parse_rate(rate, field_name=field)
    if isinstance(rate, Rate):
        try:
            return Policy(name, rate, algorithm)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{field}: {exc.field}", exc.value, exc.reason) from None
    raise ConfigurationError(field, rate, "must be a rate string, a Rate or a Policy")


def _client_endpoint_limit(
    endpoint: str, value: tuple[Any, ...], algorithm: Algorithm
) -> RouteLimit:
    # {"POST /ocr/process": ("50/minute", "user")}: the route-limit machinery, declared here.
    field = f"endpoint_limits[{endpoint!r}]"
    if len(value) != 2 or not isinstance(value[1], str):
        raise ConfigurationError(field, value, "must be a rate or a (rate, scope) pair")
    rate, scope = value
    return RouteLimit.build(
        rate,
        scope=scope,
        cost=None,
        key=None,
        name=None,
        algorithm=algorithm,
        limiter=None,
        refund_when=None,
        where=field,
    )


def _composite(
    composite: CompositeLimit, default: Algorithm
) -> tuple[tuple[str, ...], str, Policy]:
    if not isinstance(composite, CompositeLimit):
        raise ConfigurationError("composite_limits", composite, "must hold CompositeLimit objects")
    parts = tuple(composite.parts)
    if len(parts) < 2 or not set(parts) <= set(COMPOSITE_PARTS) or len(set(parts)) != len(parts):
        raise ConfigurationError(
            "composite_limits.parts", parts, f"must be two or more of {', '.join(COMPOSITE_PARTS)}"
        )
    scope = "+".join(parts)
    name = composite.name or "-".join(parts)
    field = f"composite_limits[{scope!r}]"
    try:
        algorithm = Algorithm(composite.algorithm) if composite.algorithm is not None else default
    except ValueError:
        raise ConfigurationError(
            f"{field}.algorithm",
            composite.algorithm,
            f"must be one of {', '.join(a.value for a in Algorithm)}",
        ) from None
    policy = _policy(field, name, composite.rate, algorithm)
    assert policy is not None
    return parts, scope, policy


def _composite_identity(parts: tuple[str, ...], context: RequestContext) -> tuple[str, ...] | None:
    values: list[str] = []
    for part in parts:
        value = {
            "ip": context.ip,
            "user": context.user,
            "api_key": context.api_key,
            "endpoint": context.endpoint,
        }[part]
        if value is None:
            return None
        values.append(value)
    return tuple(values)
