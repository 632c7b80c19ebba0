"""What is limited: :class:`Scope`, :class:`Algorithm` and :class:`Policy`.

A policy is a named rate bound to an algorithm. Its name shows in response headers and in
metrics, and is part of the storage key, so it is restricted to a safe alphabet.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import StrEnum

from .errors import ConfigurationError
from .rate import MAX_PERIOD, Rate, parse_rate

__all__ = ["Algorithm", "Policy", "Scope"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


class Scope(StrEnum):
    """The levels a request is checked at. Composite scopes are plain strings like ``"user+ip"``."""

    GLOBAL = "global"
    IP = "ip"
    ENDPOINT = "endpoint"
    API_KEY = "api_key"
    USER = "user"

    def __str__(self) -> str:
        return self.value


class Algorithm(StrEnum):
    """The five algorithms. Each has a pure-Python reference and a Lua script of the same stem."""

    FIXED_WINDOW = "fixed_window"
    SLIDING_WINDOW_LOG = "sliding_window_log"
    SLIDING_WINDOW_COUNTER = "sliding_window_counter"
    TOKEN_BUCKET = "token_bucket"
    GCRA = "gcra"

    def __str__(self) -> str:
        return self.value

    @property
    def code(self) -> str:
        """Two-letter code used in storage keys and in the Lua dispatcher."""
        return _CODES[self]

    @property
    def uses_burst(self) -> bool:
        return self in (Algorithm.TOKEN_BUCKET, Algorithm.GCRA)


_CODES = {
    Algorithm.FIXED_WINDOW: "fw",
    Algorithm.SLIDING_WINDOW_LOG: "sl",
    Algorithm.SLIDING_WINDOW_COUNTER: "sc",
    Algorithm.TOKEN_BUCKET: "tb",
    Algorithm.GCRA: "gc",
}


@dataclass(frozen=True, slots=True)
class Policy:
    """A named rate bound to an algorithm.

    Args:
        name: shown in headers (``RateLimit-Policy: "ip";q=300;w=60``) and metrics; letters,
            digits, ``_``, ``.`` and ``-``, at most 64 characters.
        rate: a :class:`Rate` or a string such as ``"100/minute"`` or ``"100/minute;burst=200"``.
        algorithm: how the rate is enforced (default: sliding window counter).
        bucket: the name the stored state is keyed by (default: ``name``). Policies that share
            a bucket share their counters: the tiers of the user level all use ``"user"``,
            so an upgrade from Free to Pro keeps what was already spent.
    """

    name: str
    rate: Rate
    algorithm: Algorithm = Algorithm.SLIDING_WINDOW_COUNTER
    #: Longest time, in microseconds, for which stored state can still change a decision.
    #: Storage TTLs never exceed it (plus a small margin).
    horizon_us: int = field(init=False, repr=False, compare=False)
    #: The quota shown to clients: the burst for bucket algorithms, else the limit.
    limit: int = field(init=False, repr=False, compare=False)
    bucket: str = field(init=False, repr=False, compare=False)
    #: The window in seconds (``w`` in ``RateLimit-Policy``).
    window: float = field(init=False, repr=False, compare=False)
    #: The algorithm's two-letter code, as stored keys use it (a plain attribute: hot path).
    code: str = field(init=False, repr=False, compare=False)
    #: ``"<code> <limit> <window us> <capacity> "``: the policy as the Lua script reads it,
    #: built once so a Redis check only appends the cost.
    wire: str = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        name: str,
        rate: Rate | str,
        algorithm: Algorithm | str = Algorithm.SLIDING_WINDOW_COUNTER,
        *,
        bucket: str | None = None,
    ) -> None:
        if bucket is not None and (not isinstance(bucket, str) or not _NAME_RE.fullmatch(bucket)):
            raise ConfigurationError("policy.bucket", bucket, "must be a policy-like name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigurationError(
                "policy.name",
                name,
                "must be 1-64 characters of letters, digits, '_', '.' or '-', starting with a "
                "letter or digit",
            )
        if isinstance(rate, str):
            rate = parse_rate(rate, field_name=f"policy {name!r}: rate")
        elif not isinstance(rate, Rate):
            raise ConfigurationError(f"policy {name!r}: rate", rate, "must be a Rate or a string")
        try:
            algorithm = Algorithm(algorithm)
        except ValueError:
            choices = ", ".join(a.value for a in Algorithm)
            raise ConfigurationError(
                f"policy {name!r}: algorithm", algorithm, f"must be one of {choices}"
            ) from None
        if rate.burst is not None and not algorithm.uses_burst:
            raise ConfigurationError(
                f"policy {name!r}: rate.burst",
                str(rate),
                f"burst only applies to token_bucket and gcra, not {algorithm.value}",
            )
        _check_arithmetic(name, rate, algorithm)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "bucket", bucket or name)
        object.__setattr__(self, "window", rate.period)
        object.__setattr__(self, "code", algorithm.code)
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "algorithm", algorithm)
        object.__setattr__(self, "horizon_us", _horizon_us(rate, algorithm))
        object.__setattr__(self, "limit", rate.capacity if algorithm.uses_burst else rate.limit)
        object.__setattr__(
            self, "wire", f"{algorithm.code} {rate.limit} {rate.period_us} {rate.capacity} "
        )


#: GCRA keeps an absolute time in microseconds, which a double holds to 0.25 us today: an
#: emission interval (period / limit) under this many microseconds would be kept loosely
#: (at 1 us or less, not at all).
MIN_GCRA_INTERVAL_US = 10
#: The longest a bucket may take to refill (burst x period / limit): the stored times and
#: TTLs must stay whole microseconds and milliseconds the backends can write.
_MAX_HORIZON_US = round(MAX_PERIOD * 1_000_000)


def _check_arithmetic(name: str, rate: Rate, algorithm: Algorithm) -> None:
    """Refuse rates whose arithmetic the backends cannot carry exactly (found in an audit:
    GCRA at millions a second admitted everything; a token bucket refilling over millennia
    failed on Redis)."""
    if algorithm is Algorithm.GCRA and rate.period_us < MIN_GCRA_INTERVAL_US * rate.limit:
        raise ConfigurationError(
            f"policy {name!r}: rate",
            str(rate),
            f"is more than {1_000_000 // MIN_GCRA_INTERVAL_US} a second, finer than GCRA "
            "keeps time: use token_bucket (or sliding_window_counter) for it",
        )
    if algorithm.uses_burst and rate.capacity * rate.period_us > _MAX_HORIZON_US * rate.limit:
        raise ConfigurationError(
            f"policy {name!r}: rate.burst",
            str(rate),
            "takes more than 10 years to refill (burst x period / limit): lower the burst",
        )


def _horizon_us(rate: Rate, algorithm: Algorithm) -> int:
    if algorithm is Algorithm.SLIDING_WINDOW_COUNTER:
        # The previous window's count still weighs on the estimate during the current one.
        return 2 * rate.period_us
    if algorithm.uses_burst:
        # Time for an empty bucket to refill completely.
        return math.ceil(rate.capacity * rate.period_us / rate.limit)
    return rate.period_us
