"""One standalone ``redis-server`` (also the building block of the other set-ups)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from .process import (
    HOST,
    READY_TIMEOUT,
    STOP_TIMEOUT,
    RedisReplyError,
    Reply,
    _die_with_parent,
    _info_fields,
    _live_lock,
    _live_servers,
    _prctl,
    free_port,
    redis_server_binary,
    send_command,
)

_S = TypeVar("_S", bound="RedisServer")


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
