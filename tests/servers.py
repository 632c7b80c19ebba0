"""Start real ``redis-server`` processes for the test-suite.

Dependency-free (standard library only).  Every server listens on 127.0.0.1 only, on a
free port, with persistence disabled and its working directory, log file and (for cluster
nodes) ``nodes.conf`` in a private temporary directory.

Three set-ups are provided:

* :class:`RedisServer` -- one standalone server (also the building block of the others);
* :class:`RedisCluster` -- three masters, no replicas, all 16384 slots assigned;
* :class:`RedisSentinelSetup` -- one master, one replica and one sentinel.

Processes are always reaped (no zombies).  Besides explicit ``stop()``/``close()`` and
context-manager support, an :mod:`atexit` hook stops whatever is still running, and on
Linux the children receive SIGTERM if the process that started them dies (when they were
started from the main thread).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, TypeAlias, TypeVar

__all__ = [
    "HOST",
    "RedisCluster",
    "RedisReplyError",
    "RedisSentinelSetup",
    "RedisServer",
    "Reply",
    "free_port",
    "redis_cli_binary",
    "redis_server_binary",
    "send_command",
]

HOST = "127.0.0.1"
CLUSTER_BUS_OFFSET = 10000
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

Reply: TypeAlias = "bytes | int | list[Reply] | None"

_S = TypeVar("_S", bound="RedisServer")
_C = TypeVar("_C", bound="RedisCluster")
_T = TypeVar("_T", bound="RedisSentinelSetup")


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

_live_servers: dict[int, RedisServer] = {}
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


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1.

    The port is chosen (see :func:`free_port`) at construction time unless given, so
    :attr:`url` is known before :meth:`start`.  :meth:`stop` keeps the working directory
    (so :meth:`start`/:meth:`restart` reuse data such as cluster ``nodes.conf``);
    :meth:`close` stops the server and removes the directory if this object created it.
    """

    def __init__(
        self,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        *,
        cluster_bus: bool = False,
        directory: str | Path | None = None,
        name: str = "redis",
    ) -> None:
        self._auto_port = port is None
        self._cluster_bus = cluster_bus
        self._port = free_port(cluster_bus=cluster_bus) if port is None else port
        self.extra_args: list[str] = list(extra_args)
        self.name = name
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix=f"{name}-{self._port}-"))
            self._owns_directory = True
        else:
            self.directory = Path(directory)
            self.directory.mkdir(parents=True, exist_ok=True)
            self._owns_directory = False
        self.log_path = self.directory / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._ever_started = False
        self._closed = False
        with _live_lock:  # so the atexit hook stops it and removes the directory
            _live_servers[id(self)] = self

    # -- properties

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self._port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self._port)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- process control

    def command_line(self) -> list[str]:
        """The argv used to start the server."""
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server not found on PATH")
        return [
            binary,
            "--bind", HOST,
            "--port", str(self._port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> None:
        """Start the process (no-op if running) and wait until it answers PING."""
        if self._closed:
            raise RuntimeError(f"{self!r} was closed")
        if self.is_running:
            return
        attempts = 3 if (self._auto_port and not self._ever_started) else 1
        for attempt in range(attempts):
            self._spawn()
            try:
                self.wait_ready()
            except RuntimeError:
                lost_port_race = not self.is_running and "Address already in use" in self.log_tail()
                self.stop()
                if lost_port_race and attempt + 1 < attempts:
                    # Someone grabbed the port between free_port() and bind(): pick another.
                    self._port = free_port(cluster_bus=self._cluster_bus)
                    continue
                raise
            self._ever_started = True
            return

    def _spawn(self) -> None:
        argv = self.command_line()
        on_main_thread = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} starting: {argv!r}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
                # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only use
                # it from the main thread, whose end is the end of the process.
                preexec_fn=_die_with_parent if on_main_thread and _prctl is not None else None,
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll with PING until the server answers ``+PONG``.

        Raises :class:`RuntimeError` (with the tail of the log) if the process exits or does
        not answer within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            proc = self._proc
            if proc is None:
                raise RuntimeError(f"{self.name} on port {self._port} is not started")
            code = proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{self.name} on port {self._port} exited with code {code}\n{self.log_tail()}"
                )
            try:
                if send_command(self._port, "PING", timeout=1.0) == b"PONG":
                    return
            except (OSError, RedisReplyError):
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{self.name} on port {self._port} not ready after {timeout:.0f}s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Terminate the process and reap it (SIGKILL if it ignores SIGTERM)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
            else:
                proc.wait()

    def kill(self) -> None:
        """SIGKILL the process (simulates a crash) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its temporary directory (if this object created it)."""
        self.stop()
        self._closed = True
        with _live_lock:
            _live_servers.pop(id(self), None)
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- helpers

    def command(self, *args: str | bytes | int, timeout: float = 2.0) -> Reply:
        """Run one command on this server through a raw socket (see :func:`send_command`)."""
        return send_command(self._port, *args, timeout=timeout)

    def info(self, section: str | None = None) -> dict[str, str]:
        """``INFO [section]`` parsed into a flat ``{field: value}`` dict."""
        args: tuple[str, ...] = ("INFO",) if section is None else ("INFO", section)
        return _info_fields(self.command(*args))

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last lines of {self.log_path} ---\n{tail}"

    # -- context manager / repr

    def __enter__(self: _S) -> _S:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<{type(self).__name__} {self.name} {HOST}:{self._port} {state}>"


# --------------------------------------------------------------------------- cluster


class RedisCluster:
    """Three cluster-enabled masters (no replicas) holding all 16384 slots."""

    def __init__(self, size: int = 3, node_timeout_ms: int = 2000) -> None:
        if size < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",  # relative to the node's own --dir
            "--cluster-node-timeout", str(node_timeout_ms),
        ]  # fmt: skip
        self.nodes: list[RedisServer] = [
            RedisServer(extra_args=args, cluster_bus=True, name=f"cluster-node{i}")
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.nodes[0].port}"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [node.address for node in self.nodes]

    def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, join them with ``redis-cli --cluster create`` and wait for OK."""
        cli = redis_cli_binary()
        if cli is None:
            raise RuntimeError("redis-cli not found on PATH (needed to create the cluster)")
        try:
            for node in self.nodes:
                node.start()
            argv = [
                cli, "--cluster", "create",
                *(f"{HOST}:{node.port}" for node in self.nodes),
                "--cluster-replicas", "0", "--cluster-yes",
            ]  # fmt: skip
            try:
                result = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"redis-cli --cluster create timed out: {exc}") from exc
            if result.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed ({result.returncode}):\n"
                    f"{result.stdout}\n{result.stderr}"
                )
            self.wait_ok(timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every *running* node reports ``cluster_state:ok``, all slots assigned
        and knows all the other nodes."""

        def node_ok(node: RedisServer) -> bool:
            info = _info_fields(node.command("CLUSTER", "INFO"))
            return (
                info.get("cluster_state") == "ok"
                and info.get("cluster_slots_assigned") == "16384"
                and info.get("cluster_known_nodes") == str(len(self.nodes))
            )

        def describe() -> str:
            parts: list[str] = []
            for node in self.nodes:
                try:
                    state = _info_fields(node.command("CLUSTER", "INFO")).get("cluster_state")
                except (OSError, RedisReplyError) as exc:
                    state = f"unreachable ({exc})"
                parts.append(f"{node!r}: cluster_state={state}\n{node.log_tail(15)}")
            return "\n".join(parts)

        _wait_until(
            lambda: all(node_ok(n) for n in self.nodes if n.is_running),
            timeout,
            "cluster_state:ok on every node",
            describe,
        )

    def stop_node(self, index: int) -> None:
        """Stop one node (its ``nodes.conf`` is kept, so :meth:`start_node` rejoins it)."""
        self.nodes[index].stop()

    def start_node(self, index: int, timeout: float = 30.0) -> None:
        """Restart a stopped node on the same port and wait for the cluster to be OK."""
        self.nodes[index].start()
        self.wait_ok(timeout=timeout)

    def stop(self) -> None:
        """Stop every node and remove their directories."""
        for node in self.nodes:
            node.close()

    def __enter__(self: _C) -> _C:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- sentinel


class _SentinelServer(RedisServer):
    """A ``redis-server <conf> --sentinel`` process monitoring one master."""

    def __init__(
        self,
        service_name: str,
        master_port: int,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        super().__init__(name="sentinel")
        self.service_name = service_name
        self.master_port = master_port
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.config_path = self.directory / "sentinel.conf"

    def command_line(self) -> list[str]:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server not found on PATH")
        if not self.config_path.exists():  # sentinel rewrites it; keep it across restarts
            name = self.service_name
            self.config_path.write_text(
                f"port {self.port}\n"
                f"bind {HOST}\n"
                f"dir {self.directory}\n"
                f"sentinel monitor {name} {HOST} {self.master_port} 1\n"
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
                "sentinel resolve-hostnames no\n"
            )
        return [binary, str(self.config_path), "--sentinel"]


class RedisSentinelSetup:
    """One master, one replica of it, and one sentinel monitoring ``mymaster`` (quorum 1)."""

    service_name = "mymaster"

    def __init__(self) -> None:
        # Without this the master waits 5 s (repl-diskless-sync-delay) before the full sync;
        # set on both so a re-sync after a failover is immediate too.
        no_delay = ["--repl-diskless-sync-delay", "0"]
        self.master = RedisServer(extra_args=no_delay, name="sentinel-master")
        self.replica = RedisServer(
            extra_args=[*no_delay, "--replicaof", HOST, str(self.master.port)],
            name="sentinel-replica",
        )
        self.sentinel: RedisServer = _SentinelServer(self.service_name, self.master.port)

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [self.sentinel.address]

    def start(self, timeout: float = 30.0) -> None:
        """Start master, replica and sentinel and wait until replication is up and the
        sentinel knows the master (and has discovered the replica)."""
        try:
            self.master.start()
            self.replica.start()
            _wait_until(
                lambda: self.replica.info("replication").get("master_link_status") == "up",
                timeout,
                "master_link_status:up on the replica",
                lambda: f"{self.replica.log_tail(15)}\n{self.master.log_tail(15)}",
            )
            self.sentinel.start()
            expected = [HOST.encode(), str(self.master.port).encode()]

            def sentinel_ready() -> bool:
                addr = self.sentinel.command(
                    "SENTINEL", "get-master-addr-by-name", self.service_name
                )
                replicas = self.sentinel.command("SENTINEL", "replicas", self.service_name)
                return addr == expected and isinstance(replicas, list) and len(replicas) >= 1

            _wait_until(
                sentinel_ready,
                timeout,
                f"the sentinel to report {self.service_name} at {HOST}:{self.master.port}",
                lambda: self.sentinel.log_tail(20),
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop sentinel, replica and master and remove their directories."""
        for server in (self.sentinel, self.replica, self.master):
            server.close()

    def __enter__(self: _T) -> _T:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
