"""Redis Sentinel: one master, one replica and one sentinel."""

from __future__ import annotations

from .process import (
    HOST,
    ServerSet,
    _wait_until,
    redis_server_binary,
)
from .standalone import RedisServer


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


class RedisSentinelSetup(ServerSet):
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
