from __future__ import annotations

import pytest

from fastapi_ratelimit import Algorithm, ConfigurationError, Policy, Rate


def test_policy_parses_rate_and_defaults_to_sliding_counter() -> None:
    policy = Policy("ip", "300/minute")
    assert policy.rate == Rate(300, 60)
    assert policy.algorithm is Algorithm.SLIDING_WINDOW_COUNTER
    assert policy.limit == 300
    assert policy.window == 60.0


def test_algorithm_accepts_its_name() -> None:
    assert Policy("x", "1/second", "gcra").algorithm is Algorithm.GCRA


def test_burst_is_the_limit_for_bucket_algorithms() -> None:
    policy = Policy("user-free", "60/minute;burst=100", Algorithm.TOKEN_BUCKET)
    assert policy.limit == 100
    # An empty bucket refills 100 tokens at 1 per second.
    assert policy.horizon_us == 100_000_000


@pytest.mark.parametrize(
    ("algorithm", "horizon_us"),
    [
        (Algorithm.FIXED_WINDOW, 60_000_000),
        (Algorithm.SLIDING_WINDOW_LOG, 60_000_000),
        (Algorithm.SLIDING_WINDOW_COUNTER, 120_000_000),
        (Algorithm.TOKEN_BUCKET, 60_000_000),
        (Algorithm.GCRA, 60_000_000),
    ],
)
def test_horizon(algorithm: Algorithm, horizon_us: int) -> None:
    assert Policy("p", "10/minute", algorithm).horizon_us == horizon_us


@pytest.mark.parametrize(
    "algorithm", [Algorithm.FIXED_WINDOW, "sliding_window_log", "sliding_window_counter"]
)
def test_burst_on_window_algorithm_fails_naming_the_policy(algorithm: str) -> None:
    with pytest.raises(ConfigurationError, match=r"policy 'p': rate\.burst") as info:
        Policy("p", "10/minute;burst=20", algorithm)
    assert "token_bucket and gcra" in str(info.value)


@pytest.mark.parametrize("name", ["", "has space", "a:b", "{tag}", "x" * 65, "ünï", "-lead", None])
def test_bad_names(name: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        Policy(name, "1/second")  # type: ignore[arg-type]
    assert info.value.field == "policy.name"


def test_bad_rate_names_policy_and_field() -> None:
    with pytest.raises(ConfigurationError) as info:
        Policy("upload", "0/minute")
    assert info.value.field == "policy 'upload': rate.limit"
    with pytest.raises(ConfigurationError, match="policy 'upload': rate"):
        Policy("upload", 5)  # type: ignore[arg-type]


def test_unknown_algorithm() -> None:
    with pytest.raises(ConfigurationError, match="must be one of fixed_window") as info:
        Policy("p", "1/second", "leaky")
    assert info.value.field == "policy 'p': algorithm"


def test_policies_are_immutable_values() -> None:
    a = Policy("p", "1/second")
    assert a == Policy("p", Rate(1, 1))
    assert hash(a) == hash(Policy("p", Rate(1, 1)))
    with pytest.raises(AttributeError):
        a.name = "q"  # type: ignore[misc]
