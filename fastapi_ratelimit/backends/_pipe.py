"""One multiplexed connection to a standalone Redis, for the script calls on the hot path.

redis-py checks a connection out of its pool for every command, and its ``execute_command``
adds retries, observability hooks and argument encoding on top; per request, that costs more
CPU than everything else the middleware does. Here every request shares ONE connection:
a command is written as soon as it is made and the replies, which Redis sends in order, are
matched to their callers first-in first-out (aioredis 1.x worked this way). Concurrent
requests so pipeline on the wire for free: fewer system calls on both sides, no pool, no
connection per request.

A caller that gives up (timeout, cancellation) leaves its slot in the queue, and its reply is
read and dropped when it comes: the connection never goes out of step. A timeout also drops
the connection, since a link that swallowed one reply may have swallowed more; the next call
connects afresh. So does anything else that breaks the stream (a reply nobody asked for, one
hiredis cannot parse): a connection is never used again after a timeout or an error of its own.

Time: :meth:`Pipe.call` returns or raises within ``timeout`` of being called (plus the event
loop's lag), whatever the connection is doing; one timer per connection watches the deadlines
of all the calls waiting on it. Waiting for a new connection, its AUTH, SELECT and SCRIPT LOAD
counts against the same ``timeout``: the connect timeout (5 s unless the client sets
``socket_connect_timeout``) bounds the shared attempt, never a caller. Concurrent callers share
one attempt, which carries on when they give up, so the next callers can use it.
At start-up, :meth:`Pipe.warm_up` opens the connection with a bound of its own (see
``RedisBackend.warm_up``), so the first call does not pay for it.

Used only where redis-py adds nothing we need: plain TCP or Unix-socket
connections of a standalone client, RESP2, password or ACL user (see :func:`pipe_for`);
TLS, Sentinel, Cluster and other set-ups keep redis-py for everything.

Replies are parsed by ``hiredis`` (installed with ``redis[hiredis]``); without it the backend
uses redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:
    import hiredis
except ImportError:  # pragma: no cover - redis[hiredis] installs it
    hiredis = None  # type: ignore[assignment]

__all__ = ["Pipe", "bulk", "pack", "pipe_for"]

_NEVER = float("inf")


def pack(*parts: bytes) -> bytes:
    """A command as a RESP array of bulk strings."""
    return b"*%d\r\n" % len(parts) + bulk(*parts)


def bulk(*parts: bytes) -> bytes:
    """``parts`` as consecutive RESP bulk strings (the elements of an array)."""
    return b"".join([b"$%d\r\n%s\r\n" % (len(part), part) for part in parts])


def pipe_for(client: Redis, setup: Sequence[bytes] = ()) -> Pipe | None:
    """A :class:`Pipe` with ``client``'s connection settings, or ``None`` when the client is
    set up in a way only redis-py handles (TLS, Sentinel, RESP3, credential providers, a
    custom pool or connection class). ``setup``: commands sent on every new connection."""
    pool = client.connection_pool
    if hiredis is None or type(pool) is not ConnectionPool:
        return None
    kind = pool.connection_class
    options = pool.connection_kwargs
    if kind not in (Connection, UnixDomainSocketConnection):
        return None
    if options.get("credential_provider") is not None or options.get("protocol") not in (
        None,
        2,
        "2",
    ):
        return None
    return Pipe(
        host=str(options.get("host", "localhost")),
        port=int(options.get("port", 6379)),
        path=options.get("path") if kind is UnixDomainSocketConnection else None,
        db=int(options.get("db", 0) or 0),
        username=options.get("username"),
        password=options.get("password"),
        connect_timeout=options.get("socket_connect_timeout") or 5.0,
        setup=setup,
    )


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        assert hiredis is not None
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        #: Each waiter's deadline (loop time; ``inf`` for none), in the same order.
        self.deadlines: deque[float] = deque()
        #: One timer for the whole queue, due at or before its earliest deadline (see
        #: :meth:`send`).
        self.watch: asyncio.TimerHandle | None = None
        # An asyncio.Transport, or uvloop's, which does not subclass it.
        self.transport: Any = None
        self.lost = False
        # A connection belongs to the loop that opened it (tests run one loop per test).
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError:  # garbage on the wire: nothing after it can be trusted
                self.abort()
                return
            if reply is False:
                return
            if not waiters:  # a reply nobody asked for: the stream is broken
                self.abort()
                return
            waiter = waiters.popleft()
            self.deadlines.popleft()
            if waiter.done():
                continue  # its caller gave up; the reply is dropped, the order kept
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(_reply_error(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        error = RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        self.deadlines.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, command: bytes, timeout: float | None) -> asyncio.Future[Any]:
        """Write ``command``; the future of its reply, failed with ``TimeoutError`` (and the
        connection dropped) if none came within ``timeout`` seconds."""
        # Written before the waiter is queued: a transport that refuses the write (uvloop's,
        # closed but not yet reported lost, raises) leaves no orphan waiter behind.
        self.transport.write(command)
        loop = self.loop
        waiter = loop.create_future()
        self.waiters.append(waiter)
        deadline = _NEVER if timeout is None else loop.time() + timeout
        self.deadlines.append(deadline)
        # One timer for the queue, not one per call: a timer per call cost each request in
        # flight more objects for the garbage collector to count (its handle, its libuv
        # timer), and at a few dozen requests in flight that is what sets how often the
        # collector runs (docs/contributing.md, "Tail latency").
        watch = self.watch
        if deadline != _NEVER and (watch is None or deadline < watch.when()):
            if watch is not None:
                watch.cancel()
            self.watch = loop.call_at(deadline, self._expire)
        return waiter

    def _expire(self) -> None:
        # Due at (or before) the earliest deadline of the queue as it was: a waiter whose
        # time is up gets TimeoutError and the connection goes (a link that swallowed one
        # reply may have swallowed more); otherwise wait for the earliest one left.
        self.watch = None
        if self.lost:
            return
        now = self.loop.time()
        expired: list[asyncio.Future[Any]] = []
        earliest = _NEVER
        for waiter, deadline in zip(self.waiters, self.deadlines, strict=True):
            if waiter.done():
                continue  # answered, or its caller gave up: its deadline no longer counts
            if deadline <= now:
                expired.append(waiter)
            elif deadline < earliest:
                earliest = deadline
        if expired:
            for waiter in expired:
                waiter.set_exception(TimeoutError())
            self.abort()
        elif earliest != _NEVER:
            self.watch = self.loop.call_at(earliest, self._expire)

    def abort(self) -> None:
        self.lost = True
        if self.transport is not None:
            # abort(), not close(): nothing queued for a link we give up on is worth sending.
            with contextlib.suppress(RuntimeError):  # its event loop is closed already
                self.transport.abort()


def _reply_error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class Pipe:
    """One shared, pipelined connection (see the module docstring). Connects lazily and
    reconnects on the call after a loss."""

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float = 5.0,
        setup: Sequence[bytes] = (),
    ) -> None:
        self._host, self._port, self._path = host, port, path
        self._setup = tuple(setup)
        self._db = db
        self._username, self._password = username, password
        self._connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._closed = False

    def call(self, command: bytes, timeout: float | None) -> Awaitable[Any]:
        """Send one packed command; an awaitable of its reply, which returns or raises
        (``TimeoutError`` when time runs out) within ``timeout`` seconds of this call,
        connecting included.

        Not a coroutine function: on an open connection it hands back the reply's future
        itself, so a request waiting for Redis holds no coroutine of its own here."""
        protocol = self._protocol
        if protocol is None or protocol.lost or protocol.loop is not asyncio.get_running_loop():
            return self._call_connecting(command, timeout)
        return protocol.send(command, timeout)

    async def _call_connecting(self, command: bytes, timeout: float | None) -> Any:  # noqa: ASYNC109
        # The connection (and its AUTH, SELECT, SCRIPT LOAD) is waited for out of this
        # call's own time, not the connect timeout's: that one is 5 s unless the client
        # says otherwise, and every request arriving meanwhile would wait for it.
        loop = asyncio.get_running_loop()
        if timeout is None:
            protocol = await self._connect(None)
        else:
            deadline = loop.time() + timeout
            protocol = await self._connect(timeout)
            timeout = deadline - loop.time()
            if timeout <= 0:
                raise TimeoutError()
        if protocol.lost:
            # Lost between the attempt's end and this caller's turn (a reset, another
            # caller's timeout): its waiters were failed already, a new one would never be.
            raise RedisConnectionError("connection to Redis lost as it was made")
        return await protocol.send(command, timeout)

    async def warm_up(self, bound: float) -> None:
        """Open the connection (AUTH, SELECT, SCRIPT LOAD) now unless one is open, allowing it
        ``bound`` seconds instead of the connect timeout: meant for start-up, before the first
        call, whose own ``timeout`` would otherwise include it. Raises ``RedisTimeoutError``
        or ``RedisConnectionError`` as a call would."""
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        if protocol is not None and not protocol.lost and protocol.loop is loop:
            return
        await self._connect(bound, bound)

    def close(self) -> None:
        """Close the connection for good (pending callers get a ConnectionError)."""
        self._closed = True
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.lost = True
            protocol.transport.close()

    async def _connect(
        self,
        timeout: float | None,  # noqa: ASYNC109
        bound: float | None = None,
    ) -> _Protocol:
        # Concurrent callers share one attempt rather than each opening a connection; each
        # waits for it at most its own ``timeout`` (the attempt carries on without it). A new
        # attempt gets ``bound`` seconds, the connect timeout unless given.
        if self._closed:
            raise RedisConnectionError("the backend was closed")
        if self._protocol is not None:
            self._protocol.abort()  # lost, or of another loop: make sure it is closed
            self._protocol = None
        connecting = self._connecting
        if (
            connecting is None
            or connecting.done()
            or connecting.get_loop() is not asyncio.get_running_loop()
        ):
            # A finished attempt is never reused: its failure was its own callers' answer.
            connecting = self._connecting = asyncio.ensure_future(self._open(bound))
            connecting.add_done_callback(_retrieved)
        try:
            if timeout is None:
                return await asyncio.shield(connecting)
            async with asyncio.timeout(timeout):
                return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self, bound: float | None = None) -> _Protocol:
        loop = asyncio.get_running_loop()
        bound = self._connect_timeout if bound is None else bound
        try:
            async with asyncio.timeout(bound):
                if self._path is not None:
                    _, protocol = await loop.create_unix_connection(_Protocol, self._path)
                else:
                    _, protocol = await loop.create_connection(_Protocol, self._host, self._port)
                try:
                    if self._password is not None:
                        credentials = [self._password.encode()]
                        if self._username is not None:
                            credentials.insert(0, self._username.encode())
                        await _ask(protocol, pack(b"AUTH", *credentials))
                    if self._db:
                        await _ask(protocol, pack(b"SELECT", b"%d" % self._db))
                    for command in self._setup:
                        await _ask(protocol, command)
                except BaseException:
                    protocol.abort()
                    raise
        except TimeoutError:
            raise RedisTimeoutError(f"connecting to Redis timed out after {bound}s") from None
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
        if self._closed:  # closed while connecting: keep nothing open
            protocol.abort()
            raise RedisConnectionError("the backend was closed")
        self._protocol = protocol
        return protocol


async def _ask(protocol: _Protocol, command: bytes) -> Any:
    # Bounded by the connection attempt's own timeout (Pipe._open).
    return await protocol.send(command, None)


def _retrieved(attempt: asyncio.Future[Any]) -> None:
    # Mark a failed attempt's exception as seen even if every caller gave up waiting for it
    # (otherwise asyncio logs "exception was never retrieved").
    if not attempt.cancelled():
        attempt.exception()
