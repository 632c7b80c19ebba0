"""The :class:`RateLimiter`: one object shared by the middleware, ``@rate_limit`` and the
``Depends`` guard. It turns a request into checks (global, IP, endpoint, API key, user and
composite levels), asks the backend once, and applies tiers, shadow mode and the backend
failure policy."""

from __future__ import annotations

import asyncio
import inspect
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple, cast

from loguru import logger
from starlette.requests import HTTPConnection
from starlette.responses import Response

from ._types import Scope
from .access import AccessLists, Kind, ListEntry
from .backends.base import Backend, Check, new_check
from .backends.memory import MemoryBackend
from .breaker import CircuitBreaker, EndpointBreaker
from .context import RequestContext
from .control import ControlStore, PollPolicy
from .costs import CostTable, check_cost, check_endpoint, endpoint_key
from .decision import Decision, Verdict, never
from .denials import DenialLog
from .dynamic import DynamicLimits
from .errors import BackendError, ConfigurationError
from .headers import HeaderStyle, parse_header_style, rate_limit_headers, retry_after_value
from .identity import ClientIP, api_key_from_scope, ip_identity, parse_ip
from .keys import KeyBuilder
from .limit_overrides import LimitOverrides, target_key
from .logs import log_limited
from .masking import mask_identity
from .node_breakers import NodeBreakers
from .policy import Algorithm, Policy
from .rate import Rate, parse_rate
from .recorder import Recorder, error_kind
from .responses import (
    backend_unavailable_response,
    cost_exceeds_limit_response,
    quota_exceeded_response,
    reduced_capacity_response,
)
from .route_limits import RouteLimit, refund_server_error
from .routing import UNMATCHED, request_method, resolve_route
from .tiers import Tier, TierStore, build_tiers

__all__ = ["CompositeLimit", "RateLimiter"]

RateLike = str | Rate | Policy
Resolver = Callable[[HTTPConnection], Any]
ResponseBuilder = Callable[[Sequence[Decision], Sequence[tuple[bytes, bytes]]], Response]
OnBackendError = Literal["allow", "deny"]
COMPOSITE_PARTS = ("ip", "user", "api_key", "endpoint")


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


class _EndpointPlan(NamedTuple):
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


_MAX_PLANS = 4096


_OBJECT_STR: Any = object.__str__
#: Longest user identity keyed on; a longer one is treated as anonymous (keyed by IP).
_MAX_USER_IDENTITY = 1024
#: (what, type name) pairs already logged: each odd user shape is logged once per process.
_warned_users: set[tuple[str, str]] = set()


def _warn_user_once(what: str, kind: type, exc: BaseException | None = None) -> None:
    # No user data in the message: only where it happened and the types involved.
    key = (what, kind.__qualname__)
    if key in _warned_users or len(_warned_users) >= 256:
        return
    _warned_users.add(key)
    if exc is None:
        logger.warning("rate limit: unusable user identity from {} ({})", what, key[1])
    else:
        logger.warning(
            "rate limit: {} failed on a {} ({}): the user is treated as anonymous or the "
            "next attribute is tried",
            what,
            key[1],
            type(exc).__name__,
        )


def _default_user(scope: Scope) -> str | None:
    # request.state.user (set by an auth middleware), then Starlette's AuthenticationMiddleware.
    # No user object, however odd, may fail the request: anything unusable is anonymous.
    state = scope.get("state")
    user = state.get("user") if isinstance(state, dict) else None
    if user is None:
        user = scope.get("user")
        if user is None:
            return None
        try:
            authenticated = bool(getattr(user, "is_authenticated", True))
        except Exception as exc:
            _warn_user_once("user.is_authenticated", type(user), exc)
            return None
        if not authenticated:
            return None
    return user_identity(user)


def _identity_string(value: Any, attribute: str, kind: type) -> str | None:
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool) or (
        not isinstance(value, int) and getattr(type(value), "__str__", None) is _OBJECT_STR
    ):
        # Integers, and ids whose type defines its own string form (UUIDs, ObjectIds, ...),
        # are identities; anything else would be a repr (with an address in it, a new "user"
        # per object) or a container's.
        _warn_user_once(f"user.{attribute}", kind)
        return None
    else:
        try:
            text = str(value)
        except Exception as exc:  # a __str__ that raises, an int too long to convert
            _warn_user_once(f"user.{attribute}", kind, exc)
            return None
        if not isinstance(text, str):
            return None
    if not text or len(text) > _MAX_USER_IDENTITY:
        _warn_user_once(f"user.{attribute}", kind)
        return None
    return text


def user_identity(user: Any) -> str | None:
    """A user object, id or name -> the string the user level is keyed on.

    Never raises: an attribute that raises or holds something that is not a string, integer
    or UUID is logged once (per type, without the value) and the next attribute is tried;
    with none usable the user is anonymous (``None``)."""
    if user is None or isinstance(user, bool):
        return None
    if isinstance(user, (str, int, uuid.UUID)):
        return _identity_string(user, "self", type(user))
    kind = type(user)
    for attribute in ("id", "user_id", "identity", "username", "email", "sub"):
        try:
            if isinstance(user, Mapping):
                value = user.get(attribute)
            else:
                value = getattr(user, attribute, None)
        except Exception as exc:
            _warn_user_once(f"user.{attribute}", kind, exc)
            continue
        if value is None or callable(value):
            continue
        text = _identity_string(value, attribute, kind)
        if text is not None:
            return text
    return None


class RateLimiter:
    """Everything about *what* is limited, shared by all three entry points.

    Metrics are off unless :class:`~fastapi_ratelimit.metrics.RateLimitMetrics` (or the
    dashboard) sets :attr:`recorder`.

    Args:
        backend: where state lives (default: a new :class:`MemoryBackend`).
        global_limit: one quota for all requests (``"10000/minute"``).
        ip_limit: per client IP (IPv6 grouped by ``ipv6_prefix``).
        api_key_limit: per API key (header ``api_key_header``; query ``api_key_query`` opt-in).
        user_limit: per user, when there are no ``tiers``.
        endpoint_limits: per endpoint, shared by all clients:
            ``{"POST /ocr/process": "50/minute"}`` (route template + method); ``"* /path"``
            gives every method of the route that limit, each method counted apart. A
            ``(rate, scope)`` pair limits each client apart instead:
            ``{"POST /ocr/process": ("50/minute", "user")}`` (scopes as for ``@rate_limit``).
        composite_limits: levels keyed on several parts (:class:`CompositeLimit`).
        algorithm: the one default algorithm: for every limit given as a string or Rate
            (levels, tiers, ``endpoint_limits``, composites) and for ``@rate_limit`` and
            ``RateLimit`` without ``algorithm=``.
        tiers, default_tier, tier_resolver: per-user tiers; ``tier_resolver(request)`` (sync or
            async) names the tier; unknown or missing names fall back to ``default_tier``.
        costs: ``{"POST /ocr/process": 10}`` or a :class:`CostTable`; ``cost_function(request)``
            overrides it. Tier cost multipliers apply.
        trusted_proxies, ipv6_prefix, forwarded_headers, trust_unix_socket: see
            :class:`~fastapi_ratelimit.identity.ClientIP`. Forwarding headers count only from
            trusted proxies; list the ones your proxy sets (``"forwarded"``, ``"x-real-ip"``).
        user_resolver: ``(request) -> str | None`` (sync or async); default:
            ``request.state.user``, then ``scope["user"]`` if authenticated.
        headers: ``"ietf"`` (the default: ``RateLimit`` and ``RateLimit-Policy``), ``"both"``
            (plus the seed's ``X-RateLimit-*``), ``"x-ratelimit"``, ``"legacy"``, ``"none"``.
            Every extra header costs the server about 3 us per response to write.
        shadow: ``True`` or a set of scopes: decided, counted and logged, never enforced.
        shadow_headers: announce the shadow levels in the rate-limit headers of admitted
            responses (the default), so clients see a limit before it is enforced; ``False``
            hides them.
        on_backend_error: when the backend fails (error, timeout, or its circuit breaker is
            open): ``"allow"`` (fail open) or ``"deny"`` (503), or a mapping per scope with an
            optional ``"default"`` (``{"ip": "deny", "default": "allow"}``). A request is
            refused if any of its levels says deny.
        fallback: under ``"allow"``, check the same policies against a per-process memory
            backend while the shared one is down.
        breaker: the :class:`CircuitBreaker` around the backend (default settings unless
            given; ``None`` disables it).
        endpoint_breaker: an :class:`EndpointBreaker` protecting failing endpoints (503).
        dynamic: :class:`DynamicLimits` scaling quotas by load, behaviour and overrides.
        delay: ``{scope: max_delay}``: throttle instead of reject (like NGINX ``limit_req``
            with burst): a request that would pass within ``max_delay`` seconds waits.
        max_waiting: most requests waiting at once; beyond it they are refused at once.
        refund_when: ``(status) -> bool``; matching responses give their units back (e.g.
            ``lambda s: s < 400`` counts only failed logins).
        response_builder: ``(decisions, headers) -> Response`` for denials.
        access_lists: apply the allow/block lists (``limiter.allow(...)``, the admin API,
            the CLI). Off by default: then no instance mirrors or polls them. Entries may be
            added from anywhere, so turn it on in every instance that must apply them.
        allow, block: static list entries, checked at construction and applied in this
            process beside any stored ones (no ``access_lists=True`` needed):
            ``allow=["ip:10.0.0.0/8", "user:admin"]``, ``block=["api_key:leaked-key"]``.
        user_tiers: static user-to-tier assignments, ``{"alice": "pro"}``; a ``tier_resolver``
            or a tier stored at run time (``set_tier``) wins over them.
        refresh_interval: how often each instance refreshes its copy of the operator state
            its configuration uses: lists, stored tiers, overrides, shared breakers (seconds,
            at most 1). Nothing that is not configured is mirrored or polled.
        allow_any_network: let the lists hold ``0.0.0.0/0`` and ``::/0``.
        limit_overrides: apply the limits changed at run time (:meth:`set_limit`, the admin
            API, the CLI) to the levels this limiter has. Off by default: then no instance
            mirrors or polls them. Turn it on in every instance that must apply them.
    """

    #: Counts every verdict in process when set (see recorder.py); ``None``: metrics off.
    recorder: Recorder | None = None

    def __init__(
        self,
        *,
        backend: Backend | None = None,
        global_limit: RateLike | None = None,
        ip_limit: RateLike | None = None,
        api_key_limit: RateLike | None = None,
        user_limit: RateLike | None = None,
        endpoint_limits: Mapping[str, RateLike | tuple[RateLike, str]] | None = None,
        composite_limits: Sequence[CompositeLimit] = (),
        algorithm: Algorithm | str = Algorithm.SLIDING_WINDOW_COUNTER,
        tiers: Mapping[str, Tier | str] | None = None,
        default_tier: str = "free",
        tier_resolver: Resolver | None = None,
        costs: Mapping[str, int] | CostTable | None = None,
        cost_function: Callable[[HTTPConnection], int] | None = None,
        trusted_proxies: Iterable[str] = (),
        ipv6_prefix: int = 64,
        forwarded_headers: Sequence[str] = ("x-forwarded-for",),
        trust_unix_socket: bool = False,
        api_key_header: str | None = "X-API-Key",
        api_key_query: str | None = None,
        user_resolver: Resolver | None = None,
        headers: HeaderStyle | str = HeaderStyle.IETF,
        shadow: bool | Iterable[str] = False,
        shadow_headers: bool = True,
        on_backend_error: OnBackendError | Mapping[str, OnBackendError] = "allow",
        fallback: bool = False,
        breaker: CircuitBreaker | Literal["default"] | None = "default",
        endpoint_breaker: EndpointBreaker | None = None,
        dynamic: DynamicLimits | None = None,
        delay: Mapping[str, float] | None = None,
        max_waiting: int = 1000,
        refund_when: Callable[[int], bool] | None = None,
        response_builder: ResponseBuilder | None = None,
        access_lists: bool = False,
        allow: Sequence[str] = (),
        block: Sequence[str] = (),
        user_tiers: Mapping[str, str] | None = None,
        refresh_interval: float = 0.5,
        allow_any_network: bool = False,
        limit_overrides: bool = False,
    ) -> None:
        try:
            algorithm = Algorithm(algorithm)
        except ValueError:
            raise ConfigurationError("algorithm", algorithm, "is not an Algorithm") from None
        #: The algorithm of every limit that names none: levels and tiers given as rate
        #: strings or Rates, ``endpoint_limits``, ``@rate_limit`` and ``RateLimit``.
        self.algorithm = algorithm
        self.backend: Backend = backend if backend is not None else MemoryBackend()
        if not isinstance(self.backend, Backend):
            raise ConfigurationError("backend", backend, "must implement the Backend protocol")
        self._global = _policy("global_limit", "global", global_limit, algorithm)
        self._ip = _policy("ip_limit", "ip", ip_limit, algorithm)
        self._api_key = _policy("api_key_limit", "api_key", api_key_limit, algorithm)
        if tiers is not None and user_limit is not None:
            raise ConfigurationError("user_limit", user_limit, "give either user_limit or tiers")
        self._user = _policy("user_limit", "user", user_limit, algorithm)
        self._tiers = build_tiers(tiers, default_tier, algorithm) if tiers is not None else None
        self._default_tier = default_tier
        self._user_tiers = _user_tiers(user_tiers, self._tiers)
        self._endpoints: dict[str, Policy] = {}
        self._client_endpoints: dict[str, RouteLimit] = {}
        for endpoint, rate in (endpoint_limits or {}).items():
            check_endpoint("endpoint_limits", endpoint)
            if isinstance(rate, tuple):
                self._client_endpoints[endpoint] = _client_endpoint_limit(endpoint, rate, algorithm)
                continue
            policy = _policy(f"endpoint_limits[{endpoint!r}]", "endpoint", rate, algorithm)
            assert policy is not None
            self._endpoints[endpoint] = policy
        self._composites: list[tuple[tuple[str, ...], str, Policy]] = []
        for composite in composite_limits:
            self._composites.append(_composite(composite, algorithm))
        self._costs = costs if isinstance(costs, CostTable) else CostTable(costs)
        self._check_costs()
        for name, value in (
            ("cost_function", cost_function),
            ("user_resolver", user_resolver),
            ("tier_resolver", tier_resolver),
            ("refund_when", refund_when),
            ("response_builder", response_builder),
        ):
            if value is not None and not callable(value):
                raise ConfigurationError(name, value, "must be a callable")
        self._cost_function = cost_function
        self._user_resolver = user_resolver
        self._tier_resolver = tier_resolver
        self.refund_when = refund_when
        self._ipv6_prefix = ipv6_prefix
        self._client_ip = ClientIP(
            trusted_proxies=trusted_proxies,
            ipv6_prefix=ipv6_prefix,
            headers=forwarded_headers,
            trust_unix_socket=trust_unix_socket,
        )
        if api_key_header is not None and (
            not isinstance(api_key_header, str) or not api_key_header
        ):
            raise ConfigurationError("api_key_header", api_key_header, "must be a header name")
        self._api_key_header = api_key_header.lower().encode("latin-1") if api_key_header else None
        self._api_key_query = api_key_query
        self.header_style = parse_header_style(headers)
        if isinstance(shadow, bool):
            self._shadow_all, self._shadow = shadow, frozenset[str]()
        elif isinstance(shadow, str) or not isinstance(shadow, Iterable):
            raise ConfigurationError("shadow", shadow, "must be True/False or a set of scopes")
        else:
            self._shadow_all, self._shadow = False, frozenset(shadow)
        if not isinstance(shadow_headers, bool):
            raise ConfigurationError("shadow_headers", shadow_headers, "must be True or False")
        self._shadow_headers = shadow_headers
        self._on_error_default, self._on_error = _failure_policies(on_backend_error)
        self._fallback = MemoryBackend() if fallback else None
        if breaker == "default":
            breaker = CircuitBreaker()
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise ConfigurationError("breaker", breaker, "must be a CircuitBreaker or None")
        self.breaker = breaker
        #: A Redis Cluster's breakers, one per master (see node_breakers.py): a node that is
        #: down fails open or closed alone, and the others keep limiting.
        self.node_breakers: NodeBreakers | None = None
        if breaker is not None and getattr(self.backend, "cluster", False) is True:
            self.node_breakers = NodeBreakers(breaker, cast(Any, self.backend))
        if endpoint_breaker is not None and not isinstance(endpoint_breaker, EndpointBreaker):
            raise ConfigurationError(
                "endpoint_breaker", endpoint_breaker, "must be an EndpointBreaker"
            )
        self.endpoint_breaker = endpoint_breaker
        if dynamic is not None and not isinstance(dynamic, DynamicLimits):
            raise ConfigurationError("dynamic", dynamic, "must be a DynamicLimits")
        self.dynamic = dynamic
        self._delays: dict[str, float] = {}
        for scope, max_delay in (delay or {}).items():
            if (
                isinstance(max_delay, bool)
                or not isinstance(max_delay, (int, float))
                or not (0 < max_delay <= 60)
            ):
                raise ConfigurationError(f"delay[{scope!r}]", max_delay, "must be in (0, 60] s")
            self._delays[scope] = float(max_delay)
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ConfigurationError("max_waiting", max_waiting, "must be a whole number >= 0")
        self._max_waiting = max_waiting
        self._waiting = 0
        self._last_failure_log = 0.0
        self._respond: ResponseBuilder = response_builder or _default_response
        self._warned_cost_function = False
        self._warned_tiers: set[str] = set()
        if not (isinstance(refresh_interval, (int, float)) and 0 < refresh_interval <= 1):
            raise ConfigurationError("refresh_interval", refresh_interval, "must be in (0, 1] s")
        self.lists: AccessLists | None = None
        self.tier_store: TierStore | None = None
        # Fixed at construction; whether the backend is the memory one is read per request.
        self._may_run_now = (
            dynamic is None
            and not self._shadow_all
            and not self._shadow
            and not self._delays
            and not limit_overrides
        )
        #: :meth:`after_response` has work after every response (a breaker to feed, refunds
        #: by status to look at), not only when a request asks for it.
        self.after_every_response = endpoint_breaker is not None or refund_when is not None
        #: True when :meth:`build_context` can stand in for :meth:`context` (no resolvers and
        #: no tiers to look up): one coroutine less per request.
        self.sync_context = user_resolver is None and tier_resolver is None and tiers is None
        # endpoint -> its plan; bounded, since a client can send any method string.
        self._plans: dict[str, _EndpointPlan] = {}
        #: Denials, logged as one line per second however many there are.
        self._denials = DenialLog()
        # Operator state is mirrored only for what is configured (see control.py); the
        # mirrors poll through the breaker and log their health as one.
        store = self.backend if isinstance(self.backend, ControlStore) else None
        #: Every backend call on the request path besides the check goes through it.
        self._polling = polling = PollPolicy(self.breaker)
        if self.node_breakers is not None:
            polling.breaker_for = self.node_breakers.for_namespace
        if not isinstance(access_lists, bool):
            raise ConfigurationError("access_lists", access_lists, "must be True or False")
        if access_lists and store is None:
            raise ConfigurationError(
                "access_lists", access_lists, "needs a backend that stores operator state"
            )
        static: dict[Literal["allow", "block"], Sequence[str]] = {}
        lists: tuple[tuple[Literal["allow", "block"], Any], ...] = (
            ("allow", allow),
            ("block", block),
        )
        for name, entries in lists:
            if isinstance(entries, str) or not isinstance(entries, Sequence):
                raise ConfigurationError(name, entries, "must be a list of entries")
            if entries:
                static[name] = entries
        if static and store is None:
            raise ConfigurationError(
                "allow" if "allow" in static else "block",
                static.get("allow") or static.get("block"),
                "needs a backend that stores operator state",
            )
        if store is not None and (access_lists or static or self._tiers is not None):
            keys = getattr(self.backend, "key_builder", None)
            keys = keys if isinstance(keys, KeyBuilder) else KeyBuilder()
            if access_lists or static:
                self.lists = AccessLists(
                    store,
                    keys,
                    ipv6_prefix=ipv6_prefix,
                    refresh_interval=refresh_interval,
                    allow_any_network=allow_any_network,
                    polling=polling,
                    mirrored=access_lists,
                    static=static,
                )
            if self._tiers is not None:
                self.tier_store = TierStore(store, keys, refresh_interval, polling)
        if not isinstance(limit_overrides, bool):
            raise ConfigurationError("limit_overrides", limit_overrides, "must be True or False")
        if limit_overrides and store is None:
            raise ConfigurationError(
                "limit_overrides", limit_overrides, "needs a backend that stores operator state"
            )
        self.limit_overrides: LimitOverrides | None = None
        if limit_overrides and store is not None:
            levels = {
                level: policy
                for level, policy in (
                    ("global", self._global),
                    ("ip", self._ip),
                    ("api_key", self._api_key),
                    ("user", self._user),
                )
                if policy is not None
            }
            for endpoint, policy in self._endpoints.items():
                levels[target_key("endpoint", endpoint)] = policy
            self.limit_overrides = LimitOverrides(store, levels, refresh_interval, polling)
        if self.endpoint_breaker is not None:
            self.endpoint_breaker.bind(store, refresh_interval, polling)
        if self.dynamic is not None:
            self.dynamic.bind(store, refresh_interval, polling)

    def _check_costs(self) -> None:
        """Refuse a cost that a level could never admit (times every tier's multiplier): each
        such request would be refused for ever, with nothing to tell the client why."""
        shared = [p for p in (self._global, self._ip, self._api_key, self._user) if p]
        shared += [policy for _, _, policy in self._composites]
        # (cost table entry, its cost, the levels it meets)
        rows = [
            (endpoint, cost, [*shared, *self._endpoint_policies(endpoint)])
            for endpoint, cost in self._costs.entries().items()
        ]
        # An endpoint limit without a cost entry of its own meets the default cost.
        rows += [(key, self._costs.cost(key), [p]) for key, p in self._endpoint_rules()]
        tiers: list[Tier | None] = [None]
        tiers += list(self._tiers.values()) if self._tiers is not None else []
        for endpoint, base, policies in rows:
            for tier in tiers:
                cost, levels = base, policies
                if tier is not None:
                    cost = self._costs.cost(endpoint, tier.cost_multiplier)
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
            *self._endpoints.items(),
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

    # -- per request ---------------------------------------------------------------------------

    @staticmethod
    def now() -> float:
        return time.time()

    def build_context(self, scope: Scope) -> RequestContext:
        """:meth:`context` without resolvers or tiers (see :attr:`sync_context`)."""
        user, api_key = _default_user(scope), self._api_key_of(scope)
        return self._finish_context(scope, user, api_key, None, None)

    def _api_key_of(self, scope: Scope) -> str | None:
        if self._api_key_header is None and self._api_key_query is None:
            return None
        # b"" matches no header: with only a query parameter configured, read only that.
        return api_key_from_scope(scope, self._api_key_header or b"", self._api_key_query)

    async def context(self, scope: Scope) -> RequestContext:
        """Work out who is calling, which endpoint, at what cost."""
        connection: HTTPConnection | None = None
        user = _default_user(scope)
        if self._user_resolver is not None:
            connection = HTTPConnection(scope)
            try:
                resolved = await _maybe_await(self._user_resolver(connection))
            except Exception as exc:
                # A failing resolver must not fail the request: the caller is anonymous.
                _warn_user_once("user_resolver()", type(self._user_resolver), exc)
                resolved = None
            user = user_identity(resolved)
        api_key = self._api_key_of(scope)
        tier: Tier | None = None
        key_tier: Tier | None = None
        if self._tiers is not None:
            if user is not None:
                name = None
                if self._tier_resolver is not None:
                    connection = connection or HTTPConnection(scope)
                    try:
                        name = await _maybe_await(self._tier_resolver(connection))
                    except Exception as exc:
                        # As for an unknown tier: the default tier applies, never a 500.
                        _warn_user_once("tier_resolver()", type(self._tier_resolver), exc)
                        name = None
                if name is None and self.tier_store is not None:
                    name = await self.tier_store.lookup("user", user)
                if name is None:
                    name = self._user_tiers.get(user)
                tier = self._tier_named(name)
            if api_key is not None and self.tier_store is not None:
                name = await self.tier_store.lookup("api_key", api_key)
                key_tier = self._tiers.get(name) if name is not None else None
                if name is not None and key_tier is None:
                    self._unknown_tier(name)
        return self._finish_context(scope, user, api_key, tier, key_tier, connection)

    def _finish_context(
        self,
        scope: Scope,
        user: str | None,
        api_key: str | None,
        tier: Tier | None,
        key_tier: Tier | None,
        connection: HTTPConnection | None = None,
    ) -> RequestContext:
        routes = getattr(scope.get("app"), "routes", None)
        if isinstance(routes, list):
            resolved = resolve_route(routes, scope)
            endpoint, route = resolved.endpoint, resolved.route
        else:
            endpoint, route = endpoint_key(request_method(scope), UNMATCHED), None
        plan = self._plans.get(endpoint) or self._plan(endpoint)
        cost = plan.cost
        charged_tier = tier or key_tier
        multiplier = charged_tier.cost_multiplier if charged_tier is not None else 1.0
        if multiplier != 1.0:
            cost = self._costs.cost(endpoint, multiplier)
        if self._cost_function is not None:
            connection = connection or HTTPConnection(scope)
            cost = self._custom_cost(connection, cost, multiplier)
        # Positional: keyword arguments cost a measurable share of the call, per request.
        return RequestContext(
            self, self._client_ip(scope), api_key, user, tier, endpoint, route, cost, key_tier
        )

    def _plan(self, endpoint: str) -> _EndpointPlan:
        cost = self._costs.cost(endpoint)
        policy = self._endpoints.get(endpoint)
        every_method = "* " + endpoint.partition(" ")[2]
        if policy is None:
            # "* /path": the limit of every method of the route, each method counted apart.
            policy = self._endpoints.get(every_method)
        clients = self._client_endpoints
        client_limit = clients.get(endpoint) or clients.get(every_method) if clients else None
        plan = _EndpointPlan(
            cost,
            policy,
            Check(self._global, "global", "", cost) if self._global is not None else None,
            Check(policy, "endpoint", endpoint, cost) if policy is not None else None,
            (client_limit,) if client_limit is not None else (),
        )
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[endpoint] = plan
        return plan

    def level_checks(self, context: RequestContext) -> list[Check]:
        """The checks for the limiter's own levels (not the route limits)."""
        cost = context.cost
        plan = self._plans.get(context.endpoint) or self._plan(context.endpoint)
        # At the table's cost (the usual case) the global and endpoint checks are prebuilt.
        base = cost == plan.cost
        checks: list[Check] = []
        if base and plan.global_check is not None:
            checks.append(plan.global_check)
        elif self._global is not None:
            checks.append(new_check((self._global, "global", "", cost)))
        if self._ip is not None:
            checks.append(new_check((self._ip, "ip", context.ip, cost)))
        if base and plan.endpoint_check is not None:
            checks.append(plan.endpoint_check)
        elif plan.policy is not None:
            checks.append(new_check((plan.policy, "endpoint", context.endpoint, cost)))
        for limit in plan.client_limits:
            client_check = limit.check(context)
            if client_check is not None:
                checks.append(client_check)
        if context.api_key is not None:
            key_policy = context.key_tier.key_policy if context.key_tier else self._api_key
            if key_policy is not None:
                checks.append(new_check((key_policy, "api_key", context.api_key, cost)))
        if context.user is not None:
            user_policy = context.tier.policy if context.tier is not None else self._user
            if user_policy is not None:
                checks.append(new_check((user_policy, "user", context.user, cost)))
        for parts, scope, policy in self._composites:
            identity = _composite_identity(parts, context)
            if identity is not None:
                checks.append(new_check((policy, scope, identity, cost)))
        return checks

    async def access(self, context: RequestContext) -> str | None:
        """``"allow"``, ``"block"`` or ``None``: the allow/block lists' word on this request."""
        lists = self.lists
        if lists is None or lists.known_empty():
            return None  # the common case, without another coroutine on the hot path
        return await lists.decide(context)

    def _tier_named(self, name: Any) -> Tier:
        assert self._tiers is not None
        if name is None:
            return self._tiers[self._default_tier]
        if not isinstance(name, str):
            name = str(name) if isinstance(name, int) and not isinstance(name, bool) else "?"
        tier = self._tiers.get(name)
        if tier is None:
            self._unknown_tier(name)
            return self._tiers[self._default_tier]
        return tier

    def _unknown_tier(self, name: str) -> None:
        # Once per name (bounded), never a 500: the default tier applies.
        if name not in self._warned_tiers and len(self._warned_tiers) < 1024:
            self._warned_tiers.add(name)
            logger.warning(
                "unknown tier {!r}: using the default tier {!r}", name[:64], self._default_tier
            )

    async def run(self, checks: Sequence[Check], context: RequestContext) -> Verdict | None:
        """Decide ``checks`` (one backend call for the enforced ones) and record the decisions
        in ``context``. Returns ``None`` when the backend failed and the policy is to allow;
        raises :class:`BackendError` when it failed and the policy is to deny."""
        if self.limit_overrides is not None:
            checks = await self.limit_overrides.apply(checks)
        given = checks
        if self.dynamic is not None:
            checks = await self._scaled_checks(checks, context)
            denial = await self._penalty(context)
            if denial is not None:
                context.decisions = (*context.decisions, denial)
                return Verdict((denial,))
        enforced: Sequence[Check] = checks
        if self._shadow_all or self._shadow:
            enforced = [c for c in checks if not self._is_shadow(c.scope)]
            shadow = [c for c in checks if self._is_shadow(c.scope)]
            if shadow:
                await self._run_shadow(shadow, context)
        if not enforced:
            return Verdict(())
        verdict = await self._hit(enforced)
        if verdict is not None and not verdict.allowed:
            # Measured against the quotas as configured: a scaled-down one comes back.
            never = self._never(c for c in given if not self._is_shadow(c.scope))
            if never is not None:
                verdict = never
            elif self._delays:
                verdict = await self._wait_and_retry(enforced, verdict)
        if verdict is None:
            return None
        self._record(verdict, enforced, context)
        if self.dynamic is not None and self.dynamic.behaviour is not None:
            for record in _records(context):
                await self.dynamic.behaviour.record(record, verdict.allowed)
        return verdict

    @property
    def runs_now(self) -> bool:
        """Whether :meth:`run_now` may stand in for :meth:`run` (one coroutine less per
        request). Read per request: the backend is a public attribute and may be replaced."""
        return self._may_run_now and type(self.backend) is MemoryBackend

    def run_now(self, checks: Sequence[Check], context: RequestContext) -> Verdict:
        """:meth:`run` without a coroutine, for limiters that :attr:`runs_now` (the memory
        backend, which never waits or fails, and no dynamic limits, shadow levels or
        delays): the same decisions, recorded the same way."""
        backend = self.backend
        assert isinstance(backend, MemoryBackend)
        verdict = backend.hit_now(checks)
        if not verdict.allowed:
            verdict = self._never(checks) or verdict
        self._record(verdict, checks, context)
        return verdict

    @staticmethod
    def _never(checks: Iterable[Check]) -> Verdict | None:
        """The verdict for checks one of which costs more than its level ever admits (a cost
        function, a tier multiplier): refused for good, with ``retry_after`` infinite, since
        any finite wait would be a promise never kept. Looked at on denials only."""
        decisions = tuple(
            Decision(
                False, c.policy.limit, 0, 0.0, math.inf, c.policy.name, c.scope, c.policy.window
            )
            for c in checks
            if c.cost > c.policy.limit
        )
        return Verdict(decisions) if decisions else None

    def _record(self, verdict: Verdict, enforced: Sequence[Check], context: RequestContext) -> None:
        # Replaced, not extended (see RequestContext): usually the first and only time.
        context.decisions = (
            (*context.decisions, *verdict.decisions) if context.decisions else verdict.decisions
        )
        if verdict.allowed:
            # Those at the request's cost are picked out after the response, if ever needed.
            context.charged = (*context.charged, *enforced) if context.charged else enforced
        else:
            self._denials.record(context.endpoint, ",".join(d.policy for d in verdict.denied))

    async def _hit(self, checks: Sequence[Check]) -> Verdict | None:
        """One backend call through the circuit breaker and the failure policy."""
        cached_denial = getattr(self.backend, "cached_denial", None)
        if cached_denial is not None:
            # A client known to be over a limit: answered here, as neither a success nor a
            # failure of the backend (the breaker hears nothing).
            known = cached_denial(checks)
            if known is not None:
                return cast(Verdict, known)
        if self.node_breakers is not None:
            return await self.node_breakers.hit(checks, self._refuses, self._fallback)
        breaker = self.breaker
        probe = False
        # An idle breaker (closed, nothing failed lately) needs no call either way.
        if breaker is not None and not breaker.idle:
            if not breaker.allow_call():
                if self.recorder is not None:
                    self.recorder.backend_error("circuit_open")
                return await self._backend_down(checks, None)
            probe = breaker.state == "half_open"  # half-open lets only its one probe through
        try:
            verdict = await self.backend.hit(checks)
        except BackendError as exc:
            if breaker is not None:
                breaker.record_failure()
            if self.recorder is not None:
                self.recorder.backend_error(error_kind(exc))
            return await self._backend_down(checks, exc)
        except BaseException:
            # Cancelled (the client went away) or a bug: no answer about the backend. A probe
            # that ends so must hand its turn on, or the breaker stays half-open for good and
            # no call ever reaches the backend again.
            if probe:
                assert breaker is not None
                breaker.abandon_probe()
            raise
        if breaker is not None and not breaker.idle:
            breaker.record_success()
        return verdict

    async def _backend_down(
        self, checks: Sequence[Check], error: BackendError | None
    ) -> Verdict | None:
        if error is not None and self.breaker is None:
            # Without a breaker, at most one line per 10 s: an outage must not flood the logs.
            now = time.monotonic()
            if now - self._last_failure_log > 10:
                self._last_failure_log = now
                logger.warning("rate-limit backend failed: {}", error)
        if self._refuses(checks):
            raise error or BackendError("rate-limit backend circuit open")
        if self._fallback is not None:
            # Per-process limits at the same policies: an outage is not a free-for-all.
            return await self._fallback.hit(checks)
        return None

    def _failure_policy(self, scope: str) -> str:
        return self._on_error.get(scope, self._on_error_default)

    def _refuses(self, checks: Sequence[Check]) -> bool:
        """Whether the failure policy refuses a request whose ``checks`` can't be decided."""
        return any(self._failure_policy(c.scope) == "deny" for c in checks)

    def retry_after_unavailable(self) -> int:
        if self.node_breakers is not None:
            return self.node_breakers.retry_after()
        return self.breaker.retry_after() if self.breaker is not None else 1

    async def _wait_and_retry(self, checks: Sequence[Check], verdict: Verdict) -> Verdict | None:
        """Throttle instead of reject: wait up to the denied levels' ``max_delay``."""
        budget = min((self._delays.get(d.scope, 0.0) for d in verdict.denied), default=0.0)
        deadline = time.monotonic() + budget
        if budget <= 0 or self._waiting >= self._max_waiting:
            return verdict
        self._waiting += 1
        started = time.monotonic()
        waited = False
        try:
            while not verdict.allowed:
                wait = verdict.retry_after
                if time.monotonic() + wait > deadline:
                    break
                await asyncio.sleep(wait)
                waited = True
                retried = await self._hit(checks)
                if retried is None:
                    return None
                verdict = retried
            if waited and self.recorder is not None:
                self.recorder.delayed(time.monotonic() - started, verdict.allowed)
            return verdict
        finally:
            self._waiting -= 1

    async def _scaled_checks(self, checks: Sequence[Check], context: RequestContext) -> list[Check]:
        dynamic = self.dynamic
        assert dynamic is not None
        factor = await dynamic.global_factor()
        client_factor = 1.0
        if dynamic.behaviour is not None:
            # The worst record the request matches: a fresh identity never sheds a bad one.
            client_factor = min(dynamic.behaviour.factor(r) for r in _records(context))
        context.reduced = factor < 1.0
        if factor == 1.0 and client_factor == 1.0:
            return list(checks)
        scaled = []
        for check in checks:
            f = factor * (client_factor if check.scope in _CLIENT_SCOPES else 1.0)
            policy = dynamic.scaled(check.policy, f)
            scaled.append(check if policy is check.policy else check._replace(policy=policy))
        return scaled

    async def _penalty(self, context: RequestContext) -> Decision | None:
        assert self.dynamic is not None
        behaviour = self.dynamic.behaviour
        if behaviour is None:
            return None
        until = None
        for record in _records(context):
            found = await behaviour.penalty_until(record)
            if found is not None:
                until = max(until or 0.0, found)
        if until is None:
            return None
        wait = max(until - time.time(), 0.001)
        return Decision(
            False, 1, 0, wait, wait, "penalty-box", "client", behaviour.penalty_duration
        )

    def denial_response(self, context: RequestContext, verdict: Verdict) -> Response:
        if never(verdict.decisions):
            return cost_exceeds_limit_response(verdict.decisions, context.cost)
        headers = rate_limit_headers(context.decisions, self.header_style, now=self.now())
        if (
            context.reduced
            and self.dynamic is not None
            and self.dynamic.reduced_capacity_status
            and any(d.scope != "client" for d in verdict.denied)
        ):
            # Refused because load (or an operator) shrank the quotas: the draft's 503.
            retry = retry_after_value(verdict.decisions)
            return reduced_capacity_response(retry, headers=headers)
        return self._respond(verdict.decisions, headers)

    def unavailable_response(self) -> Response:
        return backend_unavailable_response(self.retry_after_unavailable())

    def needs_after_response(self, context: RequestContext) -> bool:
        """Whether :meth:`after_response` has anything to do for this request."""
        return bool(
            self.after_every_response or context.refundable or context.reported_cost is not None
        )

    async def after_response(self, context: RequestContext, status: int | None) -> None:
        """Refunds by status (every level, for a server error), the adjustment for a cost the
        endpoint reported, and the endpoint breaker's count."""
        if status is None:
            return
        if self.endpoint_breaker is not None:
            await self.endpoint_breaker.record(context.endpoint, status)
        if self.breaker is not None and self.breaker.state != "closed":
            return  # the backend is down: refunds would only add latency
        if status >= 500:
            # A server error is never charged: every level gives its units back.
            await refund_server_error(self, context.charged)
            return
        try:
            refunds: list[Check] = []
            # Route limits with a cost of their own are refunded by their own rule.
            charged = [c for c in context.charged if c.cost == context.cost]
            if self.refund_when is not None and charged and self.refund_when(status):
                refunds.extend(charged)
                charged = []
            for limit, check in context.refundable:
                if limit.refund_when is not None and limit.refund_when(status):
                    refunds.append(check)
            reported = context.reported_cost
            if reported is not None and charged and reported != context.cost:
                delta = reported - context.cost
                if delta < 0:
                    refunds.extend(c._replace(cost=-delta) for c in charged)
                else:
                    # Charged afterwards where quota is left; denied means nothing is taken.
                    # Never more than a level admits at once: a cost beyond it could never
                    # be charged, and the request would have cost nothing extra at all.
                    extra = [
                        c._replace(cost=min(delta, c.policy.limit - c.cost))
                        for c in charged
                        if c.policy.limit > c.cost
                    ]
                    if extra:
                        await self._polling.call("charging a cost", lambda: self.backend.hit(extra))
            if refunds:
                # Through the breaker: a failing backend is not waited on after every response.
                await self._polling.call("a refund", lambda: self.backend.refund(refunds))
        except Exception as exc:  # a refund_when that raises: the response is already sent
            log_limited(
                "WARNING",
                "adjustment",
                "rate-limit adjustment after the response failed: {!r}",
                exc,
            )

    async def aclose(self) -> None:
        """Stop background refreshes and close the backend. Call it from the app's lifespan
        shutdown."""
        if self.lists is not None:
            await self.lists.aclose()
        if self.tier_store is not None:
            await self.tier_store.aclose()
        if self.endpoint_breaker is not None:
            await self.endpoint_breaker.aclose()
        if self.dynamic is not None:
            await self.dynamic.aclose()
        if self.limit_overrides is not None:
            await self.limit_overrides.aclose()
        await self.backend.aclose()

    # -- operator API (also behind the admin router and the CLI) ------------------------------

    def _lists(self) -> AccessLists:
        if self.lists is None or not self.lists.mirrored:
            raise ConfigurationError(
                "access_lists",
                False,
                "this limiter does not apply allow/block lists: pass access_lists=True (on "
                "every instance that must apply them)",
            )
        return self.lists

    def _tier_store(self) -> TierStore:
        if self.tier_store is None or self._tiers is None:
            raise ConfigurationError("tiers", None, "this limiter has no tiers configured")
        return self.tier_store

    async def set_tier(
        self,
        identity: str,
        tier: str,
        *,
        kind: Literal["user", "api_key"] = "user",
        ttl: float | None = None,
        by: str = "",
    ) -> None:
        """Store ``tier`` for a user (or API key), for ``ttl`` seconds or until cleared. Every
        instance applies it within ``refresh_interval``; counters carry over."""
        store = self._tier_store()
        assert self._tiers is not None
        if tier not in self._tiers:
            raise ConfigurationError("tier", tier, f"is not one of {', '.join(self._tiers)}")
        await store.set(kind, identity, tier, ttl=ttl, by=by)

    async def get_tier(
        self, identity: str, *, kind: Literal["user", "api_key"] = "user"
    ) -> str | None:
        entry = await self._tier_store().get(kind, identity)
        return None if entry is None else str(entry.get("tier"))

    async def clear_tier(
        self, identity: str, *, kind: Literal["user", "api_key"] = "user", by: str = ""
    ) -> bool:
        return await self._tier_store().clear(kind, identity, by=by)

    async def allow(
        self, kind: Kind, value: str, *, reason: str = "", by: str = "", ttl: float | None = None
    ) -> ListEntry:
        """Put a user, API key, IP or CIDR range on the allow-list."""
        return await self._lists().add("allow", kind, value, reason=reason, added_by=by, ttl=ttl)

    async def block(
        self, kind: Kind, value: str, *, reason: str = "", by: str = "", ttl: float | None = None
    ) -> ListEntry:
        """Put a user, API key, IP or CIDR range on the block-list (403, nothing consumed)."""
        return await self._lists().add("block", kind, value, reason=reason, added_by=by, ttl=ttl)

    async def unallow(self, kind: Kind, value: str, *, by: str = "") -> bool:
        return await self._lists().remove("allow", kind, value, by=by)

    async def unblock(self, kind: Kind, value: str, *, by: str = "") -> bool:
        return await self._lists().remove("block", kind, value, by=by)

    async def allowed(self) -> list[ListEntry]:
        return await self._lists().entries("allow")

    async def blocked(self) -> list[ListEntry]:
        return await self._lists().entries("block")

    def _limit_overrides(self) -> LimitOverrides:
        if self.limit_overrides is None:
            raise ConfigurationError(
                "limit_overrides",
                False,
                "this limiter does not apply limits changed at run time: pass "
                "limit_overrides=True (on every instance that must apply them)",
            )
        return self.limit_overrides

    async def set_limit(
        self, level: str, rate: str, *, endpoint: str | None = None, by: str = ""
    ) -> None:
        """Change one level's limit on every instance (within ``refresh_interval``), without
        a restart; counters carry over. ``level``: ``"global"``, ``"ip"``, ``"api_key"``,
        ``"user"`` or ``"endpoint"`` with ``endpoint`` naming an ``endpoint_limits`` key.
        An invalid rate raises :class:`ConfigurationError` and changes nothing."""
        await self._limit_overrides().set(target_key(level, endpoint), rate, by=by)

    async def clear_limit(self, level: str, *, endpoint: str | None = None, by: str = "") -> bool:
        """Go back to the configured limit of a level, on every instance."""
        return await self._limit_overrides().clear(target_key(level, endpoint), by=by)

    async def changed_limits(self) -> dict[str, dict[str, Any]]:
        """The limits changed at run time: ``{"ip": {"rate": "200/minute", ...}}``."""
        return await self._limit_overrides().entries()

    async def cleanup(self) -> int:
        """Remove expired entries from the backend: allow/block lists, the penalty box and
        shared endpoint breakers (those this limiter uses). Returns how many."""
        behaviour = self.dynamic.behaviour if self.dynamic is not None else None
        if self.lists is None and behaviour is None and self.endpoint_breaker is None:
            self._lists()  # nothing to clean: say what is missing
        removed = await self.lists.cleanup() if self.lists is not None else 0
        if behaviour is not None:
            removed += await behaviour.cleanup()
        if self.endpoint_breaker is not None:
            removed += await self.endpoint_breaker.cleanup()
        return removed

    def operator_context(
        self,
        *,
        ip: str | None = None,
        user: str | None = None,
        api_key: str | None = None,
        endpoint: str | None = None,
    ) -> RequestContext:
        """A request context for an identity given by an operator (for inspect and reset)."""
        identity = "unknown"
        if ip is not None:
            address = parse_ip(ip)
            if address is None:
                raise ConfigurationError("ip", ip, "is not an IP address")
            identity = ip_identity(address, self._ipv6_prefix)
        if endpoint is not None:
            check_endpoint("endpoint", endpoint)
        tier = self._tiers[self._default_tier] if self._tiers is not None else None
        return RequestContext(
            limiter=self,
            ip=identity,
            api_key=api_key,
            user=user,
            tier=tier,
            endpoint=endpoint or "<operator>",
            route=None,
            cost=1,
        )

    def _operator_checks(self, context: RequestContext, *, all_tiers: bool) -> list[Check]:
        checks = [
            c
            for c in self.level_checks(context)
            if (c.scope != "ip" or context.ip != "unknown")
            and (c.scope != "endpoint" or context.endpoint != "<operator>")
            and (c.scope != "global")
        ]
        if all_tiers and self._tiers is not None and context.user is not None:
            # Every tier of the user level shares one bucket per algorithm: cover them all.
            seen = {(c.policy.bucket, c.policy.algorithm) for c in checks}
            for tier in self._tiers.values():
                marker = (tier.policy.bucket, tier.policy.algorithm)
                if marker not in seen:
                    seen.add(marker)
                    checks.append(Check(tier.policy, "user", context.user, 1))
        return checks

    async def inspect(
        self,
        *,
        ip: str | None = None,
        user: str | None = None,
        api_key: str | None = None,
        endpoint: str | None = None,
    ) -> list[Decision]:
        """The current state of every level that applies to an identity (nothing consumed)."""
        context = self.operator_context(ip=ip, user=user, api_key=api_key, endpoint=endpoint)
        if user is not None and self.tier_store is not None and self._tiers is not None:
            name = await self.tier_store.lookup("user", user)
            context.tier = self._tier_named(
                name if name is not None else self._user_tiers.get(user)
            )
        checks = self._operator_checks(context, all_tiers=False)
        if self._global is not None:
            checks.insert(0, Check(self._global, "global", "", 1))
        if not checks:
            return []
        if self.limit_overrides is not None:
            checks = list(await self.limit_overrides.apply(checks))
        return list((await self.backend.peek(checks)).decisions)

    async def reset(
        self,
        *,
        ip: str | None = None,
        user: str | None = None,
        api_key: str | None = None,
        endpoint: str | None = None,
        by: str = "",
    ) -> int:
        """Forget the counters of an identity at every level that applies to it."""
        context = self.operator_context(ip=ip, user=user, api_key=api_key, endpoint=endpoint)
        checks = self._operator_checks(context, all_tiers=True)
        if checks:
            await self.backend.reset(checks)
        logger.info(
            "ratelimit audit: reset ip={} user={} api_key={} endpoint={} by {!r}",
            ip,
            user,
            "<given>" if api_key is not None else None,
            endpoint,
            by,
        )
        return len(checks)

    # -- internals -----------------------------------------------------------------------------

    def _is_shadow(self, scope: str) -> bool:
        return self._shadow_all or scope in self._shadow

    async def _run_shadow(self, checks: list[Check], context: RequestContext) -> None:
        # Each shadow level is charged on its own: a shadow denial must not stop the others
        # from counting, and must never block.
        # Through the breaker, like the enforced levels: a dead backend is not waited on.
        results = await asyncio.gather(
            *(self._polling.call("a shadow level", partial(self.backend.hit, [c])) for c in checks)
        )
        for check, result in zip(checks, results, strict=True):
            if result is not None and self.recorder is not None:
                self.recorder.shadow_decision(check.scope, result.allowed)
            if result is not None and self._shadow_headers:
                context.shadow = (*context.shadow, *result.decisions)
            if result is not None and not result.allowed:
                # One line a second at most: a flood would deny on every request.
                client = _masked_client(check)
                log_limited(
                    "INFO",
                    "shadow",
                    "shadow rate limit would deny: {} {} ({}) for {}",
                    context.endpoint,
                    check.policy.name,
                    check.scope,
                    client,
                    endpoint=context.endpoint,
                    policy=check.policy.name,
                    scope=check.scope,
                    client=client,
                )

    def _custom_cost(self, connection: HTTPConnection, fallback: int, multiplier: float) -> int:
        assert self._cost_function is not None
        try:
            cost = check_cost("cost_function()", self._cost_function(connection))
        except Exception as exc:
            if not self._warned_cost_function:
                self._warned_cost_function = True
                logger.warning("cost_function failed, using the cost table: {!r}", exc)
            return fallback
        return cost if multiplier == 1.0 else max(1, math.ceil(cost * multiplier))


def _default_response(
    decisions: Sequence[Decision], headers: Sequence[tuple[bytes, bytes]]
) -> Response:
    return quota_exceeded_response(decisions, headers=headers)


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


def _user_tiers(value: Any, tiers: Mapping[str, Tier] | None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError("user_tiers", value, "must map user ids to tier names")
    if tiers is None:
        raise ConfigurationError("user_tiers", value, "needs tiers=... to name tiers from")
    for user, tier in value.items():
        if not isinstance(user, str) or not user:
            raise ConfigurationError("user_tiers", user, "user ids must be non-empty strings")
        if tier not in tiers:
            raise ConfigurationError(
                f"user_tiers[{user!r}]", tier, f"is not one of the tiers ({', '.join(tiers)})"
            )
    return dict(value)


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
    algorithm = Algorithm(composite.algorithm) if composite.algorithm is not None else default
    policy = _policy(f"composite_limits[{scope!r}]", name, composite.rate, algorithm)
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


_CLIENT_SCOPES = frozenset({"ip", "user", "api_key"})


def _masked_client(check: Check) -> str:
    """Who a level counts, as logs may show it."""
    kind = check.scope.partition("+")[0]
    identity = check.identity
    if not isinstance(identity, str) or not identity or kind not in ("ip", "user", "api_key"):
        return check.scope  # a shared level (global, endpoint) or a composite identity
    return mask_identity(kind, identity)


def _records(context: RequestContext) -> tuple[str, ...]:
    # Behaviour and penalties follow what the client cannot make up: its IP (as the trusted
    # proxies give it) and its authenticated user. Never the API key: the limiter cannot tell
    # a valid key from a random one, and a random one would be a fresh, clean record.
    if context.user is not None:
        return (f"ip:{context.ip}", f"user:{context.user}")
    return (f"ip:{context.ip}",)


def _failure_policies(value: Any) -> tuple[str, dict[str, str]]:
    if isinstance(value, str):
        if value not in ("allow", "deny"):
            raise ConfigurationError("on_backend_error", value, "must be 'allow' or 'deny'")
        return value, {}
    if not isinstance(value, Mapping):
        raise ConfigurationError("on_backend_error", value, "must be 'allow', 'deny' or a mapping")
    per_scope: dict[str, str] = {}
    for scope, policy in value.items():
        if policy not in ("allow", "deny"):
            raise ConfigurationError(
                f"on_backend_error[{scope!r}]", policy, "must be 'allow' or 'deny'"
            )
        per_scope[str(scope)] = policy
    return per_scope.pop("default", "allow"), per_scope


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value
