"""Allow-lists and block-lists: users, API keys, IP addresses and CIDR ranges.

Entries live in the backend (every instance sees them) and are mirrored locally (see
:mod:`fastapi_ratelimit.control`), so checking a request costs no round trip. Allowed
identities skip rate limiting (and get no rate-limit headers); blocked ones get 403 and
consume nothing. A block wins over an allow.

Matching follows the same normalisation as bucketing, so no variant of an identity can be
both exempt and separately limited: users match exactly, API keys by the same hash the keys
use (raw keys are never stored), IPs by the client identity the trusted-proxy rules produce
(IPv4-mapped IPv6 is IPv4; IPv6 is bucketed per /64, so IPv6 entries must be /64 or wider).
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

from loguru import logger

from .context import RequestContext
from .control import ControlStore, Mirror, PollPolicy, live, live_json
from .errors import ConfigurationError, check_ttl
from .keys import KeyBuilder

__all__ = ["AccessLists", "ListEntry"]

ListName = Literal["allow", "block"]
Kind = Literal["ip", "user", "api_key"]
_KINDS = ("ip", "user", "api_key")
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ListEntry:
    """One allow- or block-list entry. ``value`` is normalised: a network for IPs
    (``"10.0.0.0/8"``, ``"203.0.113.7/32"``), the user id, or the API key's hash."""

    kind: str
    value: str
    reason: str = ""
    added_by: str = ""
    added_at: float = 0.0
    expires_at: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ListEntry | None:
        try:
            expires = data.get("expires_at")
            expires_at = None if expires is None else float(expires)
            added_at = float(data.get("added_at", 0.0))
            return cls(
                str(data["kind"]),
                str(data["value"]),
                str(data.get("reason", "")),
                str(data.get("added_by", "")),
                added_at if math.isfinite(added_at) else 0.0,
                # Stored before TTLs were checked: an infinite expiry is no expiry (and
                # would break every listing: JSON has no inf, gmtime() overflows).
                expires_at if expires_at is not None and math.isfinite(expires_at) else None,
            )
        except (KeyError, TypeError, ValueError, OverflowError):
            return None


class _Index:
    """What one list matches, rebuilt whenever its mirror changes."""

    __slots__ = ("api_keys", "generation", "networks", "users")

    def __init__(self) -> None:
        self.generation = -1
        self.users: dict[str, dict[str, Any]] = {}
        self.api_keys: dict[str, dict[str, Any]] = {}
        # (version, prefix length) -> {network as int: entry}
        self.networks: dict[tuple[int, int], dict[int, dict[str, Any]]] = {}

    def rebuild(self, entries: Mapping[str, dict[str, Any]], generation: int) -> None:
        self.users, self.api_keys, self.networks = {}, {}, {}
        for entry in entries.values():
            kind, value = entry.get("kind"), entry.get("value")
            if not isinstance(value, str):
                continue
            if kind == "user":
                self.users[value] = entry
            elif kind == "api_key":
                self.api_keys[value] = entry
            elif kind == "ip":
                try:
                    network = ipaddress.ip_network(value)
                except ValueError:
                    continue
                group = self.networks.setdefault((network.version, network.prefixlen), {})
                group[int(network.network_address)] = entry
        self.generation = generation

    def match(
        self, network: _Network | None, user: str | None, key_digest: str | None, now: float
    ) -> dict[str, Any] | None:
        if user is not None:
            entry = self.users.get(user)
            if entry is not None and live(entry, now):
                return entry
        if key_digest is not None:
            entry = self.api_keys.get(key_digest)
            if entry is not None and live(entry, now):
                return entry
        if network is not None:
            address = int(network.network_address)
            bits = network.max_prefixlen
            for (version, prefix), group in self.networks.items():
                # An entry applies when it covers the client's whole bucket.
                if version != network.version or prefix > network.prefixlen:
                    continue
                entry = group.get(address >> (bits - prefix) << (bits - prefix))
                if entry is not None and live(entry, now):
                    return entry
        return None


class AccessLists:
    """The allow- and block-lists of one limiter.

    Args:
        store: the backend (it must implement :class:`~fastapi_ratelimit.control.ControlStore`).
        keys: hashes API keys exactly as the rate-limit keys do.
        ipv6_prefix: the IPv6 bucketing prefix; IPv6 entries must be at least as wide.
        refresh_interval: seconds between background refreshes of the local copy.
        allow_any_network: accept ``0.0.0.0/0`` and ``::/0`` (refused by default).
        polling: the circuit breaker and health log the mirrors share with the limiter's
            other mirrors (see :class:`~fastapi_ratelimit.control.PollPolicy`).

    The mirrors start with the first request that :meth:`decide` sees; an instance that only
    writes entries (the CLI) never starts them.
    """

    def __init__(
        self,
        store: ControlStore,
        keys: KeyBuilder,
        *,
        ipv6_prefix: int = 64,
        refresh_interval: float = 0.5,
        allow_any_network: bool = False,
        polling: PollPolicy | None = None,
        mirrored: bool = True,
        static: Mapping[ListName, Sequence[str]] | None = None,
    ) -> None:
        self._keys = keys
        self._ipv6_prefix = ipv6_prefix
        self._allow_any = allow_any_network
        self._mirrors = {
            "allow": Mirror(store, "allow", refresh_interval, polling),
            "block": Mirror(store, "block", refresh_interval, polling),
        }
        self._allow, self._block = self._mirrors["allow"], self._mirrors["block"]
        self._indexes = {"allow": _Index(), "block": _Index()}
        self._store = store
        self._networks: dict[str, _Network | None] = {}
        #: Whether the stored lists apply (``access_lists=True``); else only the static ones.
        self.mirrored = mirrored
        # Entries from the constructor: in this process only, never stored or expiring.
        self._static = {"allow": _Index(), "block": _Index()}
        for name, values in (static or {}).items():
            entries = {}
            for value in values:
                kind, normalised = self.parse_entry(name, value)
                entries[f"{kind}:{normalised}"] = {"kind": kind, "value": normalised}
            self._static[name].rebuild(entries, 0)
        self._has_static = any(static.values()) if static else False

    # -- the hot path ------------------------------------------------------------------------

    def known_empty(self) -> bool:
        """No static entries, and both stored lists are loaded, refreshing, and empty."""
        if self._has_static:
            return False
        if not self.mirrored:
            return True
        allow, block = self._allow, self._block
        return allow.running and block.running and not allow.entries and not block.entries

    async def decide(self, context: RequestContext) -> ListName | None:
        """``"block"``, ``"allow"`` or ``None`` for this request."""
        allow, block = self._mirrors["allow"], self._mirrors["block"]
        if self.mirrored:
            await allow.ensure_loaded()
            await block.ensure_loaded()
            stored = bool(allow.entries or block.entries)
        else:
            stored = False
        if not stored and not self._has_static:
            return None
        now = time.time()
        network = self._network(context.ip)
        digest = self._keys.digest(context.api_key) if context.api_key is not None else None
        for name in ("block", "allow"):
            if self._static[name].match(network, context.user, digest, now) is not None:
                return "block" if name == "block" else "allow"
            if not stored:
                continue
            mirror = self._mirrors[name]
            if not mirror.entries:
                continue
            index = self._indexes[name]
            if index.generation != mirror.generation:
                index.rebuild(mirror.entries, mirror.generation)
            if index.match(network, context.user, digest, now) is not None:
                return "block" if name == "block" else "allow"
        return None

    def _network(self, ip: str) -> _Network | None:
        found = self._networks.get(ip, False)
        if found is not False:
            return found  # type: ignore[return-value]
        try:
            network: _Network | None = ipaddress.ip_network(ip)
        except ValueError:
            network = None  # "unknown"
        if len(self._networks) >= 4096:
            self._networks.clear()
        self._networks[ip] = network
        return network

    async def aclose(self) -> None:
        for mirror in self._mirrors.values():
            await mirror.aclose()

    # -- operator API ------------------------------------------------------------------------

    async def add(
        self,
        list_name: ListName,
        kind: Kind,
        value: str,
        *,
        reason: str = "",
        added_by: str = "",
        ttl: float | None = None,
    ) -> ListEntry:
        mirror = self._mirror(list_name)
        normalised = self.normalise(kind, value, list_name)
        ttl = check_ttl(ttl)
        now = time.time()
        entry = ListEntry(
            kind,
            normalised,
            str(reason)[:500],
            str(added_by)[:200],
            now,
            None if ttl is None else now + ttl,
        )
        await self._store.control_put(list_name, f"{kind}:{normalised}", entry.to_json())
        await mirror.refresh()  # this instance applies it at once
        logger.info(
            "ratelimit audit: {} add {} {} by {!r} (reason {!r}, ttl {})",
            list_name,
            kind,
            _shown(kind, normalised),
            added_by,
            reason,
            ttl,
        )
        return entry

    async def remove(self, list_name: ListName, kind: Kind, value: str, *, by: str = "") -> bool:
        mirror = self._mirror(list_name)
        normalised = self.normalise(kind, value, list_name)
        removed = await self._store.control_delete(list_name, [f"{kind}:{normalised}"])
        await mirror.refresh()  # this instance applies it at once
        logger.info(
            "ratelimit audit: {} remove {} {} by {!r} ({})",
            list_name,
            kind,
            _shown(kind, normalised),
            by,
            "removed" if removed else "not found",
        )
        return bool(removed)

    async def entries(
        self, list_name: ListName, *, include_expired: bool = False
    ) -> list[ListEntry]:
        self._mirror(list_name)
        _, raw = await self._store.control_load(list_name)
        now = time.time()
        found = []
        for value in raw.values():
            try:
                entry = ListEntry.from_mapping(json.loads(value))
            except ValueError:
                entry = None
            if entry is not None and (include_expired or live(asdict(entry), now)):
                found.append(entry)
        return sorted(found, key=lambda e: (e.kind, e.value))

    async def cleanup(self) -> int:
        """Delete expired entries from both lists; returns how many."""
        removed = 0
        now = time.time()
        for name in ("allow", "block"):
            _, raw = await self._store.control_load(name)
            stale = [key for key, value in raw.items() if not live_json(value, now)]
            if stale:
                removed += await self._store.control_delete(name, stale)
                await self._mirrors[name].refresh()
        if removed:
            logger.info("ratelimit audit: cleanup removed {} expired entries", removed)
        return removed

    def parse_entry(self, list_name: str, entry: object) -> tuple[Kind, str]:
        """``"ip:10.0.0.0/8"``, ``"user:alice"``, ``"api_key:..."`` (as the constructor's
        ``allow=``/``block=`` take them) -> ``(kind, stored form)``."""
        if not isinstance(entry, str) or entry.partition(":")[0] not in _KINDS:
            raise ConfigurationError(
                list_name,
                entry,
                "entries must be 'ip:<address or network>', 'user:<id>' or 'api_key:<key>'",
            )
        kind, _, value = entry.partition(":")
        return cast(Kind, kind), self.normalise(kind, value, list_name)

    def normalise(self, kind: str, value: str, list_name: str = "") -> str:
        """The stored form of an entry; raises ConfigurationError naming the list, the kind
        and what is wrong."""
        where = f"{list_name}-list " if list_name else ""
        if kind not in _KINDS:
            raise ConfigurationError(f"{where}kind", kind, f"must be one of {', '.join(_KINDS)}")
        field = f"{where}{kind} entry"
        if not isinstance(value, str) or not value or len(value) > 4096:
            raise ConfigurationError(field, value, "must be a non-empty string (at most 4096)")
        if kind == "user":
            return value
        if kind == "api_key":
            return self._keys.digest(value)
        return self._normalise_network(value.strip(), field)

    def _normalise_network(self, value: str, field: str) -> str:
        if "%" in value:
            # A zone id (fe80::1%eth0/64) names an interface, not addresses: dropped, as it
            # is from client addresses, so that one network has one stored form.
            head, _, tail = value.partition("%")
            _, slash, prefix = tail.partition("/")
            value = head + slash + prefix
        try:
            network = ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            meant = ""
            if "host bits" in str(exc):
                network = ipaddress.ip_network(value, strict=False)
                meant = f" (host bits are set: did you mean {network}?)"
            raise ConfigurationError(
                field, value, "is not an IP address or network" + meant
            ) from None
        if isinstance(network, ipaddress.IPv6Network):
            mapped = network.network_address.ipv4_mapped
            if mapped is not None and network.prefixlen >= 96:
                # ::ffff:10.0.0.0/104 is 10.0.0.0/8: match what the client identity becomes.
                network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
            elif network.prefixlen > self._ipv6_prefix:
                raise ConfigurationError(
                    field,
                    value,
                    f"IPv6 clients are bucketed per /{self._ipv6_prefix}: entries must be "
                    f"/{self._ipv6_prefix} or wider",
                )
        if network.prefixlen == 0 and not self._allow_any:
            raise ConfigurationError(
                field, value, "matches every address; pass allow_any_network=True to mean it"
            )
        return str(network)

    def _mirror(self, list_name: str) -> Mirror:
        mirror = self._mirrors.get(list_name)
        if mirror is None:
            raise ConfigurationError("list", list_name, "must be 'allow' or 'block'")
        return mirror


def _shown(kind: str, value: str) -> str:
    # Audit lines never carry API keys (the stored value is already a hash: show a prefix).
    return f"key#{value[:12]}" if kind == "api_key" else value
