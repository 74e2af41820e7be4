"""The one status enum shared by the journal, the store, the API and the console."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    RECEIVED = "RECEIVED"  # committed to the journal, not yet processed
    FILTERED = "FILTERED"  # a channel filter declined it: a result, not an error
    TRANSFORMED = "TRANSFORMED"  # steps done, deliveries about to be queued
    QUEUED = "QUEUED"  # waiting for (or between) delivery attempts
    SENT = "SENT"  # every destination accepted it
    ERROR = "ERROR"  # processing failed, or a delivery failed and will be retried
    DEAD = "DEAD"  # a destination gave up after its attempts: needs an operator

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({Status.FILTERED, Status.SENT, Status.DEAD})
