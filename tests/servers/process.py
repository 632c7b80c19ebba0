"""What every server set-up shares: free ports, a minimal RESP client, waiting, and
processes that never outlive the test run (an :mod:`atexit` hook and, on Linux, SIGTERM
when the parent dies)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import BinaryIO, Protocol, Self, TypeAlias

HOST = "127.0.0.1"
CLUSTER_BUS_OFFSET = 10000
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

Reply: TypeAlias = "bytes | int | list[Reply] | None"


def redis_server_binary() -> str | None:
    """Path of the ``redis-server`` executable, or ``None`` if it is not on ``PATH``."""
    return shutil.which("redis-server")


def redis_cli_binary() -> str | None:
    """Path of the ``redis-cli`` executable, or ``None`` if it is not on ``PATH``."""
    return shutil.which("redis-cli")


# --------------------------------------------------------------------------- ports

_used_ports: set[int] = set()
_ports_lock = threading.Lock()


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster_bus: bool = False) -> int:
    """Return a currently free TCP port on 127.0.0.1.

    A port is never returned twice in the same process.  With ``cluster_bus=True`` the
    port ``P + 10000`` (Redis Cluster bus port) is checked to be free as well.
    """
    with _ports_lock:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port = int(sock.getsockname()[1])
            if port in _used_ports:
                continue
            if cluster_bus:
                bus = port + CLUSTER_BUS_OFFSET
                if bus > 65535 or bus in _used_ports or not _can_bind(bus):
                    continue
                _used_ports.add(bus)
            _used_ports.add(port)
            return port
    raise RuntimeError("could not find a free port on 127.0.0.1")


# --------------------------------------------------------------------------- RESP


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``) received from a server."""


def _encode_command(args: Sequence[str | bytes | int]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(stream: BinaryIO) -> Reply:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by server")
    kind, payload = line[:1], line[1:-2]
    if kind == b"+":
        return payload
    if kind == b"-":
        raise RedisReplyError(payload.decode(errors="replace"))
    if kind == b":":
        return int(payload)
    if kind == b"$":
        length = int(payload)
        if length < 0:
            return None
        data = stream.read(length + 2)
        if len(data) != length + 2:
            raise ConnectionError("connection closed by server")
        return data[:-2]
    if kind == b"*":
        count = int(payload)
        if count < 0:
            return None
        return [_read_reply(stream) for _ in range(count)]
    raise ConnectionError(f"unexpected RESP reply: {line!r}")


def send_command(
    port: int, *args: str | bytes | int, host: str = HOST, timeout: float = 2.0
) -> Reply:
    """Send one command over a fresh RESP2 connection and return the decoded reply.

    Raises :class:`RedisReplyError` for error replies and :class:`OSError` (including
    :class:`ConnectionError` and :class:`TimeoutError`) for connection problems.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(_encode_command(args))
        with sock.makefile("rb") as stream:
            return _read_reply(stream)


def _info_fields(reply: Reply) -> dict[str, str]:
    if not isinstance(reply, bytes):
        raise RuntimeError(f"unexpected INFO reply: {reply!r}")
    fields: dict[str, str] = {}
    for raw in reply.decode(errors="replace").splitlines():
        key, sep, value = raw.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _wait_until(
    condition: Callable[[], bool], timeout: float, what: str, on_timeout: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (OSError, RedisReplyError):
            pass
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- processes


class _Closable(Protocol):
    def close(self) -> None: ...


class ServerSet:
    """A set-up of several servers (Cluster, Sentinel): ``with`` starts it and stops it."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


#: Every server still running, by pid: stopped at exit whatever happened.
_live_servers: dict[int, _Closable] = {}
_live_lock = threading.Lock()


def _cleanup_at_exit() -> None:
    with _live_lock:
        servers = list(_live_servers.values())
    for server in servers:
        with contextlib.suppress(Exception):
            server.close()


atexit.register(_cleanup_at_exit)

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl: Callable[[int, int], int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


_prctl = _load_prctl()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
