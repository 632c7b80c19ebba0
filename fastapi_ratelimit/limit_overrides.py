"""One level's limit changed at run time, on every instance, without a restart.

An operator sets, say, the IP level to ``200/minute`` or one endpoint's limit
(``limiter.operator.set_limit(...)``, the admin API, ``fastapi-ratelimit limit set``). The new
rate is stored in the backend (namespace ``limits``) and mirrored by every instance built
with ``RateLimiter(limit_overrides=True)``, like the allow/block lists, so it applies everywhere
within ``refresh_interval`` plus a round trip. The changed policy keeps the level's name,
algorithm and storage bucket: counters carry over, nothing is reset.

Targets are the levels a limiter was built with: ``global``, ``ip``, ``api_key``, ``user``
(``user_limit``, not tiers) and ``endpoint`` with one key of ``endpoint_limits``. A stored rate
this instance cannot apply (a level it doesn't have, a burst its algorithm has no use for) is
ignored, with one warning: the configured limit stays in force.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from loguru import logger

from .backends.base import Check
from .control import ControlStore, Mirror, PollPolicy
from .errors import ConfigurationError
from .policy import Policy
from .rate import parse_rate

__all__ = [
    "NAMESPACE",
    "LimitOverrides",
    "changed_policy",
    "store_limit",
    "stored_limits",
    "target_key",
]

NAMESPACE = "limits"
LEVELS = ("global", "ip", "api_key", "user", "endpoint")


def target_key(level: str, endpoint: str | None = None) -> str:
    """The stored key of a level: ``"ip"``, or ``"endpoint:POST /ocr/process"``."""
    if level not in LEVELS:
        raise ConfigurationError("level", level, f"must be one of {', '.join(LEVELS)}")
    if level == "endpoint":
        if not isinstance(endpoint, str) or not endpoint:
            raise ConfigurationError(
                "endpoint", endpoint, "name the endpoint_limits entry, e.g. 'POST /ocr/process'"
            )
        return f"endpoint:{endpoint}"
    if endpoint is not None:
        raise ConfigurationError("endpoint", endpoint, "only applies to the endpoint level")
    return level


def changed_policy(policy: Policy, rate: Any) -> Policy:
    """``policy`` at a new rate: same name, algorithm and bucket, so counters carry over.
    Raises :class:`ConfigurationError` naming ``rate`` for anything that is not a valid rate
    for this policy."""
    parsed = parse_rate(rate, field_name="rate")
    try:
        return Policy(policy.name, parsed, policy.algorithm, bucket=policy.bucket)
    except ConfigurationError as exc:
        raise ConfigurationError("rate", rate, exc.reason) from None


async def store_limit(store: ControlStore, key: str, rate: str, *, by: str = "") -> None:
    """Store a (syntactically checked) rate for a level; every mirroring instance applies it."""
    parse_rate(rate, field_name="rate")
    entry = {"rate": rate.strip(), "set_by": str(by)[:200], "set_at": time.time()}
    await store.control_put(NAMESPACE, key, json.dumps(entry, separators=(",", ":")))
    logger.info("ratelimit audit: limit {} = {} by {!r}", key, rate, by)


async def clear_limit(store: ControlStore, key: str, *, by: str = "") -> bool:
    """Remove a level's changed rate (it goes back to the configured one everywhere); returns
    whether one was stored."""
    removed = await store.control_delete(NAMESPACE, [key])
    logger.info("ratelimit audit: limit {} restored by {!r}", key, by)
    return bool(removed)


class LimitOverrides:
    """The changed limits of one limiter: a mirror of the ``limits`` namespace, and the
    configured policies they replace."""

    def __init__(
        self,
        store: ControlStore,
        levels: Mapping[str, Policy],
        refresh_interval: float,
        polling: PollPolicy | None = None,
    ) -> None:
        self._store = store
        #: target key -> the policy configured for it.
        self.levels = dict(levels)
        self._mirror = Mirror(store, NAMESPACE, refresh_interval, polling)
        #: id(configured policy) -> the policy in force; empty while nothing is changed.
        self._in_force: dict[int, Policy] = {}
        self._generation = -1
        self._warned: set[tuple[str, str]] = set()

    async def apply(self, checks: Sequence[Check]) -> Sequence[Check]:
        """``checks`` with every changed level at its new rate (the same list when nothing
        is changed: the usual case costs a dict lookup)."""
        mirror = self._mirror
        if not mirror.running:
            await mirror.ensure_loaded()
        if mirror.generation != self._generation:
            self._rebuild()
        in_force = self._in_force
        if not in_force:
            return checks
        changed: list[Check] = []
        for check in checks:
            policy = in_force.get(id(check.policy))
            changed.append(check if policy is None else check._replace(policy=policy))
        return changed

    def _rebuild(self) -> None:
        self._generation = self._mirror.generation
        in_force: dict[int, Policy] = {}
        for key, entry in self._mirror.entries.items():
            configured = self.levels.get(key)
            if configured is None:
                continue  # a level this instance does not have
            rate = entry.get("rate")
            try:
                in_force[id(configured)] = changed_policy(configured, rate)
            except ConfigurationError as exc:
                # Stored by a CLI that could not know this level's algorithm: keep the
                # configured limit, and say so once.
                if (key, str(rate)) not in self._warned and len(self._warned) < 1024:
                    self._warned.add((key, str(rate)))
                    logger.warning("ignoring the stored limit for {}: {}", key, exc)
        self._in_force = in_force

    async def set(self, key: str, rate: str, *, by: str = "") -> None:
        configured = self.levels.get(key)
        if configured is None:
            known = ", ".join(self.levels) or "none"
            raise ConfigurationError("level", key, f"is not a level of this limiter ({known})")
        changed_policy(configured, rate)  # refused here, before anything is stored
        await store_limit(self._store, key, rate, by=by)
        await self._mirror.refresh()  # this instance applies it at once

    async def clear(self, key: str, *, by: str = "") -> bool:
        removed = await clear_limit(self._store, key, by=by)
        await self._mirror.refresh()
        return removed

    async def entries(self) -> dict[str, dict[str, Any]]:
        """The stored limits, as every instance will apply them."""
        return await stored_limits(self._store)

    async def aclose(self) -> None:
        await self._mirror.aclose()


def _parsed(raw: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for key, value in sorted(raw.items()):
        try:
            entry = json.loads(value)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries[key] = entry
    return entries


async def stored_limits(store: ControlStore) -> dict[str, dict[str, Any]]:
    """The stored limits (for the CLI, which has no limiter)."""
    _, raw = await store.control_load(NAMESPACE)
    return _parsed(raw)
