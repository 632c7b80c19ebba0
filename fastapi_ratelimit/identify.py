"""Step 1 of a request: who is calling. The client IP (decided in :mod:`.identity`), the API
key, the user and the tier, in a new :class:`~fastapi_ratelimit.context.RequestContext`.

No resolver, user object or stored tier may fail a request: whatever is unusable is logged
once (per type, without the value) and the caller is anonymous or gets the default tier.
"""

from __future__ import annotations

import inspect
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from loguru import logger
from starlette.requests import HTTPConnection

from ._types import Scope
from .context import RequestContext
from .errors import ConfigurationError
from .identity import ClientIP, api_key_from_scope
from .tiers import Tier, TierStore

__all__ = ["Identifier", "user_identity"]

Resolver = Callable[[HTTPConnection], Any]
_OBJECT_STR: Any = object.__str__
#: Longest user identity keyed on; a longer one is treated as anonymous (keyed by IP).
_MAX_USER_IDENTITY = 1024
#: What resolvers usually return, none of it awaitable: no need to ask inspect.isawaitable.
_PLAIN = frozenset({str, int, type(None)})
#: A header name as RFC 9110 has it (a "token").
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class _WarnOnce:
    """Each odd user shape is logged once: ``(where, type name)`` pairs already logged, per
    limiter (bounded)."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, what: str, kind: type, exc: BaseException | None = None) -> None:
        # No user data in the message: only where it happened and the types involved.
        key = (what, kind.__qualname__)
        if key in self._seen or len(self._seen) >= 256:
            return
        self._seen.add(key)
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


def _identity_string(value: Any, attribute: str, kind: type, warn: _WarnOnce) -> str | None:
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool) or (
        not isinstance(value, int) and getattr(type(value), "__str__", None) is _OBJECT_STR
    ):
        # Integers, and ids whose type defines its own string form (UUIDs, ObjectIds, ...),
        # are identities; anything else would be a repr (with an address in it, a new "user"
        # per object) or a container's.
        warn(f"user.{attribute}", kind)
        return None
    else:
        try:
            text = str(value)
        except Exception as exc:  # a __str__ that raises, an int too long to convert
            warn(f"user.{attribute}", kind, exc)
            return None
        if not isinstance(text, str):
            return None
    if not text or len(text) > _MAX_USER_IDENTITY:
        warn(f"user.{attribute}", kind)
        return None
    return text


def user_identity(user: Any, warn: _WarnOnce | None = None) -> str | None:
    """A user object, id or name -> the string the user level is keyed on.

    Never raises: an attribute that raises or holds something that is not a string, integer
    or UUID is logged (once per type with the limiter's ``warn``, without the value) and the
    next attribute is tried; with none usable the user is anonymous (``None``)."""
    warn = warn if warn is not None else _WarnOnce()
    if user is None or isinstance(user, bool):
        return None
    if isinstance(user, (str, int, uuid.UUID)):
        return _identity_string(user, "self", type(user), warn)
    kind = type(user)
    for attribute in ("id", "user_id", "identity", "username", "email", "sub"):
        try:
            if isinstance(user, Mapping):
                value = user.get(attribute)
            else:
                value = getattr(user, attribute, None)
        except Exception as exc:
            warn(f"user.{attribute}", kind, exc)
            continue
        if value is None or callable(value):
            continue
        text = _identity_string(value, attribute, kind, warn)
        if text is not None:
            return text
    return None


class Identifier:
    """Works out the caller of one request: IP, API key, user, and the tiers of both.

    Args:
        client_ip: the client IP rule (trusted proxies, IPv6 grouping).
        api_key_header, api_key_query: where the API key is read.
        user_resolver, tier_resolver: the app's resolvers (sync or async), or ``None``.
        tiers, default_tier, user_tiers: the configured tiers and static assignments.
    """

    def __init__(
        self,
        *,
        client_ip: ClientIP,
        api_key_header: str | None,
        api_key_query: str | None,
        user_resolver: Resolver | None,
        tier_resolver: Resolver | None,
        tiers: Mapping[str, Tier] | None,
        default_tier: str,
        user_tiers: Any,
    ) -> None:
        if api_key_header is not None and (
            not isinstance(api_key_header, str) or not _TOKEN_RE.fullmatch(api_key_header)
        ):
            # Anything else (a space, a non-Latin-1 letter) could never match a header.
            raise ConfigurationError(
                "api_key_header", api_key_header, "must be an HTTP header name"
            )
        if api_key_query is not None and (not isinstance(api_key_query, str) or not api_key_query):
            raise ConfigurationError("api_key_query", api_key_query, "must be a parameter name")
        if tier_resolver is not None and tiers is None:
            raise ConfigurationError(
                "tier_resolver", tier_resolver, "needs tiers=... to name tiers from"
            )
        for name, value in (("user_resolver", user_resolver), ("tier_resolver", tier_resolver)):
            if value is not None and not callable(value):
                raise ConfigurationError(name, value, "must be a callable")
        self.client_ip = client_ip
        self._api_key_header = api_key_header.lower().encode("latin-1") if api_key_header else None
        self._api_key_query = api_key_query
        self._user_resolver = user_resolver
        self._tier_resolver = tier_resolver
        self.tiers = tiers
        self.default_tier = default_tier
        self.user_tiers = _user_tiers(user_tiers, tiers)
        #: Set by the limiter when tiers may be stored at run time.
        self.tier_store: TierStore | None = None
        self.warn = _WarnOnce()
        self._warned_tiers: set[str] = set()
        #: True when :meth:`identify_now` can stand in for :meth:`identify` (no resolvers and
        #: no tiers to look up): one coroutine less per request.
        self.sync = user_resolver is None and tier_resolver is None and tiers is None

    def identify_now(self, limiter: Any, scope: Scope) -> RequestContext:
        """:meth:`identify` without resolvers or tiers (see :attr:`sync`)."""
        # Positional: keyword arguments cost a measurable share of the call, per request.
        return RequestContext(
            limiter,
            self.client_ip(scope),
            self._api_key_of(scope),
            self._default_user(scope),
            None,
            "",
            None,
            1,
        )

    async def identify(self, limiter: Any, scope: Scope) -> RequestContext:
        """Who is calling: IP, API key, user and tiers (the endpoint and cost come next)."""
        if self._user_resolver is not None:
            try:
                resolved = self._user_resolver(HTTPConnection(scope))
                # Awaited only if it must be: a plain value costs no coroutine.
                if type(resolved) not in _PLAIN and inspect.isawaitable(resolved):
                    resolved = await resolved
            except Exception as exc:
                # A failing resolver must not fail the request: the caller is anonymous.
                self.warn("user_resolver()", type(self._user_resolver), exc)
                resolved = None
            if type(resolved) is str and 0 < len(resolved) <= _MAX_USER_IDENTITY:
                user: str | None = resolved  # what user_identity() would make of it
            else:
                user = user_identity(resolved, self.warn)
        else:
            user = self._default_user(scope)
        api_key = self._api_key_of(scope)
        tier: Tier | None = None
        key_tier: Tier | None = None
        if self.tiers is not None:
            if user is not None:
                tier = self.tier_named(await self._tier_name(scope, user))
            if api_key is not None and self.tier_store is not None:
                name = await self.tier_store.lookup("api_key", api_key)
                key_tier = self.tiers.get(name) if name is not None else None
                if name is not None and key_tier is None:
                    self._unknown_tier(name)
        return RequestContext(
            limiter, self.client_ip(scope), api_key, user, tier, "", None, 1, key_tier
        )

    async def _tier_name(self, scope: Scope, user: str) -> Any:
        """The resolver's word, then a tier stored at run time, then ``user_tiers``."""
        name = None
        if self._tier_resolver is not None:
            try:
                name = self._tier_resolver(HTTPConnection(scope))
                if type(name) not in _PLAIN and inspect.isawaitable(name):
                    name = await name
            except Exception as exc:
                # As for an unknown tier: the default tier applies, never a 500.
                self.warn("tier_resolver()", type(self._tier_resolver), exc)
                name = None
        if name is None and self.tier_store is not None:
            name = await self.tier_store.lookup("user", user)
        if name is None:
            name = self.user_tiers.get(user)
        return name

    def _default_user(self, scope: Scope) -> str | None:
        # request.state.user (set by an auth middleware), then Starlette's
        # AuthenticationMiddleware. No user object, however odd, may fail the request.
        state = scope.get("state")
        user = state.get("user") if isinstance(state, dict) else None
        if user is None:
            user = scope.get("user")
            if user is None:
                return None
            try:
                authenticated = bool(getattr(user, "is_authenticated", True))
            except Exception as exc:
                self.warn("user.is_authenticated", type(user), exc)
                return None
            if not authenticated:
                return None
        return user_identity(user, self.warn)

    def _api_key_of(self, scope: Scope) -> str | None:
        if self._api_key_header is None and self._api_key_query is None:
            return None
        # b"" matches no header: with only a query parameter configured, read only that.
        return api_key_from_scope(scope, self._api_key_header or b"", self._api_key_query)

    def tier_named(self, name: Any) -> Tier:
        """The tier called ``name``; the default tier for ``None`` or an unknown name."""
        assert self.tiers is not None
        if name is None:
            return self.tiers[self.default_tier]
        if not isinstance(name, str):
            name = str(name) if isinstance(name, int) and not isinstance(name, bool) else "?"
        tier = self.tiers.get(name)
        if tier is None:
            self._unknown_tier(name)
            return self.tiers[self.default_tier]
        return tier

    def _unknown_tier(self, name: str) -> None:
        # Once per name (bounded), never a 500: the default tier applies.
        if name not in self._warned_tiers and len(self._warned_tiers) < 1024:
            self._warned_tiers.add(name)
            logger.warning(
                "unknown tier {!r}: using the default tier {!r}", name[:64], self.default_tier
            )


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
        if not isinstance(tier, str) or tier not in tiers:
            raise ConfigurationError(
                f"user_tiers[{user!r}]", tier, f"is not one of the tiers ({', '.join(tiers)})"
            )
    return dict(value)
