"""The start-up warm-up (``RateLimiter.warm_up``, run by ``RateLimitMiddleware`` at lifespan
start-up): the backend connects and loads its script before the first request, within a
bound of its own, so the first request's 50 ms per-call timeout no longer has to cover them.

Through a real uvicorn lifespan, against real redis-servers. Before the warm-up existed, the
first request of a process connected (and ran ``SCRIPT LOAD``) inside its own timeout: with
a slow connection set-up it timed out, and under ``on_backend_error="deny"`` got a 503 from
a healthy Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from faultproxy import FaultProxy
from http_helpers import live_server, remaining
from loguru import logger
from servers import RedisCluster, RedisSentinelSetup, RedisServer

from fastapi_ratelimit import (
    ConfigurationError,
    MemoryBackend,
    RateLimiter,
    RateLimitMiddleware,
    RedisBackend,
)
from fastapi_ratelimit.backends.base import WARM_UP_TIMEOUT

#: Longer than the 50 ms per-call timeout, well within the warm-up's bound.
SLOW_CONNECT = 0.5
assert 0.05 < SLOW_CONNECT < WARM_UP_TIMEOUT / 4


def app_for(limiter: RateLimiter, **options: Any) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await limiter.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    app.add_middleware(RateLimitMiddleware, limiter=limiter, **options)
    return app


@asynccontextmanager
async def serving(limiter: RateLimiter, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app behind uvicorn with its lifespan on; the client is handed out once uvicorn
    serves, that is after the app's start-up (and the warm-up) completed."""
    async with (
        live_server(app_for(limiter, **options), lifespan="on") as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        yield client


@contextmanager
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    try:
        yield lines
    finally:
        logger.remove(handler)


class Stats:
    """``INFO`` counters of one redis-server, read over one connection opened up front (so
    reading them opens no connection the counts would include)."""

    def __init__(self, host: str, port: int, *, reset: bool = True) -> None:
        self.client = redis.Redis(host=host, port=port)
        if reset:  # a sentinel has no CONFIG: compare its counts instead
            self.client.config_resetstat()

    def calls(self, command: str) -> int:
        stats: dict[str, Any] = self.client.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    def connections(self) -> int:
        return int(self.client.info("stats")["total_connections_received"])

    def noscript_errors(self) -> int:
        errors: dict[str, Any] = self.client.info("errorstats")
        return int(errors.get("errorstat_NOSCRIPT", {}).get("count", 0))

    def close(self) -> None:
        self.client.close()


@contextmanager
def stats_of(*servers: RedisServer) -> Iterator[list[Stats]]:
    for server in servers:
        with redis.Redis(host=server.host, port=server.port) as client:
            client.script_flush()  # scripts survive FLUSHALL: start without any
    opened = [Stats(s.host, s.port) for s in servers]
    try:
        yield opened
    finally:
        for stats in opened:
            stats.close()


# -- standalone: the first request after a slow start ----------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("multiplex", [None, False], ids=["multiplexed", "redis-py pool"])
async def test_first_request_is_decided_though_connecting_outlasts_its_timeout(
    redis_url: str, redis_server: RedisServer, multiplex: bool | None
) -> None:
    with stats_of(redis_server) as (stats,):
        async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
            # Every new connection takes 0.5 s before Redis hears from it: ten times the
            # per-call timeout, a tenth of the warm-up's bound.
            proxy.delay_new_connections(SLOW_CONNECT)
            backend = RedisBackend.from_url(proxy.url, multiplex=multiplex)
            limiter = RateLimiter(backend=backend, ip_limit="5/minute", on_backend_error="deny")
            async with serving(limiter) as client:
                # Start-up connected and loaded the script before any request.
                assert stats.calls("script|load") >= 1
                connected = proxy.stats.connections_accepted
                assert connected >= 1

                first = await client.get("/hello")
                assert first.status_code == 200  # was a 503: the first call timed out
                assert remaining(first) == "4"  # decided by Redis, not failed open
                # The request neither connected nor loaded anything.
                assert proxy.stats.connections_accepted == connected
                assert stats.calls("evalsha") == 1
                assert stats.noscript_errors() == 0


@pytest.mark.redis
async def test_warm_up_false_leaves_start_up_alone(redis_server: RedisServer) -> None:
    with redis.Redis(host=redis_server.host, port=redis_server.port) as r:
        r.flushall()  # counts other tests left for this client
    with stats_of(redis_server) as (stats,):
        async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
            backend = RedisBackend.from_url(proxy.url)
            limiter = RateLimiter(backend=backend, ip_limit="5/minute", on_backend_error="deny")
            async with serving(limiter, warm_up=False) as client:
                # Serving, and Redis has not heard from this process yet.
                assert proxy.stats.connections_accepted == 0
                assert stats.calls("script|load") == 0

                first = await client.get("/hello")  # connects now, on a fast connection
                assert first.status_code == 200
                assert remaining(first) == "4"
                assert proxy.stats.connections_accepted >= 1


def test_warm_up_must_be_a_bool() -> None:
    limiter = RateLimiter(backend=MemoryBackend(), ip_limit="5/minute")
    with pytest.raises(ConfigurationError, match="warm_up"):
        RateLimitMiddleware(FastAPI(), limiter=limiter, warm_up="no")  # type: ignore[arg-type]


# -- Redis down or silent at start-up --------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize(("policy", "status"), [("allow", 200), ("deny", 503)])
async def test_redis_down_at_startup_logs_one_warning_and_start_up_goes_on(
    redis_server: RedisServer, policy: Any, status: int
) -> None:
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        proxy.refuse()  # nothing listens on its port: connections are refused
        backend = RedisBackend.from_url(proxy.url)
        limiter = RateLimiter(backend=backend, ip_limit="5/minute", on_backend_error=policy)
        with warnings() as lines:
            async with serving(limiter) as client:
                at_start_up = list(lines)
                response = await client.get("/hello")
    assert len(at_start_up) == 1
    assert "not ready at start-up" in at_start_up[0]
    assert "Redis warm-up failed" in at_start_up[0]
    assert response.status_code == status  # the failure policy, as without a warm-up


@pytest.mark.redis
async def test_a_silent_redis_holds_the_warm_up_no_longer_than_its_bound(
    redis_server: RedisServer,
) -> None:
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        proxy.blackhole()  # connections are accepted, nothing is ever answered
        for multiplex in (None, False):
            limiter = RateLimiter(backend=RedisBackend.from_url(proxy.url, multiplex=multiplex))
            try:
                with warnings() as lines:
                    async with asyncio.timeout(WARM_UP_TIMEOUT):  # fails the test if it hangs
                        assert await limiter.warm_up(timeout=0.3) is False
                assert len(lines) == 1
                assert "timed out after 0.3s" in lines[0]
            finally:
                await limiter.aclose()


# -- Cluster and Sentinel: whatever the first call would have set up -------------------------


@pytest.mark.redis
@pytest.mark.cluster
async def test_cluster_start_up_reaches_every_master_before_the_first_request(
    cluster_url: str, redis_cluster: RedisCluster
) -> None:
    with stats_of(*redis_cluster.nodes) as nodes:
        backend = RedisBackend.from_url(cluster_url, cluster=True)
        limiter = RateLimiter(backend=backend, ip_limit="5/minute", on_backend_error="deny")
        async with serving(limiter) as client:
            # The slot map is loaded, and the script on every master.
            assert backend.control_node("lists")  # "" until the slot map is loaded
            assert all(node.calls("script|load") >= 1 for node in nodes)
            connected = [node.connections() for node in nodes]

            first = await client.get("/hello")
            assert first.status_code == 200
            assert remaining(first) == "4"
            assert [node.connections() for node in nodes] == connected
            assert sum(node.calls("evalsha") for node in nodes) == 1
            assert sum(node.noscript_errors() for node in nodes) == 0


@pytest.mark.redis
@pytest.mark.sentinel
async def test_sentinel_start_up_finds_and_connects_the_master_before_the_first_request(
    redis_sentinel: RedisSentinelSetup,
) -> None:
    with redis.Redis(host=redis_sentinel.master.host, port=redis_sentinel.master.port) as r:
        r.flushall()
    with stats_of(redis_sentinel.master) as (master,):
        sentinel = Stats(redis_sentinel.sentinel.host, redis_sentinel.sentinel.port, reset=False)
        try:
            backend = RedisBackend.from_sentinel(
                redis_sentinel.sentinels, redis_sentinel.service_name
            )
            limiter = RateLimiter(backend=backend, ip_limit="5/minute", on_backend_error="deny")
            async with serving(limiter) as client:
                assert master.calls("script|load") >= 1
                asked = sentinel.connections()
                connected = master.connections()

                first = await client.get("/hello")
                assert first.status_code == 200
                assert remaining(first) == "4"
                assert (master.connections(), sentinel.connections()) == (connected, asked)
                assert master.calls("evalsha") == 1
                assert master.noscript_errors() == 0
        finally:
            sentinel.close()


# -- the memory backend ----------------------------------------------------------------------


async def test_memory_backend_warm_up_is_a_no_op() -> None:
    limiter = RateLimiter(backend=MemoryBackend(), ip_limit="5/minute")
    with warnings() as lines:
        assert await limiter.warm_up() is True
        async with serving(limiter) as client:
            first = await client.get("/hello")
    assert lines == []
    assert remaining(first) == "4"  # nothing was counted before the first request
