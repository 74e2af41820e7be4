"""Retry as a type: a per-destination policy, exponential backoff with jitter."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 10
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 300.0
    multiplier: float = 2.0
    timeout_s: float = 30.0

    @classmethod
    def from_config(cls, data: Mapping[str, Any] | None) -> RetryPolicy:
        return cls(**dict(data or {}))

    def delay(self, attempt: int, defer: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if defer is not None:
            return min(max(defer, 0.0), self.max_backoff_s)
        base = self.initial_backoff_s * self.multiplier ** max(attempt - 1, 0)
        # ±10 % jitter so that many lanes retrying one destination do not pulse together.
        return min(base, self.max_backoff_s) * random.uniform(0.9, 1.1)
