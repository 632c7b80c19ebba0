"""Start real ``redis-server`` processes for the test-suite.

Dependency-free (standard library only).  Every server listens on 127.0.0.1 only, on a
free port, with persistence disabled and its working directory, log file and (for cluster
nodes) ``nodes.conf`` in a private temporary directory.

One module per kind of server: ``standalone.py`` (:class:`RedisServer`, also the building
block of the others), ``cluster.py`` (:class:`RedisCluster`, three masters, no replicas,
all 16384 slots assigned), ``sentinel.py`` (:class:`RedisSentinelSetup`, one master, one
replica and one sentinel), and ``process.py`` (ports, the RESP client, process helpers).

Processes are always reaped (no zombies).  Besides explicit ``stop()``/``close()`` and
context-manager support, an :mod:`atexit` hook stops whatever is still running, and on
Linux the children receive SIGTERM if the process that started them dies (when they were
started from the main thread).
"""

from .cluster import RedisCluster
from .process import (
    HOST,
    RedisReplyError,
    Reply,
    free_port,
    redis_cli_binary,
    redis_server_binary,
    send_command,
)
from .sentinel import RedisSentinelSetup
from .standalone import RedisServer

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
