"""The multiplexed connection (``backends/_pipe.py``) under network faults, through
``tests/faultproxy.py`` to a real redis-server: how long a call can take, and whose reply it
gets.

* Every call returns or raises within its timeout (plus a generous margin) from the moment it
  is called, also while a connection is being made and the script loaded. Before this was
  so, a call that found no connection waited for the connect timeout (5 s unless the client
  set ``socket_connect_timeout``) and then its own timeout on top, and a NOSCRIPT retry got a
  second timeout of its own.
* Under a fault (delays, a reply cut part-way, a black hole, a reset in the middle of a
  pipelined batch) many concurrent calls each get their own reply or an error, never the
  reply of another call: each asks for something only its own reply can carry.
* A connection that timed out or failed is never used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
import redis
import redis.asyncio
import uvloop
from faultproxy import FaultProxy
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from servers import RedisServer

from fastapi_ratelimit import BackendError, Policy, RedisBackend
from fastapi_ratelimit.backends._pipe import Pipe, pack
from fastapi_ratelimit.backends.base import Check

pytestmark = pytest.mark.redis

TIMEOUT = 0.2
#: Added to every bound: the machines are small and shared. The faults below held calls for
#: seconds (5 s for a black-holed connection attempt) before the bounds were enforced.
MARGIN = 1.0

Runner = Callable[[Coroutine[Any, Any, None]], None]
RUNNERS = [
    pytest.param(asyncio.run, id="asyncio"),
    pytest.param(uvloop.run, id="uvloop"),  # what uvicorn runs by default
]


def own(i: int) -> list[Check]:
    # Its own key and limit: the reply's "remaining" (100 + i - 1 on a first hit) says whose
    # reply it is.
    return [Check(Policy(f"p{i}", f"{100 + i}/minute"), "ip", f"client-{i}")]


def echo(i: int) -> bytes:
    # Of varying length, so that cut replies end anywhere in one.
    return b"call-%d-" % i + b"x" * (i % 37)


async def timed(call: Awaitable[Any]) -> tuple[float, Any]:
    """How long ``call`` took, and its result or the exception it raised."""
    start = time.monotonic()
    try:
        outcome = await call
    except Exception as exc:
        outcome = exc
    return time.monotonic() - start, outcome


def passed_in_client(proxy: FaultProxy) -> redis.asyncio.Redis:
    # No socket_connect_timeout: the pipe's own connection attempt may take 5 s.
    return redis.asyncio.Redis(host="127.0.0.1", port=proxy.port)


@contextlib.asynccontextmanager
async def piped(port: int) -> AsyncIterator[tuple[FaultProxy, Pipe]]:
    """A pipe through a fault proxy to the redis-server on ``port``, its connection open."""
    async with FaultProxy("127.0.0.1", port) as proxy:
        pipe = Pipe(host="127.0.0.1", port=proxy.port)
        try:
            assert await pipe.call(pack(b"PING"), 5.0) == b"PONG"
            yield proxy, pipe
        finally:
            pipe.close()


async def until_served(backend: RedisBackend, i: int, within: float = 10.0) -> int:
    """``remaining`` of the first successful hit of ``own(i)``, trying until ``within``."""
    deadline = time.monotonic() + within
    while True:
        try:
            return (await backend.hit(own(i))).decisions[0].remaining
        except BackendError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# -- time bounds ----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["blackhole", "slow handshake"])
async def test_no_call_waits_for_a_connection_past_its_timeout(
    redis_url: str, redis_server: RedisServer, fault: str
) -> None:
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        client = passed_in_client(proxy)
        backend = RedisBackend(client, multiplex=True, timeout=TIMEOUT)
        try:
            if fault == "blackhole":
                proxy.blackhole()  # connects, then SCRIPT LOAD is never answered
            else:
                proxy.delay(3.0)  # answered, after 3 s
            # Callers arriving all through the attempt: each is bounded from its own start.
            calls = []
            for i in range(8):
                calls.append(asyncio.ensure_future(timed(backend.hit(own(i)))))
                await asyncio.sleep(0.1)
            outcomes = await asyncio.gather(*calls)
            for elapsed, outcome in outcomes:
                assert elapsed < TIMEOUT + MARGIN, f"{fault}: a call took {elapsed:.2f}s"
                assert isinstance(outcome, BackendError), outcome
                assert "timed out" in str(outcome)
            # They shared one attempt rather than each opening a connection.
            assert proxy.stats.connections_accepted == 1
            proxy.pass_through()
            assert await until_served(backend, 100) == 199
        finally:
            await backend.aclose()
            await client.aclose()


async def test_a_noscript_retry_shares_the_first_call_deadline(
    redis_url: str, redis_server: RedisServer
) -> None:
    timeout, delay = 1.5, 1.4  # EVALSHA's NOSCRIPT, then EVAL: 2.8 s with a timeout each
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        backend = RedisBackend.from_url(proxy.url, timeout=timeout)
        try:
            assert (await backend.hit(own(1))).decisions[0].remaining == 100
            redis_server.command("SCRIPT", "FLUSH")
            proxy.delay(delay)
            elapsed, outcome = await timed(backend.hit(own(2)))
            assert elapsed < timeout + MARGIN, f"took {elapsed:.2f}s"
            assert isinstance(outcome, BackendError), outcome
            assert "timed out" in str(outcome)
            proxy.pass_through()
            assert await until_served(backend, 3) == 102
        finally:
            await backend.aclose()


async def test_a_reconnect_counts_against_the_call_timeout(
    redis_url: str, redis_server: RedisServer
) -> None:
    timeout, delay = 1.5, 1.4  # SCRIPT LOAD on the new connection, then EVALSHA
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        backend = RedisBackend.from_url(proxy.url, timeout=timeout)
        try:
            assert (await backend.hit(own(1))).decisions[0].remaining == 100
            proxy.reset_connections()
            await asyncio.sleep(0.05)
            proxy.delay(delay)
            elapsed, outcome = await timed(backend.hit(own(2)))
            assert elapsed < timeout + MARGIN, f"took {elapsed:.2f}s"
            assert isinstance(outcome, BackendError), outcome
            proxy.pass_through()
            assert await until_served(backend, 3) == 102
        finally:
            await backend.aclose()


async def test_a_connection_lost_as_it_is_made_fails_its_callers_at_once(
    redis_url: str, redis_server: RedisServer
) -> None:
    # The window between an attempt's end and its callers' turn: here a reset lands in it.
    pipe = Pipe(host=redis_server.host, port=redis_server.port)
    opened = pipe._open

    async def open_then_lose(bound: float | None = None) -> Any:
        protocol = await opened(bound)
        asyncio.get_running_loop().call_soon(protocol.abort)
        return protocol

    pipe._open = open_then_lose  # type: ignore[method-assign]
    try:
        elapsed, outcome = await timed(pipe.call(pack(b"ECHO", b"x"), 5.0))
        # It used to be sent down the dead connection and wait for its whole timeout.
        assert isinstance(outcome, RedisConnectionError), outcome
        assert elapsed < MARGIN
        pipe._open = opened  # type: ignore[method-assign]
        assert await pipe.call(pack(b"ECHO", b"y"), 5.0) == b"y"
    finally:
        pipe.close()


# -- replies go to their callers ------------------------------------------------------------


async def _inject(proxy: FaultProxy, fault: str) -> None:
    """Inject ``fault`` while a batch is in flight, then heal the network."""
    if fault == "reset":
        proxy.reset_connections()
    elif fault == "delay":
        proxy.delay(TIMEOUT * 1.5)  # some replies late, some in time
        await asyncio.sleep(0.5)
    elif fault == "cut":
        proxy.cut_after(300)  # a reply stops part-way through
        await asyncio.sleep(0.5)
    elif fault == "blackhole":
        proxy.blackhole()
        await asyncio.sleep(0.5)
    proxy.pass_through()


FAULTS = ["reset", "delay", "cut", "blackhole"]


async def _echo_scenario(port: int, fault: str) -> None:
    async with FaultProxy("127.0.0.1", port) as proxy:
        pipe = Pipe(host="127.0.0.1", port=proxy.port)
        try:
            assert await pipe.call(pack(b"PING"), 5.0) == b"PONG"
            calls: list[asyncio.Future[tuple[float, Any]]] = []
            injected: asyncio.Future[None] | None = None
            for wave in range(12):  # waves of pipelined calls, the fault in the middle
                for i in range(wave * 40, wave * 40 + 40):
                    command = pack(b"ECHO", echo(i))
                    calls.append(asyncio.ensure_future(timed(pipe.call(command, TIMEOUT))))
                if wave == 3:
                    injected = asyncio.ensure_future(_inject(proxy, fault))
                await asyncio.sleep(0.01 if wave < 4 else 0.08)
            outcomes = await asyncio.gather(*calls)
            assert injected is not None
            await injected
            failed = 0
            for i, (elapsed, outcome) in enumerate(outcomes):
                assert elapsed < TIMEOUT + MARGIN, f"call {i} took {elapsed:.2f}s"
                if isinstance(outcome, Exception):
                    assert isinstance(outcome, (RedisConnectionError, TimeoutError)), outcome
                    failed += 1
                else:
                    assert outcome == echo(i), f"call {i} got {outcome[:20]!r}"
            assert failed, "the fault should have failed some calls"
            # After the fault: a new connection, every reply its caller's.
            await asyncio.sleep(TIMEOUT)
            after = range(10_000, 10_200)
            replies = await asyncio.gather(*(pipe.call(pack(b"ECHO", echo(i)), 5.0) for i in after))
            assert replies == [echo(i) for i in after]
            assert proxy.stats.connections_accepted >= 2  # the faulty one was not reused
        finally:
            pipe.close()


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("run", RUNNERS)
def test_under_a_fault_each_call_gets_its_own_reply_or_an_error(
    redis_url: str, redis_server: RedisServer, fault: str, run: Runner
) -> None:
    run(_echo_scenario(redis_server.port, fault))


@pytest.mark.parametrize("fault", FAULTS)
async def test_under_a_fault_each_request_gets_its_own_decision_or_a_backend_error(
    redis_url: str, redis_server: RedisServer, fault: str
) -> None:
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        backend = RedisBackend.from_url(proxy.url, timeout=TIMEOUT)
        try:
            await backend.hit(own(0))
            calls: list[asyncio.Future[tuple[float, Any]]] = []
            injected: asyncio.Future[None] | None = None
            for wave in range(10):
                for i in range(1 + wave * 30, 1 + wave * 30 + 30):
                    calls.append(asyncio.ensure_future(timed(backend.hit(own(i)))))
                if wave == 3:
                    injected = asyncio.ensure_future(_inject(proxy, fault))
                await asyncio.sleep(0.01 if wave < 4 else 0.08)
            outcomes = await asyncio.gather(*calls)
            assert injected is not None
            await injected
            for i, (elapsed, outcome) in enumerate(outcomes, start=1):
                # A call may reconnect (the connect and SCRIPT LOAD) and retry after NOSCRIPT:
                # all of it within the one timeout.
                assert elapsed < TIMEOUT + MARGIN, f"request {i} took {elapsed:.2f}s"
                if isinstance(outcome, Exception):
                    assert isinstance(outcome, BackendError), outcome
                else:
                    # Each key is hit once: its own reply says 100 + i - 1 left.
                    assert outcome.decisions[0].remaining == 100 + i - 1, f"request {i}"
            assert await until_served(backend, 1000) == 1099
        finally:
            await backend.aclose()


async def test_a_reply_cut_short_is_never_completed_by_another_connection(
    redis_url: str, redis_server: RedisServer
) -> None:
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        pipe = Pipe(host="127.0.0.1", port=proxy.port)
        try:
            assert await pipe.call(pack(b"PING"), 5.0) == b"PONG"
            proxy.cut_after(5)  # "$11\r\n" of the first reply, nothing of its body
            elapsed, outcome = await timed(pipe.call(pack(b"ECHO", b"first-reply"), TIMEOUT))
            assert isinstance(outcome, TimeoutError), outcome
            assert elapsed < TIMEOUT + MARGIN
            proxy.pass_through()  # the rest of it now arrives, on the connection given up
            assert await pipe.call(pack(b"ECHO", b"second"), 5.0) == b"second"
            assert proxy.stats.connections_accepted == 2
        finally:
            pipe.close()


async def test_a_timeout_on_a_live_connection_is_bounded_and_drops_it(
    redis_url: str, redis_server: RedisServer
) -> None:
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        pipe = Pipe(host="127.0.0.1", port=proxy.port)
        try:
            assert await pipe.call(pack(b"PING"), 5.0) == b"PONG"
            proxy.blackhole()
            outcomes = await asyncio.gather(
                *(timed(pipe.call(pack(b"ECHO", echo(i)), TIMEOUT)) for i in range(50))
            )
            for elapsed, outcome in outcomes:
                assert isinstance(outcome, (TimeoutError, RedisConnectionError)), outcome
                assert elapsed < TIMEOUT + MARGIN
            # The connection attempt is black-holed as well: bounded, and a timeout.
            elapsed, outcome = await timed(pipe.call(pack(b"ECHO", b"z"), TIMEOUT))
            assert isinstance(outcome, (TimeoutError, RedisTimeoutError)), outcome
            assert elapsed < TIMEOUT + MARGIN
            proxy.pass_through()
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert await pipe.call(pack(b"ECHO", b"back"), 1.0) == b"back"
                    break
                except (TimeoutError, RedisConnectionError, RedisTimeoutError):
                    assert time.monotonic() < deadline
        finally:
            pipe.close()


@pytest.mark.parametrize("run", RUNNERS)
def test_a_shorter_timeout_queued_behind_a_longer_one_keeps_its_own_bound(
    redis_url: str, redis_server: RedisServer, run: Runner
) -> None:
    run(_shorter_timeout_scenario(redis_server.port))


async def _shorter_timeout_scenario(port: int) -> None:
    # One timer watches the whole queue (not one per call): a call with less time than the
    # ones before it must move that timer forward, not wait for theirs.
    async with piped(port) as (proxy, pipe):
        proxy.blackhole()
        patient = asyncio.ensure_future(timed(pipe.call(pack(b"ECHO", b"long"), 30.0)))
        elapsed, outcome = await asyncio.wait_for(
            timed(pipe.call(pack(b"ECHO", b"short"), TIMEOUT)), 10
        )
        assert isinstance(outcome, TimeoutError), outcome
        assert elapsed < TIMEOUT + MARGIN
        # Its timeout dropped the connection: the patient call fails with it, at once.
        elapsed, outcome = await asyncio.wait_for(patient, 10)
        assert isinstance(outcome, RedisConnectionError), outcome
        assert elapsed < TIMEOUT + MARGIN


@pytest.mark.parametrize("run", RUNNERS)
def test_the_queue_timer_waits_on_for_calls_made_after_it_was_set(
    redis_url: str, redis_server: RedisServer, run: Runner
) -> None:
    run(_timer_rearmed_scenario(redis_server.port))


async def _timer_rearmed_scenario(port: int) -> None:
    # The timer falls due for an early call that was answered; a later call, still waiting,
    # must get a timer of its own then, or it would wait for ever on a dead link.
    async with piped(port) as (proxy, pipe):
        assert await pipe.call(pack(b"ECHO", b"early"), TIMEOUT) == b"early"
        proxy.blackhole()
        await asyncio.sleep(TIMEOUT / 2)  # the early call's deadline falls in this one
        elapsed, outcome = await asyncio.wait_for(
            timed(pipe.call(pack(b"ECHO", b"late"), TIMEOUT)), 10
        )
        assert isinstance(outcome, TimeoutError), outcome
        assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + MARGIN


async def test_calls_answered_in_time_never_time_out_however_long_the_traffic_lasts(
    redis_url: str, redis_server: RedisServer
) -> None:
    # Replies 50 ms late, calls with 1 s each, for many times the timeout: the queue's timer
    # falls due again and again while calls wait, and must fail none of them.
    async with piped(redis_server.port) as (proxy, pipe):
        proxy.delay(0.05)
        calls = []
        for i in range(60):
            calls.append(asyncio.ensure_future(pipe.call(pack(b"ECHO", echo(i)), 1.0)))
            await asyncio.sleep(0.05)
        assert await asyncio.gather(*calls) == [echo(i) for i in range(60)]
        assert proxy.stats.connections_accepted == 1


async def test_garbage_on_the_wire_drops_the_connection() -> None:
    # A stream hiredis cannot parse: the call fails at once and the next one reconnects.
    answers = [b"?not RESP\r\n", b"+second-connection\r\n"]
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        answer = answers[min(connections, 1)]
        connections += 1
        try:
            while await reader.read(65536):
                writer.write(answer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pipe = Pipe(host="127.0.0.1", port=port)
    try:
        elapsed, outcome = await timed(pipe.call(pack(b"PING"), 5.0))
        assert isinstance(outcome, RedisConnectionError), outcome
        assert elapsed < MARGIN
        assert await pipe.call(pack(b"PING"), 5.0) == b"second-connection"
        assert connections == 2
    finally:
        pipe.close()
        server.close()
        await server.wait_closed()
