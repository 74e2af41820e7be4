"""Retry as a type: a per-destination policy, exponential backoff with jitter, and one verdict.

``decide`` is the single place that says what follows a failed delivery attempt, for the local
lanes (gateway.engine.channel) and the JetStream consumers (gateway.engine.nats_channel) alike.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
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

    def backoff(self, attempt: int, defer: float | None = None, jitter: float = 1.0) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based), never past the cap.

        ``defer``: the wait the destination asked for; ``jitter``: a factor around 1.
        """
        if defer is not None:
            return min(max(defer, 0.0), self.max_backoff_s)
        exponent = max(attempt - 1, 0)
        try:
            base = self.initial_backoff_s * self.multiplier**exponent
        except OverflowError:  # a large attempt count: the cap was reached long ago
            base = math.inf if self.initial_backoff_s > 0 else 0.0
        return min(base * jitter, self.max_backoff_s)

    def delay(self, attempt: int, defer: float | None = None) -> float:
        """``backoff`` with ±10 % jitter, so that lanes retrying one destination do not pulse together."""
        return self.backoff(attempt, defer, jitter())


def jitter() -> float:
    return random.uniform(0.9, 1.1)


class Failure(StrEnum):
    """What kind of failure an attempt ended in."""

    TRANSIENT = "transient"  # a timeout, a refusal worth another try, an unknown error
    PERMANENT = "permanent"  # the destination will never take this message


class Action(StrEnum):
    RETRY = "retry"  # try again after ``Verdict.delay`` seconds
    DEAD_LETTER = "dead_letter"  # the delivery is DEAD: kept for an operator's replay
    GIVE_UP = "give_up"  # a channel without queue: one attempt, the message is in ERROR


class Reason(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    ATTEMPTS_SPENT = "attempts_spent"
    LAST_DELIVERY = "last_delivery"  # the stream will not deliver the message again
    NOT_QUEUED = "not_queued"


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: Reason
    delay: float = 0.0


def decide(
    failure: Failure,
    attempt: int,
    policy: RetryPolicy,
    *,
    queued: bool = True,
    last_delivery: bool = False,
    defer: float | None = None,
    jitter: float = 1.0,
) -> Verdict:
    """What follows failed attempt number ``attempt`` (1-based) of one delivery.

    ``last_delivery``: no later delivery of the message will come (JetStream's last one);
    ``defer``: the wait the destination asked for; ``jitter``: the factor the backoff is scaled by.
    """
    if not queued:
        return Verdict(Action.GIVE_UP, Reason.NOT_QUEUED)
    if failure is Failure.PERMANENT:
        return Verdict(Action.DEAD_LETTER, Reason.PERMANENT)
    if attempt >= policy.max_attempts:
        return Verdict(Action.DEAD_LETTER, Reason.ATTEMPTS_SPENT)
    if last_delivery:
        return Verdict(Action.DEAD_LETTER, Reason.LAST_DELIVERY)
    return Verdict(Action.RETRY, Reason.TRANSIENT, policy.backoff(attempt, defer, jitter))
