"""Who is calling: the client IP (behind trusted proxies only) and the API key of a request.

Everything here reads the raw ASGI scope, because it runs on every request and building a
``Request`` object for it would cost more than the rate-limit check itself.

Client IP, the model being uvicorn's ``ProxyHeadersMiddleware``:

* The TCP peer (``scope["client"]``) is the only address nobody can forge. Forwarding headers
  (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``) are believed only when that peer is a
  configured :class:`TrustedProxies` entry; otherwise anyone could pick a fresh identity, and
  so a fresh rate-limit bucket, per request.
* Each proxy *appends* the address it received the request from, so the hops are walked from
  the right: trusted proxies are skipped, and the first untrusted hop is the client. The
  left-most entries were written by the client and prove nothing. When every hop is trusted,
  the request came from inside, and the left-most hop is the best answer.
* A malformed hop on the way means the chain cannot be believed past that point, so the
  identity falls back to the peer (the proxy): the sender of junk then shares the proxy's bucket
  instead of choosing its own.
* Only list headers that your proxy sets or overwrites. A header the proxy passes through
  untouched is written by the client, and the first configured header *present* wins.
* IPv6 clients are grouped by network (``/64`` by default): one host usually owns a whole
  ``/64`` and could otherwise rotate through 2**64 identities.

The API key is returned raw: :class:`~fastapi_ratelimit.KeyBuilder` hashes identities before
they reach any store. Never log it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from socket import inet_aton
from typing import Any
from urllib.parse import unquote

from .errors import ConfigurationError

__all__ = [
    "ClientIP",
    "QueryTooLong",
    "TrustedProxies",
    "api_key_from_scope",
    "ip_identity",
    "parse_ip",
]

_Address = IPv4Address | IPv6Address
_Network = IPv4Network | IPv6Network

#: The longest address text worth parsing: a bracketed IPv6 with a zone id and a port fits.
_MAX_ADDRESS_TEXT = 100
#: Only the right-most bytes of a forwarding header are parsed: a hostile header must cost O(1).
#: The cut is on the left, where the client writes; the hops that proxies append stay whole.
_MAX_HEADER_BYTES = 8192
#: No real proxy chain is longer: at most this many hops are walked from the right, and when
#: all of them are trusted proxies the identity falls back to the peer.
_MAX_HOPS = 32
#: Parsed peers and hops, keyed by their text. Emptied when full, so a flood of distinct
#: addresses costs re-parsing, never memory.
_CACHE_SIZE = 4096
#: Whole forwarding header values are remembered only up to this length, so that the chain
#: cache holds at most about 1 MiB.
_MAX_CACHED_CHAIN = 256
#: HTTP optional whitespace. Not str.strip(): that would also eat \x1c-\x1f, \x85 and \xa0.
_OWS = " \t"
#: A port, or an RFC 7239 obfuscated port such as ``_hidden``: either way the host is usable.
_PORT_RE = re.compile(r"[0-9]{1,5}|_[A-Za-z0-9._-]{1,32}")
_HEADERS = frozenset({"forwarded", "x-forwarded-for", "x-real-ip"})
#: IPv4 in exactly the form ``str(IPv4Address)`` writes: four decimal octets, no leading
#: zeros, nothing around them. Text that matches is its own identity (a property test holds
#: this to parse_ip and ip_identity).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
_IPV4_MAPPED = IPv6Network("::ffff:0:0/96")


def parse_ip(text: str) -> IPv4Address | IPv6Address | None:
    """Parse one address as found in a header or in ``scope["client"]``, or return ``None``.

    Lenient about the forms proxies really send: surrounding whitespace and double quotes,
    ``[::1]``, ports (``1.2.3.4:8080``, ``[2001:db8::1]:443``), zone ids (``fe80::1%eth0``).
    IPv4-mapped IPv6 (``::ffff:10.0.0.1``) becomes IPv4, so that a dual-stack socket and a
    header name the same client alike. Anything else (``unknown``, obfuscated identifiers such
    as ``_hidden``, garbage, over 100 characters) is ``None``.
    """
    if not isinstance(text, str):
        return None
    text = text.strip(_OWS)
    if len(text) > _MAX_ADDRESS_TEXT:
        return None
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1].strip(_OWS)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        if rest and not (rest[0] == ":" and _PORT_RE.fullmatch(rest, 1)):
            return None
        if ":" not in host:
            # Brackets are for IPv6 only; "[1.2.3.4]" is not something a proxy writes.
            return None
    elif text.count(":") == 1:
        # Exactly one colon: IPv4 with a port. (Bare IPv6 has at least two.)
        host, _, port = text.partition(":")
        if not _PORT_RE.fullmatch(port):
            return None
    else:
        host = text
    if ":" in host:
        # The zone id only means something on the proxy's host; it must not split one client
        # into several identities. "%25" is the URL-encoded form (RFC 6874).
        host = host.partition("%")[0]
    try:
        address = ip_address(host)
    except ValueError:
        return None
    if isinstance(address, IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
    return address


def ip_identity(address: IPv4Address | IPv6Address, ipv6_prefix: int = 64) -> str:
    """The rate-limit identity of an address.

    IPv4: the address (``"203.0.113.7"``). IPv6: its network of ``ipv6_prefix`` bits, compressed,
    with the prefix (``"2001:db8:1:2::/64"``), because one client usually owns a whole ``/64``.
    IPv4-mapped IPv6 counts as IPv4.
    """
    _check_ipv6_prefix(ipv6_prefix)
    return _identity(address, ipv6_prefix)


def _identity(address: _Address, ipv6_prefix: int) -> str:
    if isinstance(address, IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is None:
            shift = 128 - ipv6_prefix
            # IPv6Address(int) is much cheaper than building an IPv6Network, and drops any zone.
            network = IPv6Address(int(address) >> shift << shift)
            return f"{network.compressed}/{ipv6_prefix}"
        address = mapped
    return str(address)


def _check_ipv6_prefix(ipv6_prefix: object) -> None:
    # bool is an int, but ipv6_prefix=True is a mistake, not a /1.
    if isinstance(ipv6_prefix, bool) or not isinstance(ipv6_prefix, int):
        raise ConfigurationError("ipv6_prefix", ipv6_prefix, "must be an int from 1 to 128")
    if not 1 <= ipv6_prefix <= 128:
        raise ConfigurationError("ipv6_prefix", ipv6_prefix, "must be from 1 to 128")


class TrustedProxies:
    """Addresses and CIDR networks (IPv4 and IPv6) of proxies whose forwarding headers we
    believe.

    Entries are parsed once, strictly: a typo must fail at start-up, not silently trust nobody
    (or everybody). ``"*"`` is refused: trusting every peer lets every client name itself.
    """

    __slots__ = ("_networks", "_v4", "_v6")

    def __init__(self, proxies: Iterable[str] = ()) -> None:
        if isinstance(proxies, (str, bytes)):
            # A bare "10.0.0.1" would otherwise be iterated character by character.
            raise ConfigurationError(
                "trusted_proxies", proxies, "must be a list of addresses or networks, not a string"
            )
        try:
            entries = list(proxies)
        except TypeError:
            raise ConfigurationError(
                "trusted_proxies", proxies, "must be a list of addresses or networks"
            ) from None
        networks = [_parse_proxy(entry) for entry in entries]
        self._networks = tuple(dict.fromkeys(networks))
        self._v4 = _table(n for n in self._networks if isinstance(n, IPv4Network))
        self._v6 = _table(n for n in self._networks if isinstance(n, IPv6Network))

    def __contains__(self, address: IPv4Address | IPv6Address) -> bool:
        if isinstance(address, IPv6Address):
            mapped = address.ipv4_mapped
            if mapped is None:
                table = self._v6
            else:
                address, table = mapped, self._v4
        elif isinstance(address, IPv4Address):
            table = self._v4
        else:
            return False
        # One set lookup per distinct prefix length, however many proxies are listed.
        number = int(address)
        return any(number >> shift in prefixes for shift, prefixes in table)

    def contains_v4(self, dotted_quad: str) -> bool:
        """``parse_ip(dotted_quad) in self``, for text already known to be canonical IPv4."""
        table = self._v4
        if not table:
            return False
        number = int.from_bytes(inet_aton(dotted_quad), "big")
        return any(number >> shift in prefixes for shift, prefixes in table)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self._networks]!r})"


def _parse_proxy(entry: object) -> _Network:
    if not isinstance(entry, str):
        raise ConfigurationError("trusted_proxies", entry, "each entry must be a string")
    text = entry.strip()
    if text == "*":
        raise ConfigurationError(
            "trusted_proxies",
            entry,
            "'*' would let every client choose its own address; list the proxies' addresses"
            " or networks",
        )
    if "%" in text:
        raise ConfigurationError("trusted_proxies", entry, "zone ids are not supported")
    try:
        network = ip_network(text)
    except ValueError:
        try:
            loose = ip_network(text, strict=False)
        except ValueError:
            raise ConfigurationError(
                "trusted_proxies", entry, "is not an IP address or CIDR network"
            ) from None
        raise ConfigurationError(
            "trusted_proxies", entry, f"has host bits set; did you mean {loose}?"
        ) from None
    if isinstance(network, IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        # Addresses are canonicalised to IPv4, so the entry must be too.
        low = int(network.network_address) & 0xFFFFFFFF
        return IPv4Network((low, network.prefixlen - 96))
    return network


def _table(networks: Iterable[_Network]) -> tuple[tuple[int, frozenset[int]], ...]:
    by_shift: dict[int, set[int]] = {}
    for network in networks:
        shift = network.max_prefixlen - network.prefixlen
        by_shift.setdefault(shift, set()).add(int(network.network_address) >> shift)
    return tuple((shift, frozenset(by_shift[shift])) for shift in sorted(by_shift))


#: What a peer or hop text resolves to: (identity, is a trusted proxy).
_Resolved = tuple[str, bool]
#: Unparsable text; the empty identity is never produced for a real address.
_MALFORMED: _Resolved = ("", False)


class ClientIP:
    """Resolves the client IP identity of a request. Built once (configuration), called per
    request.

    ``headers`` lists the forwarding headers to read, in order of preference; only the first
    one present is read. List only headers your proxy sets or overwrites (see the module
    docstring). The default is ``X-Forwarded-For`` alone, which proxies append to: reading
    ``Forwarded`` first by default would let a client behind a proxy that passes it through
    (nginx does) choose its own identity. Never raises on request data; a request without a
    usable peer is ``"unknown"``.

    ``trust_unix_socket``: a request with no peer address at all (``scope["client"]`` is
    ``None``, as under ``uvicorn --uds``) came through a local proxy on a Unix socket, whose
    forwarding headers are then read as a trusted proxy's. Off by default: only turn it on
    when nothing but your proxy can connect to the socket.
    """

    __slots__ = (
        "_cache",
        "_chains",
        "_headers",
        "_ipv6_prefix",
        "_proxies",
        "_trust_unix_socket",
        "_wanted",
    )

    def __init__(
        self,
        *,
        trusted_proxies: Iterable[str] = (),
        ipv6_prefix: int = 64,
        headers: Sequence[str] = ("x-forwarded-for",),
        trust_unix_socket: bool = False,
    ) -> None:
        _check_ipv6_prefix(ipv6_prefix)
        if not isinstance(trust_unix_socket, bool):
            raise ConfigurationError("trust_unix_socket", trust_unix_socket, "must be a bool")
        self._trust_unix_socket = trust_unix_socket
        if isinstance(headers, (str, bytes)) or not isinstance(headers, Iterable):
            raise ConfigurationError(
                "forwarded_headers", headers, "must be a list of header names (empty: none)"
            )
        names: list[str] = []
        for header in headers:
            name = header.lower() if isinstance(header, str) else ""
            if name not in _HEADERS:
                raise ConfigurationError(
                    "forwarded_headers",
                    header,
                    "must be one of 'forwarded', 'x-forwarded-for', 'x-real-ip'",
                )
            if name not in names:
                names.append(name)
        self._proxies = TrustedProxies(trusted_proxies)
        self._ipv6_prefix = ipv6_prefix
        # ASGI header names are lower-case bytes.
        self._headers = tuple(name.encode("ascii") for name in names)
        self._wanted = frozenset(self._headers)
        self._cache: dict[str, _Resolved] = {}
        self._chains: dict[tuple[bytes, bytes], str] = {}

    def __call__(self, scope: Mapping[str, Any]) -> str:
        client = scope.get("client")
        if not client:
            if client is None and self._trust_unix_socket:
                # No peer address: the trusted local proxy on the Unix socket.
                try:
                    return self._forwarded(scope, "unknown")
                except (TypeError, ValueError, AttributeError):
                    return "unknown"
            return "unknown"
        try:
            host = client[0]
        except (TypeError, LookupError):
            return "unknown"
        if not isinstance(host, str):
            return "unknown"
        resolved = self._cache.get(host)
        if resolved is None:
            resolved = self._resolve(host)
        identity, trusted = resolved
        if not trusted:
            # The common case: no proxy in front, one dict lookup.
            return identity or "unknown"
        try:
            return self._forwarded(scope, identity)
        except (TypeError, ValueError, AttributeError):
            # A malformed scope (not bytes, not pairs): request data must never raise.
            return identity

    def __repr__(self) -> str:
        headers = [h.decode("ascii") for h in self._headers]
        return (
            f"ClientIP(trusted_proxies={self._proxies!r}, ipv6_prefix={self._ipv6_prefix},"
            f" headers={headers!r}, trust_unix_socket={self._trust_unix_socket})"
        )

    def _resolve(self, text: str) -> _Resolved:
        if _DOTTED_QUAD.fullmatch(text) is not None:
            # Canonical IPv4, by far the most common peer: its text is its identity, with
            # no ipaddress objects to build and nothing cached (a cache that thousands of
            # clients churn misses anyway, and every entry it drops is GC work).
            return text, self._proxies.contains_v4(text)
        address = parse_ip(text)
        if address is None:
            resolved = _MALFORMED
        else:
            resolved = (_identity(address, self._ipv6_prefix), address in self._proxies)
        if len(text) <= _MAX_ADDRESS_TEXT:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[text] = resolved
        return resolved

    def _forwarded(self, scope: Mapping[str, Any], peer: str) -> str:
        raw_headers = scope.get("headers")
        if not raw_headers:
            return peer
        wanted = self._wanted
        lines: dict[bytes, list[bytes]] = {}
        for name, value in raw_headers:
            if name in wanted:
                lines.setdefault(name, []).append(value)
        for name in self._headers:
            values = lines.get(name)
            if values is not None:
                return self._walk(name, values, peer)
        return peer

    def _walk(self, name: bytes, values: list[bytes], peer: str) -> str:
        # Only the right-most _MAX_HEADER_BYTES are read. Proxies append on the right, so the
        # bytes beyond that limit are on the left, where the client writes: a limit that
        # ignored the whole header would let a client pad its own part until it shares the
        # proxy's bucket. Lines are joined with "," from the right until there is enough.
        if len(values) == 1:
            raw = values[0]
        else:
            pieces: list[bytes] = []
            size = -1
            for value in reversed(values):
                pieces.append(value)
                size += len(value) + 1
                if size > _MAX_HEADER_BYTES:
                    break
            pieces.reverse()
            raw = b",".join(pieces)
        complete = len(raw) <= _MAX_HEADER_BYTES
        if not complete:
            # One byte more than the limit: when it is a comma, the first hop is whole. Else
            # the left-most hop was cut and is dropped.
            raw = raw[-(_MAX_HEADER_BYTES + 1) :]
            raw = raw[raw.find(b",") + 1 :] if b"," in raw else b""
        # Behind a proxy this is the common path, and a client sends the same chain again and
        # again: remember the outcome per header value ("" meaning "the peer").
        key = (name, raw)
        identity = self._chains.get(key) if complete else None
        if identity is None:
            identity = self._client_from_hops(name, raw.decode("latin-1"), complete)
            if complete and len(raw) <= _MAX_CACHED_CHAIN:
                if len(self._chains) >= _CACHE_SIZE:
                    self._chains.clear()
                self._chains[key] = identity
        return identity or peer

    def _client_from_hops(self, name: bytes, text: str, complete: bool = True) -> str:
        """The client identity of one header's (joined) value; "" means "fall back to the peer".

        ``complete`` is False when ``text`` holds only the right-most hops of a longer value.
        """
        if name == b"x-real-ip" and (not complete or "," in text):
            # One address by definition. Several lines were joined with ",", so this also
            # catches a list: someone appended to a header that must not be appended to.
            return ""
        # rsplit leaves at most _MAX_HOPS + 1 parts; a left-over part means "too many hops".
        parts = text.rsplit(",", _MAX_HOPS)
        forwarded = name == b"forwarded"
        cache = self._cache
        identity = ""
        for part in reversed(parts[-_MAX_HOPS:]):
            # Forwarded elements are parsed lazily: the walk usually stops at the first one.
            hop = _forwarded_for(part) if forwarded else part
            if hop is None:
                return ""
            resolved = cache.get(hop)
            if resolved is None:
                resolved = self._resolve(hop)
            identity, trusted = resolved
            if not identity or not trusted:
                # Malformed (""): stop here. Untrusted: this is the client.
                return identity
        if len(parts) > _MAX_HOPS or not complete:
            # Only trusted hops were read, and there are more further left: no answer.
            return ""
        # Every hop is a trusted proxy: the request came from inside; the left-most is the client.
        return identity


def _forwarded_for(element: str) -> str | None:
    """The ``for=`` value of one RFC 7239 forwarded-element, or ``None`` if it has none."""
    found: str | None = None
    for pair in element.split(";"):
        key, sep, value = pair.partition("=")
        if not sep:
            if pair.strip(_OWS):
                return None
            continue
        if key.strip(_OWS).lower() == "for":
            if found is not None:
                # RFC 7239: a parameter must not occur twice in one element.
                return None
            found = value
    return found


#: Longest query string read for an API key (when a query parameter carries one): far above
#: what servers and proxies accept in a request line (h11: 16 KiB for the whole head).
MAX_QUERY_BYTES = 64 * 1024


#: The 400's detail for :class:`QueryTooLong`.
QUERY_TOO_LONG = "The query string is too long."


class QueryTooLong(ValueError):
    """The query string is longer than :data:`MAX_QUERY_BYTES` and may carry the API key: the
    request is refused (400) rather than limited without its key."""


def api_key_from_scope(
    scope: Mapping[str, Any], header: bytes = b"x-api-key", query_param: str | None = None
) -> str | None:
    """The API key of a request: the ``header`` (first occurrence, stripped), else -- only when
    ``query_param`` is given -- that query parameter. ``None`` when absent or empty.

    The query parameter's value is the one Starlette and FastAPI hand the endpoint: the *last*
    occurrence, decoded as they decode it, so a decoy before the real key counts for nothing.
    Every field is read, however many there are; a query string over
    :data:`MAX_QUERY_BYTES` raises :class:`QueryTooLong`.

    Query parameters are opt-in because they end up in access logs and browser history. The
    value is returned as sent: the key builder hashes it before it reaches any store. Never log it.
    """
    name = header.lower()
    try:
        for key, value in scope.get("headers") or ():
            if key == name:
                text: str = value.decode("latin-1").strip(_OWS)
                if text:
                    return text
                break
    except (TypeError, ValueError, AttributeError):
        pass
    if query_param is None:
        return None
    query_string = scope.get("query_string")
    if not query_string or not isinstance(query_string, bytes):
        return None
    if len(query_string) > MAX_QUERY_BYTES:
        raise QueryTooLong(len(query_string))
    # What starlette.datastructures.QueryParams does (parse_qsl, keep_blank_values=True, and
    # the last value wins), read from the right so the first match is the answer.
    for field in reversed(query_string.decode("latin-1").split("&")):
        raw_name, _, raw_value = field.partition("=")
        if _unquote(raw_name) == query_param:
            return _unquote(raw_value).strip(_OWS) or None
    return None


def _unquote(text: str) -> str:
    if "%" not in text and "+" not in text:
        return text
    return unquote(text.replace("+", " "))
