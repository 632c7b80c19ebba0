"""What only the Redis backend has to show: one round trip, script reloads, pooling, errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from importlib.resources import files

import pytest
import redis
import redis.asyncio
from servers import RedisServer, free_port

from fastapi_ratelimit import (
    Algorithm,
    BackendError,
    Check,
    ConfigurationError,
    FakeClock,
    Policy,
    RedisBackend,
)

pytestmark = pytest.mark.redis


def five_levels(user: str = "alice") -> list[Check]:
    return [
        Check(Policy("global", "100000/minute", Algorithm.FIXED_WINDOW), "global", ""),
        Check(Policy("ip", "1000/minute", Algorithm.SLIDING_WINDOW_LOG), "ip", "10.1.2.3"),
        Check(Policy("ep", "500/minute", Algorithm.SLIDING_WINDOW_COUNTER), "endpoint", "GET /x"),
        Check(Policy("key", "100/second;burst=200", Algorithm.TOKEN_BUCKET), "api_key", "k"),
        Check(Policy("user", "600/minute;burst=100", Algorithm.GCRA), "user", user),
    ]


def commandstats(url: str) -> dict[str, int]:
    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return {name: int(entry["calls"]) for name, entry in stats.items()}


async def test_one_redis_command_per_multi_level_check(redis_url: str) -> None:
    backend = RedisBackend.from_url(redis_url, timeout=5.0)
    try:
        await backend.hit(five_levels())  # loads the script (EVALSHA, NOSCRIPT, SCRIPT LOAD)
        with redis.Redis.from_url(redis_url) as client:
            client.config_resetstat()
        for _ in range(10):
            assert (await backend.hit(five_levels())).allowed
        stats = commandstats(redis_url)
    finally:
        await backend.aclose()
    # Ten checks of five levels each: ten EVALSHA. Redis also counts the commands the script
    # runs inside itself; apart from those (and this test's own connection for RESETSTAT and
    # INFO), nothing else ran.
    assert stats["cmdstat_evalsha"] == 10
    inside_script = {
        f"cmdstat_{c}"
        for c in [
            "hmget",
            "hset",
            "pexpire",
            "llen",
            "lindex",
            "ltrim",
            "rpush",
            "rpop",
            "del",
            "get",
            "set",
            "time",
        ]
    }
    own = {"cmdstat_info", "cmdstat_hello", "cmdstat_config|resetstat", "cmdstat_client|setinfo"}
    assert set(stats) - inside_script - own == {"cmdstat_evalsha"}


async def test_script_flush_mid_traffic_loses_nothing(redis_url: str) -> None:
    backend = RedisBackend.from_url(redis_url, timeout=5.0)
    flusher = redis.asyncio.Redis.from_url(redis_url)
    levels = five_levels()
    try:
        for i in range(60):
            if i % 10 == 5:
                await flusher.script_flush()
            assert (await backend.hit(levels)).allowed
        # Counters continued across every flush.
        peeked = await backend.peek(levels)
        assert peeked.decisions[0].remaining == 100000 - 60
        assert peeked.decisions[1].remaining == 1000 - 60

        # And under concurrency: flush in a loop while 300 checks run.
        async def flush_loop() -> None:
            for _ in range(20):
                await flusher.script_flush()
                await asyncio.sleep(0.001)

        other = five_levels("bob")
        results = await asyncio.gather(
            flush_loop(), *(backend.hit(other) for _ in range(300)), return_exceptions=True
        )
        assert not [r for r in results if isinstance(r, BaseException)]
        admitted = sum(r.allowed for r in results[1:])  # type: ignore[union-attr]
        assert admitted >= 100  # bob's own GCRA level has a burst of 100
        assert (await backend.peek(other)).decisions[1].remaining == 1000 - 60 - admitted
    finally:
        await flusher.aclose()
        await backend.aclose()


_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from fastapi_ratelimit import Algorithm, Check, Policy, RedisBackend

    async def main(url, algorithm):
        backend = RedisBackend.from_url(url, timeout=10.0)
        check = [Check(Policy("p", "100/day", Algorithm(algorithm)), "ip", "shared")]
        verdicts = await asyncio.gather(*(backend.hit(check) for _ in range(250)))
        await backend.aclose()
        print(sum(v.allowed for v in verdicts))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_two_processes_sharing_redis_admit_exactly_the_limit(
    redis_url: str, algorithm: Algorithm
) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, redis_url, algorithm.value],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    admitted = [int(out.strip()) for out, _ in outputs]
    assert sum(admitted) == 100, admitted


async def test_a_thousand_concurrent_checks_all_get_a_decision(redis_url: str) -> None:
    # A plain client whose pool *raises* past 10 connections: max_in_flight keeps us under it.
    client = redis.asyncio.Redis.from_url(redis_url, max_connections=10)
    # One fixed time for both: on a loaded machine the run can cross a minute boundary, and
    # the global level (a fixed window) would start counting again there.
    clock = FakeClock()
    backend = RedisBackend(client, max_in_flight=10, timeout=10.0, clock=clock)
    owned = RedisBackend.from_url(redis_url, max_connections=8, timeout=10.0, clock=clock)
    try:
        levels = five_levels()
        admitted = 0
        for b in (backend, owned):
            verdicts = await asyncio.gather(
                *(
                    b.hit([*levels[:4], Check(levels[4].policy, "user", f"u{i}")])
                    for i in range(1000)
                )
            )
            # gather() would have raised on the first error: every check got a decision.
            assert len(verdicts) == 1000
            admitted += sum(v.allowed for v in verdicts)
        assert admitted >= 200  # the token bucket's burst
        assert (await backend.peek(levels[:1])).decisions[0].remaining == 100000 - admitted
    finally:
        await owned.aclose()
        await backend.aclose()
        await client.aclose()


async def test_connection_refused_is_a_backend_error_without_the_password() -> None:
    url = f"redis://admin:hunter2@127.0.0.1:{free_port()}/0"
    backend = RedisBackend.from_url(url, timeout=2.0)
    try:
        with pytest.raises(BackendError) as info:
            await backend.hit(five_levels())
    finally:
        await backend.aclose()
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(backend)
    assert isinstance(info.value.__cause__, (redis.ConnectionError, OSError))


async def test_timeout_is_a_backend_error(redis_url: str) -> None:
    backend = RedisBackend.from_url(redis_url, timeout=0.1)
    admin = redis.asyncio.Redis.from_url(redis_url)
    try:
        await backend.hit(five_levels())
        # WRITE: scripts wait, the admin's UNPAUSE does not.
        await admin.execute_command("CLIENT", "PAUSE", "30000", "WRITE")
        started = asyncio.get_running_loop().time()
        with pytest.raises(BackendError, match=r"timed out after 0\.1s") as info:
            await backend.hit(five_levels())
        elapsed = asyncio.get_running_loop().time() - started
        await admin.execute_command("CLIENT", "UNPAUSE")
        assert isinstance(info.value.__cause__, TimeoutError)
        # Bounded by the timeout (0.1 s), not by the pause (30 s): a wide margin both ways.
        assert elapsed < 5
        # Afterwards the backend works again, counters intact (one hit before the pause).
        verdict = await backend.hit(five_levels())
        assert verdict.allowed
        assert verdict.decisions[1].remaining == 1000 - 2
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")  # never leave it paused
        await admin.aclose()
        await backend.aclose()


async def test_calls_queued_for_a_slot_wait_within_their_own_timeout(redis_url: str) -> None:
    """Found in the session-25 audit: on redis-py's path (TLS, Sentinel, multiplex=False) the
    wait for one of the max_in_flight slots was outside the timeout, so during a pause the
    calls queued behind the first ones each waited a whole timeout more once they ran."""
    backend = RedisBackend.from_url(redis_url, timeout=0.1, multiplex=False, max_in_flight=1)
    admin = redis.asyncio.Redis.from_url(redis_url)
    loop = asyncio.get_running_loop()

    async def timed_hit(user: str) -> float:
        started = loop.time()
        with pytest.raises(BackendError, match="timed out"):
            await backend.hit(five_levels(user))
        return loop.time() - started

    try:
        await backend.hit(five_levels())
        await admin.execute_command("CLIENT", "PAUSE", "30000", "WRITE")
        waits = await asyncio.gather(*(timed_hit(f"u{i}") for i in range(20)))
        await admin.execute_command("CLIENT", "UNPAUSE")
        # Queued 19 deep behind 1 slot, the last used to wait about 20 timeouts (2 s). Each
        # now gives up at its own timeout (0.1 s): a wide margin for a busy machine.
        assert max(waits) < 0.8, waits
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
        await backend.aclose()


async def test_out_of_memory_is_a_backend_error(redis_url: str) -> None:
    backend = RedisBackend.from_url(redis_url, timeout=5.0)
    admin = redis.asyncio.Redis.from_url(redis_url)
    try:
        await admin.set("ballast", "x" * 10000)
        await admin.config_set("maxmemory", "1")
        with pytest.raises(BackendError, match="maxmemory") as info:
            await backend.hit(five_levels())
        assert isinstance(info.value.__cause__, redis.ResponseError)
        # The script failed on its first write: nothing of the request was stored.
        await admin.config_set("maxmemory", "0")
        assert await admin.dbsize() == 1
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()
        await backend.aclose()


async def test_auth_failures_are_backend_errors_without_the_password() -> None:
    with RedisServer() as server:
        # Set after start: the fixture's readiness probe speaks without a password.
        server.command("CONFIG", "SET", "requirepass", "s3cret-pw")
        wrong = RedisBackend.from_url(
            f"redis://:wrong-pw-123@127.0.0.1:{server.port}/0", timeout=5.0
        )
        missing = RedisBackend.from_url(f"redis://127.0.0.1:{server.port}/0", timeout=5.0)
        right = RedisBackend.from_url(f"redis://:s3cret-pw@127.0.0.1:{server.port}/0", timeout=5.0)
        try:
            with pytest.raises(BackendError) as wrong_info:
                await wrong.hit(five_levels())
            assert "wrong-pw-123" not in str(wrong_info.value)
            with pytest.raises(BackendError):
                await missing.hit(five_levels())
            assert (await right.hit(five_levels())).allowed
            assert "s3cret" not in repr(right)
        finally:
            for backend in (wrong, missing, right):
                await backend.aclose()


async def test_keys_hold_no_raw_identifiers(redis_url: str) -> None:
    backend = RedisBackend.from_url(redis_url, timeout=5.0)
    secret = "sk_live_0123456789abcdef"
    try:
        await backend.hit([Check(Policy("keys", "10/minute"), "api_key", secret)])
        await backend.hit([Check(Policy("ips", "10/minute"), "ip", "203.0.113.9")])
        keys = [k.decode() async for k in backend.client.scan_iter()]
    finally:
        await backend.aclose()
    assert len(keys) == 2
    for key in keys:
        assert secret not in key
        assert "203.0.113.9" not in key


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.0}, "timeout"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"ttl_margin": -1}, "ttl_margin"),
        ({"prefix": "a:b"}, "prefix"),
    ],
)
async def test_bad_configuration_names_the_field(
    redis_url: str, kwargs: dict[str, object], field: str
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        with pytest.raises(ConfigurationError) as info:
            RedisBackend(client, **kwargs)  # type: ignore[arg-type]
        assert info.value.field == field
    finally:
        await client.aclose()


def test_bad_url_and_client_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match=r"^url: ") as info:
        RedisBackend.from_url("http://user:pw@localhost")
    assert "pw@" not in str(info.value)
    with pytest.raises(ConfigurationError, match=r"^client: "):
        RedisBackend(object())  # type: ignore[arg-type]


def test_every_algorithm_has_a_python_reference_and_a_lua_twin() -> None:
    package = files("fastapi_ratelimit")
    for algorithm in Algorithm:
        assert package.joinpath("algorithms", f"{algorithm.value}.py").is_file()
        lua = package.joinpath("backends", "lua", f"{algorithm.value}.lua").read_text()
        assert lua.startswith("--"), "each script starts with a header comment giving its units"
        assert "microsecond" in lua.split("\n\n")[0]
        assert f"ALGORITHMS['{algorithm.code}']" in lua


async def test_sentinel_backend_follows_the_master(redis_sentinel) -> None:  # type: ignore[no-untyped-def]
    backend = RedisBackend.from_sentinel(
        redis_sentinel.sentinels, redis_sentinel.service_name, timeout=5.0
    )
    try:
        assert (await backend.hit(five_levels("sentinel-user"))).allowed
        keys = redis_sentinel.master.command("DBSIZE")
        assert isinstance(keys, int)
        assert keys >= 5
    finally:
        await backend.aclose()
