"""Redis backend on ``redis.asyncio``: standalone, Sentinel and Cluster.

Every request's levels go to Redis in ONE ``EVALSHA`` of the multi-level script (see
``lua/_main.lua``), which decides all-or-nothing: if any level denies, no level consumes.
Time comes from ``redis.call('TIME')``, so app servers with skewed clocks agree.

Redis Cluster: the keys of different identities hash to different slots, and one script may
only touch one slot. There the backend runs one script call per slot, concurrently, and when
some slot denies, it refunds the slots that consumed. Between the consume and the refund
(one round trip) a concurrent request may see those levels slightly fuller than they are:
it can be denied early, never admitted past a limit.

Connections: the number of calls in flight is bounded (``max_in_flight``, never above the
pool's size), so a burst of thousands of requests waits its turn instead of failing with
``MaxConnectionsError``.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

from loguru import logger
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..clock import Clock
from ..decision import Decision, Verdict
from ..errors import BackendError, ConfigurationError
from ..keys import KeyBuilder
from ..logs import log_limited
from ._denials import DenialCache
from ._pipe import Pipe, pack, pipe_for
from ._pipe import bulk as _bulk
from ._scripts import multi_level_script
from .base import WARM_UP_TIMEOUT, Check, ensure_distinct, make_decision

# redis-py's Sentinel gained annotations only in 8.2; before that its constructor counts as an
# untyped call under mypy --strict. A typed view of it type-checks against both, so a redis
# release cannot break the build by adding (or dropping) annotations.
_new_sentinel = cast("Callable[..., Sentinel]", Sentinel)

__all__ = ["RedisBackend"]

_Mode = Literal["h", "p", "r"]
_CREDENTIALS_RE = re.compile(r"(?<=://)[^@/\s]*@")
_DEFAULT_TIMEOUT = 0.05
_VERSION = "#version"
#: A random number a namespace's hash gets with its first write: see control_version.
_EPOCH = "#epoch"
_PACKED_KEYS = 8192
_FALLBACK_TIMEOUT = 5.0


class RedisBackend:
    """Rate-limit state in Redis.

    Args:
        client: a ``redis.asyncio.Redis`` (standalone or from a Sentinel's ``master_for``) or a
            ``redis.asyncio.cluster.RedisCluster``. The backend does not close a client it was
            given; use :meth:`from_url` or :meth:`from_sentinel` to let it own one.
        prefix: key prefix.
        key_secret: optional secret for the identifier hash (see :mod:`fastapi_ratelimit.keys`).
        timeout: seconds allowed for one Redis call; ``None`` for no limit. A call that runs
            over raises :class:`~fastapi_ratelimit.errors.BackendError`.
        max_in_flight: most concurrent Redis calls; further ones wait their turn.
        ttl_margin: seconds every key lives past the point where its state stops mattering.
        clock: **tests only.** Send this clock's time instead of using Redis ``TIME``, so the
            same scenario can run against the memory backend.
        multiplex: send the rate-limit script calls of all requests over one pipelined
            connection of the backend's own (see :mod:`~fastapi_ratelimit.backends._pipe`),
            bypassing redis-py's pool for them: much less CPU per request. ``None`` (the
            default) does so when the backend owns its client (:meth:`from_url`) and the
            client is a plain TCP or Unix-socket one; ``max_in_flight`` then bounds only the
            other commands. ``False``: always redis-py. On that connection ``timeout`` runs
            from the moment a call is made, so it also covers waiting for a new connection
            (and its ``SCRIPT LOAD``), behind the calls pipelined before it, and a reload
            after ``NOSCRIPT``: the latency a request can gain stays bounded. So that the
            first request does not pay for the connection, :meth:`warm_up` makes it at
            start-up.
        denial_cache: most denials kept in this process until their ``retry_after``, so
            that a client hammering past its limit costs no Redis round trip per request
            (see :mod:`~fastapi_ratelimit.backends._denials`); ``0`` turns it off.
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = "rl",
        key_secret: bytes | None = None,
        timeout: float | None = _DEFAULT_TIMEOUT,
        max_in_flight: int = 64,
        ttl_margin: float = 1.0,
        clock: Clock | None = None,
        multiplex: bool | None = None,
        denial_cache: int = 10_000,
        _owns_client: bool = False,
        _redacted_url: str = "",
    ) -> None:
        if not isinstance(client, (Redis, RedisCluster)):
            raise ConfigurationError(
                "client", type(client).__name__, "must be a redis.asyncio Redis or RedisCluster"
            )
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigurationError("timeout", timeout, "must be a number of seconds > 0 or None")
        if (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or max_in_flight < 1
        ):
            raise ConfigurationError("max_in_flight", max_in_flight, "must be a whole number >= 1")
        if not (isinstance(ttl_margin, (int, float)) and 0 <= ttl_margin <= 60):
            raise ConfigurationError("ttl_margin", ttl_margin, "must be between 0 and 60 seconds")
        if isinstance(denial_cache, bool) or not isinstance(denial_cache, int) or denial_cache < 0:
            raise ConfigurationError("denial_cache", denial_cache, "must be a whole number >= 0")
        self._client = client
        # With a test clock, the cache runs on the time Redis is told.
        self._denials: DenialCache | None = None
        #: Refused looks (:meth:`look`), apart: a key holds one policy per cache, and a look
        #: at the quota as configured must not displace the hit's denial at a reduced one.
        self._looks: DenialCache | None = None
        if denial_cache:
            seconds = time.monotonic if clock is None else (lambda: clock.now_us() / 1e6)
            self._denials = DenialCache(denial_cache, seconds)
            self._looks = DenialCache(denial_cache, seconds)
        self._cluster = isinstance(client, RedisCluster)
        self._keys = KeyBuilder(prefix, secret=key_secret)
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_in_flight)
        self._margin_ms = str(round(ttl_margin * 1000))
        self._clock = clock
        self._owns_client = _owns_client
        self._redacted_url = _redacted_url
        self._sentinel_clients: list[Redis] = []
        # redis-py's RedisCluster breaks ("'NoneType' object has no attribute 'writelines'")
        # when many commands race its lazy first initialize(): do it once, under a lock.
        self._initialized = not self._cluster
        self._init_lock = asyncio.Lock()
        # One AsyncScript per client: EVALSHA, reloaded automatically after SCRIPT FLUSH.
        self._source = multi_level_script()
        self._script = client.register_script(self._source)
        if multiplex is None:
            multiplex = _owns_client
        # Every new pipe connection loads the script first: a cold start never meets NOSCRIPT.
        load = pack(b"SCRIPT", b"LOAD", self._source.encode())
        self._pipe = (
            pipe_for(client, [load])
            if multiplex and not self._cluster and isinstance(client, Redis)
            else None
        )
        # What bounds one call on the pipe (and names it in errors): without a per-call
        # timeout, the socket-level fallback of _socket_options, since a dead connection
        # must never hold a request forever.
        self._call_timeout = timeout if timeout is not None else _FALLBACK_TIMEOUT
        self._sha = self._script.sha.encode()
        # The packed EVALSHA head per number of keys, and packed keys (they repeat a lot).
        self._heads: dict[int, bytes] = {}
        self._packed_keys: dict[str, bytes] = {}

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        cluster: bool = False,
        max_connections: int = 64,
        **options: Any,
    ) -> RedisBackend:
        """Build a backend that owns its client.

        ``url`` is a ``redis://``, ``rediss://`` or ``unix://`` URL; ``cluster=True`` treats it
        as one node of a Redis Cluster. The pool holds at most ``max_connections`` connections
        and callers wait for a free one rather than fail. ``options`` go to
        :class:`RedisBackend` (``timeout``, ``prefix``, ...).
        """
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(
                "url", redact_url(str(url)), "must start with redis://, rediss:// or unix://"
            )
        sockets = _socket_options(options.get("timeout", _DEFAULT_TIMEOUT))
        client: Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(url, max_connections=max_connections, **sockets)
        else:
            # A plain pool: the backend never has more than max_in_flight calls out, so the
            # pool cannot run dry, and it is ~20% cheaper per call than BlockingConnectionPool.
            client = Redis.from_url(url, max_connections=max_connections, **sockets)
        options["max_in_flight"] = min(
            options.get("max_in_flight", max_connections), max_connections
        )
        return cls(client, _owns_client=True, _redacted_url=redact_url(url), **options)

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[tuple[str, int]],
        service_name: str,
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
        db: int = 0,
        **options: Any,
    ) -> RedisBackend:
        """Build a backend that follows the master of ``service_name`` through Sentinel."""
        if not sentinels:
            raise ConfigurationError("sentinels", sentinels, "needs at least one (host, port)")
        sentinel_kwargs = {"password": sentinel_password} if sentinel_password else {}
        sentinel = _new_sentinel(
            list(sentinels),
            sentinel_kwargs=sentinel_kwargs,
            password=password,
            db=db,
            **_socket_options(options.get("timeout", _DEFAULT_TIMEOUT)),
        )
        client = sentinel.master_for(service_name)
        shown = ",".join(f"{h}:{p}" for h, p in sentinels)
        backend = cls(
            client, _owns_client=True, _redacted_url=f"sentinel://{shown}/{service_name}", **options
        )
        backend._sentinel_clients = list(sentinel.sentinels)
        return backend

    def __repr__(self) -> str:
        kind = "cluster" if self._cluster else "standalone"
        return (
            f"RedisBackend({kind}, {self._redacted_url or 'client'}, prefix={self._keys.prefix!r})"
        )

    @property
    def client(self) -> Redis | RedisCluster:
        return self._client

    @property
    def key_builder(self) -> KeyBuilder:
        return self._keys

    def key_for(self, check: Check) -> str:
        """The Redis key that holds ``check``'s state (for operators and tests)."""
        policy = check.policy
        return self._keys.key(check.scope, policy.bucket, policy.code, check.identity)

    def _keys_of(self, checks: Sequence[Check]) -> list[str]:
        """:meth:`key_for` of each check. The key builder's cache is read here, as the memory
        backend reads it: a key built lately (most are) costs no call of its own."""
        cached = self._keys.cached
        return [
            cached.get((c.scope, c.policy.bucket, c.policy.code, c.identity)) or self.key_for(c)
            for c in checks
        ]

    @property
    def cluster(self) -> bool:
        """Whether the client is a Redis Cluster (the limiter then breaks per node)."""
        return self._cluster

    def node_of(self, check: Check) -> str:
        """Cluster: the address of the master holding ``check``'s key, as the client's slot
        map has it; ``""`` until that map is loaded (and always, outside a cluster)."""
        return self._node(self.key_for(check))

    def control_node(self, namespace: str) -> str:
        """:meth:`node_of` for the hash of an operator-state namespace."""
        return self._node(self._control_key(namespace))

    def _node(self, key: str) -> str:
        if not self._cluster or not self._initialized:
            return ""
        client = cast(RedisCluster, self._client)
        try:
            node = client.get_node_from_key(key)
        except RedisClusterException:  # a slot the map does not cover (yet)
            return ""
        return node.name if node is not None else ""

    # -- the Backend protocol ----------------------------------------------------------------

    async def hit(self, checks: Sequence[Check]) -> Verdict:
        denials = self._denials
        sent = denials.now() if denials is not None else 0.0
        keys: list[str] | None = None
        if self._cluster or not checks:
            verdict = await self._run("h", checks)
        else:
            # Standalone and Sentinel: straight to the one script call, with no coroutine
            # between (_eval's): every object a request holds while it waits counts, see
            # docs/contributing.md, "Tail latency".
            keys = self._keys_of(checks)
            if len(keys) > 1:
                ensure_distinct(keys)
            arg = self._arg("h", checks)
            pipe = self._pipe
            if pipe is None:
                reply = await self._script_call(keys, arg)
            else:
                # _script_call's pipe branch, inline: one coroutine fewer held while waiting.
                started = time.monotonic()
                try:
                    reply = await pipe.call(self._evalsha(keys, arg), self._call_timeout)
                except Exception as exc:
                    reply = await self._pipe_failed(pipe, keys, arg, exc, started)
            verdict = Verdict(tuple(self._decisions(checks, reply)))
        if denials is not None and not verdict.allowed:
            if keys is None:
                keys = self._keys_of(checks)
            denials.store(checks, keys, verdict, sent)
        return verdict

    def cached_denial(self, checks: Sequence[Check]) -> Verdict | None:
        """A denial these checks are known to get without asking Redis (see
        :mod:`~fastapi_ratelimit.backends._denials`), or ``None``. Costs nothing while no
        client is over its limit."""
        denials = self._denials
        if denials is None or not denials:  # empty while no client is over its limit
            return None
        return denials.lookup(checks, self._keys_of(checks))

    async def peek(self, checks: Sequence[Check]) -> Verdict:
        return await self._run("p", checks)

    async def look(self, checks: Sequence[Check]) -> Verdict:
        """:meth:`peek` for whether the checks would pass, with a refusal kept until its wait
        is over, as a refused hit is (:mod:`~fastapi_ratelimit.backends._denials`; in a cache
        of its own), so that a flood asking the same (the 503-or-429 question under dynamic
        limits, enforce.py) costs no round trip either. Only ``allowed`` is exact:
        :meth:`peek` is the exact look."""
        looks = self._looks
        if looks is None:
            return await self._run("p", checks)
        keys = self._keys_of(checks)
        known = looks.lookup(checks, keys) if looks else None
        if known is not None:
            return known
        sent = looks.now()
        verdict = await self._run("p", checks)
        if not verdict.allowed:
            looks.store(checks, keys, verdict, sent)
        return verdict

    async def refund(self, checks: Sequence[Check]) -> None:
        if checks:
            for cache in (self._denials, self._looks):
                if cache:
                    cache.forget([self.key_for(c) for c in checks])
            await self._run("r", checks)

    async def reset(self, checks: Sequence[Check]) -> None:
        keys = self._keys_of(checks)
        if not keys:
            return
        for cache in (self._denials, self._looks):
            if cache is not None:
                cache.forget(keys)
        if self._cluster:
            # DEL of keys in several slots is a CROSSSLOT error: one DEL per slot.
            by_slot: dict[int, list[str]] = defaultdict(list)
            for key in keys:
                by_slot[key_slot(key.encode())].append(key)
            await asyncio.gather(
                *(self._call("reset", self._client.delete, *ks) for ks in by_slot.values())
            )
        else:
            await self._call("reset", self._client.delete, *keys)

    async def warm_up(self, timeout: float = WARM_UP_TIMEOUT) -> None:  # noqa: ASYNC109
        """Connect and load the script now, before the first request.

        Otherwise the first call of the process connects, and loads the script, within its
        own per-call ``timeout`` (50 ms by default): on a busy machine or after a full
        garbage collection it runs over, and the first request fails open (or gets a 503
        under ``on_backend_error="deny"``) while Redis is fine. Here the set-up gets
        ``timeout`` seconds (5 by default) in all, outside any request:

        - standalone: the multiplexed connection is opened (AUTH, SELECT, ``SCRIPT LOAD``);
        - every kind: the script is loaded with redis-py, over a connection its pool keeps
          for the requests and the operator-state polls; through Sentinel that first looks
          the master up, on a Cluster it loads the slot map first and reaches every master.

        A connection attempt cut short by the client's own connect timeout (``from_url``
        sets it to the per-call ``timeout``) is tried again while time is left. Raises
        :class:`~fastapi_ratelimit.errors.BackendError` when Redis cannot be reached in
        time; requests then connect as they would have, under the failure policy. Safe to
        call again: open connections are kept, and the script load costs one round trip.
        ``RateLimitMiddleware`` calls it at lifespan start-up, through
        :meth:`RateLimiter.warm_up <fastapi_ratelimit.RateLimiter.warm_up>`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    try:
                        await self._warm_up_once(deadline)
                        return
                    except RedisTimeoutError:
                        # The client's connect timeout, far shorter than ours, ran out: try
                        # again (at most every 50 ms) until the outer timeout ends it.
                        await asyncio.sleep(0.05)
        except TimeoutError as exc:
            raise BackendError(
                f"Redis warm-up timed out after {timeout}s ({self._where()})"
            ) from exc
        except Exception as exc:  # as in _call: whatever fails, it is a backend failure
            cause = f"{type(exc).__name__}: {_scrub(str(exc))}"
            raise BackendError(f"Redis warm-up failed: {cause} ({self._where()})") from exc

    async def _warm_up_once(self, deadline: float) -> None:
        if self._cluster:
            await self._initialize(None)  # the slot map, within the warm-up's time
        # SCRIPT LOAD goes to every master of a Cluster, and leaves a connection to each (or
        # to the one master) in redis-py's pool.
        await self._client.script_load(self._source)
        if self._pipe is not None:
            left = deadline - asyncio.get_running_loop().time()
            await self._pipe.warm_up(max(left, 0.0))

    async def aclose(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
        if not self._owns_client:
            return
        if isinstance(self._client, RedisCluster):
            await self._client.aclose()
        else:
            await self._client.aclose(close_connection_pool=True)
        for sentinel_client in self._sentinel_clients:
            await sentinel_client.aclose()

    # -- operator state (see fastapi_ratelimit.control) ---------------------------------------
    # One hash per namespace; the field "#version" counts changes, so instances can poll one
    # field and reload only when something changed. Entry keys never start with "#".
    #
    # A Redis that loses its keyspace (a restart without persistence, FLUSHALL) counts again
    # from 0, and a few writes later can reach the very number an instance last saw: that
    # instance would keep its stale copy for good. So the hash also gets a random "#epoch"
    # with its first write, and the version instances compare is epoch and count together.

    def _control_key(self, namespace: str) -> str:
        return f"{self._keys.prefix}:ctl:{{{namespace}}}"

    async def control_load(self, namespace: str) -> tuple[int, dict[str, str]]:
        raw = await self._call("control", self._client.hgetall, self._control_key(namespace))
        entries = {_text(k): _text(v) for k, v in raw.items()}
        version = _versioned(entries.pop(_VERSION, None), entries.pop(_EPOCH, None))
        return version, entries

    async def control_version(self, namespace: str) -> int:
        count, epoch = await self._call(
            "control", self._client.hmget, self._control_key(namespace), [_VERSION, _EPOCH]
        )
        return _versioned(count, epoch)

    async def control_put(self, namespace: str, key: str, value: str) -> None:
        await self._call("control", self._control_update, namespace, {key: value}, [])

    async def control_delete(self, namespace: str, keys: list[str]) -> int:
        return int(await self._call("control", self._control_update, namespace, {}, keys))

    async def _control_update(
        self, namespace: str, puts: dict[str, str], deletes: list[str]
    ) -> int:
        key = self._control_key(namespace)
        async with self._client.pipeline(transaction=True) as pipe:
            if puts:
                pipe.hset(key, mapping=dict[Any, Any](puts))
            if deletes:
                pipe.hdel(key, *deletes)
            pipe.hincrby(key, _VERSION, 1)
            pipe.hsetnx(key, _EPOCH, str(secrets.randbits(30) + 1))
            results = await pipe.execute()
        return int(results[0]) if deletes else len(puts)

    # -- internals -----------------------------------------------------------------------------

    async def _run(self, mode: _Mode, checks: Sequence[Check]) -> Verdict:
        if not checks:
            return Verdict(())
        keys = self._keys_of(checks)
        if len(keys) > 1:
            ensure_distinct(keys)
        if not self._cluster:
            return Verdict(tuple(await self._eval(mode, checks, keys)))
        by_slot: dict[int, list[int]] = defaultdict(list)
        for index, key in enumerate(keys):
            by_slot[key_slot(key.encode())].append(index)
        if len(by_slot) == 1:
            return Verdict(tuple(await self._eval(mode, checks, keys)))
        return await self._run_per_slot(mode, checks, keys, list(by_slot.values()))

    async def _run_per_slot(
        self, mode: _Mode, checks: Sequence[Check], keys: list[str], groups: list[list[int]]
    ) -> Verdict:
        results = await asyncio.gather(
            *(self._eval(mode, [checks[i] for i in g], [keys[i] for i in g]) for g in groups),
            return_exceptions=True,
        )
        committed = [
            g
            for g, r in zip(groups, results, strict=True)
            if mode == "h" and isinstance(r, list) and all(d.allowed for d in r)
        ]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        decisions: list[Decision | None] = [None] * len(checks)
        for group, result in zip(groups, results, strict=True):
            if isinstance(result, list) and mode != "r":  # a refund answers no decisions
                for i, decision in zip(group, result, strict=True):
                    decisions[i] = decision
        all_allowed = failure is None and all(d is not None and d.allowed for d in decisions)
        if mode == "h" and not all_allowed and committed:
            # Another slot refused (or failed): give back what the passing slots consumed.
            refunds = await asyncio.gather(
                *(self._eval("r", [checks[i] for i in g], [keys[i] for i in g]) for g in committed),
                return_exceptions=True,
            )
            for error in refunds:
                if isinstance(error, BaseException):
                    # The request is refused either way; the levels stay charged until their
                    # window passes. Say so, once per failed refund.
                    log_limited(
                        "WARNING",
                        "cluster-refund",
                        "could not refund a cluster slot after a denial: {}",
                        error,
                    )
            for i in (i for g in committed for i in g):
                d = decisions[i]
                assert d is not None
                decisions[i] = d._replace(remaining=d.remaining + checks[i].cost)
        if failure is not None:
            raise failure
        return Verdict(tuple(d for d in decisions if d is not None))

    async def _eval(self, mode: _Mode, checks: Sequence[Check], keys: list[str]) -> list[Decision]:
        reply = await self._script_call(keys, self._arg(mode, checks))
        return [] if mode == "r" else self._decisions(checks, reply)

    def _arg(self, mode: _Mode, checks: Sequence[Check]) -> str:
        """The script's one argument: mode, clock, margin and each level's policy and cost."""
        now = "-" if self._clock is None else str(self._clock.now_us())
        levels = " ".join([f"{check.policy.wire}{check.cost}" for check in checks])
        return f"{mode} {now} {self._margin_ms} {levels}"

    @staticmethod
    def _decisions(checks: Sequence[Check], reply: bytes) -> list[Decision]:
        """The script's reply, four numbers a level, as decisions."""
        # One iterator read four at a time: the parsing stays in C.
        values = map(int, reply.split())
        return [
            make_decision(check, allowed == 1, remaining, reset_us, retry_us)
            for check, allowed, remaining, reset_us, retry_us in zip(
                checks, values, values, values, values, strict=True
            )
        ]

    async def _script_call(self, keys: list[str], arg: str) -> Any:
        # _call and a straight EVALSHA folded into one coroutine: every await layer costs on
        # the hot path (AsyncScript.__call__ too); the reload path stays in _reload_and_run.
        pipe = self._pipe
        if pipe is not None:
            started = time.monotonic()
            try:
                return await pipe.call(self._evalsha(keys, arg), self._call_timeout)
            except Exception as exc:
                return await self._pipe_failed(pipe, keys, arg, exc, started)
        client = self._client
        try:
            if not self._initialized:
                await self._initialize(self._timeout)
            if self._timeout is None:
                async with self._slots:
                    try:
                        return await client.evalsha(self._script.sha, len(keys), *keys, arg)
                    except NoScriptError:
                        return await self._reload_and_run(keys, [arg])
            # The wait for a slot counts against the timeout too: calls queued behind a Redis
            # that stopped answering must not each wait a whole timeout more once they run.
            async with asyncio.timeout(self._timeout), self._slots:
                try:
                    return await client.evalsha(self._script.sha, len(keys), *keys, arg)
                except NoScriptError:
                    return await self._reload_and_run(keys, [arg])
        except Exception as exc:  # see _call: never anything but a BackendError
            raise self._script_error(exc) from exc

    async def _pipe_failed(
        self, pipe: Pipe, keys: list[str], arg: str, exc: Exception, started: float
    ) -> Any:
        """After the pipe's ``EVALSHA`` (sent at ``started``) raised ``exc``: the reply of
        ``EVAL`` if the script was gone, else :class:`BackendError`."""
        try:
            if not isinstance(exc, NoScriptError):
                raise exc
            # Flushed (SCRIPT FLUSH, a restart without persistence): EVAL sends the source,
            # runs it and caches it again, so EVALSHA works from then on. In what is left of
            # the request's time, not a second timeout of its own.
            left = started + self._call_timeout - time.monotonic()
            if left <= 0:
                raise TimeoutError()
            return await pipe.call(self._eval_source(keys, arg), left)
        except Exception as error:
            raise self._script_error(error) from error

    def _script_error(self, exc: Exception) -> BackendError:
        if isinstance(exc, TimeoutError):
            return BackendError(
                f"Redis script timed out after {self._call_timeout}s ({self._where()})"
            )
        return BackendError(
            f"Redis script failed: {type(exc).__name__}: {_scrub(str(exc))} ({self._where()})"
        )

    def _eval_source(self, keys: list[str], arg: str) -> bytes:
        parts = [b"EVAL", self._source.encode(), b"%d" % len(keys), *map(str.encode, keys)]
        return pack(*parts, arg.encode())

    def _evalsha(self, keys: list[str], arg: str) -> bytes:
        """``EVALSHA sha len(keys) *keys arg``, packed for the pipe."""
        count = len(keys)
        head = self._heads.get(count)
        if head is None:
            # An array of EVALSHA, the sha, the key count, the keys and the one argument.
            head = b"*%d\r\n" % (count + 4) + _bulk(b"EVALSHA", self._sha, b"%d" % count)
            self._heads[count] = head
        parts = [head]
        cache = self._packed_keys
        for key in keys:
            packed = cache.get(key)
            if packed is None:
                packed = _bulk(key.encode())
                if len(cache) >= _PACKED_KEYS:
                    cache.clear()
                cache[key] = packed
            parts.append(packed)
        parts.append(_bulk(arg.encode()))
        return b"".join(parts)

    async def _reload_and_run(self, keys: list[str], args: list[str]) -> Any:
        client = self._client
        try:
            # NOSCRIPT after SCRIPT FLUSH or a restart: AsyncScript loads it and retries.
            return await self._script(keys, args)
        except NoScriptError:
            # Flushed again between that load and the retry (SCRIPT FLUSH in a loop, a
            # failover to a fresh replica): EVAL sends the source and cannot miss.
            logger.info("rate-limit script flushed twice in a row; falling back to EVAL once")
            return await client.eval(self._source, len(keys), *keys, *args)

    async def _call(self, operation: str, function: Any, *args: Any) -> Any:
        try:
            if not self._initialized:
                await self._initialize(self._timeout)
            if self._timeout is None:
                async with self._slots:
                    return await function(*args)
            # As in _script_call: the wait for a slot is within the timeout.
            async with asyncio.timeout(self._timeout), self._slots:
                return await function(*args)
        except TimeoutError as exc:
            raise BackendError(
                f"Redis {operation} timed out after {self._timeout}s ({self._where()})"
            ) from exc
        # RedisClusterException (slot not covered, ...) is not a RedisError, and a client bug
        # (an AttributeError deep in a reconnect) must not become a 500 either: anything but
        # cancellation is a backend failure.
        except (RedisError, RedisClusterException, OSError, Exception) as exc:
            raise BackendError(
                f"Redis {operation} failed: {type(exc).__name__}: {_scrub(str(exc))} "
                f"({self._where()})"
            ) from exc

    async def _initialize(self, timeout: float | None) -> None:  # noqa: ASYNC109
        async with self._init_lock:
            if self._initialized:
                return
            assert isinstance(self._client, RedisCluster)
            if timeout is None:
                await self._client.initialize()
            else:
                async with asyncio.timeout(timeout):
                    await self._client.initialize()
            self._initialized = True

    def _where(self) -> str:
        return self._redacted_url or ("cluster" if self._cluster else "client")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _socket_options(timeout: Any) -> dict[str, Any]:
    # The backend's own per-call timeout already bounds every call; a second, socket-level
    # timer per read and write would only cost CPU (about 20% of throughput, measured).
    # Without a per-call timeout, fall back to socket timeouts so nothing waits forever.
    if isinstance(timeout, (int, float)) and timeout > 0:
        return {"socket_timeout": None, "socket_connect_timeout": float(timeout)}
    return {"socket_timeout": _FALLBACK_TIMEOUT, "socket_connect_timeout": _FALLBACK_TIMEOUT}


def redact_url(url: str) -> str:
    """``redis://user:secret@host:6379/0`` -> ``redis://***@host:6379/0``."""
    return _CREDENTIALS_RE.sub("***@", url)


def _scrub(message: str) -> str:
    return redact_url(message)[:300]


def _versioned(count: Any, epoch: Any) -> int:
    """A namespace's version as instances compare it: its random epoch (0 for a hash written
    before epochs) above its change count."""
    return (int(epoch or 0) << 32) + int(count or 0)
