"""Shared fixtures: real Redis servers started on demand (see ``tests/servers/``).

The session-scoped server fixtures are lazy: a set-up is only started when the first test
that needs it runs, and it is stopped at the end of the session.  When ``redis-server`` is
missing or a set-up cannot start, the requesting tests are skipped -- or fail when the
environment variable ``CI`` is ``"true"``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NoReturn

import pytest
import pytest_asyncio
import redis
import redis.asyncio
from loguru import logger

# tests/ has no __init__.py: pytest (rootdir/prepend import mode) puts tests/ on sys.path.
from servers import RedisCluster, RedisSentinelSetup, RedisServer, redis_server_binary

from fastapi_ratelimit import Backend, MemoryBackend, RedisBackend

# The library is silent until an app opts in; the tests read its log lines.
logger.enable("fastapi_ratelimit")


def _unavailable(reason: str, details: str = "") -> NoReturn:
    """Skip the requesting test, or fail it when running on CI (``CI=true``).

    ``details`` (e.g. the server's log tail) is only shown in the failure message.
    """
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}\n{details}".rstrip(), pytrace=False)
    pytest.skip(reason)


def _start_failed(what: str, exc: BaseException) -> NoReturn:
    summary, _, details = str(exc).partition("\n")
    _unavailable(f"could not start {what}: {summary}", details)


def require_redis() -> str:
    """Return the path of ``redis-server``; skip (or fail on CI) when it is not installed."""
    binary = redis_server_binary()
    if binary is None:
        _unavailable("redis-server is not installed (not found on PATH)")
    return binary


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A standalone redis-server shared by the whole session."""
    require_redis()
    server = RedisServer(name="redis-test")
    error: Exception | None = None
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        server.close()
        error = exc
    if error is not None:  # outside the except block: no chained traceback on CI
        _start_failed("redis-server", error)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster shared by the whole session."""
    require_redis()
    cluster = RedisCluster()
    error: Exception | None = None
    try:
        cluster.start()  # stops whatever it started on failure
    except (RuntimeError, OSError) as exc:
        error = exc
    if error is not None:
        _start_failed("a Redis Cluster", error)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelSetup]:
    """Master + replica + one sentinel (service ``mymaster``) shared by the whole session."""
    require_redis()
    setup = RedisSentinelSetup()
    error: Exception | None = None
    try:
        setup.start()  # stops whatever it started on failure
    except (RuntimeError, OSError) as exc:
        error = exc
    if error is not None:
        _start_failed("a Redis Sentinel set-up", error)
    try:
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session server, emptied (FLUSHALL) before the test.

    If an earlier test stopped the server, it is started again first.
    """
    if not redis_server.is_running:
        redis_server.start()
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest_asyncio.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio client connected to the (flushed) session server."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def cluster_url(redis_cluster: RedisCluster) -> str:
    """URL of the session cluster with every master emptied (FLUSHALL) before the test.

    Nodes stopped by an earlier test are started again (and the cluster state waited for).
    """
    for index, node in enumerate(redis_cluster.nodes):
        if not node.is_running:
            redis_cluster.start_node(index)
    redis_cluster.wait_ok()
    for node in redis_cluster.nodes:
        with redis.Redis(host=node.host, port=node.port) as client:
            client.flushall()
    return redis_cluster.url


# -- backends under test -------------------------------------------------------------------------

BackendFactory = Callable[..., Backend]

#: Every backend kind the contract suite runs against. Markers let `-m "not redis"` skip the
#: ones that need servers.
BACKEND_KINDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("cluster", id="cluster", marks=[pytest.mark.redis, pytest.mark.cluster]),
    pytest.param("sentinel", id="sentinel", marks=[pytest.mark.redis, pytest.mark.sentinel]),
]


def _flushed_sentinel_master(setup: RedisSentinelSetup) -> None:
    with redis.Redis(host=setup.master.host, port=setup.master.port) as client:
        client.flushall()


@pytest_asyncio.fixture(params=BACKEND_KINDS)
async def make_backend(request: pytest.FixtureRequest) -> AsyncIterator[BackendFactory]:
    """A factory for fresh, empty backends of one kind; keyword arguments (``clock``, ...) go
    to the backend constructor. Everything it made is closed after the test."""
    kind: str = request.param
    created: list[Backend] = []

    def factory(**options: Any) -> Backend:
        if kind != "memory":
            # Generous: CI machines are small and shared; timeouts have their own tests.
            options.setdefault("timeout", 5.0)
        backend: Backend
        if kind == "memory":
            backend = MemoryBackend(**options)
        elif kind == "redis":
            backend = RedisBackend.from_url(request.getfixturevalue("redis_url"), **options)
        elif kind == "cluster":
            url = request.getfixturevalue("cluster_url")
            backend = RedisBackend.from_url(url, cluster=True, **options)
        else:
            setup: RedisSentinelSetup = request.getfixturevalue("redis_sentinel")
            _flushed_sentinel_master(setup)
            backend = RedisBackend.from_sentinel(setup.sentinels, setup.service_name, **options)
        created.append(backend)
        return backend

    factory.kind = kind  # type: ignore[attr-defined]
    yield factory
    for backend in created:
        await backend.aclose()
