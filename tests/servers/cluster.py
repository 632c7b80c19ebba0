"""A Redis Cluster: three masters, no replicas, all 16384 slots assigned."""

from __future__ import annotations

import subprocess

from .process import (
    HOST,
    RedisReplyError,
    ServerSet,
    _info_fields,
    _wait_until,
    redis_cli_binary,
)
from .standalone import RedisServer


class RedisCluster(ServerSet):
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


# --------------------------------------------------------------------------- sentinel
