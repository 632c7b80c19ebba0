"""The :class:`RateLimiter`: the configuration shared by the middleware, ``@rate_limit`` and
the ``Depends`` guard, and the parts that carry out a request's steps (see
``docs/architecture.md``): the :class:`~.identify.Identifier`, :class:`~.pricing.Pricing`,
the :class:`~.levels.Levels`, the :class:`~.enforce.Enforcer` and, for operators,
:attr:`RateLimiter.operator`. The steps themselves run in order in
:class:`~fastapi_ratelimit.middleware.RateLimitMiddleware`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from loguru import logger
from starlette.requests import HTTPConnection

from ._types import Scope
from .access import AccessLists
from .backends.base import WARM_UP_TIMEOUT, Backend, Check, WarmsUp
from .backends.memory import MemoryBackend
from .breaker import CircuitBreaker, EndpointBreaker
from .context import RequestContext
from .control import ControlStore, PollPolicy
from .costs import CostTable
from .dynamic import DynamicLimits
from .enforce import Enforcer
from .errors import ConfigurationError
from .failure import FailureHandling, OnBackendError
from .headers import HeaderStyle, parse_header_style
from .identify import Identifier, Resolver
from .identity import ClientIP
from .keys import KeyBuilder
from .levels import CompositeLimit, Levels, RateLike
from .limit_overrides import LimitOverrides
from .node_breakers import NodeBreakers
from .operations import Operator
from .policy import Algorithm
from .pricing import Pricing
from .recorder import Recorder
from .responses import ResponseBuilder, default_response
from .tiers import Tier, TierStore, build_tiers

__all__ = ["CompositeLimit", "RateLimiter"]


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
        access_lists: apply the allow/block lists (``limiter.operator.allow(...)``, the admin API,
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
        built_tiers = build_tiers(tiers, default_tier, algorithm) if tiers is not None else None
        costs = costs if isinstance(costs, CostTable) else CostTable(costs)
        # The parts, one per step (see docs/architecture.md); each validates its own options.
        #: Levels and route limits as checks (step 4).
        self.levels = Levels(
            algorithm=algorithm,
            global_limit=global_limit,
            ip_limit=ip_limit,
            api_key_limit=api_key_limit,
            user_limit=user_limit,
            endpoint_limits=endpoint_limits,
            composite_limits=composite_limits,
            tiers=built_tiers,
            costs=costs,
        )
        self.ipv6_prefix = ipv6_prefix
        #: Who is calling (step 1).
        self.identifier = Identifier(
            client_ip=ClientIP(
                trusted_proxies=trusted_proxies,
                ipv6_prefix=ipv6_prefix,
                headers=forwarded_headers,
                trust_unix_socket=trust_unix_socket,
            ),
            api_key_header=api_key_header,
            api_key_query=api_key_query,
            user_resolver=user_resolver,
            tier_resolver=tier_resolver,
            tiers=built_tiers,
            default_tier=default_tier,
            user_tiers=user_tiers,
        )
        if api_key_limit is not None and api_key_header is None and api_key_query is None:
            raise ConfigurationError(
                "api_key_limit", api_key_limit, "needs api_key_header or api_key_query to read keys"
            )
        for name, flag in (("fallback", fallback), ("allow_any_network", allow_any_network)):
            if not isinstance(flag, bool):
                raise ConfigurationError(name, flag, "must be True or False")
        #: Which endpoint, at what cost (step 2).
        self.pricing = Pricing(costs, cost_function, self.levels)
        for name, value in (("refund_when", refund_when), ("response_builder", response_builder)):
            if value is not None and not callable(value):
                raise ConfigurationError(name, value, "must be a callable")
        self.refund_when = refund_when
        self.response_builder: ResponseBuilder = response_builder or default_response
        self.header_style = parse_header_style(headers)
        failure = FailureHandling(
            self, on_backend_error=on_backend_error, fallback=fallback, breaker=breaker
        )
        self.breaker = failure.breaker
        self.node_breakers: NodeBreakers | None = failure.node_breakers
        if endpoint_breaker is not None and not isinstance(endpoint_breaker, EndpointBreaker):
            raise ConfigurationError(
                "endpoint_breaker", endpoint_breaker, "must be an EndpointBreaker"
            )
        self.endpoint_breaker = endpoint_breaker
        if dynamic is not None and not isinstance(dynamic, DynamicLimits):
            raise ConfigurationError("dynamic", dynamic, "must be a DynamicLimits")
        self.dynamic = dynamic
        if isinstance(refresh_interval, bool) or not (
            isinstance(refresh_interval, (int, float)) and 0 < refresh_interval <= 1
        ):
            raise ConfigurationError("refresh_interval", refresh_interval, "must be in (0, 1] s")
        #: Every backend call on the request path besides the check goes through it.
        self.polling = polling = PollPolicy(self.breaker)
        if self.node_breakers is not None:
            polling.breaker_for = self.node_breakers.for_namespace
            polling.split = self.node_breakers.split
        #: Decides the checks (step 5).
        self.enforcer = Enforcer(
            self,
            failure,
            polling,
            shadow=shadow,
            shadow_headers=shadow_headers,
            delay=delay,
            max_waiting=max_waiting,
        )
        # Fixed at construction; whether the backend is the memory one is read per request.
        self._may_run_now = self.enforcer.simple and dynamic is None and not limit_overrides
        #: Step 7 has work after every response (a breaker to feed, refunds by status to look
        #: at), not only when a request asks for it.
        self.after_every_response = endpoint_breaker is not None or refund_when is not None
        self.lists: AccessLists | None = None
        self.tier_store: TierStore | None = None
        self.limit_overrides: LimitOverrides | None = None
        self._bind_operator_state(
            access_lists, allow, block, limit_overrides, refresh_interval, allow_any_network
        )
        #: The operator API (tiers, lists, limits changed at run time, inspect, reset).
        self.operator = Operator(self)

    def _bind_operator_state(
        self,
        access_lists: bool,
        allow: Sequence[str],
        block: Sequence[str],
        limit_overrides: bool,
        refresh_interval: float,
        allow_any_network: bool,
    ) -> None:
        """Mirror operator state only for what is configured (see control.py); the mirrors
        poll through the breaker and log their health as one."""
        store = self.backend if isinstance(self.backend, ControlStore) else None
        polling = self.polling
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
        tiers = self.identifier.tiers
        if store is not None and (access_lists or static or tiers is not None):
            keys = getattr(self.backend, "key_builder", None)
            keys = keys if isinstance(keys, KeyBuilder) else KeyBuilder()
            if access_lists or static:
                self.lists = AccessLists(
                    store,
                    keys,
                    ipv6_prefix=self.ipv6_prefix,
                    refresh_interval=refresh_interval,
                    allow_any_network=allow_any_network,
                    polling=polling,
                    mirrored=access_lists,
                    static=static,
                )
            if tiers is not None:
                self.tier_store = TierStore(store, keys, refresh_interval, polling)
                self.identifier.tier_store = self.tier_store
        if not isinstance(limit_overrides, bool):
            raise ConfigurationError("limit_overrides", limit_overrides, "must be True or False")
        if limit_overrides and store is None:
            raise ConfigurationError(
                "limit_overrides", limit_overrides, "needs a backend that stores operator state"
            )
        if limit_overrides and store is not None:
            levels = self.levels.overridable()
            self.limit_overrides = LimitOverrides(store, levels, refresh_interval, polling)
        if self.endpoint_breaker is not None:
            self.endpoint_breaker.bind(store, refresh_interval, polling)
        if self.dynamic is not None:
            self.dynamic.bind(store, refresh_interval, polling)

    # -- the steps, for the route guards and the middleware ------------------------------------

    @staticmethod
    def now() -> float:
        return time.time()

    async def context(self, scope: Scope) -> RequestContext:
        """Steps 1 and 2: who is calling, which endpoint, at what cost."""
        context = await self.identifier.identify(self, scope)
        self.pricing.price(context, scope)
        return context

    async def access(self, context: RequestContext) -> str | None:
        """Step 3: ``"allow"``, ``"block"`` or ``None``, the allow/block lists' word."""
        lists = self.lists
        if lists is None or lists.known_empty():
            return None  # the common case, without another coroutine on the hot path
        return await lists.decide(context)

    def level_checks(self, context: RequestContext) -> list[Check]:
        """Step 4: the checks for the limiter's own levels (not the route limits)."""
        return self.levels.checks(context)

    @property
    def runs_now(self) -> bool:
        """Whether ``enforcer.run_now`` may stand in for ``enforcer.run`` (one coroutine less
        per request). Read per request: the backend is a public attribute and may be
        replaced."""
        return self._may_run_now and type(self.backend) is MemoryBackend

    def retry_after_unavailable(self) -> int:
        """Seconds until the backend is worth trying again (for a 503's Retry-After)."""
        return self.enforcer.failure.retry_after()

    async def warm_up(self, timeout: float = WARM_UP_TIMEOUT) -> bool:  # noqa: ASYNC109
        """Set up the backend's connections and scripts before the first request, so that no
        request's own timeout has to cover them (see :meth:`RedisBackend.warm_up
        <fastapi_ratelimit.backends.redis.RedisBackend.warm_up>`; the memory backend has
        nothing to set up).

        :class:`~fastapi_ratelimit.RateLimitMiddleware` calls it at lifespan start-up. Apps
        that use only ``@rate_limit`` or ``Depends(RateLimit(...))`` call it from their own
        lifespan: ``await limiter.warm_up()``.

        Takes at most ``timeout`` seconds (5 by default) and never raises: when the backend
        cannot be reached it logs one warning and returns ``False``, and requests then follow
        ``on_backend_error`` as they would have. ``True`` when the backend is ready. A failed
        warm-up does not count towards the circuit breaker.
        """
        backend = self.backend
        if not isinstance(backend, WarmsUp):
            return True
        try:
            await backend.warm_up(timeout)
        except Exception as exc:  # start-up must go on whatever a backend raises
            logger.warning(
                "rate-limit backend not ready at start-up; requests follow on_backend_error "
                "until it is: {}",
                exc,
            )
            return False
        return True

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
