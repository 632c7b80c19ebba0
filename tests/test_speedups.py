"""The C speedups (``fastapi_ratelimit/_speedups.c``) against their pure-Python twins: the
same answers, the same stored state, the same headers, byte for byte."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Any

import pytest
from fastapi import FastAPI, Request
from http_helpers import client_for
from hypothesis import given, settings
from hypothesis import strategies as st

from fastapi_ratelimit import (
    Algorithm,
    Check,
    Decision,
    FakeClock,
    MemoryBackend,
    Policy,
    RateLimiter,
    RateLimitMiddleware,
)
from fastapi_ratelimit import headers as headers_module
from fastapi_ratelimit._accel import ACCELERATED
from fastapi_ratelimit.headers import HeaderStyle, rate_limit_headers, rate_limit_headers_py

needs_c = pytest.mark.skipif(not ACCELERATED, reason="the C speedups are not in use")


def test_ci_builds_the_c_speedups() -> None:
    """CI must test what users get: a missing compiler there is a failure, not a skip. (The
    pure-Python pass of scripts/test.sh sets FASTAPI_RATELIMIT_PURE: built, but not used.)"""
    if os.environ.get("CI") == "true":
        built = importlib.util.find_spec("fastapi_ratelimit._speedups") is not None
        assert built, "fastapi_ratelimit._speedups was not built (is gcc installed?)"
        pure = os.environ.get("FASTAPI_RATELIMIT_PURE", "").strip().lower()
        assert ACCELERATED or pure in ("1", "true", "yes")


def test_the_pure_python_switch() -> None:
    code = "from fastapi_ratelimit._accel import ACCELERATED; print(ACCELERATED)"
    built = importlib.util.find_spec("fastapi_ratelimit._speedups") is not None
    for value, expected in (("1", "False"), ("", str(built))):
        env = {**os.environ, "FASTAPI_RATELIMIT_PURE": value}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected


# -- headers ---------------------------------------------------------------------------------

NAMES = st.sampled_from(["global", "ip", "endpoint", "user-pro", "a.b_c"])
# Integers past 2**53 and limits of 0 are what the C side leaves to Python: drawn on purpose.
COUNTS = st.one_of(st.integers(0, 10**12), st.integers(2**53 - 2, 2**64))
SECONDS = st.one_of(
    st.floats(0, 10**7, allow_nan=False), st.integers(0, 10**6), st.just(1.0), st.just(0.5)
)
DECISIONS = st.builds(
    Decision,
    allowed=st.booleans(),
    limit=COUNTS,
    remaining=st.one_of(COUNTS, st.integers(-5, 0)),
    reset_after=SECONDS,
    retry_after=SECONDS,
    policy=NAMES,
    scope=st.sampled_from(["global", "ip", "user+endpoint"]),
    window=st.sampled_from([1.0, 60.0, 0.25, 86400.0]),
)


@needs_c
@settings(max_examples=400)
@given(
    decisions=st.lists(DECISIONS, min_size=1, max_size=6),
    style=st.sampled_from([*HeaderStyle, "ietf", "both"]),
    now=st.floats(0, 2e9, allow_nan=False),
)
def test_headers_match_the_python_twin(
    decisions: list[Decision], style: HeaderStyle, now: float
) -> None:
    def outcome(function: Any) -> Any:
        try:
            return function(decisions, style, now=now)
        except Exception as exc:  # the twin's own errors (a limit of 0) must match too
            return type(exc)

    assert outcome(rate_limit_headers) == outcome(rate_limit_headers_py)


@needs_c
def test_headers_use_the_c_twin() -> None:
    # Not a tautology of the test above: the C function itself answers, not the fallback.
    assert headers_module._c_headers is not None
    decisions = [Decision(True, 10, 3, 12.5, 0.0, "ip", "ip", 60.0)]
    assert headers_module._c_headers(decisions, HeaderStyle.IETF, 0.0) == [
        (b"ratelimit-policy", b'"ip";q=10;w=60'),
        (b"ratelimit", b'"ip";r=3;t=13'),
    ]
    # What it leaves to Python: "none", plain strings, a limit of 0.
    assert headers_module._c_headers(decisions, HeaderStyle.NONE, 0.0) is None
    assert headers_module._c_headers(decisions, "ietf", 0.0) is None
    zero = [Decision(True, 0, 0, 1.0, 0.0, "ip", "ip", 60.0)]
    assert headers_module._c_headers(zero, HeaderStyle.IETF, 0.0) is None


# -- the memory backend's shortcut -----------------------------------------------------------

ALGORITHMS = st.sampled_from(
    [Algorithm.SLIDING_WINDOW_COUNTER] * 4 + [Algorithm.TOKEN_BUCKET, Algorithm.FIXED_WINDOW]
)


@needs_c
@settings(max_examples=150, deadline=None)
@given(
    algorithms=st.lists(ALGORITHMS, min_size=1, max_size=3),
    steps=st.lists(
        st.tuples(
            st.integers(0, 2),  # which identity
            st.one_of(st.integers(1, 4), st.integers(10**11, 10**12)),  # cost
            st.integers(0, 90_000),  # ms to wait first
            st.booleans(),  # the same key twice in one call
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_memory_shortcut_in_c_matches_python(
    algorithms: list[Algorithm], steps: list[tuple[int, int, int, bool]]
) -> None:
    """``_admit_all_c`` and ``_admit_all_py`` (each followed by the general path when they
    decline, as ``hit_now`` does): the same verdicts and the same live state."""
    policies = [
        Policy(f"p{i}", f"{7 + i}/{10 * (i + 1)}s", algorithm)
        for i, algorithm in enumerate(algorithms)
    ]
    policies.append(Policy("huge", "1000000000000/minute"))
    clocks = (FakeClock(), FakeClock())
    c_backend, py_backend = (MemoryBackend(clock=clock) for clock in clocks)
    for who, cost, wait, twice in steps:
        for clock in clocks:
            clock.advance(wait / 1000)
        checks = [Check(p, "ip", f"id{who}", cost) for p in policies]
        if twice:
            checks.append(checks[0])
        answers = []
        for backend, shortcut in ((c_backend, "_admit_all_c"), (py_backend, "_admit_all_py")):
            try:
                verdict = getattr(backend, shortcut)(checks)
                answers.append(verdict or backend._check(checks, commit=True))
            except Exception as exc:
                answers.append(type(exc))
        assert answers[0] == answers[1]
    now = clocks[0].now_us()
    assert {k: v for k, v in c_backend._data.items() if v[0] > now} == {
        k: v for k, v in py_backend._data.items() if v[0] > now
    }


# -- whole apps, against pure Python ---------------------------------------------------------


def build(clock: FakeClock) -> tuple[FastAPI, RateLimiter]:
    limiter = RateLimiter(
        backend=MemoryBackend(clock=clock),
        global_limit="40/10s",
        ip_limit="6/10s",
        endpoint_limits={"GET /a": "9/10s"},
        costs={"GET /b": 2},
        headers="both",
    )
    app = FastAPI()

    @app.get("/a")
    async def a() -> dict[str, str]:
        return {"a": "a"}

    @app.get("/b")
    async def b(request: Request) -> dict[str, Any]:
        return {"key": request.scope["fastapi_ratelimit"].api_key}

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app, limiter


async def run_steps(steps: list[tuple[int, int, bool, int]]) -> list[Any]:
    clock = FakeClock(1_700_000_000.0)
    app, limiter = build(clock)
    seen: list[Any] = []
    for ip, path, keyed, wait in steps:
        clock.advance(wait / 1000)
        headers = {"X-API-Key": "key-1"} if keyed else {}
        async with client_for(app, ip=f"192.0.2.{ip}") as client:
            response = await client.get(("/a", "/b", "/missing")[path], headers=headers)
        rate = {k: v for k, v in response.headers.items() if "ratelimit" in k or k == "retry-after"}
        # X-RateLimit-Reset is an epoch from the real clock: compare the rest.
        rate.pop("x-ratelimit-reset", None)
        seen.append((response.status_code, rate, response.content))
    backend = limiter.backend
    assert isinstance(backend, MemoryBackend)
    now = clock.now_us()
    seen.append({k: v for k, v in backend._data.items() if v[0] > now})
    return seen


@needs_c
@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),  # peer
            st.integers(0, 2),  # path
            st.booleans(),  # with an API key
            st.integers(0, 4000),  # ms to wait first
        ),
        min_size=1,
        max_size=40,
    )
)
async def test_apps_answer_alike_with_and_without_the_speedups(
    steps: list[tuple[int, int, bool, int]],
) -> None:
    with_c = await run_steps(steps)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(headers_module, "_c_headers", None)
        patch.setattr(MemoryBackend, "_admit_all", MemoryBackend._admit_all_py)
        pure = await run_steps(steps)
    assert with_c == pure
