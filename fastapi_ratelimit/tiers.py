"""Subscription tiers: each a per-user policy and a cost multiplier.

The defaults are the seed document's figures (burst / sustained): Free 100 / 1 per second,
Basic 500 / 10, Pro 2000 / 50, Enterprise 10000 / 200, as token buckets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ConfigurationError
from .policy import Algorithm, Policy
from .rate import Rate, parse_rate

__all__ = ["DEFAULT_TIERS", "Tier", "build_tiers"]


@dataclass(frozen=True, slots=True)
class Tier:
    """A subscription tier.

    Args:
        name: lower-case name (``"free"``); the user level's policy is named ``user-<name>``.
        rate: the per-user rate (``"1/second;burst=100"`` or a :class:`Rate`).
        algorithm: how it is enforced (default: token bucket, so ``burst`` applies).
        cost_multiplier: request costs are multiplied by this (rounded up), e.g. 0.5 for a
            tier whose calls count half.
    """

    name: str
    rate: Rate | str
    algorithm: Algorithm = Algorithm.TOKEN_BUCKET
    cost_multiplier: float = 1.0
    policy: Policy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rate = self.rate
        if isinstance(rate, str):
            rate = parse_rate(rate, field_name=f"tier {self.name!r}: rate")
            object.__setattr__(self, "rate", rate)
        multiplier = self.cost_multiplier
        if (
            isinstance(multiplier, bool)
            or not isinstance(multiplier, (int, float))
            or not (0 < multiplier <= 1000)
        ):
            raise ConfigurationError(
                f"tier {self.name!r}: cost_multiplier", multiplier, "must be a number in (0, 1000]"
            )
        object.__setattr__(self, "policy", Policy(f"user-{self.name}", rate, self.algorithm))


DEFAULT_TIERS: Mapping[str, Tier] = {
    tier.name: tier
    for tier in (
        Tier("free", "1/second;burst=100"),
        Tier("basic", "10/second;burst=500"),
        Tier("pro", "50/second;burst=2000"),
        Tier("enterprise", "200/second;burst=10000"),
    )
}


def build_tiers(tiers: Mapping[str, Tier | str], default_tier: str) -> dict[str, Tier]:
    """Validate a tier table: values are Tiers or rate strings; ``default_tier`` must exist."""
    if not isinstance(tiers, Mapping) or not tiers:
        raise ConfigurationError("tiers", tiers, "must be a non-empty mapping of name to Tier")
    built: dict[str, Tier] = {}
    for name, tier in tiers.items():
        if isinstance(tier, str):
            tier = Tier(name, tier)
        if not isinstance(tier, Tier):
            raise ConfigurationError(f"tiers[{name!r}]", tier, "must be a Tier or a rate string")
        if tier.name != name:
            raise ConfigurationError(
                f"tiers[{name!r}]", tier.name, "the key must be the tier's name"
            )
        built[name] = tier
    if default_tier not in built:
        raise ConfigurationError(
            "default_tier", default_tier, f"is not one of the tiers ({', '.join(built)})"
        )
    return built
