"""Each fault mode of :class:`faultproxy.FaultProxy` against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
import redis.exceptions
from conftest import require_redis
from faultproxy import Direction, FaultProxy
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from servers import RedisServer, free_port

pytestmark = pytest.mark.redis

PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    require_redis()  # skips, or fails on CI
    with RedisServer(name="faultproxy") as srv:
        yield srv


@pytest_asyncio.fixture
async def proxy(server: RedisServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", server.port) as fault_proxy:
        yield fault_proxy


def client(proxy: FaultProxy, **kwargs: Any) -> redis.asyncio.Redis:
    """A client through the proxy that never retries (explicit, whatever redis-py's default)."""
    return redis.asyncio.Redis.from_url(proxy.url, retry=Retry(NoBackoff(), 0), **kwargs)


async def raw_ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(PING)
    await writer.drain()
    return await reader.readexactly(len(PONG))


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def test_pass_through_ping_set_get(proxy: FaultProxy) -> None:
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"
    async with asyncio.timeout(5), client(proxy) as r:
        assert await r.ping() is True
        assert await r.set("faultproxy:key", "value") is True
        assert await r.get("faultproxy:key") == b"value"
        values = [f"v{i}".encode() * 1000 for i in range(50)]  # several chunks, pipelined
        async with r.pipeline(transaction=False) as pipe:
            for i, value in enumerate(values):
                pipe.set(f"faultproxy:{i}", value)
                pipe.get(f"faultproxy:{i}")
            results = await pipe.execute()
        assert results[1::2] == values
        await r.delete("faultproxy:key", *(f"faultproxy:{i}" for i in range(50)))
    assert proxy.stats.connections_accepted == 1
    assert proxy.stats.bytes_to_upstream > 50_000
    assert proxy.stats.bytes_to_client > 50_000


async def test_delay_reply_slows_ping_and_times_out_short_socket_timeout(
    proxy: FaultProxy,
) -> None:
    async with client(proxy) as patient, client(proxy, socket_timeout=0.05) as hasty:
        async with asyncio.timeout(5):
            assert await patient.ping() is True  # both connected before the delay starts
            assert await hasty.ping() is True
            proxy.delay(0.2)
            start = time.monotonic()
            assert await patient.ping() is True
            assert time.monotonic() - start >= 0.2

            # Without the socket timeout the reply would come, after 0.2 s, and not raise.
            with pytest.raises(redis.exceptions.TimeoutError):
                await hasty.ping()

    async with asyncio.timeout(5), client(proxy, socket_timeout=0.05) as late:
        with pytest.raises(redis.exceptions.TimeoutError):
            await late.ping()  # a new connection under delay times out too


@pytest.mark.parametrize("direction", ["request", "both"])
async def test_delay_other_directions_keep_order(proxy: FaultProxy, direction: Direction) -> None:
    proxy.delay(0.1, direction=direction)
    async with asyncio.timeout(5), client(proxy) as r:
        start = time.monotonic()
        async with r.pipeline(transaction=False) as pipe:
            for i in range(200):
                pipe.echo(f"message-{i}")
            results = await pipe.execute()
        elapsed = time.monotonic() - start
    assert results == [f"message-{i}".encode() for i in range(200)]
    # connect (+ CLIENT SETINFO) and the pipeline: at least two delayed round trips
    assert elapsed >= 0.2


async def test_delay_does_not_accumulate_over_chunks(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        async with asyncio.timeout(5):
            assert await raw_ping(reader, writer) == PONG
            proxy.delay(0.2, direction="both")
            start = time.monotonic()
            for _ in range(5):  # five separate chunks, each held 0.2 s both ways
                writer.write(PING)
                await writer.drain()
                await asyncio.sleep(0.02)
            assert await reader.readexactly(5 * len(PONG)) == 5 * PONG
            elapsed = time.monotonic() - start
    finally:
        await close(writer)
    # ~0.08 + 2 * 0.2; accumulated it would be at least 5 * 2 * 0.2 = 2 s (a wide margin).
    assert 0.4 <= elapsed < 1.5


async def test_switching_to_pass_through_releases_delayed_chunks_at_once(
    proxy: FaultProxy,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        async with asyncio.timeout(5):
            assert await raw_ping(reader, writer) == PONG
            proxy.delay(30)
            pong = asyncio.ensure_future(raw_ping(reader, writer))
            await asyncio.sleep(0.1)
            assert not pong.done()
            proxy.pass_through()
            # Held for the 30 s delay, the asyncio.timeout(5) above would fail the test.
            assert await pong == PONG
    finally:
        await close(writer)


async def test_delay_new_connections_holds_only_connections_opened_after(
    proxy: FaultProxy,
) -> None:
    old_reader, old_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    new_writer = None
    try:
        async with asyncio.timeout(5):
            assert await raw_ping(old_reader, old_writer) == PONG
            proxy.delay_new_connections(0.3)
            start = time.monotonic()
            new_reader, new_writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            pong = asyncio.ensure_future(raw_ping(new_reader, new_writer))
            # The connection open before is not held; the new one's PING waits its turn.
            assert await raw_ping(old_reader, old_writer) == PONG
            assert not pong.done()
            assert await pong == PONG
            assert time.monotonic() - start >= 0.3
    finally:
        await close(old_writer)
        if new_writer is not None:
            await close(new_writer)


async def test_blackhole_hangs_new_and_existing_connections(proxy: FaultProxy) -> None:
    async with client(proxy) as r:
        async with asyncio.timeout(5):
            assert await r.ping() is True
        proxy.blackhole()
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await r.ping()  # existing connection stalls
        assert time.monotonic() - start >= 0.3

    async with client(proxy, socket_timeout=0.3) as r:
        start = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            async with asyncio.timeout(5):
                await r.ping()  # new connection: accepted, then nothing comes back
        assert 0.3 <= time.monotonic() - start < 2
    assert proxy.stats.connections_accepted == 2

    proxy.pass_through()
    async with asyncio.timeout(5), client(proxy) as r:
        assert await r.ping() is True


async def test_blackhole_holds_data_until_mode_changes(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        async with asyncio.timeout(5):
            assert await raw_ping(reader, writer) == PONG
            proxy.blackhole()
            pong = asyncio.ensure_future(raw_ping(reader, writer))
            await asyncio.sleep(0.2)
            assert not pong.done()
            proxy.pass_through()
            assert await pong == PONG  # held, not dropped: like a healed partition
    finally:
        await close(writer)


async def test_cut_after_forwards_part_of_a_reply_then_holds_the_rest(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        async with asyncio.timeout(5):
            assert await raw_ping(reader, writer) == PONG
            proxy.cut_after(len(PONG) + 3)
            writer.write(2 * PING)  # one chunk each way: the second reply is split
            await writer.drain()
            assert await reader.readexactly(len(PONG) + 3) == PONG + PONG[:3]
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await reader.read(1)  # the rest is held
            writer.write(PING)  # requests still go through: Redis answers, the proxy holds it
            await writer.drain()
            await asyncio.sleep(0.05)
            proxy.pass_through()
            assert await reader.readexactly(len(PONG) - 3 + len(PONG)) == PONG[3:] + PONG
    finally:
        await close(writer)


async def test_cut_after_gives_each_new_connection_the_budget(proxy: FaultProxy) -> None:
    proxy.cut_after(2)
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            async with asyncio.timeout(5):
                writer.write(PING)
                await writer.drain()
                assert await reader.readexactly(2) == PONG[:2]
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await reader.read(1)
        finally:
            await close(writer)


async def test_refuse_fails_fast_then_relistens_on_the_same_port(proxy: FaultProxy) -> None:
    port = proxy.port
    async with asyncio.timeout(5), client(proxy) as r:
        assert await r.ping() is True
        proxy.refuse()
        assert await r.ping() is True  # the open connection keeps working

    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    async with client(proxy, socket_connect_timeout=30) as r:
        # Refused, not hung: a hang would end in the asyncio timeout, not a ConnectionError.
        with pytest.raises(redis.exceptions.ConnectionError):
            async with asyncio.timeout(5):
                await r.ping()

    proxy.pass_through()
    assert proxy.port == port
    async with asyncio.timeout(5), client(proxy) as r:
        assert await r.ping() is True


async def test_reset_connections_fails_or_reconnects_the_next_command(
    proxy: FaultProxy,
) -> None:
    async with asyncio.timeout(5), client(proxy) as r:
        assert await r.ping() is True
        proxy.reset_connections()
        await asyncio.sleep(0.05)
        # redis-py 8.1 raises ConnectionError (Error 104 while writing); a client that checks
        # connections at pool checkout would reconnect instead.
        with contextlib.suppress(redis.exceptions.ConnectionError):
            await r.ping()
        assert await r.ping() is True  # the pool reconnects
    assert proxy.stats.connections_reset == 1
    assert proxy.stats.connections_accepted == 2


async def test_reset_connections_is_survived_by_a_retrying_client(proxy: FaultProxy) -> None:
    retry = Retry(NoBackoff(), 1)
    async with asyncio.timeout(5), redis.asyncio.Redis.from_url(proxy.url, retry=retry) as r:
        assert await r.ping() is True
        proxy.reset_connections()
        await asyncio.sleep(0.05)
        assert await r.ping() is True
    assert proxy.stats.connections_accepted == 2


async def test_reset_connections_sends_rst(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        async with asyncio.timeout(5):
            assert await raw_ping(reader, writer) == PONG
            proxy.reset_connections()
            with pytest.raises(ConnectionResetError):
                await reader.read(1)
    finally:
        await close(writer)


async def test_upstream_down_closes_the_client_connection() -> None:
    async with FaultProxy("127.0.0.1", free_port()) as fault_proxy:
        async with client(fault_proxy) as r:
            with pytest.raises(redis.exceptions.ConnectionError):
                async with asyncio.timeout(5):
                    await r.ping()
        assert fault_proxy.stats.upstream_failures == 1


async def test_stop_closes_everything_and_leaks_no_task(server: RedisServer) -> None:
    before = asyncio.all_tasks()
    fault_proxy = FaultProxy("127.0.0.1", server.port)
    await fault_proxy.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", fault_proxy.port)
    try:
        async with asyncio.timeout(5):
            assert await raw_ping(reader, writer) == PONG
            fault_proxy.delay(10)
            writer.write(PING)  # held in the proxy when it stops
            await writer.drain()
            await asyncio.sleep(0.05)
            assert len(asyncio.all_tasks()) > len(before)
            await fault_proxy.stop()
            assert asyncio.all_tasks() == before
            assert fault_proxy.stats.connections_active == 0
            with pytest.raises(ConnectionResetError):
                await reader.read(1)
    finally:
        await close(writer)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", fault_proxy.port)


def test_invalid_delay_arguments() -> None:
    fault_proxy = FaultProxy("127.0.0.1", 1)
    with pytest.raises(ValueError, match="direction"):
        fault_proxy.delay(1, direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        fault_proxy.delay(-1)
    with pytest.raises(ValueError, match=">= 0"):
        fault_proxy.cut_after(-1)
    with pytest.raises(ValueError, match=">= 0"):
        fault_proxy.delay_new_connections(-1)
    with pytest.raises(ValueError, match="direction"):
        fault_proxy.cut_after(1, direction="up")  # type: ignore[arg-type]
