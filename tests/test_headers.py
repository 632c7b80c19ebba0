"""Rate-limit headers: every structured field is checked with an independent RFC 9651 parser
(``http_sf``), so a formatting slip cannot pass by agreeing with itself."""

from __future__ import annotations

import math
from collections.abc import Mapping

import http_sf
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastapi_ratelimit import ConfigurationError, Decision, Verdict
from fastapi_ratelimit.headers import (
    HeaderStyle,
    parse_header_style,
    rate_limit_headers,
    retry_after_value,
)

NOW = 1_700_000_000.25

IETF_NAMES = [b"ratelimit-policy", b"ratelimit"]
X_NAMES = [
    b"x-ratelimit-limit",
    b"x-ratelimit-remaining",
    b"x-ratelimit-reset",
    b"x-ratelimit-used",
    b"x-ratelimit-scope",
]
LEGACY_NAMES = [b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset"]


def allowed(
    policy: str = "ip",
    *,
    limit: int = 100,
    remaining: int = 99,
    reset_after: float = 60.0,
    scope: str = "ip",
    window: float = 60.0,
) -> Decision:
    return Decision(True, limit, remaining, reset_after, 0.0, policy, scope, window)


def denied(
    policy: str = "ip",
    *,
    limit: int = 100,
    retry_after: float = 30.0,
    reset_after: float = 60.0,
    scope: str = "ip",
    window: float = 60.0,
) -> Decision:
    return Decision(False, limit, 0, reset_after, retry_after, policy, scope, window)


def as_dict(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    names = [name for name, _ in headers]
    assert len(names) == len(set(names)), "a header is repeated"
    return dict(headers)


def parse_policy(value: bytes) -> list[tuple[str, Mapping[str, object]]]:
    parsed = http_sf.parse(value, tltype="list")
    assert isinstance(parsed, list)
    members: list[tuple[str, Mapping[str, object]]] = []
    for member in parsed:
        assert isinstance(member, tuple)
        name, params = member
        assert isinstance(name, str), "policy names must be sf-strings"
        assert isinstance(params, dict)
        members.append((name, params))
    return members


def parse_ratelimit(value: bytes) -> tuple[str, Mapping[str, object]]:
    item = http_sf.parse(value, tltype="item")
    assert isinstance(item, tuple)
    name, params = item
    assert isinstance(name, str)
    assert isinstance(params, dict)
    # The draft defines RateLimit as a List; one member must parse the same way as a list.
    assert http_sf.parse(value, tltype="list") == [item]
    return name, params


def ietf_t(decisions: list[Decision]) -> int:
    headers = as_dict(rate_limit_headers(decisions, HeaderStyle.IETF, now=NOW))
    _, params = parse_ratelimit(headers[b"ratelimit"])
    t = params["t"]
    assert isinstance(t, int)
    return t


# -- parse_header_style --------------------------------------------------------------------


@pytest.mark.parametrize("style", list(HeaderStyle))
def test_parse_header_style_accepts_every_member_and_its_value(style: HeaderStyle) -> None:
    assert parse_header_style(style) is style
    assert parse_header_style(style.value) is style


@pytest.mark.parametrize(
    ("text", "style"),
    [
        ("IETF", HeaderStyle.IETF),
        (" both ", HeaderStyle.BOTH),
        ("X_RATELIMIT", HeaderStyle.X_RATELIMIT),
        ("X-RateLimit", HeaderStyle.X_RATELIMIT),
    ],
)
def test_parse_header_style_is_lenient_about_spelling(text: str, style: HeaderStyle) -> None:
    assert parse_header_style(text) is style


@pytest.mark.parametrize("value", ["", "draft", "ietf2", "x-rate-limit", 1, None])
def test_parse_header_style_rejects_unknown_values(value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_header_style(value)  # type: ignore[arg-type]
    assert info.value.field == "headers"
    assert info.value.value == value
    assert "ietf" in str(info.value)


# -- styles and shapes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("style", "names"),
    [
        (HeaderStyle.IETF, IETF_NAMES),
        (HeaderStyle.X_RATELIMIT, X_NAMES),
        (HeaderStyle.BOTH, IETF_NAMES + X_NAMES),
        (HeaderStyle.LEGACY, LEGACY_NAMES),
        (HeaderStyle.NONE, []),
    ],
)
def test_each_style_emits_exactly_its_headers(style: HeaderStyle, names: list[bytes]) -> None:
    headers = rate_limit_headers([allowed(), denied("user")], style, now=NOW)
    assert [name for name, _ in headers] == names
    for name, value in headers:
        assert isinstance(name, bytes)
        assert isinstance(value, bytes)
        assert name == name.lower()
        value.decode("latin-1")


def test_plain_string_style_works_like_the_member() -> None:
    expected = [(b"ratelimit-policy", b'"ip";q=100;w=60'), (b"ratelimit", b'"ip";r=99;t=60')]
    assert rate_limit_headers([allowed()], "ietf", now=NOW) == expected  # type: ignore[arg-type]
    assert rate_limit_headers([allowed()], HeaderStyle.IETF, now=NOW) == expected


def test_unknown_style_is_an_error_not_silence() -> None:
    with pytest.raises(ValueError, match="header style"):
        rate_limit_headers([allowed()], "bogus", now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize("style", list(HeaderStyle))
def test_no_decisions_no_headers(style: HeaderStyle) -> None:
    assert rate_limit_headers([], style, now=NOW) == []


def test_both_is_ietf_then_x_ratelimit() -> None:
    decisions = [allowed(remaining=7), allowed("user", limit=10, remaining=1, scope="user")]
    assert rate_limit_headers(decisions, HeaderStyle.BOTH, now=NOW) == [
        (b"ratelimit-policy", b'"ip";q=100;w=60, "user";q=10;w=60'),
        # The binding level is the one with the smallest share left (7% against 10%).
        (b"ratelimit", b'"ip";r=7;t=60'),
        (b"x-ratelimit-limit", b"100"),
        (b"x-ratelimit-remaining", b"7"),
        (b"x-ratelimit-reset", b"1700000061"),  # NOW + 60, rounded up
        (b"x-ratelimit-used", b"93"),
        (b"x-ratelimit-scope", b"ip"),
    ]


# -- IETF ----------------------------------------------------------------------------------


def test_ietf_example_from_the_brief() -> None:
    decisions = [
        allowed("ip", limit=300, remaining=250, reset_after=12.0),
        allowed("user-pro", limit=2000, remaining=12, reset_after=40.3, scope="user"),
    ]
    headers = as_dict(rate_limit_headers(decisions, HeaderStyle.IETF, now=NOW))
    assert headers[b"ratelimit-policy"] == b'"ip";q=300;w=60, "user-pro";q=2000;w=60'
    assert headers[b"ratelimit"] == b'"user-pro";r=12;t=41'
    assert parse_policy(headers[b"ratelimit-policy"]) == [
        ("ip", {"q": 300, "w": 60}),
        ("user-pro", {"q": 2000, "w": 60}),
    ]
    assert parse_ratelimit(headers[b"ratelimit"]) == ("user-pro", {"r": 12, "t": 41})


def test_policy_names_are_deduplicated_keeping_the_first() -> None:
    decisions = [
        allowed("ip", limit=300),
        allowed("burst", limit=10, window=1.0, scope="user"),
        allowed("ip", limit=999, window=3600.0, scope="endpoint"),
        allowed("burst", limit=5, window=2.0, scope="api_key"),
    ]
    headers = as_dict(rate_limit_headers(decisions, HeaderStyle.IETF, now=NOW))
    assert parse_policy(headers[b"ratelimit-policy"]) == [
        ("ip", {"q": 300, "w": 60}),
        ("burst", {"q": 10, "w": 1}),
    ]


@pytest.mark.parametrize(
    "name", ["a", "ip", "user-pro", "user_free", "v1.search", "A.b-C_9", "x" * 64]
)
def test_every_valid_policy_name_round_trips(name: str) -> None:
    headers = as_dict(rate_limit_headers([allowed(name)], HeaderStyle.IETF, now=NOW))
    assert parse_policy(headers[b"ratelimit-policy"])[0][0] == name
    assert parse_ratelimit(headers[b"ratelimit"])[0] == name


@pytest.mark.parametrize(
    ("window", "w"),
    [
        (0.001, 1),
        (0.5, 1),
        (1.0, 1),
        (1.5, 2),
        (60.0, 60),
        (3600.0, 3600),
        (86400.0, 86400),
        (315_360_000.0, 315_360_000),
    ],
)
def test_window_is_whole_seconds_rounded_up_and_at_least_one(window: float, w: int) -> None:
    headers = as_dict(rate_limit_headers([allowed(window=window)], HeaderStyle.IETF, now=NOW))
    [(_, params)] = parse_policy(headers[b"ratelimit-policy"])
    assert params == {"q": 100, "w": w}


def test_binding_when_allowed_is_the_smallest_share_left() -> None:
    decisions = [
        allowed("ip", limit=300, remaining=30, reset_after=5.0),  # 10 % left
        allowed("user", limit=10, remaining=2, reset_after=9.0, scope="user"),  # 20 % left
        allowed("global", limit=10_000, remaining=5000, reset_after=1.0, scope="global"),
    ]
    headers = as_dict(rate_limit_headers(decisions, HeaderStyle.IETF, now=NOW))
    assert parse_ratelimit(headers[b"ratelimit"]) == ("ip", {"r": 30, "t": 5})
    assert Verdict.of(decisions).binding is decisions[0]


def test_binding_when_denied_is_the_longest_wait() -> None:
    decisions = [
        allowed("global", limit=10_000, remaining=1, scope="global"),
        denied("ip", retry_after=3.5),
        denied("user", retry_after=41.2, scope="user"),
    ]
    headers = as_dict(rate_limit_headers(decisions, HeaderStyle.IETF, now=NOW))
    assert parse_ratelimit(headers[b"ratelimit"]) == ("user", {"r": 0, "t": 42})
    assert Verdict.of(decisions).binding is decisions[2]


@given(
    st.lists(
        st.tuples(
            st.booleans(), st.integers(1, 50), st.integers(0, 50), st.sampled_from([0.5, 2.0, 9.0])
        ),
        min_size=1,
        max_size=6,
    )
)
def test_binding_follows_its_definition(rows: list[tuple[bool, int, int, float]]) -> None:
    """The one-pass loop in binding_of against the rule written plainly: the denied level
    with the longest wait, else the smallest share left (then fewest units); ties go to the
    first."""
    decisions = [
        Decision(ok, limit, min(left, limit), 1.0, 0.0 if ok else wait, f"p{i}", "ip", 60.0)
        for i, (ok, limit, left, wait) in enumerate(rows)
    ]
    refused = [d for d in decisions if not d.allowed]
    if refused:
        expected = max(refused, key=lambda d: d.retry_after)
    else:
        expected = min(decisions, key=lambda d: (d.remaining / d.limit, d.remaining))
    assert Verdict.of(decisions).binding is expected


@pytest.mark.parametrize(
    ("reset_after", "t"),
    [(0.0, 0), (0.000001, 1), (0.2, 1), (1.0, 1), (1.2, 2), (59.99, 60), (86400.0, 86400)],
)
def test_allowed_t_is_reset_after_rounded_up(reset_after: float, t: int) -> None:
    assert ietf_t([allowed(reset_after=reset_after)]) == t


@pytest.mark.parametrize(
    ("retry_after", "t"),
    [
        (0.000001, 1),
        (0.2, 1),
        (1.0, 1),
        (1.2, 2),
        (29.0001, 30),
        (3600.0, 3600),
        # Corrupt input still yields a wait, never t=0 on a denial.
        (0.0, 1),
        (-5.0, 1),
    ],
)
def test_denied_t_is_retry_after_rounded_up_and_at_least_one(retry_after: float, t: int) -> None:
    # reset_after (the full refill) must not be what a denied client is told to wait for.
    assert ietf_t([denied(retry_after=retry_after, reset_after=500.0)]) == t


def test_remaining_is_never_negative() -> None:
    decision = Decision(True, 10, -3, 5.0, 0.0, "ip", "ip", 60.0)
    for style in (HeaderStyle.BOTH, HeaderStyle.LEGACY):
        headers = as_dict(rate_limit_headers([decision], style, now=NOW))
        if style is HeaderStyle.BOTH:
            assert parse_ratelimit(headers[b"ratelimit"])[1]["r"] == 0
            assert headers[b"x-ratelimit-remaining"] == b"0"
            assert headers[b"x-ratelimit-used"] == b"10"
        else:
            assert headers[b"ratelimit-remaining"] == b"0"


def test_policy_and_ratelimit_name_the_same_policies() -> None:
    decisions = [allowed("ip"), denied("user-pro", scope="user"), allowed("global")]
    headers = as_dict(rate_limit_headers(decisions, HeaderStyle.IETF, now=NOW))
    names = [name for name, _ in parse_policy(headers[b"ratelimit-policy"])]
    assert parse_ratelimit(headers[b"ratelimit"])[0] in names


# -- X-RateLimit ---------------------------------------------------------------------------


def test_x_ratelimit_allowed() -> None:
    decisions = [allowed("user-pro", limit=2000, remaining=1500, reset_after=30.5, scope="user")]
    headers = as_dict(rate_limit_headers(decisions, HeaderStyle.X_RATELIMIT, now=NOW))
    assert headers == {
        b"x-ratelimit-limit": b"2000",
        b"x-ratelimit-remaining": b"1500",
        # t = ceil(30.5) = 31; ceil(1_700_000_000.25 + 31)
        b"x-ratelimit-reset": b"1700000032",
        b"x-ratelimit-used": b"500",
        b"x-ratelimit-scope": b"user",
    }


def test_x_ratelimit_denied_reports_the_binding_level() -> None:
    decisions = [
        allowed("global", limit=10_000, remaining=9000, scope="global"),
        denied("user+endpoint", limit=5, retry_after=0.2, scope="user+endpoint"),
    ]
    headers = as_dict(rate_limit_headers(decisions, HeaderStyle.X_RATELIMIT, now=1000.0))
    assert headers == {
        b"x-ratelimit-limit": b"5",
        b"x-ratelimit-remaining": b"0",
        b"x-ratelimit-reset": b"1001",
        b"x-ratelimit-used": b"5",
        b"x-ratelimit-scope": b"user+endpoint",
    }


@pytest.mark.parametrize(
    ("now", "reset_after", "epoch"),
    [
        (1000.0, 0.0, 1000),
        (1000.0, 10.0, 1010),
        (1000.1, 10.0, 1011),
        (1000.9, 0.1, 1002),
        (1_700_000_000.0, 86400.0, 1_700_086_400),
    ],
)
def test_x_ratelimit_reset_is_a_unix_epoch_rounded_up(
    now: float, reset_after: float, epoch: int
) -> None:
    headers = rate_limit_headers(
        [allowed(reset_after=reset_after)], HeaderStyle.X_RATELIMIT, now=now
    )
    assert as_dict(headers)[b"x-ratelimit-reset"] == str(epoch).encode()
    assert epoch == math.ceil(now + math.ceil(reset_after))


def test_x_ratelimit_reset_agrees_with_ietf_t() -> None:
    decisions = [denied(retry_after=7.3)]
    headers = as_dict(rate_limit_headers(decisions, HeaderStyle.BOTH, now=NOW))
    t = parse_ratelimit(headers[b"ratelimit"])[1]["t"]
    assert t == 8
    assert int(headers[b"x-ratelimit-reset"]) == math.ceil(NOW + 8)


@pytest.mark.parametrize(("limit", "remaining", "used"), [(10, 0, 10), (10, 10, 0), (10, 25, 0)])
def test_x_ratelimit_used_is_never_negative(limit: int, remaining: int, used: int) -> None:
    decision = Decision(True, limit, remaining, 1.0, 0.0, "ip", "ip", 60.0)
    headers = as_dict(rate_limit_headers([decision], HeaderStyle.X_RATELIMIT, now=NOW))
    assert headers[b"x-ratelimit-used"] == str(used).encode()


# -- legacy --------------------------------------------------------------------------------


def test_legacy_uses_delta_seconds() -> None:
    decisions = [allowed(limit=50, remaining=20, reset_after=12.01)]
    headers = rate_limit_headers(decisions, HeaderStyle.LEGACY, now=NOW)
    assert headers == [
        (b"ratelimit-limit", b"50"),
        (b"ratelimit-remaining", b"20"),
        (b"ratelimit-reset", b"13"),
    ]


def test_legacy_denied_reset_is_the_wait() -> None:
    headers = as_dict(
        rate_limit_headers([denied(retry_after=0.000001)], HeaderStyle.LEGACY, now=NOW)
    )
    assert headers[b"ratelimit-reset"] == b"1"
    assert headers[b"ratelimit-remaining"] == b"0"


# -- Retry-After ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(0.000001, 1), (0.2, 1), (1.0, 1), (1.2, 2), (59.5, 60), (3600.0, 3600)],
)
def test_retry_after_is_whole_seconds_at_least_one_and_at_least_t(
    retry_after: float, expected: int
) -> None:
    decisions = [allowed("global", scope="global"), denied(retry_after=retry_after)]
    value = retry_after_value(decisions)
    assert isinstance(value, int)
    assert value == expected
    assert value >= 1
    assert value >= retry_after
    assert value >= ietf_t(decisions)


def test_retry_after_takes_the_longest_denial() -> None:
    decisions = [
        denied("ip", retry_after=2.5),
        denied("user", retry_after=9.01, scope="user"),
        allowed("global", reset_after=500.0, scope="global"),
    ]
    assert retry_after_value(decisions) == 10
    assert ietf_t(decisions) == 10


@pytest.mark.parametrize("reset_after", [0.0, 0.3, 7.5])
def test_retry_after_without_denial_still_covers_t(reset_after: float) -> None:
    # A 503 may be sent while every level allowed the request: Retry-After still >= t, >= 1.
    decisions = [allowed(reset_after=reset_after)]
    assert retry_after_value(decisions) == max(math.ceil(reset_after), 1)
    assert retry_after_value(decisions) >= ietf_t(decisions)


def test_retry_after_without_decisions_is_one() -> None:
    assert retry_after_value([]) == 1


@pytest.mark.parametrize("retry_after", [1e-9, 0.000001, 0.2, 0.5, 0.999, 1.0, 1.2, 2.0001])
def test_retry_after_never_less_than_t_across_styles(retry_after: float) -> None:
    decisions = [denied(retry_after=retry_after, reset_after=retry_after * 3)]
    value = retry_after_value(decisions)
    headers = as_dict(rate_limit_headers(decisions, HeaderStyle.BOTH, now=0.0))
    assert value >= parse_ratelimit(headers[b"ratelimit"])[1]["t"]  # type: ignore[operator]
    assert value >= int(headers[b"x-ratelimit-reset"])
    legacy = as_dict(rate_limit_headers(decisions, HeaderStyle.LEGACY, now=0.0))
    assert value >= int(legacy[b"ratelimit-reset"])
