"""Live stats (per-second buckets, alerts, masked top clients, the backend flush) and the
dashboard's protection, in process. The page itself runs in chromium in
test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI

from fastapi_ratelimit import ConfigurationError, MemoryBackend, RateLimiter, RateLimitMiddleware
from fastapi_ratelimit.dashboard import dashboard_app
from fastapi_ratelimit.masking import mask_identity
from fastapi_ratelimit.stats import AlertThresholds, LiveStats

TOKEN = "a-dashboard-token-of-some-length"


def manual(stats: LiveStats) -> LiveStats:
    """The test ticks: no background task that could tick in between."""
    stats.recorder.on_first_request = None
    return stats


def make_app(limiter: RateLimiter, stats: LiveStats, token: str | None = TOKEN) -> FastAPI:
    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter=limiter, exempt=["/dash"])
    app.mount("/dash", dashboard_app(stats, token=token))

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    return app


def client(app: FastAPI, ip: str = "203.0.113.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 1234))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_buckets_breakdowns_and_masked_top_clients() -> None:
    limiter = RateLimiter(ip_limit="3/minute", api_key_limit="2/minute")
    stats = manual(LiveStats(limiter, flush=False))
    app = make_app(limiter, stats)
    async with client(app) as http:
        for i in range(5):
            await http.get(f"/items/{i}", headers={"x-api-key": "sk-live-secret"})
        async with client(app, ip="2001:db8:1:2::9") as other:
            for _ in range(4):
                await other.get("/items/x")
    stats.tick(now=1000.0)
    summary = await stats.summary()
    assert summary["total"] == 9
    assert summary["blocked"] == 4  # 3 of the key's (2/minute), 1 of the IPv6 client (3/minute)
    assert summary["block_rate"] == pytest.approx(44.44)
    assert summary["endpoints"] == {"GET /items/{item_id}": [9, 4]}
    assert summary["scopes"]["api_key"] == [5, 3]
    assert summary["tiers"] == {"none": [9, 4]}
    assert dict(summary["top_limited"]) == {
        "key#" + mask_identity("api_key", "sk-live-secret")[4:]: 3,
        "2001:db8:1::/48": 1,
    }
    assert summary["series"][-1][1:] == [9, 4]
    text = json.dumps(summary)
    for secret in ("sk-live-secret", "203.0.113.7", "2001:db8:1:2"):
        assert secret not in text
    # The next bucket holds only what came after.
    stats.tick(now=1001.0)
    assert (await stats.summary())["series"][-2:] == [[1000, 9, 4], [1001, 0, 0]]


async def test_alerts_follow_configurable_thresholds() -> None:
    stats = LiveStats(RateLimiter(), flush=False)
    assert stats.alerts(10, 51.0)[0]["severity"] == "critical"
    assert stats.alerts(10, 31.0)[0]["severity"] == "warning"
    assert stats.alerts(10, 30.0) == []
    assert [a["severity"] for a in stats.alerts(100_001, 0.0)] == ["info"]
    custom = LiveStats(
        RateLimiter(),
        flush=False,
        thresholds=AlertThresholds(
            critical_block_rate=20, warning_block_rate=5, requests_per_window=10
        ),
    )
    assert [a["severity"] for a in custom.alerts(11, 6.0)] == ["warning", "info"]
    assert custom.alerts(11, 21.0)[0]["severity"] == "critical"


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("critical_block_rate", {"critical_block_rate": 150}),
        ("warning_block_rate", {"warning_block_rate": 60}),
        ("requests_per_window", {"requests_per_window": 0}),
    ],
)
def test_bad_thresholds_name_the_field(field: str, kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError, match=field):
        AlertThresholds(**kwargs)


async def test_instances_add_up_through_the_backend() -> None:
    backend = MemoryBackend()
    first, second = RateLimiter(backend=backend), RateLimiter(backend=backend)
    one, two = manual(LiveStats(first)), manual(LiveStats(second))
    async with client(make_app(first, one)) as a, client(make_app(second, two)) as b:
        for _ in range(3):
            await a.get("/items/1")
        await b.get("/items/2")
    # One write per instance per tick, never per request.
    assert (await backend.control_load("stats"))[1] == {}
    await one.tick_and_flush()
    await two.tick_and_flush()
    _, written = await backend.control_load("stats")
    assert set(written) == {one.instance, two.instance}
    summary = await one.summary()
    assert summary["instances"] == 2
    assert summary["total"] == 4
    await one.aclose()
    await two.aclose()


async def test_dashboard_is_off_without_a_token_and_refuses_strangers() -> None:
    limiter = RateLimiter()
    off = make_app(limiter, LiveStats(limiter, flush=False), token=None)
    async with client(off) as http:
        for path in ("/dash/", "/dash/summary", "/dash/?token=" + TOKEN):
            assert (await http.get(path)).status_code == 403

    limiter = RateLimiter()
    stats = LiveStats(limiter, flush=False)
    app = make_app(limiter, stats)
    async with client(app) as http:
        for path in ("/dash/", "/dash/app.js", "/dash/summary", "/dash/events"):
            assert (await http.get(path)).status_code == 401, path
        assert (await http.get("/dash/?token=wrong")).status_code == 401
        login = await http.get("/dash/?token=" + TOKEN)
        assert login.status_code == 303
        assert login.headers["location"] == "http://test/dash/"
        cookie = login.headers["set-cookie"]
        assert TOKEN not in cookie
        assert "httponly" in cookie.lower()
        assert "samesite=strict" in cookie.lower()
        assert "path=/dash/" in cookie.lower()
        page = await http.get("/dash/")  # the cookie is sent back
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="app.js"' in page.text
        assert "http" not in page.text.replace("http-equiv", "")  # no CDN
        summary = await http.get("/dash/summary")
        assert summary.json()["total"] == 0
    bearer = {"authorization": f"Bearer {TOKEN}"}
    async with client(app) as http:
        assert (await http.get("/dash/summary", headers=bearer)).status_code == 200
    await stats.aclose()


def test_dashboard_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="token"):
        dashboard_app(LiveStats(RateLimiter(), flush=False), token="short")
    with pytest.raises(ConfigurationError, match="window"):
        LiveStats(RateLimiter(), window=1)


@pytest.mark.redis
async def test_the_cli_shows_every_instances_traffic(redis_url: str) -> None:
    from http_helpers import cli

    from fastapi_ratelimit import RedisBackend

    limiters = [
        RateLimiter(backend=RedisBackend.from_url(redis_url), ip_limit="2/minute") for _ in range(2)
    ]
    instances = [manual(LiveStats(limiter)) for limiter in limiters]
    for limiter, stats in zip(limiters, instances, strict=True):
        async with client(make_app(limiter, stats), ip="198.51.100.4") as http:
            for _ in range(3):
                await http.get("/items/1")
        await stats.tick_and_flush()
    shown = await asyncio.to_thread(cli, redis_url, "--json", "stats")
    assert shown.returncode == 0, shown.stderr
    traffic = json.loads(shown.stdout)["traffic"]
    assert traffic["instances"] == 2
    assert traffic["total"] == 6
    assert traffic["blocked"] == 4  # one shared Redis: 2 admitted in all
    assert traffic["top_limited"] == [["198.51.100.0/24", 4]]
    assert "198.51.100.4" not in shown.stdout
    for limiter in limiters:
        await limiter.aclose()
