"""One circuit breaker per Redis Cluster master: a master that is down fails open (or
closed) for the keys it holds only, while clients whose keys live on the healthy masters stay
limited (issue 14, item 5)."""

from __future__ import annotations

from typing import Any, cast

import pytest
import redis
from http_helpers import client_for, work_app
from servers import RedisCluster

from fastapi_ratelimit import RateLimiter, RedisBackend
from fastapi_ratelimit.breaker import CircuitBreaker
from fastapi_ratelimit.node_breakers import NodeBreakers

pytestmark = [pytest.mark.redis, pytest.mark.cluster]


def _serve_partial_slots(cluster: RedisCluster, value: str) -> None:
    # With the default (yes), a cluster refuses every command once a master is marked as
    # failed; "no" keeps the healthy masters serving their slots, as production clusters
    # without replicas (or waiting for a failover) are often set up.
    for node in cluster.nodes:
        if node.is_running:
            with redis.Redis(host=node.host, port=node.port) as client:
                client.config_set("cluster-require-full-coverage", value)


@pytest.mark.parametrize("policy", ["allow", "deny", "fallback"])
async def test_one_master_down_fails_only_its_own_keys(
    policy: str, cluster_url: str, redis_cluster: RedisCluster
) -> None:
    limiter = RateLimiter(
        backend=RedisBackend.from_url(cluster_url, cluster=True, timeout=0.5),
        global_limit="100000/day",
        ip_limit="3/day",
        on_backend_error="deny" if policy == "deny" else "allow",
        fallback=policy == "fallback",
        # A long cooldown: no probe reaches the dead master while the test runs.
        breaker=CircuitBreaker(failure_threshold=3, cooldown=600),
        # A mirror polling often: its polls go through the breaker of its namespace's node.
        limit_overrides=True,
        refresh_interval=0.05,
    )
    backend = limiter.backend
    assert isinstance(backend, RedisBackend)
    app = work_app(limiter)
    async with client_for(app, ip="192.0.2.1") as client:
        assert (await client.get("/work")).status_code == 200  # loads the slot map

    def node_of(ip: str) -> str:
        _, ip_check = limiter.level_checks(limiter.operator.context(ip=ip))
        return backend.node_of(ip_check)

    global_check = limiter.level_checks(limiter.operator.context())[0]
    assert global_check.scope == "global"

    # The master holding the mirrored namespace, which does not hold the global level (the
    # key hashes say so): every request has a level on a healthy master, and the clients
    # whose IP level lives on the dead one have one there too.
    names = [f"{node.host}:{node.port}" for node in redis_cluster.nodes]
    index = names.index(backend.control_node("limits"))
    assert names[index] != backend.node_of(global_check)
    dead_name = names[index]
    ips = [f"198.51.100.{i}" for i in range(1, 41)]
    on_dead = [ip for ip in ips if node_of(ip) == dead_name]
    healthy = [ip for ip in ips if node_of(ip) not in ("", dead_name)]
    assert on_dead
    assert healthy
    _serve_partial_slots(redis_cluster, "no")
    try:
        redis_cluster.stop_node(index)
        statuses: dict[str, list[int]] = {}
        # The dead master's clients first: with one breaker, they would open it for all.
        for ip in on_dead + healthy:
            async with client_for(app, ip=ip) as client:
                statuses[ip] = [(await client.get("/work")).status_code for _ in range(4)]
        (global_level,) = (await backend.peek([global_check])).decisions
    finally:
        _serve_partial_slots(redis_cluster, "yes")
        await limiter.aclose()
    expected_dead = {"allow": [200] * 4, "deny": [503] * 4, "fallback": [200, 200, 200, 429]}
    assert {ip: statuses[ip] for ip in on_dead} == dict.fromkeys(on_dead, expected_dead[policy])
    # Every client on a healthy master is still limited: three admitted, then 429.
    assert {ip: statuses[ip] for ip in healthy} == {ip: [200, 200, 200, 429] for ip in healthy}
    # The global level counted exactly the admitted requests: a request refused for its
    # dead-master level (deny) or by the fallback gave back what the healthy master took.
    admitted = 1 + sum(status == 200 for codes in statuses.values() for status in codes)
    assert global_level.remaining == 100000 - admitted
    assert limiter.node_breakers is not None
    states = {node: b.state for node, b in limiter.node_breakers.by_node.items() if node}
    assert states.pop(dead_name) == "open"
    assert states
    assert set(states.values()) == {"closed"}
    assert limiter.breaker is not None
    assert limiter.breaker.state == "closed"


async def test_levels_on_several_masters_stay_all_or_nothing(cluster_url: str) -> None:
    limiter = RateLimiter(
        backend=RedisBackend.from_url(cluster_url, cluster=True, timeout=5.0),
        global_limit="1000/minute",
        ip_limit="2/minute",
    )
    backend = limiter.backend
    assert isinstance(backend, RedisBackend)
    async with client_for(work_app(limiter), ip="192.0.2.1") as client:
        await client.get("/work")  # loads the slot map
    # An IP whose level lives on another master than the global one.
    global_check = limiter.level_checks(limiter.operator.context())[0]
    ip = next(
        f"198.51.100.{i}"
        for i in range(1, 255)
        if backend.node_of(limiter.level_checks(limiter.operator.context(ip=f"198.51.100.{i}"))[1])
        != backend.node_of(global_check)
    )
    async with client_for(work_app(limiter), ip=ip) as client:
        assert [(await client.get("/work")).status_code for _ in range(4)] == [200, 200, 429, 429]
    # The denied requests consumed nothing at the global level: 1 + 2 admitted.
    (decision,) = (await backend.peek([global_check])).decisions
    assert decision.remaining == 1000 - 3
    await limiter.aclose()


async def test_standalone_and_sentinel_keep_one_breaker(redis_url: str) -> None:
    standalone = RateLimiter(backend=RedisBackend.from_url(redis_url), ip_limit="3/minute")
    # Sentinel clients connect lazily: nothing is reached by building one.
    sentinel = RateLimiter(
        backend=RedisBackend.from_sentinel([("127.0.0.1", 1)], "mymaster"), ip_limit="3/minute"
    )
    for limiter in (standalone, sentinel):
        assert limiter.node_breakers is None
        assert limiter.breaker is not None
        await limiter.aclose()


def test_a_503_waits_for_the_longest_open_breaker() -> None:
    now = [0.0]
    template = CircuitBreaker(failure_threshold=1, cooldown=10, clock=lambda: now[0])
    breakers = NodeBreakers(template, cast(Any, None))  # no call reaches the backend here
    breakers.breaker("10.0.0.1:6379").record_failure()  # open at 0, since failed over
    now[0] = 30.0
    breakers.breaker("10.0.0.2:6379").record_failure()  # open at 30
    assert breakers.retry_after() == 10


async def test_refunds_go_to_each_master_through_its_own_breaker(
    cluster_url: str, redis_cluster: RedisCluster
) -> None:
    """Refunds after a response (a server error, ``refund_when``) on a cluster with a master
    down: the dead master's share is skipped while its breaker is open, and the healthy
    masters' shares are still given back, for every client (with one breaker for refunds,
    the dead master's failures opened it and stopped every client's refunds)."""
    from fastapi import FastAPI, Response

    from fastapi_ratelimit import RateLimitMiddleware

    limiter = RateLimiter(
        backend=RedisBackend.from_url(cluster_url, cluster=True, timeout=0.5),
        global_limit="100000/day",
        ip_limit="3/day",
        refund_when=lambda status: status == 404,
        breaker=CircuitBreaker(failure_threshold=3, cooldown=600),
    )
    backend = limiter.backend
    assert isinstance(backend, RedisBackend)
    app = FastAPI()

    @app.get("/{status}")
    async def answer(status: int) -> Response:
        return Response(status_code=status)

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    async with client_for(app, ip="192.0.2.1") as client:
        assert (await client.get("/200")).status_code == 200  # loads the slot map

    def node_of(ip: str) -> str:
        _, ip_check = limiter.level_checks(limiter.operator.context(ip=ip))
        return backend.node_of(ip_check)

    global_check = limiter.level_checks(limiter.operator.context())[0]
    names = [f"{node.host}:{node.port}" for node in redis_cluster.nodes]
    index = next(i for i, name in enumerate(names) if name != backend.node_of(global_check))
    dead_name = names[index]
    ips = [f"198.51.100.{i}" for i in range(1, 41)]
    on_dead = [ip for ip in ips if node_of(ip) == dead_name][:3]
    healthy = [ip for ip in ips if node_of(ip) not in ("", dead_name)][:3]
    assert on_dead
    assert healthy

    # Which masters each refund call reached.
    reached: list[set[str]] = []
    refund = backend.refund

    async def recording_refund(checks: Any) -> None:
        reached.append({backend.node_of(c) for c in checks})
        await refund(checks)

    backend.refund = recording_refund  # type: ignore[method-assign]
    _serve_partial_slots(redis_cluster, "no")
    try:
        redis_cluster.stop_node(index)
        admitted = 1
        async with client_for(app, ip=on_dead[0]) as client:
            # Three failed checks open the dead master's breaker (its levels fail open).
            for _ in range(3):
                assert (await client.get("/200")).status_code == 200
                admitted += 1
        assert limiter.node_breakers is not None
        assert limiter.node_breakers.by_node[dead_name].state == "open"
        reached.clear()
        statuses: dict[str, list[int]] = {}
        for ip in on_dead + healthy:
            async with client_for(app, ip=ip) as client:
                statuses[ip] = [(await client.get(f"/{s}")).status_code for s in [404] * 4]
                statuses[ip] += [(await client.get(f"/{s}")).status_code for s in [500] * 4]
                statuses[ip] += [(await client.get("/200")).status_code for _ in range(4)]
        (global_level,) = (await backend.peek([global_check])).decisions
    finally:
        _serve_partial_slots(redis_cluster, "yes")
        await limiter.aclose()
    # Every 404 and 500 was given back: each healthy client still has its 3 a day.
    assert {ip: statuses[ip] for ip in healthy} == dict.fromkeys(
        healthy, [404] * 4 + [500] * 4 + [200, 200, 200, 429]
    )
    # The dead master's clients fail open there, and their global level was given back too.
    assert {ip: statuses[ip] for ip in on_dead} == dict.fromkeys(
        on_dead, [404] * 4 + [500] * 4 + [200] * 4
    )
    admitted += sum(status == 200 for codes in statuses.values() for status in codes)
    assert global_level.remaining == 100000 - admitted
    # No refund went to the dead master once its breaker was open; no other breaker opened.
    assert reached
    assert all(dead_name not in nodes for nodes in reached)
    states = {node: b.state for node, b in limiter.node_breakers.by_node.items()}
    assert states.pop(dead_name) == "open"
    assert set(states.values()) == {"closed"}
