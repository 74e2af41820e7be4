"""config.yaml: every mistake names the file, the key and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import config
from gateway.core.errors import ConfigError

GOOD = """\
sources:
  - name: hospital
    type: mllp
    port: 2575
channels:
  - name: adt
    source: hospital
    destinations:
      - name: archive
        type: file
        directory: /tmp/x
"""


def test_the_shipped_config_is_valid() -> None:
    cfg = config.load(Path(__file__).parents[2] / "config.yaml")
    assert cfg.data["sources"][0]["type"] == "mllp"


def test_good_config_parses() -> None:
    cfg = config.parse(GOOD, "c.yaml")
    assert cfg.data["channels"][0]["name"] == "adt"
    assert cfg.line_of(("channels", 0, "destinations", 0, "type")) == 10


def test_unknown_key_names_key_and_line() -> None:
    text = GOOD.replace("    source: hospital\n", "    source: hospital\n    filtre: {}\n")
    with pytest.raises(ConfigError) as info:
        config.parse(text, "c.yaml")
    err = info.value
    assert (err.file, err.key, err.line) == ("c.yaml", "channels[0].filtre", 8)
    assert "unknown key" in err.reason
    assert str(err).startswith("c.yaml:8: channels[0].filtre:")


def test_bad_enum_value() -> None:
    text = GOOD.replace("    source: hospital\n", "    source: hospital\n    ack: {timing: whenever}\n")
    with pytest.raises(ConfigError) as info:
        config.parse(text, "c.yaml")
    assert info.value.key == "channels[0].ack.timing"
    assert info.value.line == 8


def test_queued_channel_only_acks_before_processing() -> None:
    text = GOOD.replace("    source: hospital\n", "    source: hospital\n    ack: {timing: after_delivery}\n")
    with pytest.raises(ConfigError) as info:
        config.parse(text, "c.yaml")
    assert info.value.key == "channels[0].ack.timing"
    assert "queue: false" in info.value.reason


def test_non_queued_channel_may_ack_after_delivery() -> None:
    text = GOOD.replace(
        "    source: hospital\n",
        "    source: hospital\n    queue: false\n    ack: {timing: after_delivery}\n",
    )
    assert config.parse(text, "c.yaml").data["channels"][0]["queue"] is False


def test_unknown_source_reference() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(GOOD.replace("source: hospital", "source: clinic"), "c.yaml")
    assert info.value.key == "channels[0].source"
    assert "hospital" in info.value.reason


def test_duplicate_names() -> None:
    text = GOOD + "      - name: archive\n        type: file\n        directory: /tmp/y\n"
    with pytest.raises(ConfigError) as info:
        config.parse(text, "c.yaml")
    assert info.value.key == "channels[0].destinations[1].name"
    assert info.value.line == 12


def test_missing_required() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse("sources: []\n", "c.yaml")
    assert "required" in info.value.reason or "short" in info.value.reason


def test_invalid_yaml_reports_line() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse("sources:\n  - name: [unclosed\n", "c.yaml")
    assert info.value.line is not None
    assert "YAML" in info.value.reason


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        config.load("/nonexistent/passerelle.yaml")
    assert info.value.file == "/nonexistent/passerelle.yaml"


def test_a_patient_credential_names_its_identifier_system() -> None:
    text = (
        GOOD
        + "auth:\n  tokens:\n    - {token: patient-token-0123456789, subject: p1, role: patient,"
        + " patients: ['552233']}\n"
    )
    with pytest.raises(ConfigError) as info:
        config.parse(text, "c.yaml")
    assert info.value.key == "auth.tokens[0].patients[0]"
    qualified = text.replace("['552233']", "['urn:oid:1.2.250.1.213.1.4.8|552233']")
    assert config.parse(qualified, "c.yaml").data["auth"]["tokens"][0]["patients"] == [
        "urn:oid:1.2.250.1.213.1.4.8|552233"
    ]
