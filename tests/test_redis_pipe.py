"""The multiplexed connection (``backends/_pipe.py``) against a real redis-server: one
connection for every request's script call, replies matched in order even when callers give
up, NOSCRIPT, AUTH and SELECT, reconnection, and uvloop (what uvicorn runs by default)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis
import uvloop
from faultproxy import FaultProxy
from http_helpers import until
from servers import RedisServer

from fastapi_ratelimit import BackendError, Policy, RedisBackend
from fastapi_ratelimit.backends.base import Check

pytestmark = pytest.mark.redis


def own(i: int) -> list[Check]:
    # Each caller has its own limit, so its reply says whose it is.
    return [Check(Policy(f"p{i}", f"{100 + i}/minute"), "ip", f"client-{i}")]


def script_connections(url: str) -> int:
    """Clients that have run EVALSHA (the last command of each connection)."""
    with redis.Redis.from_url(url) as admin:
        return sum(1 for c in admin.client_list() if c["cmd"] in ("evalsha", "eval"))


async def test_concurrent_requests_share_one_connection_exactly(redis_url: str) -> None:
    # 500 calls at once on a loaded machine can outlast the default 50 ms timeout; this test
    # is about the connection they share, not about the timeout (test_redis_pipe_faults is).
    backend = RedisBackend.from_url(redis_url, max_connections=32, timeout=5.0)
    policy = Policy("shared", "100/minute")
    try:
        verdicts = await asyncio.gather(
            *(
                backend.hit([Check(policy, "ip", "one"), Check(policy, "user", "u")])
                for _ in range(500)
            )
        )
        assert sum(v.allowed for v in verdicts) == 100
        assert script_connections(redis_url) == 1
    finally:
        await backend.aclose()


async def test_a_passed_in_client_uses_redis_py_unless_asked(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    pooled = RedisBackend(client, max_in_flight=8)
    try:
        await asyncio.gather(*(pooled.hit(own(i)) for i in range(64)))
        assert script_connections(redis_url) > 1  # redis-py's pool, several connections
    finally:
        await pooled.aclose()
        await client.aclose()


async def test_callers_that_give_up_never_shift_the_replies(redis_url: str) -> None:
    backend = RedisBackend.from_url(redis_url, timeout=None)
    try:
        tasks = [asyncio.ensure_future(backend.hit(own(i))) for i in range(200)]
        await asyncio.sleep(0)  # all written; now half of the callers give up
        for task in tasks[::2]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(results):
            if i % 2:
                assert result.decisions[0].policy == f"p{i}"  # type: ignore[union-attr]
        after = await asyncio.gather(*(backend.hit(own(i)) for i in range(200, 300)))
        for i, verdict in zip(range(200, 300), after, strict=True):
            assert verdict.decisions[0].policy == f"p{i}"
            assert verdict.decisions[0].remaining == 100 + i - 1
    finally:
        await backend.aclose()


async def test_script_flush_falls_back_and_the_pipe_resumes(redis_url: str) -> None:
    backend = RedisBackend.from_url(redis_url)
    try:
        assert (await backend.hit(own(1))).decisions[0].remaining == 100
        with redis.Redis.from_url(redis_url) as admin:
            admin.script_flush()
            assert (await backend.hit(own(1))).decisions[0].remaining == 99
            assert (await backend.hit(own(1))).decisions[0].remaining == 98
            stats = admin.info("commandstats")
        # The flushed call was answered NOSCRIPT once, then reloaded and retried.
        assert (
            stats["cmdstat_evalsha"]["failed_calls"]
            + stats["cmdstat_evalsha"].get("rejected_calls", 0)
            >= 1
        )
    finally:
        await backend.aclose()


async def test_password_and_database_from_the_url() -> None:
    with RedisServer(name="pipe-auth") as server:
        server.command("CONFIG", "SET", "requirepass", "pipe-pw")
        url = f"redis://:pipe-pw@127.0.0.1:{server.port}/3"
        backend = RedisBackend.from_url(url)
        try:
            await backend.hit(own(7))
            with redis.Redis(port=server.port, password="pipe-pw", db=3) as admin:
                assert len(admin.keys("rl:*")) == 1
            with redis.Redis(port=server.port, password="pipe-pw", db=0) as admin:
                assert admin.keys("rl:*") == []
        finally:
            await backend.aclose()
        wrong = RedisBackend.from_url(f"redis://:nope-pw@127.0.0.1:{server.port}/0")
        try:
            with pytest.raises(BackendError) as caught:
                await wrong.hit(own(1))
            assert "nope-pw" not in str(caught.value)
        finally:
            await wrong.aclose()


async def test_a_timeout_drops_the_connection_and_the_next_call_reconnects() -> None:
    with RedisServer(name="pipe-timeout") as server:
        async with FaultProxy("127.0.0.1", server.port) as proxy:
            backend = RedisBackend.from_url(proxy.url, timeout=0.05)
            try:
                await backend.hit(own(1))
                proxy.delay(0.2)
                with pytest.raises(BackendError, match="timed out"):
                    await backend.hit(own(2))
                proxy.pass_through()
                verdict = await backend.hit(own(3))
                assert verdict.decisions[0].policy == "p3"
                # The late reply of the call that timed out went nowhere: p2 was counted
                # (it reached Redis) and p3's reply is p3's.
                assert (await backend.hit(own(2))).decisions[0].remaining <= 100
            finally:
                await backend.aclose()


async def test_redis_restart_is_survived(redis_url: str, redis_server: RedisServer) -> None:
    backend = RedisBackend.from_url(redis_url)
    try:
        await backend.hit(own(1))
        redis_server.restart()
        outcomes: list[Any] = []
        for _ in range(3):
            try:
                outcomes.append(await backend.hit(own(1)))
            except BackendError as exc:
                outcomes.append(exc)
        # The first call after the restart may see the old connection die; then it works.
        assert not isinstance(outcomes[-1], BackendError)
    finally:
        await backend.aclose()


def test_under_uvloop(redis_url: str) -> None:
    async def scenario() -> list[int]:
        backend = RedisBackend.from_url(redis_url)
        try:
            verdicts = await asyncio.gather(*(backend.hit(own(i)) for i in range(50)))
            return [v.decisions[0].remaining for v in verdicts]
        finally:
            await backend.aclose()

    run: Callable[[Any], list[int]] = uvloop.run
    assert run(scenario()) == [100 + i - 1 for i in range(50)]


async def test_a_unix_socket_url_goes_through_the_pipe(tmp_path: Any) -> None:
    path = tmp_path / "redis.sock"
    with RedisServer(name="pipe-unix", extra_args=["--unixsocket", str(path)]) as server:
        backend = RedisBackend.from_url(f"unix://{path}?db=2")
        try:
            verdicts = await asyncio.gather(*(backend.hit(own(i)) for i in range(20)))
            assert [v.decisions[0].remaining for v in verdicts] == [100 + i - 1 for i in range(20)]
            with redis.Redis(port=server.port, db=2) as admin:
                assert len(admin.keys("rl:*")) == 20
                clients = admin.client_list()
            assert sum(1 for c in clients if c["cmd"] == "evalsha") == 1
        finally:
            await backend.aclose()


async def test_closed_means_closed(redis_url: str) -> None:
    backend = RedisBackend.from_url(redis_url)
    await backend.hit(own(1))
    await backend.aclose()
    with pytest.raises(BackendError, match="closed"):
        await backend.hit(own(1))
    # The server sees the close a moment later.
    await until(lambda: script_connections(redis_url) == 0, "the connection closed")


async def test_a_failed_connect_is_retried_by_the_next_call() -> None:
    server = RedisServer(name="pipe-late")
    backend = RedisBackend.from_url(server.url)
    try:
        with pytest.raises(BackendError):
            await backend.hit(own(1))  # nothing listens yet
        server.start()
        assert (await backend.hit(own(1))).decisions[0].remaining == 100
    finally:
        await backend.aclose()
        server.close()
