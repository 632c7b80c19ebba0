from __future__ import annotations

import re

import pytest

from fastapi_ratelimit import ConfigurationError, KeyBuilder

HOSTILE = [
    "",
    "a:b",
    "a",
    "b",
    "*",
    "{",
    "}",
    "{}",
    "{user}",
    "}{",
    "line\nbreak",
    "\r\n",
    "\x00",
    "tab\t",
    "ünïcödé",
    "日本語",
    "\ud800",  # a lone surrogate, as a hostile header can decode to
    "x" * 65536,
    "x" * 65535,
    "rl:ip:p:fw:{00000000000000000000000000000000}",
]
KEY_RE = re.compile(r"rl:[a-z_+]+:[A-Za-z0-9_.\-]+:[a-z]{2}:\{[0-9a-f]{32}\}")


def test_hostile_identifiers_give_fixed_length_safe_distinct_keys() -> None:
    kb = KeyBuilder()
    keys = [kb.key("ip", "p", "fw", identity) for identity in HOSTILE]
    assert len(set(keys)) == len(HOSTILE)
    for key in keys:
        assert KEY_RE.fullmatch(key), key
        # Exactly one hash tag, so Cluster slots the whole key by the digest.
        assert key.count("{") == 1
        assert key.count("}") == 1
    assert len({len(k) for k in keys}) == 1


def test_composite_identities_are_unambiguous() -> None:
    kb = KeyBuilder()
    digests = {
        kb.digest(("a:b", "c")),
        kb.digest(("a", "b:c")),
        kb.digest(("a", "bc")),
        kb.digest(("ab", "c")),
        kb.digest(("abc",)),
        kb.digest("abc"),
        kb.digest(("", "abc")),
        kb.digest(("abc", "")),
    }
    # "abc" and ("abc",) are the same identity by design; everything else differs.
    assert len(digests) == 7


def test_raw_identifier_never_in_key() -> None:
    secret = "sk_live_abcdefghijklmnop"
    key = KeyBuilder().key("api_key", "keys", "gc", secret)
    assert secret not in key
    assert "abcdef" not in key


def test_secret_changes_digest() -> None:
    assert KeyBuilder().digest("1.2.3.4") != KeyBuilder(secret=b"s3cret").digest("1.2.3.4")
    assert KeyBuilder(secret=b"s3cret").digest("1.2.3.4") == KeyBuilder(secret=b"s3cret").digest(
        "1.2.3.4"
    )


@pytest.mark.parametrize("prefix", ["", "a:b", "{x}", "a b", "x" * 65])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^prefix: "):
        KeyBuilder(prefix)


@pytest.mark.parametrize("scope", ["", "a:b", "{x}", "user\n"])
def test_bad_scope(scope: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^scope: "):
        KeyBuilder().key(scope, "p", "fw", "id")


def test_composite_scope_is_allowed() -> None:
    assert (
        KeyBuilder()
        .key("user+endpoint", "p", "fw", ("u1", "GET /x"))
        .startswith("rl:user+endpoint:p:fw:{")
    )
