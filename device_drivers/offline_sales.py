"""The offline-sale limits a canteen terminal and the gateway both apply (CONTRACT.md section 1).

A terminal that lost the gateway keeps selling within a per-card and a per-terminal limit;
the gateway applies the same arithmetic when the batch arrives (`offline_limit`). Both
sides import this one definition so they can never disagree about what was allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any


class OverLimit(StrEnum):
    CARD = "card"
    TERMINAL = "terminal"


@dataclass(frozen=True, slots=True)
class OfflineLimits:
    """How much a terminal may sell without the gateway: the risk accepted during an outage."""

    per_card_cents: int
    per_terminal_cents: int

    @classmethod
    def from_config(cls, canteen: Any) -> OfflineLimits:
        """From `gateway.config.CanteenConfig` (duck-typed to keep this module import-light)."""
        return cls(
            per_card_cents=int(canteen.offline_limit_per_card_cents),
            per_terminal_cents=int(canteen.offline_limit_per_terminal_cents),
        )


@dataclass(frozen=True, slots=True)
class OfflineExposure:
    """Offline sales so far in one outage, per card and for the terminal."""

    per_card: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    terminal_cents: int = 0

    def check(self, limits: OfflineLimits, card_key: str, amount_cents: int) -> OverLimit | None:
        """Which limit a further offline sale would exceed, if any."""
        if self.per_card.get(card_key, 0) + amount_cents > limits.per_card_cents:
            return OverLimit.CARD
        if self.terminal_cents + amount_cents > limits.per_terminal_cents:
            return OverLimit.TERMINAL
        return None

    def add(self, card_key: str, amount_cents: int) -> OfflineExposure:
        per_card = dict(self.per_card)
        per_card[card_key] = per_card.get(card_key, 0) + amount_cents
        return OfflineExposure(MappingProxyType(per_card), self.terminal_cents + amount_cents)


# The defaults of gateway.config.CanteenConfig.
DEFAULT_LIMITS = OfflineLimits(per_card_cents=5000, per_terminal_cents=200_000)
