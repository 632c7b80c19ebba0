"""``fastapi-ratelimit``: operator commands against the Redis an app's limiter uses.

    fastapi-ratelimit --redis-url redis://localhost:6379/0 tier set user alice pro --ttl 86400
    fastapi-ratelimit allow add ip 10.0.0.0/8 --reason "office"
    fastapi-ratelimit block list --json
    fastapi-ratelimit inspect --user alice
    fastapi-ratelimit reset --ip 203.0.113.7
    fastapi-ratelimit stats

Global options (``--json``, ``--redis-url``, ...) go before or after the command. The URL
comes from ``--redis-url``, else ``RATELIMIT_REDIS_URL`` or ``REDIS_URL``. Exit codes:
0 success, 1 not found, 2 bad input or Redis unreachable.

A change applies, within about a second, on every instance whose limiter uses the feature:
lists need ``RateLimiter(access_lists=True)``, stored tiers ``tiers=...``, the override
``dynamic=...``, changed limits (``limit set ip 200/minute``) ``limit_overrides=True``.
Instances without it never read that state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from .errors import BackendError, ConfigurationError
from .identity import ip_identity, parse_ip
from .tiers import DEFAULT_TIERS

__all__ = ["main"]


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes, before or after it (``block list --json``).

    The main parser holds the defaults; each command's copy (a parent parser) leaves an
    option it was not given unset, so it never overwrites one given before the command.
    """

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--redis-url",
        default=default(None),
        help="default: $RATELIMIT_REDIS_URL or $REDIS_URL",
    )
    parser.add_argument(
        "--cluster", action="store_true", default=default(False), help="the URL is a Cluster node"
    )
    parser.add_argument(
        "--prefix", default=default("rl"), help="key prefix the app uses (default rl)"
    )
    parser.add_argument(
        "--key-secret",
        default=default(None),
        help="the app's key_secret, if it sets one (default: $RATELIMIT_KEY_SECRET); without "
        "it, API keys, users and IPs hash to keys the app never uses",
    )
    parser.add_argument(
        "--ipv6-prefix", type=int, default=default(64), help="IPv6 bucketing prefix"
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="machine-readable output"
    )
    parser.add_argument(
        "--by", default=default(os.environ.get("USER", "cli")), help="operator name"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastapi-ratelimit", description="Operate fastapi_ratelimit state in Redis."
    )
    _global_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True)

    tier = commands.add_parser(
        "tier", help="tiers stored for users or API keys (apps with RateLimiter(tiers=...))"
    )
    tier_commands = tier.add_subparsers(dest="action", required=True)
    for action in ("get", "set", "clear"):
        sub = tier_commands.add_parser(action, parents=[common])
        sub.add_argument("kind", choices=["user", "api_key"])
        sub.add_argument("identity")
        if action == "set":
            sub.add_argument("tier")
            sub.add_argument("--ttl", type=_ttl, help="seconds until it lapses")
            sub.add_argument(
                "--tiers",
                default=",".join(DEFAULT_TIERS),
                help="comma-separated tier names the app knows (checked before storing)",
            )

    for name in ("allow", "block"):
        listing = commands.add_parser(
            name, help=f"the {name}-list (apps with RateLimiter(access_lists=True))"
        )
        actions = listing.add_subparsers(dest="action", required=True)
        add = actions.add_parser("add", parents=[common])
        add.add_argument("kind", choices=["ip", "user", "api_key"])
        add.add_argument("value", help="an IP or CIDR range, a user id, or an API key")
        add.add_argument("--reason", default="")
        add.add_argument("--ttl", type=_ttl, help="seconds until it lapses")
        add.add_argument("--allow-any-network", action="store_true", help="accept /0")
        remove = actions.add_parser("remove", parents=[common])
        remove.add_argument("kind", choices=["ip", "user", "api_key"])
        remove.add_argument("value")
        actions.add_parser("list", parents=[common])

    override = commands.add_parser(
        "override", help="scale every limit (apps with RateLimiter(dynamic=...))"
    )
    override_actions = override.add_subparsers(dest="action", required=True)
    set_override = override_actions.add_parser(
        "set", help="e.g. 'override set 0.5 --ttl 600'", parents=[common]
    )
    set_override.add_argument("factor", type=float)
    set_override.add_argument("--ttl", type=_ttl, help="seconds until it lapses")
    override_actions.add_parser("get", parents=[common])
    override_actions.add_parser("clear", parents=[common])
    limit = commands.add_parser(
        "limit",
        help="change one level's limit at run time (apps with RateLimiter(limit_overrides=True))",
    )
    limit_actions = limit.add_subparsers(dest="action", required=True)
    for action in ("set", "clear"):
        sub = limit_actions.add_parser(
            action,
            help="e.g. 'limit set ip 200/minute', 'limit clear endpoint --endpoint ...'",
            parents=[common],
        )
        sub.add_argument("level", choices=["global", "ip", "api_key", "user", "endpoint"])
        if action == "set":
            sub.add_argument("rate", help="e.g. 200/minute")
        sub.add_argument("--endpoint", help="the endpoint_limits key, e.g. 'POST /ocr/process'")
    limit_actions.add_parser("list", parents=[common])
    commands.add_parser(
        "cleanup", help="delete expired list, penalty and breaker entries", parents=[common]
    )
    for name in ("inspect", "reset"):
        sub = commands.add_parser(
            name, help=f"{name} the counters of one identity", parents=[common]
        )
        sub.add_argument("--ip")
        sub.add_argument("--user")
        sub.add_argument("--api-key")
    commands.add_parser(
        "stats", help="keys per level and policy, list and tier sizes", parents=[common]
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # An application: the library's audit lines (to stderr) are for its operator.
    from loguru import logger

    logger.enable("fastapi_ratelimit")
    url = args.redis_url or os.environ.get("RATELIMIT_REDIS_URL") or os.environ.get("REDIS_URL")
    if not url:
        return _fail(args, "no Redis URL: pass --redis-url or set RATELIMIT_REDIS_URL")
    from redis.exceptions import RedisClusterException, RedisError

    from .backends.redis import redact_url

    try:
        result, found = asyncio.run(_run(args, url))
    except ConfigurationError as exc:
        return _fail(args, str(exc))
    except BackendError as exc:
        return _fail(args, f"cannot reach Redis: {exc}")
    except (RedisError, RedisClusterException, OSError) as exc:
        # Direct commands (SCAN, PTTL) outside the backend's own wrapping.
        return _fail(args, f"Redis at {redact_url(url)} failed: {type(exc).__name__}: {exc}")
    _print(args, result)
    return 0 if found else 1


async def _run(args: argparse.Namespace, url: str) -> tuple[Any, bool]:
    from .access import AccessLists
    from .backends.redis import RedisBackend, redact_url
    from .tiers import TierStore

    secret = args.key_secret or os.environ.get("RATELIMIT_KEY_SECRET") or None
    try:
        backend = RedisBackend.from_url(
            url,
            cluster=args.cluster,
            prefix=args.prefix,
            timeout=5.0,
            key_secret=secret.encode("utf-8") if secret else None,
        )
    except ValueError as exc:
        # redis-py's URL parsing (a bad port, bracket or option): bad input, said in a line.
        raise ConfigurationError("--redis-url", redact_url(url), f"is not usable: {exc}") from None
    args.keyed = secret is not None
    try:
        keys = backend.key_builder
        if args.command == "tier":
            store = TierStore(backend, keys, 0.5)
            if args.action == "get":
                entry = await store.get(args.kind, args.identity)
                return (entry or {"tier": None}), entry is not None
            if args.action == "set":
                known = [t.strip() for t in args.tiers.split(",") if t.strip()]
                if args.tier not in known:
                    raise ConfigurationError("tier", args.tier, f"is not one of {', '.join(known)}")
                await store.set(args.kind, args.identity, args.tier, ttl=args.ttl, by=args.by)
                return {"kind": args.kind, "tier": args.tier, "ttl": args.ttl}, True
            cleared = await store.clear(args.kind, args.identity, by=args.by)
            return {"cleared": cleared}, cleared
        if args.command in ("allow", "block"):
            lists = AccessLists(
                backend,
                keys,
                ipv6_prefix=args.ipv6_prefix,
                allow_any_network=getattr(args, "allow_any_network", False),
            )
            if args.action == "add":
                added = await lists.add(
                    args.command,
                    args.kind,
                    args.value,
                    reason=args.reason,
                    added_by=args.by,
                    ttl=args.ttl,
                )
                return asdict(added), True
            if args.action == "remove":
                removed = await lists.remove(args.command, args.kind, args.value, by=args.by)
                return {"removed": removed}, removed
            return [asdict(e) for e in await lists.entries(args.command)], True
        if args.command == "override":
            from .dynamic import DynamicLimits

            dynamic = DynamicLimits()
            dynamic.bind(backend, 0.5)
            try:
                if args.action == "set":
                    await dynamic.set_override(args.factor, ttl=args.ttl, by=args.by)
                    return {"factor": args.factor, "ttl": args.ttl}, True
                if args.action == "get":
                    # The mirror keeps its last copy when Redis fails (the apps' choice);
                    # a command must say it could not read instead of showing "no override".
                    await backend.control_version("override")
                    return {"factor": await dynamic.override_factor()}, True
                cleared = await dynamic.clear_override(by=args.by)
                return {"cleared": cleared}, cleared
            finally:
                await dynamic.aclose()
        if args.command == "limit":
            from .limit_overrides import clear_limit, store_limit, stored_limits, target_key

            if args.action == "list":
                return await stored_limits(backend), True
            key = target_key(args.level, args.endpoint)
            if args.action == "set":
                await store_limit(backend, key, args.rate, by=args.by)
                return {"level": key, "rate": args.rate}, True
            cleared = await clear_limit(backend, key, by=args.by)
            return {"cleared": cleared}, cleared
        if args.command == "cleanup":
            from .control import remove_expired

            lists = AccessLists(backend, keys, ipv6_prefix=args.ipv6_prefix)
            count = await lists.cleanup()
            # Expired penalties and closed endpoint breakers shared by the apps, too.
            for namespace in ("penalty", "breakers"):
                count += await remove_expired(backend, namespace)
            return {"removed": count}, True
        if args.command in ("inspect", "reset"):
            return await _inspect_or_reset(args, backend)
        return await _stats(backend), True
    finally:
        await backend.aclose()


async def _inspect_or_reset(args: argparse.Namespace, backend: Any) -> tuple[Any, bool]:
    identities: list[str] = []
    if args.ip:
        address = parse_ip(args.ip)
        if address is None:
            raise ConfigurationError("--ip", args.ip, "is not an IP address")
        identities.append(ip_identity(address, args.ipv6_prefix))
    identities += [v for v in (args.user, args.api_key) if v]
    if not identities:
        raise ConfigurationError("identity", None, "give --ip, --user or --api-key")
    client = backend.client
    found: list[dict[str, Any]] = []
    for identity in identities:
        digest = backend.key_builder.digest(identity)
        # Keys end in the identity's hash tag: one pattern finds every level and policy.
        pattern = f"{backend.key_builder.prefix}:*:{{{digest}}}"
        async for raw in client.scan_iter(match=pattern, count=1000):
            key = raw.decode() if isinstance(raw, bytes) else raw
            _, scope, policy, algorithm, _ = key.split(":", 4)
            item: dict[str, Any] = {"scope": scope, "policy": policy, "algorithm": algorithm}
            item["ttl_ms"] = await client.pttl(key)
            item["state"] = await _state(client, key, algorithm)
            if args.command == "reset":
                await client.delete(key)
            found.append(item)
    if not found:
        # Nothing under these identities' hash. The likeliest cause besides "no traffic yet":
        # the app hashes with a key_secret this command was not given.
        hint = "" if args.keyed else " (if the app sets key_secret, pass --key-secret)"
        print(f"fastapi-ratelimit: no counters found for this identity{hint}", file=sys.stderr)
    if args.command == "reset":
        from loguru import logger

        # As the admin API and limiter.operator.reset() do (identities never raw in a line).
        logger.info(
            "ratelimit audit: reset ip={} user={} api_key={} ({} levels) by {!r}",
            args.ip,
            args.user,
            "<given>" if args.api_key else None,
            len(found),
            args.by,
        )
        return {"reset": len(found), "levels": found}, bool(found)
    return found, bool(found)


async def _state(client: Any, key: str, algorithm: str) -> Any:
    if algorithm == "sl":
        return {"entries": await client.llen(key)}
    if algorithm == "gc":
        value = await client.get(key)
        tat = float(value) if value is not None else None
        return {"backlog_s": None if tat is None else max(0.0, tat / 1e6 - time.time())}
    raw = await client.hgetall(key)
    return {(k.decode() if isinstance(k, bytes) else k): _number(v) for k, v in raw.items()}


def _number(value: Any) -> float | str:
    text = value.decode() if isinstance(value, bytes) else str(value)
    try:
        return float(text)
    except ValueError:
        return text


async def _stats(backend: Any) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    prefix = backend.key_builder.prefix
    async for raw in backend.client.scan_iter(match=f"{prefix}:*", count=1000):
        key = raw.decode() if isinstance(raw, bytes) else raw
        parts = key.split(":")
        if len(parts) >= 5 and parts[1] != "ctl":
            counts[f"{parts[1]}/{parts[2]}"] += 1
    sizes = {}
    for namespace in ("allow", "block", "tiers"):
        _, entries = await backend.control_load(namespace)
        sizes[namespace] = len(entries)
    from .stats import backend_summary

    # What the apps' live stats (LiveStats) wrote in the last seconds, if any run.
    traffic = await backend_summary(backend)
    return {
        "keys": dict(sorted(counts.items())),
        "total_keys": sum(counts.values()),
        **sizes,
        "traffic": traffic,
    }


def _ttl(text: str) -> float:
    """``--ttl``: finite seconds in (0, 10 years]; anything else is a usage error (exit 2)."""
    from .errors import ConfigurationError, check_ttl

    try:
        seconds = check_ttl(float(text), "--ttl")
    except ValueError as exc:  # ConfigurationError is one; float("x") too
        reason = exc.reason if isinstance(exc, ConfigurationError) else "must be a number"
        raise argparse.ArgumentTypeError(f"{reason} (got {text!r})") from None
    assert seconds is not None
    return seconds


def _print(args: argparse.Namespace, result: Any) -> None:
    if args.json:
        print(json.dumps(result, sort_keys=True, default=str))
        return
    rows = result if isinstance(result, list) else [result]
    if not rows:
        print("(none)")
    for row in rows:
        if isinstance(row, dict):
            print("  ".join(f"{k}={_short(v)}" for k, v in row.items()))
        else:
            print(row)


def _short(value: Any) -> str:
    if isinstance(value, float) and value > 1e9:
        try:
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
        except (OverflowError, OSError, ValueError):  # inf, or past year 9999
            return str(value)
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _fail(args: argparse.Namespace, message: str) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": message}), file=sys.stderr)
    else:
        print(f"fastapi-ratelimit: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
