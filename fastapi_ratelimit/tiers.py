"""Subscription tiers: each a per-user policy and a cost multiplier.

The defaults are the seed document's figures (burst / sustained): Free 100 / 1 per second,
Basic 500 / 10, Pro 2000 / 50, Enterprise 10000 / 200, as token buckets.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from loguru import logger

from .control import ControlStore, Mirror, PollPolicy, live
from .errors import ConfigurationError, check_ttl
from .keys import KeyBuilder
from .policy import Algorithm, Policy
from .rate import Rate, parse_rate

__all__ = ["DEFAULT_TIERS", "Tier", "TierStore", "build_tiers"]


_TIER_NAME = re.compile(r"[a-z0-9][a-z0-9_\-]{0,31}")


@dataclass(frozen=True, slots=True)
class Tier:
    """A subscription tier.

    Args:
        name: lower-case name (``"free"``); the user level's policy is named ``user-<name>``.
        rate: the per-user rate (``"1/second;burst=100"`` or a :class:`Rate`).
        algorithm: how it is enforced (default: token bucket, so ``burst`` applies).
        cost_multiplier: request costs are multiplied by this (rounded up), e.g. 0.5 for a
            tier whose calls count half.
    """

    name: str
    rate: Rate | str
    algorithm: Algorithm = Algorithm.TOKEN_BUCKET
    cost_multiplier: float = 1.0
    policy: Policy = field(init=False, repr=False, compare=False)
    #: The same rate for the API-key level, when a tier is stored for a key.
    key_policy: Policy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TIER_NAME.fullmatch(self.name):
            raise ConfigurationError(
                "tier.name", self.name, "must be 1-32 lower-case letters, digits, '_' or '-'"
            )
        rate = self.rate
        if isinstance(rate, str):
            rate = parse_rate(rate, field_name=f"tier {self.name!r}: rate")
            object.__setattr__(self, "rate", rate)
        multiplier = self.cost_multiplier
        if (
            isinstance(multiplier, bool)
            or not isinstance(multiplier, (int, float))
            or not (0 < multiplier <= 1000)
        ):
            raise ConfigurationError(
                f"tier {self.name!r}: cost_multiplier", multiplier, "must be a number in (0, 1000]"
            )
        # One bucket for every tier: changing a user's tier keeps their counters.
        policy = Policy(f"user-{self.name}", rate, self.algorithm, bucket="user")
        object.__setattr__(self, "policy", policy)
        key_policy = Policy(f"api_key-{self.name}", rate, self.algorithm, bucket="api_key")
        object.__setattr__(self, "key_policy", key_policy)


DEFAULT_TIERS: Mapping[str, Tier] = {
    tier.name: tier
    for tier in (
        Tier("free", "1/second;burst=100"),
        Tier("basic", "10/second;burst=500"),
        Tier("pro", "50/second;burst=2000"),
        Tier("enterprise", "200/second;burst=10000"),
    )
}


def build_tiers(
    tiers: Mapping[str, Tier | str],
    default_tier: str,
    algorithm: Algorithm = Algorithm.TOKEN_BUCKET,
) -> dict[str, Tier]:
    """Validate a tier table: values are Tiers or rate strings (enforced with ``algorithm``,
    the limiter's default); ``default_tier`` must exist."""
    if not isinstance(tiers, Mapping) or not tiers:
        raise ConfigurationError("tiers", tiers, "must be a non-empty mapping of name to Tier")
    built: dict[str, Tier] = {}
    for name, tier in tiers.items():
        if isinstance(tier, str):
            rate = parse_rate(tier, field_name=f"tiers[{name!r}]")
            if rate.burst is not None and not algorithm.uses_burst:
                raise ConfigurationError(
                    f"tiers[{name!r}]",
                    tier,
                    f"has a burst, which the limiter's algorithm ({algorithm}) has no use "
                    "for: pass algorithm='token_bucket' or 'gcra', or a Tier",
                )
            tier = Tier(name, rate, algorithm)
        if not isinstance(tier, Tier):
            raise ConfigurationError(f"tiers[{name!r}]", tier, "must be a Tier or a rate string")
        if tier.name != name:
            raise ConfigurationError(
                f"tiers[{name!r}]", tier.name, "the key must be the tier's name"
            )
        built[name] = tier
    if not isinstance(default_tier, str) or default_tier not in built:
        raise ConfigurationError(
            "default_tier", default_tier, f"is not one of the tiers ({', '.join(built)})"
        )
    return built


class TierStore:
    """Tiers set for users or API keys at runtime (``set_tier`` after an upgrade), kept in the
    backend and mirrored locally like the access lists: every instance applies a change
    within ``refresh_interval`` + one round trip, and counters are never reset (every tier of
    a level shares one bucket)."""

    def __init__(
        self,
        store: ControlStore,
        keys: KeyBuilder,
        refresh_interval: float,
        polling: PollPolicy | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self._mirror = Mirror(store, "tiers", refresh_interval, polling)

    async def aclose(self) -> None:
        await self._mirror.aclose()

    def _entry_key(self, kind: str, identity: str) -> str:
        if kind == "user":
            return f"user:{identity}"
        if kind == "api_key":
            return f"api_key:{self._keys.digest(identity)}"
        raise ConfigurationError("kind", kind, "must be 'user' or 'api_key'")

    async def lookup(self, kind: Literal["user", "api_key"], identity: str) -> str | None:
        """The stored tier name, from the local copy (no round trip on the hot path)."""
        await self._mirror.ensure_loaded()
        entries = self._mirror.entries
        if not entries:
            return None
        entry = entries.get(self._entry_key(kind, identity))
        if entry is None or not live(entry, time.time()):
            return None
        tier = entry.get("tier")
        return tier if isinstance(tier, str) else None

    async def get(self, kind: Literal["user", "api_key"], identity: str) -> dict[str, Any] | None:
        _, raw = await self._store.control_load("tiers")
        value = raw.get(self._entry_key(kind, identity))
        if value is None:
            return None
        try:
            entry = json.loads(value)
        except ValueError:
            return None
        return entry if isinstance(entry, dict) and live(entry, time.time()) else None

    async def set(
        self,
        kind: Literal["user", "api_key"],
        identity: str,
        tier: str,
        *,
        ttl: float | None = None,
        by: str = "",
    ) -> None:
        ttl = check_ttl(ttl)
        now = time.time()
        entry = {
            "tier": tier,
            "set_by": str(by)[:200],
            "set_at": now,
            "expires_at": None if ttl is None else now + ttl,
        }
        key = self._entry_key(kind, identity)
        await self._store.control_put("tiers", key, json.dumps(entry, separators=(",", ":")))
        await self._mirror.refresh()  # this instance applies it at once
        logger.info(
            "ratelimit audit: tier {} {} = {} by {!r} (ttl {})", kind, _shown(key), tier, by, ttl
        )

    async def clear(self, kind: Literal["user", "api_key"], identity: str, *, by: str = "") -> bool:
        key = self._entry_key(kind, identity)
        removed = await self._store.control_delete("tiers", [key])
        await self._mirror.refresh()  # this instance applies it at once
        logger.info("ratelimit audit: tier {} {} cleared by {!r}", kind, _shown(key), by)
        return bool(removed)


def _shown(entry_key: str) -> str:
    kind, _, value = entry_key.partition(":")
    return f"key#{value[:12]}" if kind == "api_key" else value
