"""A channel's ``ack.timing``: one set of values, parsed once when the configuration loads."""

from __future__ import annotations

import pytest

from gateway import config
from gateway.core.ack import AckTiming
from gateway.core.errors import ConfigError

CONFIG = """\
sources:
  - name: hospital
    type: mllp
    port: 2575
channels:
  - name: adt
    source: hospital
    queue: false
    ack: {timing: after_transform}
    destinations:
      - {name: archive, type: file, directory: /tmp/x}
  - name: lab
    source: hospital
    destinations:
      - {name: archive, type: file, directory: /tmp/x}
"""


def test_the_schema_names_the_same_values() -> None:
    timing = config.schema()["properties"]["channels"]["items"]["properties"]["ack"]["properties"]["timing"]
    assert timing["enum"] == [t.value for t in AckTiming]


def test_a_loaded_timing_is_a_member() -> None:
    adt, lab = config.parse(CONFIG, "c.yaml").data["channels"]
    assert adt["ack"]["timing"] is AckTiming.AFTER_TRANSFORM
    assert AckTiming.of(adt) is AckTiming.AFTER_TRANSFORM
    assert "ack" not in lab  # nothing is written into the configuration that was not in it
    assert AckTiming.of(lab) is AckTiming.BEFORE_PROCESSING is AckTiming.DEFAULT


def test_a_bad_timing_names_file_key_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(CONFIG.replace("after_transform", "after_lunch"), "c.yaml")
    err = info.value
    assert (err.file, err.key, err.line) == ("c.yaml", "channels[0].ack.timing", 9)
    assert "after_lunch" in err.reason


@pytest.mark.parametrize(
    ("timing", "waits"),
    [
        (AckTiming.BEFORE_PROCESSING, False),
        (AckTiming.AFTER_TRANSFORM, True),
        (AckTiming.AFTER_DELIVERY, True),
    ],
)
def test_which_timings_wait_for_an_outcome(timing: AckTiming, waits: bool) -> None:
    assert timing.waits is waits


def test_a_queued_channel_that_would_wait_is_told_so_by_value() -> None:
    text = CONFIG.replace("    queue: false\n", "")
    with pytest.raises(ConfigError) as info:
        config.parse(text, "c.yaml")
    assert info.value.key == "channels[0].ack.timing"
    assert info.value.reason == (
        "'after_transform' needs 'queue: false'; a queued channel acknowledges before processing"
    )
