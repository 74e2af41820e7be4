"""When a channel lets its source answer: the ``ack.timing`` of a channel's configuration."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class AckTiming(StrEnum):
    BEFORE_PROCESSING = "before_processing"  # once journaled (the only timing of a queued channel)
    AFTER_TRANSFORM = "after_transform"  # once the steps have run
    AFTER_DELIVERY = "after_delivery"  # once every destination has answered

    DEFAULT = BEFORE_PROCESSING

    @classmethod
    def of(cls, channel: Mapping[str, Any]) -> AckTiming:
        """A channel's timing from its configuration; the default when it names none."""
        return cls(channel.get("ack", {}).get("timing", cls.DEFAULT))

    @property
    def waits(self) -> bool:
        """Whether the answer waits for processing (an outcome of the channel)."""
        return self is not AckTiming.BEFORE_PROCESSING
