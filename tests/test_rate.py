from __future__ import annotations

import math

import pytest

from fastapi_ratelimit import ConfigurationError, Rate, parse_rate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100/minute", Rate(100, 60)),
        ("10/second", Rate(10, 1)),
        ("5000/hour", Rate(5000, 3600)),
        ("2/5 seconds", Rate(2, 5)),
        ("100/minute;burst=200", Rate(100, 60, burst=200)),
        ("100/minute; burst = 200", Rate(100, 60, burst=200)),
        ("10 per second", Rate(10, 1)),
        ("1/day", Rate(1, 86400)),
        ("3/0.5s", Rate(3, 0.5)),
        ("  7 / 2 hours ", Rate(7, 7200)),
    ],
)
def test_parse(text: str, expected: Rate) -> None:
    assert parse_rate(text) == expected
    assert Rate.parse(text) == expected


def test_builders_match_parsing() -> None:
    assert Rate.per_second(10) == parse_rate("10/second")
    assert Rate.per_minute(100, burst=200) == parse_rate("100/minute;burst=200")
    assert Rate.per_hour(5000) == parse_rate("5000/hour")
    assert Rate.per_day(3) == parse_rate("3/day")
    assert Rate(2, 5).period_us == 5_000_000
    assert Rate(100, 60, burst=200).capacity == 200
    assert Rate(100, 60).capacity == 100


@pytest.mark.parametrize("text", ["100/minute", "2/5 seconds", "100/minute;burst=200", "1/day"])
def test_str_round_trips(text: str) -> None:
    assert parse_rate(str(parse_rate(text))) == parse_rate(text)


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("", "rate", "empty"),
        ("   ", "rate", "empty"),
        ("0/minute", "rate.limit", "> 0"),
        ("-5/minute", "rate.limit", "> 0"),
        ("nan/minute", "rate.limit", "'nan'"),
        ("inf/second", "rate.limit", "'inf'"),
        ("1.5/minute", "rate.limit", "'1.5'"),
        ("100/fortnight", "rate.unit", "fortnight"),
        ("100/0 seconds", "rate.period", "> 0"),
        ("100", "rate", "not a rate"),
        ("100/minute;burst=0", "rate.burst", "> 0"),
        ("100/minute;burst=nan", "rate.burst", "'nan'"),
        ("100/minute;burst=-1", "rate.burst", "> 0"),
        ("100/minute;spike=3", "rate", "spike"),
        ("100/minute;burst=2;burst=3", "rate.burst", "twice"),
        ("100/0.0000001 seconds", "rate.period", "between"),
    ],
)
def test_parse_rejects_with_named_field(text: str, field: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_rate(text)
    assert info.value.field == field
    assert fragment in str(info.value)
    assert repr(text) in str(info.value) or text == ""


def test_parse_names_the_callers_field() -> None:
    with pytest.raises(ConfigurationError, match=r"^ip_limit\.limit: ") as info:
        parse_rate("0/minute", field_name="ip_limit")
    assert info.value.value == "0/minute"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((0, 60), "rate.limit"),
        ((-1, 60), "rate.limit"),
        ((True, 60), "rate.limit"),
        ((1.0, 60), "rate.limit"),
        ((10, 0), "rate.period"),
        ((10, -1), "rate.period"),
        ((10, math.nan), "rate.period"),
        ((10, math.inf), "rate.period"),
        ((10, "60"), "rate.period"),
        ((10, 60, 0), "rate.burst"),
        ((10, 60, math.nan), "rate.burst"),
        ((10**13, 60), "rate.limit"),
    ],
)
def test_constructor_rejects(args: tuple[object, ...], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Rate(*args)  # type: ignore[arg-type]
    assert info.value.field == field


def test_non_string_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="must be a string"):
        parse_rate(100)  # type: ignore[arg-type]
