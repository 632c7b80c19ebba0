from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fastapi_ratelimit import ConfigurationError
from fastapi_ratelimit.identity import (
    _DOTTED_QUAD,
    ClientIP,
    QueryTooLong,
    TrustedProxies,
    api_key_from_scope,
    ip_identity,
    parse_ip,
)

PROXIES = ["10.0.0.0/8", "192.168.1.1", "2001:db8:ffff::/48", "::1"]


def make_scope(
    client: Any = ("203.0.113.7", 1234),
    headers: Sequence[tuple[str, str]] = (),
    query_string: bytes = b"",
) -> dict[str, Any]:
    return {
        "type": "http",
        "client": client,
        "headers": [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers],
        "query_string": query_string,
    }


ALL_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def resolve(
    peer: str,
    sent: Sequence[tuple[str, str]] = (),
    trusted: Sequence[str] = PROXIES,
    **kwargs: Any,
) -> str:
    """The identity ClientIP(trusted_proxies=trusted, **kwargs) gives ``peer`` sending ``sent``.
    All three forwarding headers are read here unless a test says otherwise."""
    kwargs.setdefault("headers", ALL_HEADERS)
    return ClientIP(trusted_proxies=trusted, **kwargs)(make_scope((peer, 1234), sent))


# -- parse_ip ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        ("  1.2.3.4\t", "1.2.3.4"),
        ('"1.2.3.4"', "1.2.3.4"),
        (' " 1.2.3.4 " ', "1.2.3.4"),
        ("1.2.3.4:8080", "1.2.3.4"),
        ('"1.2.3.4:8080"', "1.2.3.4"),
        ("1.2.3.4:_hidden", "1.2.3.4"),  # RFC 7239 obfuscated port
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[::1]:443", "::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ('"[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("[fe80::1%eth0]:80", "fe80::1"),
        ("[fe80::1%25eth0]", "fe80::1"),  # RFC 6874 URL-encoded zone id
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("::ffff:a00:1", "10.0.0.1"),
        ("[::ffff:10.0.0.1]:80", "10.0.0.1"),
        ("", None),
        ("   ", None),
        ('""', None),
        ("unknown", None),
        ("_hidden", None),
        ("_SEVKISEK", None),
        ("not-an-ip", None),
        ("example.com", None),
        ("example.com:80", None),
        ("1.2.3", None),
        ("1.2.3.4.5", None),
        ("256.1.1.1", None),
        ("010.0.0.1", None),  # leading zeros are ambiguous (octal?)
        ("1.2.3.4:", None),
        ("1.2.3.4:port", None),
        ("1.2.3.4:123456", None),
        ("1.2.3.4%eth0", None),
        ("[1.2.3.4]", None),
        ("[::1", None),
        ("[::1]x", None),
        ("[::1]:", None),
        ("[::1]:abc", None),
        ('"1.2.3.4', None),
        ("1.2.3.4\x00", None),
        ("1.2.3.4\r\n", None),
        ("\xa01.2.3.4", None),
        ("١.٢.٣.٤", None),  # non-ASCII digits
        ("1.2.3.4, 5.6.7.8", None),
        ("1" * 101, None),
        (" " * 200 + "1.2.3.4", "1.2.3.4"),
        ("::1" + " " * 98 + "x", None),
    ],
)
def test_parse_ip(text: str, expected: str | None) -> None:
    result = parse_ip(text)
    if expected is None:
        assert result is None
    else:
        assert result == ip_address(expected)


def test_parse_ip_drops_the_zone_so_addresses_compare_equal() -> None:
    zoned = parse_ip("fe80::1%eth0")
    assert zoned == parse_ip("fe80::1")
    assert isinstance(zoned, IPv6Address)
    assert zoned.scope_id is None


def test_parse_ip_canonicalises_mapped_addresses_to_ipv4() -> None:
    assert type(parse_ip("::ffff:10.0.0.1")) is IPv4Address


# -- ip_identity -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "prefix", "expected"),
    [
        ("203.0.113.7", 64, "203.0.113.7"),
        ("203.0.113.7", 128, "203.0.113.7"),
        ("203.0.113.7", 1, "203.0.113.7"),
        ("::ffff:203.0.113.7", 64, "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2::", 64, "2001:db8:1:2::/64"),
        ("2001:db8::1", 128, "2001:db8::1/128"),
        ("2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:3:4:5:6", 56, "2001:db8:1::/56"),
        ("2001:db8:1:ff00::1", 56, "2001:db8:1:ff00::/56"),
        ("2001:db8:1:2:3:4:5:6", 1, "::/1"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("::1", 64, "::/64"),
        ("::1", 128, "::1/128"),
    ],
)
def test_ip_identity(address: str, prefix: int, expected: str) -> None:
    assert ip_identity(ip_address(address), prefix) == expected


def test_ip_identity_default_prefix_is_64() -> None:
    assert ip_identity(IPv6Address("2001:db8:1:2:3:4:5:6")) == "2001:db8:1:2::/64"


@pytest.mark.parametrize("prefix", [0, 129, -1, True, 64.0, "64", None])
def test_ip_identity_rejects_bad_prefixes(prefix: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        ip_identity(IPv6Address("::1"), prefix)
    assert info.value.field == "ipv6_prefix"


# -- TrustedProxies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("proxies", "address", "expected"),
    [
        (["10.0.0.0/8"], "10.0.0.1", True),
        (["10.0.0.0/8"], "10.255.255.255", True),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["10.0.0.0/8"], "::ffff:10.0.0.1", True),
        (["10.0.0.0/8"], "::ffff:11.0.0.1", False),
        (["10.0.0.0/8"], "::a00:1", False),  # IPv4-compatible, not mapped: a different address
        (["127.0.0.1"], "127.0.0.1", True),
        (["127.0.0.1"], "127.0.0.2", False),
        (["127.0.0.1"], "::ffff:127.0.0.1", True),
        (["127.0.0.1/32"], "127.0.0.1", True),
        (["::ffff:127.0.0.1"], "127.0.0.1", True),
        (["::ffff:10.0.0.0/104"], "10.1.2.3", True),
        (["::ffff:10.0.0.0/104"], "::ffff:10.1.2.3", True),
        (["::ffff:10.0.0.0/104"], "11.1.2.3", False),
        (["::1"], "::1", True),
        (["::1"], "::2", False),
        (["::1"], "127.0.0.1", False),
        (["2001:db8::/32"], "2001:db8:1234::1", True),
        (["2001:db8::/32"], "2001:db9::1", False),
        (["2001:db8::/32"], "fe80::1%eth0", False),
        (["fe80::/10"], "fe80::1%eth0", True),
        (["2001:DB8:0::/32"], "2001:db8::1", True),
        (["0.0.0.0/0"], "198.51.100.1", True),  # explicit, so allowed
        (["0.0.0.0/0"], "2001:db8::1", False),
        (["::/0"], "2001:db8::1", True),
        (["10.0.0.0/8", "192.168.0.0/16", "172.16.0.0/12"], "172.31.0.1", True),
        (["10.0.0.0/8", "192.168.0.0/16", "172.16.0.0/12"], "172.32.0.1", False),
        (["10.0.0.0/8", "10.0.0.0/8", " 10.0.0.1 "], "10.9.9.9", True),
        (["10.0.0.0/255.0.0.0"], "10.1.1.1", True),
        ([], "10.0.0.1", False),
        ((), "::1", False),
    ],
)
def test_trusted_proxies_membership(proxies: Any, address: str, expected: bool) -> None:
    assert (ip_address(address) in TrustedProxies(proxies)) is expected


def test_trusted_proxies_accepts_any_iterable_and_is_truthy_when_not_empty() -> None:
    assert not TrustedProxies()
    assert not TrustedProxies([])
    assert TrustedProxies(p for p in ["10.0.0.0/8"])
    assert TrustedProxies(("::1",))
    assert "10.0.0.0/8" in repr(TrustedProxies(["10.0.0.0/8"]))


def test_trusted_proxies_membership_of_non_addresses_is_false() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert "10.0.0.1" not in proxies  # type: ignore[operator]
    assert None not in proxies  # type: ignore[operator]


@pytest.mark.parametrize(
    ("proxies", "bad", "reason"),
    [
        (["10.0.0.1/8"], "10.0.0.1/8", "host bits"),
        (["10.0.0.0/8", "2001:db8::1/32"], "2001:db8::1/32", "host bits"),
        (["*"], "*", "every client"),
        ([" * "], " * ", "every client"),
        (["not-an-ip"], "not-an-ip", "not an IP"),
        (["10.0.0.0/8", "localhost"], "localhost", "not an IP"),
        ([""], "", "not an IP"),
        (["10.0.0.0/33"], "10.0.0.0/33", "not an IP"),
        (["[::1]"], "[::1]", "not an IP"),
        (["10.0.0.1:80"], "10.0.0.1:80", "not an IP"),
        (["fe80::1%eth0"], "fe80::1%eth0", "zone"),
        ([10], 10, "string"),
        ([None], None, "string"),
        ([b"10.0.0.1"], b"10.0.0.1", "string"),
        ("10.0.0.1", "10.0.0.1", "not a string"),
        ("*", "*", "not a string"),
        (b"10.0.0.1", b"10.0.0.1", "not a string"),
        (None, None, "list"),
        (42, 42, "list"),
    ],
)
def test_trusted_proxies_configuration_errors(proxies: Any, bad: Any, reason: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        TrustedProxies(proxies)
    assert info.value.field == "trusted_proxies"
    assert info.value.value == bad
    assert reason in info.value.reason
    assert "trusted_proxies" in str(info.value)


def test_host_bits_error_suggests_the_network() -> None:
    with pytest.raises(ConfigurationError, match=r"did you mean 10\.0\.0\.0/8"):
        TrustedProxies(["10.0.0.1/8"])


# -- ClientIP: configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ipv6_prefix": 0}, "ipv6_prefix"),
        ({"ipv6_prefix": 129}, "ipv6_prefix"),
        ({"ipv6_prefix": -64}, "ipv6_prefix"),
        ({"ipv6_prefix": True}, "ipv6_prefix"),
        ({"ipv6_prefix": False}, "ipv6_prefix"),
        ({"ipv6_prefix": 64.0}, "ipv6_prefix"),
        ({"ipv6_prefix": "64"}, "ipv6_prefix"),
        ({"headers": ["x-client-ip"]}, "forwarded_headers"),
        ({"headers": ["x-forwarded-for", "cf-connecting-ip"]}, "forwarded_headers"),
        ({"headers": ["x-forwarded-for "]}, "forwarded_headers"),
        ({"headers": [""]}, "forwarded_headers"),
        ({"headers": [b"x-forwarded-for"]}, "forwarded_headers"),
        ({"headers": [None]}, "forwarded_headers"),
        ({"headers": "x-forwarded-for"}, "forwarded_headers"),
        ({"trusted_proxies": ["10.0.0.1/8"]}, "trusted_proxies"),
        ({"trusted_proxies": ["*"]}, "trusted_proxies"),
        ({"trusted_proxies": ["not-an-ip"]}, "trusted_proxies"),
        ({"trusted_proxies": "10.0.0.0/8"}, "trusted_proxies"),
        ({"trust_unix_socket": 1}, "trust_unix_socket"),
        ({"trust_unix_socket": "yes"}, "trust_unix_socket"),
        ({"trust_unix_socket": None}, "trust_unix_socket"),
    ],
)
def test_client_ip_configuration_errors(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ClientIP(**kwargs)
    assert info.value.field == field


def test_client_ip_accepts_header_names_in_any_case_and_ignores_duplicates() -> None:
    client_ip = ClientIP(
        trusted_proxies=["10.0.0.0/8"], headers=["X-Forwarded-For", "x-forwarded-for"]
    )
    scope = make_scope(("10.0.0.1", 1), [("x-forwarded-for", "203.0.113.9")])
    assert client_ip(scope) == "203.0.113.9"
    assert "x-forwarded-for" in repr(client_ip)


@pytest.mark.parametrize("prefix", [1, 48, 64, 128])
def test_client_ip_accepts_valid_prefixes(prefix: int) -> None:
    ClientIP(ipv6_prefix=prefix)


# -- ClientIP: untrusted peers -----------------------------------------------------------------

SPOOFED = [
    [("x-forwarded-for", "1.1.1.1")],
    [("x-forwarded-for", "1.1.1.1, 10.0.0.1")],
    [("forwarded", "for=1.1.1.1")],
    [("forwarded", 'for="[2001:db8::1]"')],
    [("x-real-ip", "1.1.1.1")],
    [("x-real-ip", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2"), ("forwarded", "for=3.3.3.3")],
    [("x-forwarded-for", "garbage")],
    [("x-forwarded-for", "x" * 65536)],
]


@pytest.mark.parametrize("headers", SPOOFED)
@pytest.mark.parametrize("trusted", [[], PROXIES])
def test_untrusted_peer_ignores_forwarding_headers(
    headers: list[tuple[str, str]], trusted: list[str]
) -> None:
    assert resolve("203.0.113.7", headers, trusted) == "203.0.113.7"


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2:3:4:5:6]", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("203.0.113.7:8080", "203.0.113.7"),
    ],
)
def test_untrusted_peer_identity(peer: str, expected: str) -> None:
    assert resolve(peer, [("x-forwarded-for", "1.1.1.1")], trusted=[]) == expected


# -- ClientIP: trusted peers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        # X-Forwarded-For: right-most untrusted hop wins.
        ("10.0.0.1", [("x-forwarded-for", "203.0.113.9")], "203.0.113.9"),
        ("10.0.0.1", [("x-forwarded-for", "203.0.113.9, 10.0.0.2")], "203.0.113.9"),
        ("10.0.0.1", [("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.2")], "203.0.113.9"),
        (
            "10.0.0.1",
            [("x-forwarded-for", "1.1.1.1,203.0.113.9,10.0.0.2,192.168.1.1")],
            "203.0.113.9",
        ),
        ("10.0.0.1", [("x-forwarded-for", "203.0.113.9, 192.168.1.2")], "192.168.1.2"),
        ("::1", [("x-forwarded-for", "203.0.113.9")], "203.0.113.9"),
        ("::ffff:10.0.0.1", [("x-forwarded-for", "203.0.113.9")], "203.0.113.9"),
        ("2001:db8:ffff::5", [("x-forwarded-for", "2001:db8:1:2::9")], "2001:db8:1:2::/64"),
        ("10.0.0.1", [("x-forwarded-for", "203.0.113.9, ::ffff:10.0.0.2")], "203.0.113.9"),
        ("10.0.0.1", [("x-forwarded-for", "::ffff:203.0.113.9")], "203.0.113.9"),
        ("10.0.0.1", [("x-forwarded-for", "203.0.113.9:5555, 10.0.0.2:80")], "203.0.113.9"),
        ("10.0.0.1", [("x-forwarded-for", "[2001:db8::9]:443")], "2001:db8::/64"),
        ("10.0.0.1", [("x-forwarded-for", "fe80::9%eth0, 10.0.0.2")], "fe80::/64"),
        ("10.0.0.1", [("x-forwarded-for", " 203.0.113.9 ,\t10.0.0.2 ")], "203.0.113.9"),
        # All hops trusted: the left-most is the client.
        ("10.0.0.1", [("x-forwarded-for", "10.0.0.3, 10.0.0.2")], "10.0.0.3"),
        ("10.0.0.1", [("x-forwarded-for", "192.168.1.1")], "192.168.1.1"),
        ("10.0.0.1", [("x-forwarded-for", "::1, 10.0.0.2")], "::/64"),
        # Several header lines are joined in order.
        (
            "10.0.0.1",
            [("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "203.0.113.9, 10.0.0.2")],
            "203.0.113.9",
        ),
        (
            "10.0.0.1",
            [("x-forwarded-for", "1.1.1.1, 203.0.113.9"), ("x-forwarded-for", "10.0.0.2")],
            "203.0.113.9",
        ),
        (
            "10.0.0.1",
            [
                ("x-forwarded-for", "1.1.1.1"),
                ("host", "example.com"),
                ("x-forwarded-for", "203.0.113.9"),
            ],
            "203.0.113.9",
        ),
        # Forwarded (RFC 7239).
        ("10.0.0.1", [("forwarded", "for=203.0.113.9")], "203.0.113.9"),
        ("10.0.0.1", [("forwarded", "For=203.0.113.9")], "203.0.113.9"),
        ("10.0.0.1", [("forwarded", "FOR=203.0.113.9")], "203.0.113.9"),
        ("10.0.0.1", [("forwarded", 'for="203.0.113.9"')], "203.0.113.9"),
        ("10.0.0.1", [("forwarded", 'for="203.0.113.9:8080"')], "203.0.113.9"),
        ("10.0.0.1", [("forwarded", 'for="[2001:db8:cafe::17]:4711"')], "2001:db8:cafe::/64"),
        ("10.0.0.1", [("forwarded", 'for="[2001:db8:cafe::17]"')], "2001:db8:cafe::/64"),
        ("10.0.0.1", [("forwarded", 'for="_hidden", for=203.0.113.9')], "203.0.113.9"),
        (
            "10.0.0.1",
            [("forwarded", "for=203.0.113.9;proto=https;by=10.0.0.2, for=10.0.0.2")],
            "203.0.113.9",
        ),
        (
            "10.0.0.1",
            [("forwarded", "proto=https;for=203.0.113.9;host=example.com")],
            "203.0.113.9",
        ),
        ("10.0.0.1", [("forwarded", "for=1.1.1.1, for=203.0.113.9, for=10.0.0.2")], "203.0.113.9"),
        ("10.0.0.1", [("forwarded", " for = 203.0.113.9 ; proto=http ")], "203.0.113.9"),
        ("10.0.0.1", [("forwarded", "for=203.0.113.9;;proto=http")], "203.0.113.9"),
        (
            "10.0.0.1",
            [("forwarded", "for=1.1.1.1"), ("forwarded", "for=203.0.113.9, for=10.0.0.2")],
            "203.0.113.9",
        ),
        ("10.0.0.1", [("forwarded", "for=10.0.0.3, for=10.0.0.2")], "10.0.0.3"),
        ("10.0.0.1", [("forwarded", 'for="[::ffff:203.0.113.9]"')], "203.0.113.9"),
        # X-Real-IP: one address.
        ("10.0.0.1", [("x-real-ip", "203.0.113.9")], "203.0.113.9"),
        ("10.0.0.1", [("x-real-ip", " 203.0.113.9:1234 ")], "203.0.113.9"),
        ("10.0.0.1", [("x-real-ip", "2001:db8:1:2::9")], "2001:db8:1:2::/64"),
        ("10.0.0.1", [("x-real-ip", "10.0.0.3")], "10.0.0.3"),
        # No forwarding header: the proxy itself.
        ("10.0.0.1", [], "10.0.0.1"),
        ("10.0.0.1", [("x-forwarded-host", "example.com")], "10.0.0.1"),
        ("2001:db8:ffff::5", [], "2001:db8:ffff::/64"),
        # The first configured header present wins: forwarded, x-forwarded-for, x-real-ip.
        (
            "10.0.0.1",
            [
                ("x-real-ip", "1.1.1.1"),
                ("x-forwarded-for", "2.2.2.2"),
                ("forwarded", "for=3.3.3.3"),
            ],
            "3.3.3.3",
        ),
        ("10.0.0.1", [("x-real-ip", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")], "2.2.2.2"),
        # ... even when it is malformed: no shopping around for a header that parses.
        ("10.0.0.1", [("forwarded", "for=unknown"), ("x-forwarded-for", "2.2.2.2")], "10.0.0.1"),
    ],
)
def test_trusted_peer_chains(peer: str, headers: list[tuple[str, str]], expected: str) -> None:
    assert resolve(peer, headers) == expected


@pytest.mark.parametrize(
    ("headers", "setting", "expected"),
    [
        (
            [("forwarded", "for=3.3.3.3"), ("x-forwarded-for", "2.2.2.2")],
            ["x-forwarded-for"],
            "2.2.2.2",
        ),
        ([("forwarded", "for=3.3.3.3")], ["x-forwarded-for"], "10.0.0.1"),
        ([("x-real-ip", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")], ["x-real-ip"], "1.1.1.1"),
        (
            [("x-real-ip", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")],
            ["x-real-ip", "x-forwarded-for"],
            "1.1.1.1",
        ),
        ([("x-forwarded-for", "2.2.2.2")], ["x-real-ip", "x-forwarded-for"], "2.2.2.2"),
        ([("x-forwarded-for", "2.2.2.2")], [], "10.0.0.1"),
    ],
)
def test_configured_headers_and_their_order(
    headers: list[tuple[str, str]], setting: list[str], expected: str
) -> None:
    assert resolve("10.0.0.1", headers, headers=setting) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [("x-forwarded-for", "")],
        [("x-forwarded-for", " ")],
        [("x-forwarded-for", "unknown")],
        [("x-forwarded-for", "203.0.113.9, unknown")],
        [("x-forwarded-for", "203.0.113.9, garbage, 10.0.0.2")],
        [("x-forwarded-for", "203.0.113.9,,10.0.0.2")],
        [("x-forwarded-for", "203.0.113.9, ")],
        [("x-forwarded-for", "203.0.113.9 10.0.0.2")],
        [("x-forwarded-for", "203.0.113.9; 10.0.0.2")],
        [("x-forwarded-for", "example.com")],
        [("x-forwarded-for", "203.0.113.9\x00")],
        [("x-forwarded-for", "_hidden")],
        [("forwarded", "for=unknown")],
        [("forwarded", "for=_hidden")],
        [("forwarded", "for=203.0.113.9, for=_hidden")],
        [("forwarded", "for=203.0.113.9, proto=https")],
        [("forwarded", "proto=https")],
        [("forwarded", "")],
        [("forwarded", "for")],
        [("forwarded", "for=203.0.113.9;garbage")],
        [("forwarded", "for=1.1.1.1;for=203.0.113.9")],
        [("forwarded", "203.0.113.9")],
        [("forwarded", 'for="203.0.113.9')],
        [("forwarded", 'for="\\"203.0.113.9"')],
        [("x-real-ip", "")],
        [("x-real-ip", "unknown")],
        [("x-real-ip", "203.0.113.9, 10.0.0.2")],
        [("x-real-ip", "203.0.113.9"), ("x-real-ip", "198.51.100.1")],
    ],
)
def test_malformed_hops_fall_back_to_the_peer(headers: list[tuple[str, str]]) -> None:
    assert resolve("10.0.0.1", headers) == "10.0.0.1"
    assert resolve("2001:db8:ffff::5", headers) == "2001:db8:ffff::/64"


def test_a_cached_fallback_still_means_each_requests_own_peer() -> None:
    client_ip = ClientIP(trusted_proxies=["10.0.0.0/8"])
    headers = [("x-forwarded-for", "garbage")]
    for _ in range(2):
        assert client_ip(make_scope(("10.0.0.1", 1), headers)) == "10.0.0.1"
        assert client_ip(make_scope(("10.0.0.2", 1), headers)) == "10.0.0.2"


# -- hop limits and hostile values -------------------------------------------------------------


@pytest.mark.parametrize(
    ("hops", "expected"),
    [
        (["203.0.113.9"] + ["10.0.0.2"] * 31, "203.0.113.9"),  # 32 hops
        (["10.0.0.3"] + ["10.0.0.2"] * 31, "10.0.0.3"),  # 32 trusted hops: left-most
        (["10.0.0.3"] + ["10.0.0.2"] * 32, "10.0.0.1"),  # 33 trusted hops: too many
        (["203.0.113.9"] + ["10.0.0.2"] * 32, "10.0.0.1"),  # the client is hop 33
        (["203.0.113.9"] + ["10.0.0.2"] * 100, "10.0.0.1"),
        (["1.1.1.1"] * 100 + ["203.0.113.9"], "203.0.113.9"),  # found within the last 32
        (["garbage"] * 100 + ["203.0.113.9", "10.0.0.2"], "203.0.113.9"),
    ],
)
def test_at_most_32_hops_are_examined(hops: list[str], expected: str) -> None:
    assert resolve("10.0.0.1", [("x-forwarded-for", ", ".join(hops))]) == expected
    forwarded = ", ".join(f"for={hop}" for hop in hops)
    assert resolve("10.0.0.1", [("forwarded", forwarded)]) == expected


HOSTILE = [
    "x" * 65536,
    "1.1.1.1," * 8192,
    ", " * 32768,
    "203.0.113.9" + " " * 65536,
    "," * 9000 + "203.0.113.9",
    ";" * 65536,
    "for=" * 16384,
    "=" * 65536,
    '"' * 65536,
    "[" * 65536,
    ":" * 65536,
    "%" * 65536,
    "\x00\x01\x02\x7f\x1f\r\n\t\v\f",
    "".join(chr(i) for i in range(256)),
    "203.0.113.9\r\nX-Forwarded-For: 1.1.1.1",
    "\xff\xfe",
    "ÿ" * 100,
]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("header", ["forwarded", "x-forwarded-for", "x-real-ip"])
def test_hostile_header_values_never_raise(value: str, header: str) -> None:
    identity = resolve("10.0.0.1", [(header, value)])
    if header == "x-forwarded-for" and value.endswith(",203.0.113.9"):
        # The right-most hop is whole and readable, however much junk is on its left.
        assert identity == "203.0.113.9"
    else:
        assert identity == "10.0.0.1"
    assert resolve("203.0.113.7", [(header, value)]) == "203.0.113.7"


def test_only_the_right_most_8_kib_are_read() -> None:
    # A hop longer than the limit cannot be read whole: the peer.
    padded = " " * 8200 + "203.0.113.9"
    assert resolve("10.0.0.1", [("x-forwarded-for", padded)]) == "10.0.0.1"
    under = " " * 8000 + "203.0.113.9"
    assert resolve("10.0.0.1", [("x-forwarded-for", under)]) == "203.0.113.9"
    # Many small lines add up: the limit is on the joined value, cut on the left.
    lines = [("x-forwarded-for", " " * 1000 + "203.0.113.9")] * 9
    assert resolve("10.0.0.1", lines) == "203.0.113.9"
    # Only trusted hops in the last 8 KiB: the true left-most hop is out of sight.
    trusted = ", ".join(["10.0.0.2"] * 5) + " " * 8200 + ", 10.0.0.3"
    assert resolve("10.0.0.1", [("x-forwarded-for", trusted)]) == "10.0.0.1"
    # A cut X-Real-IP is not one address.
    assert resolve("10.0.0.1", [("x-real-ip", " " * 9000 + "203.0.113.9")]) == "10.0.0.1"


# The client writes the left part of a forwarding header; the trusted proxy (10.0.0.0/8)
# appends the address it saw on the right. Padding the left part must not move the client
# into the proxy's bucket.
CLIENT_PADDED = [
    [("x-forwarded-for", "1.1.1.1, " * 1000 + "203.0.113.9")],
    [("x-forwarded-for", "x" * 9000 + ", 203.0.113.9")],
    [("x-forwarded-for", "x" * 9000 + ", 203.0.113.9, 10.0.0.2")],
    [("x-forwarded-for", " " * 8191 + ",203.0.113.9")],
    [("x-forwarded-for", "x" * 5000), ("x-forwarded-for", "y" * 5000 + ", 203.0.113.9")],
    [
        ("x-forwarded-for", "x" * 5000),
        ("x-forwarded-for", "y" * 5000),
        ("x-forwarded-for", "203.0.113.9"),
    ],
    [("x-forwarded-for", ", ".join(["10.0.0.2"] * 2000) + ", 203.0.113.9")],
    [("x-forwarded-for", "garbage, " * 2000 + "203.0.113.9, 10.0.0.2")],
    [("forwarded", "for=1.1.1.1, " * 1000 + "for=203.0.113.9")],
    [("forwarded", "for=" + "x" * 9000 + ", for=203.0.113.9;proto=https, for=10.0.0.2")],
    [("forwarded", 'for="' + "x" * 5000 + '"'), ("forwarded", "x" * 5000 + ", for=203.0.113.9")],
]


@pytest.mark.parametrize("headers", CLIENT_PADDED)
def test_client_padding_never_moves_the_client_into_the_proxys_bucket(
    headers: list[tuple[str, str]],
) -> None:
    assert resolve("10.0.0.1", headers, trusted=["10.0.0.0/8"]) == "203.0.113.9"
    client_ip = ClientIP(trusted_proxies=["10.0.0.0/8"], headers=ALL_HEADERS)
    for _ in range(2):
        assert client_ip(make_scope(("10.0.0.1", 1), headers)) == "203.0.113.9"


@pytest.mark.parametrize(
    "scope",
    [
        {},
        {"client": None},
        {"client": ()},
        {"client": ("",)},
        {"client": (None, 1)},
        {"client": (b"203.0.113.7", 1)},
        {"client": 42},
        {"client": ("testclient", 50000)},
        {"client": ("/run/app.sock", None)},
        {"client": ("unknown", 0)},
        {"client": ("x" * 65536, 0)},
        {"client": ([], 0)},
    ],
)
def test_no_usable_client_is_unknown(scope: dict[str, Any]) -> None:
    assert ClientIP()(scope) == "unknown"
    assert ClientIP(trusted_proxies=["10.0.0.0/8"])(scope) == "unknown"


@pytest.mark.parametrize(
    "headers",
    [
        None,
        [],
        [(b"x-forwarded-for",)],
        [(b"x-forwarded-for", b"1.1.1.1", b"extra")],
        [(b"x-forwarded-for", "203.0.113.9")],
        [(b"x-forwarded-for", None)],
        [([], b"203.0.113.9")],
        [None],
        42,
    ],
)
def test_malformed_scope_headers_never_raise(headers: Any) -> None:
    scope = {"client": ("10.0.0.1", 1), "headers": headers}
    assert ClientIP(trusted_proxies=["10.0.0.0/8"])(scope) == "10.0.0.1"


def test_trust_unix_socket_reads_the_headers_of_a_peerless_request() -> None:
    # uvicorn --uds: no peer address; the proxy on the socket sets X-Forwarded-For.
    scope = make_scope(None, [("x-forwarded-for", "198.51.100.1, 203.0.113.9")])
    assert ClientIP(trust_unix_socket=True)(scope) == "203.0.113.9"
    assert ClientIP(trusted_proxies=["10.0.0.0/8"])(scope) == "unknown"
    assert ClientIP()(scope) == "unknown"
    # Trusted proxies behind the socket are skipped as usual.
    scope = make_scope(None, [("x-forwarded-for", "203.0.113.9, 10.0.0.2")])
    client_ip = ClientIP(trusted_proxies=["10.0.0.0/8"], trust_unix_socket=True)
    assert client_ip(scope) == "203.0.113.9"
    assert "trust_unix_socket=True" in repr(client_ip)
    v6 = make_scope(None, [("x-forwarded-for", "2001:db8:1:2::9")])
    assert ClientIP(trust_unix_socket=True)(v6) == "2001:db8:1:2::/64"


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ({"client": None}, "unknown"),
        ({}, "unknown"),
        ({"client": None, "headers": [(b"x-forwarded-for", b"garbage")]}, "unknown"),
        ({"client": None, "headers": [(b"x-forwarded-for", b"203.0.113.9, junk")]}, "unknown"),
        ({"client": None, "headers": None}, "unknown"),
        ({"client": None, "headers": [(b"x-forwarded-for", None)]}, "unknown"),
        ({"client": None, "headers": 42}, "unknown"),
        # An address, even a strange one, is a peer: its own trust applies, not the socket's.
        (
            {"client": ("/run/app.sock", None), "headers": [(b"x-forwarded-for", b"203.0.113.9")]},
            "unknown",
        ),
        (
            {"client": ("198.51.100.1", 1), "headers": [(b"x-forwarded-for", b"203.0.113.9")]},
            "198.51.100.1",
        ),
    ],
)
def test_trust_unix_socket_never_invents_an_identity(scope: dict[str, Any], expected: str) -> None:
    assert ClientIP(trust_unix_socket=True)(scope) == expected


def test_client_as_a_list_works() -> None:
    assert ClientIP()({"client": ["203.0.113.7", 1]}) == "203.0.113.7"


def test_many_distinct_peers_stay_correct() -> None:
    client_ip = ClientIP()
    for i in range(10000):
        host = f"198.{i >> 8 & 255}.{i & 255}.1"
        assert client_ip(make_scope((host, 1))) == host


# -- IPv6 grouping -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "prefix", "same"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff", 64, True),
        ("2001:db8:1:2::1", "2001:db8:1:3::1", 64, False),
        ("2001:db8:1:2::1", "2001:db8:1:2::2", 128, False),
        ("2001:db8:1:2::1", "2001:db8:1:2::1", 128, True),
        ("2001:db8:1:2::1", "2001:db8:1:ffff::1", 48, True),
        ("2001:db8:1:2::1", "2001:db8:2:2::1", 48, False),
        ("2001:db8:1:2::1", "[2001:db8:1:2::9]:443", 64, True),
        ("fe80::1%eth0", "fe80::2%eth1", 64, True),
    ],
)
def test_ipv6_grouping(a: str, b: str, prefix: int, same: bool) -> None:
    client_ip = ClientIP(ipv6_prefix=prefix)
    ids = {client_ip(make_scope((peer, 1))) for peer in (a, b)}
    assert (len(ids) == 1) is same
    via_proxy = ClientIP(trusted_proxies=["10.0.0.0/8"], ipv6_prefix=prefix)
    hops = {via_proxy(make_scope(("10.0.0.1", 1), [("x-forwarded-for", hop)])) for hop in (a, b)}
    assert hops == ids


def test_ipv6_prefix_128_identity() -> None:
    assert resolve("2001:db8::1", trusted=[], ipv6_prefix=128) == "2001:db8::1/128"


def test_mapped_peer_and_mapped_hop_give_the_ipv4_identity() -> None:
    assert resolve("::ffff:203.0.113.7", trusted=[]) == resolve("203.0.113.7", trusted=[])
    assert resolve("::ffff:10.0.0.1", [("x-forwarded-for", "::ffff:203.0.113.9")]) == (
        "203.0.113.9"
    )


# -- api_key_from_scope ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query_string", "kwargs", "expected"),
    [
        ([("x-api-key", "secret")], b"", {}, "secret"),
        ([("x-api-key", "  secret\t")], b"", {}, "secret"),
        ([("x-api-key", "first"), ("x-api-key", "second")], b"", {}, "first"),
        ([("host", "a"), ("x-api-key", "k")], b"", {}, "k"),
        ([], b"", {}, None),
        ([("x-api-key", "")], b"", {}, None),
        ([("x-api-key", "   ")], b"", {}, None),
        ([("authorization", "Bearer x")], b"", {}, None),
        # The query string is not read unless asked for.
        ([], b"api_key=from-query", {}, None),
        ([], b"api_key=from-query", {"query_param": "api_key"}, "from-query"),
        # The last value, as Starlette and FastAPI hand the endpoint (issue 13 #2).
        ([], b"a=1&api_key=second&api_key=k%2Fx", {"query_param": "api_key"}, "k/x"),
        ([], b"api_key=", {"query_param": "api_key"}, None),
        ([], b"api_key=+", {"query_param": "api_key"}, None),
        ([], b"api_key", {"query_param": "api_key"}, None),
        ([], b"other=1", {"query_param": "api_key"}, None),
        ([], b"", {"query_param": "api_key"}, None),
        # Every field is read: padding never hides the key (issue 13 #2).
        ([], b"&" * 100 + b"api_key=k", {"query_param": "api_key"}, "k"),
        ([], b"%ff%fe=1&api_key=%ff", {"query_param": "api_key"}, "\ufffd"),
        # The header wins over the query parameter; an empty header does not.
        ([("x-api-key", "h")], b"api_key=q", {"query_param": "api_key"}, "h"),
        ([("x-api-key", "")], b"api_key=q", {"query_param": "api_key"}, "q"),
        # Another header name.
        ([("x-token", "t")], b"", {"header": b"x-token"}, "t"),
        ([("x-token", "t")], b"", {"header": b"X-Token"}, "t"),
        ([("x-api-key", "k")], b"", {"header": b"x-token"}, None),
    ],
)
def test_api_key_from_scope(
    headers: list[tuple[str, str]],
    query_string: bytes,
    kwargs: dict[str, Any],
    expected: str | None,
) -> None:
    scope = make_scope(headers=headers, query_string=query_string)
    assert api_key_from_scope(scope, **kwargs) == expected


@pytest.mark.parametrize(
    "scope",
    [
        {},
        {"headers": None, "query_string": None},
        {"headers": [(b"x-api-key",)], "query_string": "api_key=x"},
        {"headers": [(b"x-api-key", "str")], "query_string": 42},
        {"headers": [(b"x-api-key", b"\x00\xff")]},
        {"headers": [(b"x-api-key", b"k" * 65536)]},
        {"query_string": b"api_key=" + b"k" * (65536 - 8)},  # at the cap: read
    ],
)
def test_api_key_from_hostile_scopes_never_raises(scope: dict[str, Any]) -> None:
    result = api_key_from_scope(scope, query_param="api_key")
    assert result is None or isinstance(result, str)


def test_a_query_string_over_the_cap_is_refused_not_read_in_part() -> None:
    # The middleware answers it with a 400 (tests/test_hostile_input.py).
    with pytest.raises(QueryTooLong):
        api_key_from_scope({"query_string": b"api_key=" + b"k" * 65536}, query_param="api_key")


# -- a real application ------------------------------------------------------------------------


async def test_client_ip_in_a_starlette_app() -> None:
    client_ip = ClientIP(trusted_proxies=["10.0.0.0/8"])

    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse(client_ip(request.scope))

    app = Starlette(routes=[Route("/", endpoint)])
    proxied = httpx.ASGITransport(app=app, client=("10.0.0.1", 1234))
    async with httpx.AsyncClient(transport=proxied, base_url="http://testserver") as client:
        response = await client.get("/", headers={"X-Forwarded-For": "203.0.113.9, 10.0.0.2"})
        assert response.text == "203.0.113.9"
        response = await client.get("/", headers={"X-Forwarded-For": "garbage"})
        assert response.text == "10.0.0.1"
        response = await client.get("/")
        assert response.text == "10.0.0.1"

    direct = httpx.ASGITransport(app=app, client=("198.51.100.5", 1234))
    async with httpx.AsyncClient(transport=direct, base_url="http://testserver") as client:
        response = await client.get("/", headers={"X-Forwarded-For": "203.0.113.9"})
        assert response.text == "198.51.100.5"


def test_default_reads_only_x_forwarded_for() -> None:
    # Proxies such as nginx pass a client's own Forwarded header through: by default only
    # X-Forwarded-For (which they append to) is believed.
    client_ip = ClientIP(trusted_proxies=["10.0.0.0/8"])
    spoofed = make_scope(("10.0.0.1", 1234), [("forwarded", "for=198.51.100.1")])
    assert client_ip(spoofed) == "10.0.0.1"
    real = make_scope(
        ("10.0.0.1", 1234),
        [("forwarded", "for=198.51.100.1"), ("x-forwarded-for", "203.0.113.9")],
    )
    assert client_ip(real) == "203.0.113.9"


# -- the canonical-IPv4 shortcut ---------------------------------------------------------------

_octet_texts = st.one_of(
    st.integers(0, 300).map(str),
    st.integers(0, 99).map(lambda n: f"0{n}"),  # leading zeros: never canonical
    st.sampled_from(["", " 1", "1 ", "+1", "1e1", "٣", "0x1", "-0"]),
)


@given(st.lists(_octet_texts, min_size=3, max_size=5).map(".".join) | st.text(max_size=20))
def test_dotted_quad_shortcut_agrees_with_the_parser(text: str) -> None:
    """Where the shortcut takes a peer text as its own identity, the full parser must give
    that same identity; where the parser gives a plain IPv4 identity equal to the text, the
    shortcut must take it (it never changes an answer, only how fast it is found)."""
    address = parse_ip(text)
    full = ip_identity(address) if address is not None else None
    assert (full == text) is (_DOTTED_QUAD.fullmatch(text) is not None)


def test_trusted_proxy_check_on_the_shortcut() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "192.0.2.7", "::ffff:198.51.100.0/120"])
    for text, expected in [
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("192.0.2.7", True),
        ("192.0.2.8", False),
        ("198.51.100.77", True),
        ("198.51.101.1", False),
    ]:
        assert proxies.contains_v4(text) is expected
        assert (parse_ip(text) in proxies) is expected
    assert TrustedProxies(["2001:db8::/32"]).contains_v4("10.0.0.1") is False
