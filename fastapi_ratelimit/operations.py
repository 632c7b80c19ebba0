"""The operator API: tiers, allow/block lists, limits changed at run time, inspect, reset and
cleanup. One :class:`Operator` per limiter (``limiter.operator``), behind the admin router
and the CLI alike."""

from __future__ import annotations

from typing import Any, Literal

from loguru import logger

from .access import AccessLists, Kind, ListEntry
from .backends.base import Check
from .context import RequestContext
from .costs import check_endpoint
from .decision import Decision
from .errors import ConfigurationError
from .identity import ip_identity, parse_ip
from .limit_overrides import LimitOverrides, target_key
from .tiers import TierStore

__all__ = ["Operator"]


class Operator:
    """What an operator can do to one limiter's shared state, on every instance at once
    (each applies a change within its ``refresh_interval``).

    A method whose state this limiter does not apply raises :class:`ConfigurationError`
    naming the option to turn on (``access_lists``, ``tiers``, ``limit_overrides``)."""

    def __init__(self, limiter: Any) -> None:
        self._limiter = limiter

    # -- tiers -------------------------------------------------------------------------------

    def _tier_store(self) -> TierStore:
        store: TierStore | None = self._limiter.tier_store
        if store is None or self._limiter.identifier.tiers is None:
            raise ConfigurationError("tiers", None, "this limiter has no tiers configured")
        return store

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
        tiers = self._limiter.identifier.tiers
        if tier not in tiers:
            raise ConfigurationError("tier", tier, f"is not one of {', '.join(tiers)}")
        await store.set(kind, identity, tier, ttl=ttl, by=by)

    async def get_tier(
        self, identity: str, *, kind: Literal["user", "api_key"] = "user"
    ) -> str | None:
        """The tier stored for a user (or API key), if any."""
        entry = await self._tier_store().get(kind, identity)
        return None if entry is None else str(entry.get("tier"))

    async def clear_tier(
        self, identity: str, *, kind: Literal["user", "api_key"] = "user", by: str = ""
    ) -> bool:
        """Forget a stored tier: the resolver, ``user_tiers`` or the default applies again."""
        return await self._tier_store().clear(kind, identity, by=by)

    # -- allow/block lists -------------------------------------------------------------------

    def _lists(self) -> AccessLists:
        lists: AccessLists | None = self._limiter.lists
        if lists is None or not lists.mirrored:
            raise ConfigurationError(
                "access_lists",
                False,
                "this limiter does not apply allow/block lists: pass access_lists=True (on "
                "every instance that must apply them)",
            )
        return lists

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
        """Take an entry off the allow-list."""
        return await self._lists().remove("allow", kind, value, by=by)

    async def unblock(self, kind: Kind, value: str, *, by: str = "") -> bool:
        """Take an entry off the block-list."""
        return await self._lists().remove("block", kind, value, by=by)

    async def allowed(self) -> list[ListEntry]:
        """The allow-list's stored entries."""
        return await self._lists().entries("allow")

    async def blocked(self) -> list[ListEntry]:
        """The block-list's stored entries."""
        return await self._lists().entries("block")

    # -- limits changed at run time ----------------------------------------------------------

    def _limit_overrides(self) -> LimitOverrides:
        overrides: LimitOverrides | None = self._limiter.limit_overrides
        if overrides is None:
            raise ConfigurationError(
                "limit_overrides",
                False,
                "this limiter does not apply limits changed at run time: pass "
                "limit_overrides=True (on every instance that must apply them)",
            )
        return overrides

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

    # -- counters and housekeeping -----------------------------------------------------------

    async def cleanup(self) -> int:
        """Remove expired entries from the backend: allow/block lists, the penalty box and
        shared endpoint breakers (those this limiter uses). Returns how many."""
        limiter = self._limiter
        behaviour = limiter.dynamic.behaviour if limiter.dynamic is not None else None
        if limiter.lists is None and behaviour is None and limiter.endpoint_breaker is None:
            self._lists()  # nothing to clean: say what is missing
        removed: int = await limiter.lists.cleanup() if limiter.lists is not None else 0
        if behaviour is not None:
            removed += await behaviour.cleanup()
        if limiter.endpoint_breaker is not None:
            removed += await limiter.endpoint_breaker.cleanup()
        return removed

    def context(
        self,
        *,
        ip: str | None = None,
        user: str | None = None,
        api_key: str | None = None,
        endpoint: str | None = None,
    ) -> RequestContext:
        """A request context for an identity given by an operator (for inspect and reset)."""
        limiter = self._limiter
        identity = "unknown"
        if ip is not None:
            address = parse_ip(ip)
            if address is None:
                raise ConfigurationError("ip", ip, "is not an IP address")
            identity = ip_identity(address, limiter.ipv6_prefix)
        if endpoint is not None:
            check_endpoint("endpoint", endpoint)
        identifier = limiter.identifier
        tiers = identifier.tiers
        tier = tiers[identifier.default_tier] if tiers is not None else None
        return RequestContext(
            limiter, identity, api_key, user, tier, endpoint or "<operator>", None, 1
        )

    def _checks(self, context: RequestContext, *, all_tiers: bool) -> list[Check]:
        checks = [
            c
            for c in self._limiter.levels.checks(context)
            if (c.scope != "ip" or context.ip != "unknown")
            and (c.scope != "endpoint" or context.endpoint != "<operator>")
            and (c.scope != "global")
        ]
        tiers = self._limiter.identifier.tiers
        if all_tiers and tiers is not None:
            # Every tier of a level shares one bucket per algorithm: cover them all, for the
            # user and for the API key (whose plan may be stored).
            seen = {(c.scope, c.policy.bucket, c.policy.algorithm) for c in checks}
            for scope, identity in (("user", context.user), ("api_key", context.api_key)):
                if identity is None:
                    continue
                for tier in tiers.values():
                    policy = tier.policy if scope == "user" else tier.key_policy
                    marker = (scope, policy.bucket, policy.algorithm)
                    if marker not in seen:
                        seen.add(marker)
                        checks.append(Check(policy, scope, identity, 1))
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
        limiter = self._limiter
        context = self.context(ip=ip, user=user, api_key=api_key, endpoint=endpoint)
        identifier = limiter.identifier
        if user is not None and limiter.tier_store is not None and identifier.tiers is not None:
            name = await limiter.tier_store.lookup("user", user)
            context.tier = identifier.tier_named(
                name if name is not None else identifier.user_tiers.get(user)
            )
        if api_key is not None and limiter.tier_store is not None and identifier.tiers is not None:
            # The key's stored plan, as identification finds it (none: api_key_limit).
            name = await limiter.tier_store.lookup("api_key", api_key)
            context.key_tier = identifier.tiers.get(name) if name is not None else None
        checks = self._checks(context, all_tiers=False)
        global_policy = limiter.levels.global_
        if global_policy is not None:
            checks.insert(0, Check(global_policy, "global", "", 1))
        if not checks:
            return []
        # The limits in force: changed at run time, then scaled by dynamic limits (the
        # operator's override, the load, the client's behaviour), as a request's are.
        if limiter.limit_overrides is not None:
            checks = list(await limiter.limit_overrides.apply(checks))
        if limiter.dynamic is not None:
            checks = await limiter.enforcer.scaled_checks(checks, context)
        return list((await limiter.backend.peek(checks)).decisions)

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
        context = self.context(ip=ip, user=user, api_key=api_key, endpoint=endpoint)
        checks = self._checks(context, all_tiers=True)
        if checks:
            await self._limiter.backend.reset(checks)
        logger.info(
            "ratelimit audit: reset ip={} user={} api_key={} endpoint={} by {!r}",
            ip,
            user,
            "<given>" if api_key is not None else None,
            endpoint,
            by,
        )
        return len(checks)
