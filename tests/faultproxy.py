"""A small asyncio TCP proxy that injects network faults between a client and a server.

Standard library only.  Meant for tests: put it between a Redis client and a real
``redis-server`` and switch modes while traffic flows::

    async with FaultProxy("127.0.0.1", server.port) as proxy:
        client = redis.asyncio.Redis.from_url(proxy.url)
        proxy.delay(0.2)                # every reply is held for 0.2 s
        proxy.blackhole()               # nothing is forwarded any more (calls hang)
        proxy.cut_after(10)             # 10 more reply bytes per connection, then hold
        proxy.refuse()                  # new connections get ECONNREFUSED
        proxy.reset_connections()       # every open connection is aborted (RST)
        proxy.pass_through()            # back to normal, on the same port
        proxy.delay_new_connections(0.5)  # new connections start forwarding 0.5 s late

Modes apply at once to existing *and* new connections and to every chunk that has not
been forwarded yet:

* ``pass_through`` -- forward everything as soon as it is read (the default);
* ``delay`` -- forward each chunk ``seconds`` after the proxy read it, in one or both
  directions.  Chunks keep their order and the latency does not accumulate: a chunk read
  while an earlier one is still held is forwarded ``seconds`` after *its own* arrival;
* ``blackhole`` -- keep accepting connections and reading, but forward nothing (not even
  an end-of-stream).  What was read meanwhile is held, not dropped: like a healed network
  partition, it is delivered in order when the mode changes back;
* ``cut_after`` -- forward at most ``nbytes`` more bytes per connection in one or both
  directions (splitting a chunk if need be), then hold the rest as ``blackhole`` does: a
  reply (or request) that stops part-way through.  Bytes read but not yet forwarded count;
  new connections get the same budget.  The other direction, if any, is forwarded at once;
* ``refuse`` -- close the listening socket, so connecting fails at once with
  ``ECONNREFUSED``.  Connections already open keep forwarding without delay.  Any other
  mode listens again on the *same* port (``SO_REUSEADDR``).

Beside the mode, :meth:`FaultProxy.delay_new_connections` holds each connection accepted
from then on for a while before it forwards anything, either way: a slow connection set-up
(a loaded server, a TLS handshake), with no effect on connections already open.

Every connection is served by one task, which runs four child tasks in a task group: a
reader and a forwarder for each direction, joined by a FIFO of ``(arrival time, chunk)``.
If the upstream cannot be reached the client connection is closed.  :meth:`FaultProxy.stop`
closes the listener and every connection and awaits every task it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, TypeAlias

__all__ = ["Direction", "FaultProxy", "ProxyStats"]

Direction: TypeAlias = Literal["reply", "request", "both"]
_Mode: TypeAlias = Literal["pass", "delay", "blackhole", "cut", "refuse"]

_CHUNK = 65536
_CONNECT_TIMEOUT = 5.0
_EOF = b""  # end-of-stream marker in a direction's FIFO


@dataclass
class ProxyStats:
    """Counters since the proxy was created (never reset)."""

    connections_accepted: int = 0
    connections_active: int = 0
    upstream_failures: int = 0  # accepted connections closed because upstream was unreachable
    connections_reset: int = 0  # connections aborted by reset_connections()
    bytes_to_upstream: int = 0  # forwarded client -> server
    bytes_to_client: int = 0  # forwarded server -> client


class _Abort(Exception):
    """A side of the connection failed (reset, broken pipe...): tear the connection down."""


def _set_rst_on_close(sock: socket.socket | None) -> None:
    """Make closing ``sock`` send a TCP RST instead of a FIN (SO_LINGER with timeout 0)."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Pipe:
    """One direction of a connection: a FIFO of chunks waiting to be forwarded."""

    def __init__(self, proxy: FaultProxy, direction: Literal["request", "reply"]) -> None:
        self.proxy = proxy
        self.direction = direction
        self.queue: deque[tuple[float, bytes]] = deque()
        self.wake = asyncio.Event()
        #: Bytes this direction may still forward (``cut_after``); ``None``: no limit.
        self.budget: int | None = proxy.budget_for(direction)

    async def read_loop(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                data = await reader.read(_CHUNK)
            except OSError as exc:
                raise _Abort(f"{self.direction} side read failed: {exc!r}") from exc
            self.queue.append((time.monotonic(), data))
            self.wake.set()
            if not data:  # end of stream: queued as the last item
                return

    async def forward_loop(self, writer: asyncio.StreamWriter) -> None:
        while True:
            self.wake.clear()
            timeout: float | None = None  # None: wait for new data or a mode change
            if self.queue and not self.proxy.is_blackholed and self.budget != 0:
                arrival, data = self.queue[0]
                timeout = arrival + self.proxy.delay_for(self.direction) - time.monotonic()
                if timeout <= 0:
                    self.queue.popleft()
                    if self.budget is not None and data:
                        if len(data) > self.budget:  # forward the head, hold the tail
                            self.queue.appendleft((arrival, data[self.budget :]))
                            data = data[: self.budget]
                        self.budget -= len(data)
                    if not await self._write(writer, data):
                        return
                    continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.wake.wait()

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> bool:
        """Forward one chunk (or the end of stream); return False once the stream ended."""
        try:
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                else:
                    writer.close()
                return False
            writer.write(data)
            if self.direction == "request":
                self.proxy.stats.bytes_to_upstream += len(data)
            else:
                self.proxy.stats.bytes_to_client += len(data)
            await writer.drain()
        except OSError as exc:
            raise _Abort(f"{self.direction} side write failed: {exc!r}") from exc
        return True


class _Connection:
    def __init__(self, proxy: FaultProxy, client_sock: socket.socket) -> None:
        self.client_sock = client_sock
        self.upstream_sock: socket.socket | None = None
        self.client_writer: asyncio.StreamWriter | None = None
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.request = _Pipe(proxy, "request")
        self.reply = _Pipe(proxy, "reply")

    def wake(self) -> None:
        for pipe in (self.request, self.reply):
            pipe.budget = pipe.proxy.budget_for(pipe.direction)
            pipe.wake.set()

    def reset(self) -> None:
        """Abort both sides now, with a TCP RST where possible."""
        _set_rst_on_close(self.client_sock)
        _set_rst_on_close(self.upstream_sock)
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None:
                writer.transport.abort()
        if self.client_writer is None:  # not wrapped in a transport (yet)
            self.client_sock.close()

    def abort(self) -> None:
        """Reset both sides and cancel the connection's task."""
        self.reset()
        if self.task is not None:
            self.task.cancel()


class FaultProxy:
    """TCP proxy from ``host:<port>`` to ``target_host:target_port`` with fault injection.

    See the module docstring for the modes.  Use as ``async with FaultProxy(...) as p`` or
    call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0  # set by start(); kept when re-listening after refuse()
        self.stats = ProxyStats()
        self._mode: _Mode = "pass"
        self._request_delay = 0.0
        self._reply_delay = 0.0
        self._budgets: dict[str, int | None] = {"request": None, "reply": None}
        self._connect_delay = 0.0
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def mode(self) -> str:
        """``"pass"``, ``"delay"``, ``"blackhole"``, ``"cut"`` or ``"refuse"``."""
        return self._mode

    @property
    def is_listening(self) -> bool:
        return self._listener is not None

    async def start(self) -> None:
        """Bind a free port on ``host`` (port 0) and start accepting connections."""
        if self._started:
            raise RuntimeError("FaultProxy already started")
        self._loop = asyncio.get_running_loop()
        self._started = True
        if self._mode != "refuse":
            self._listen()

    async def stop(self) -> None:
        """Close the listener and every connection; await every task the proxy started."""
        self._started = False
        self._close_listener()
        for conn in list(self._connections):
            conn.abort()
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
        # Let the aborted transports run connection_lost() before the loop may close.
        await asyncio.sleep(0)

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.host}:{self.port} -> {self.target_host}:{self.target_port}"
            f" mode={self._mode} connections={len(self._connections)}>"
        )

    # ------------------------------------------------------------------ modes

    def pass_through(self) -> None:
        """Forward everything immediately (the default)."""
        self._set_mode("pass", 0.0, 0.0)

    def delay(self, seconds: float, *, direction: Direction = "reply") -> None:
        """Hold each chunk for ``seconds`` after it was read before forwarding it.

        ``direction``: ``"reply"`` (server -> client), ``"request"`` (client -> server) or
        ``"both"``.  The other direction, if any, is forwarded without delay.
        """
        if seconds < 0:
            raise ValueError(f"delay must be >= 0, got {seconds!r}")
        if direction not in ("reply", "request", "both"):
            raise ValueError(f"direction must be 'reply', 'request' or 'both', got {direction!r}")
        request = seconds if direction in ("request", "both") else 0.0
        reply = seconds if direction in ("reply", "both") else 0.0
        self._set_mode("delay", request, reply)

    def blackhole(self) -> None:
        """Accept and read, but forward nothing either way (held until the mode changes)."""
        self._set_mode("blackhole", 0.0, 0.0)

    def cut_after(self, nbytes: int, *, direction: Direction = "reply") -> None:
        """Forward at most ``nbytes`` more bytes per connection in ``direction``, then hold
        the rest (until the mode changes) as :meth:`blackhole` does.

        A reply cut part-way through, for a client that must not mistake half a reply for a
        whole one.  ``direction``: ``"reply"``, ``"request"`` or ``"both"`` (each gets the
        budget); the other direction, if any, is forwarded without delay.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
        if direction not in ("reply", "request", "both"):
            raise ValueError(f"direction must be 'reply', 'request' or 'both', got {direction!r}")
        request = nbytes if direction in ("request", "both") else None
        reply = nbytes if direction in ("reply", "both") else None
        self._set_mode("cut", 0.0, 0.0, budgets={"request": request, "reply": reply})

    def refuse(self) -> None:
        """Stop listening, so new connections fail with ECONNREFUSED.

        Open connections keep forwarding without delay.  Switching to another mode listens
        again on the same port.
        """
        self._set_mode("refuse", 0.0, 0.0)

    def delay_new_connections(self, seconds: float) -> None:
        """Hold every connection accepted from now on for ``seconds`` before it forwards
        anything, either way (what the client sends meanwhile is held, not dropped).
        Connections already open, and the mode, are unaffected; ``0`` turns it off."""
        if seconds < 0:
            raise ValueError(f"delay must be >= 0, got {seconds!r}")
        self._connect_delay = seconds

    def reset_connections(self) -> None:
        """Abort every open connection now (RST to both sides); the mode is unchanged."""
        for conn in list(self._connections):
            self.stats.connections_reset += 1
            conn.abort()

    # used by the pipes
    @property
    def is_blackholed(self) -> bool:
        return self._mode == "blackhole"

    def delay_for(self, direction: Literal["request", "reply"]) -> float:
        return self._request_delay if direction == "request" else self._reply_delay

    def budget_for(self, direction: Literal["request", "reply"]) -> int | None:
        return self._budgets[direction]

    def _set_mode(
        self,
        mode: _Mode,
        request_delay: float,
        reply_delay: float,
        *,
        budgets: dict[str, int | None] | None = None,
    ) -> None:
        self._mode = mode
        self._request_delay = request_delay
        self._reply_delay = reply_delay
        self._budgets = budgets or {"request": None, "reply": None}
        if self._started:
            if mode == "refuse":
                self._close_listener()
            elif self._listener is None:
                self._listen()
        for conn in self._connections:
            conn.wake()

    # ------------------------------------------------------------------ listening

    def _listen(self) -> None:
        assert self._loop is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._on_acceptable, sock)
        except BaseException:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        self._listener = sock

    def _close_listener(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            assert self._loop is not None
            self._loop.remove_reader(sock.fileno())
            sock.close()  # pending, not yet accepted connections are reset too

    def _on_acceptable(self, listener: socket.socket) -> None:
        while listener is self._listener:
            try:
                client_sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNABORTED, EMFILE: try again on the next event
                return
            client_sock.setblocking(False)
            self.stats.connections_accepted += 1
            conn = _Connection(self, client_sock)
            self._connections.add(conn)
            self.stats.connections_active = len(self._connections)
            assert self._loop is not None
            task = self._loop.create_task(self._serve(conn))
            conn.task = task
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._on_served, conn))

    # ------------------------------------------------------------------ connections

    async def _serve(self, conn: _Connection) -> None:
        try:
            if self._connect_delay:
                await asyncio.sleep(self._connect_delay)
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT):
                    up_reader, up_writer = await asyncio.open_connection(
                        self.target_host, self.target_port
                    )
            except (OSError, TimeoutError):
                self.stats.upstream_failures += 1
                return  # the finally clause closes the client connection
            conn.upstream_writer = up_writer
            conn.upstream_sock = up_writer.get_extra_info("socket")
            client_reader, client_writer = await asyncio.open_connection(sock=conn.client_sock)
            conn.client_writer = client_writer
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(conn.request.read_loop(client_reader))
                    group.create_task(conn.request.forward_loop(up_writer))
                    group.create_task(conn.reply.read_loop(up_reader))
                    group.create_task(conn.reply.forward_loop(client_writer))
            except* (_Abort, OSError):
                conn.reset()  # one side failed: reset the other one too
        finally:
            self._forget(conn)
            if conn.client_writer is None:
                conn.client_sock.close()
            writers = [w for w in (conn.client_writer, conn.upstream_writer) if w is not None]
            for writer in writers:
                writer.close()
            for writer in writers:
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    def _forget(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        self.stats.connections_active = len(self._connections)

    def _on_served(self, conn: _Connection, task: asyncio.Task[None]) -> None:
        # Also runs when the task was cancelled before it started (no finally clause ran).
        self._tasks.discard(task)
        self._forget(conn)
        if conn.client_writer is None:
            conn.client_sock.close()
