"""Namespaces: where the system of every key identifier comes from, and what happens without one."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import config as config_mod
from gateway.core.errors import ConfigError, UnknownNamespace
from gateway.hl7.er7 import Message
from gateway.mapping.namespaces import Authority, Namespaces
from tests.mapping.test_adt import LIB, segment

SENDER = ("GLIMS", "LABO-EST", "")


def resolve(ns: Namespaces, kind: str, authority: Authority, sender: tuple[str, str, str] = SENDER) -> str:
    return ns.resolve(kind, authority, lambda: sender, "OBR-3").system


def test_an_oid_names_itself_whatever_the_table_says() -> None:
    ns = Namespaces.from_config({"authorities": {"LABO": "https://elsewhere.example/id"}})
    assert resolve(ns, "filler-order", Authority("LABO", "1.2.250.1.71.4.2.2.5551", "ISO")) == (
        "urn:oid:1.2.250.1.71.4.2.2.5551"
    )
    assert resolve(ns, "filler-order", Authority("", "1.2.250.1.71.4.2.2.5551", "")) == (
        "urn:oid:1.2.250.1.71.4.2.2.5551"
    )
    assert (
        resolve(ns, "patient", Authority("", "https://chu.example/ipp", "URI")) == "https://chu.example/ipp"
    )


def test_a_namespace_id_is_looked_up_per_kind_and_per_sender() -> None:
    ns = Namespaces.from_config(
        {
            "authorities": {
                "CHU-X": {"patient": "https://chu-x.example/ipp", "*": "https://chu-x.example/other"}
            },
            "senders": {"LABO-EST": {"authorities": {"CHU-X": "https://labo-est.example/its-chu-x"}}},
        }
    )
    # the sender's own table wins over the deployment's
    assert resolve(ns, "patient", Authority("CHU-X")) == "https://labo-est.example/its-chu-x"
    other = ("SIH", "CHU-X", "")
    assert resolve(ns, "patient", Authority("CHU-X"), other) == "https://chu-x.example/ipp"
    assert resolve(ns, "visit", Authority("CHU-X"), other) == "https://chu-x.example/other"


def test_a_sender_numbers_what_it_sends_without_authority() -> None:
    ns = Namespaces.from_config(
        {
            "senders": {
                "GLIMS^LABO-EST": {
                    "system": "https://labo-est.example/id",
                    "systems": {"patient": "urn:oid:1.2.3"},
                }
            }
        }
    )
    assert resolve(ns, "filler-order", Authority()) == "https://labo-est.example/id/filler-order"
    assert resolve(ns, "patient", Authority()) == "urn:oid:1.2.3"
    # two unknown authorities of one sender do not share a namespace
    assert resolve(ns, "patient", Authority("LAB2")) != resolve(ns, "patient", Authority())


def test_a_finess_typed_authority_derives_its_system_with_a_warning() -> None:
    resolved = Namespaces().resolve(
        "patient", Authority("CHU-X", "000897406", "N"), lambda: SENDER, "PID-3[1].4"
    )
    assert resolved.system == "urn:passerelle:finess:eg:000897406:patient"
    assert resolved.note is not None and "PID-3[1].4" in resolved.note and "FINESS" in resolved.note


def test_without_namespace_the_policy_decides_reject_or_sender() -> None:
    with pytest.raises(UnknownNamespace) as info:
        resolve(Namespaces(), "filler-order", Authority())
    assert info.value.location == "OBR-3"
    assert info.value.hl7_error_code == "103"
    derived = Namespaces(policy="sender").resolve("filler-order", Authority(), lambda: SENDER, "OBR-3")
    assert derived.system == "urn:passerelle:sender:LABO-EST:GLIMS:filler-order"
    assert derived.note is not None


def test_one_authority_numbering_several_kinds_never_collides_when_derived() -> None:
    ns = Namespaces(policy="sender")
    kinds = ["patient", "visit", "movement", "account", "placer-order", "filler-order"]
    assert len({resolve(ns, kind, Authority("CHU-X")) for kind in kinds}) == len(kinds)


@settings(max_examples=80, deadline=None)
@given(
    facility=st.text(min_size=1, max_size=20),
    application=st.text(max_size=20),
    namespace=st.text(max_size=20),
)
def test_any_sender_gives_a_system_without_blanks_or_separators(
    facility: str, application: str, namespace: str
) -> None:
    system = resolve(
        Namespaces(policy="sender"), "patient", Authority(namespace), (application, facility, "")
    )
    assert system.startswith("urn:passerelle:sender:")
    assert not any(c in system for c in " |,$\\^&\r\n")  # FHIR search separators and blanks


def test_the_table_is_checked_at_start_with_file_key_and_line(tmp_path: Path) -> None:
    text = (
        "sources: [{name: s, type: mllp, port: 0}]\n"
        "channels: [{name: c, source: s, destinations: [{name: f, type: file, directory: out}]}]\n"
        "namespaces:\n  authorities:\n    CHU-X: not a system\n"
    )
    with pytest.raises(ConfigError) as info:
        config_mod.parse(text, str(tmp_path / "config.yaml"))
    assert "namespaces" in str(info.value) and "CHU-X" in str(info.value)


def test_the_mapping_names_the_field_it_cannot_namespace() -> None:
    text = "\r".join(
        [
            "MSH|^~\\&|SIL|LABO-EST|PASSERELLE|GHT|20261123110000||ORU^R01^ORU_R01|X1|P|2.5",
            "PID|||552233^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI||GÉRARD^Zoé",
            segment("OBR", {1: "1", 3: "RES456", 4: "X^Bilan^L"}),
        ]
    )
    with pytest.raises(UnknownNamespace) as info:
        LIB.map(Message.parse(text))
    assert info.value.location == "OBR-3"
    mapped = LIB.map(Message.parse(text), namespaces=Namespaces(policy="sender"))
    keys = [e["request"].get("ifNoneExist") or e["request"]["url"] for e in mapped.bundle["entry"]]
    assert all("identifier=|" not in key for key in keys)
    assert any("urn:passerelle:sender:LABO-EST:SIL:filler-order|RES456" in key for key in keys)


def test_a_refusal_names_the_occurrence_of_the_group_it_comes_from() -> None:
    """ERR-2 must point at the second order's OBR-3, not at the first one, which was fine."""
    text = "\r".join(
        [
            "MSH|^~\\&|SIL|LABO-EST|PASSERELLE|GHT|20261123110000||ORU^R01^ORU_R01|X1|P|2.5",
            "PID|||552233^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI||GÉRARD^Zoé",
            segment("OBR", {1: "1", 3: "RES455^LABO-EST^1.2.250.1.71.4.2.2.5551^ISO", 4: "X^Bilan^L"}),
            segment("OBX", {1: "1", 2: "NM", 3: "2823-3^Potassium^LN", 5: "4.1", 11: "F"}),
            segment("OBR", {1: "2", 3: "RES456", 4: "X^Bilan^L"}),
            segment("OBX", {1: "1", 2: "NM", 3: "2951-2^Sodium^LN", 5: "140", 11: "F"}),
        ]
    )
    with pytest.raises(UnknownNamespace) as info:
        LIB.map(Message.parse(text))
    assert info.value.location == "OBR[2]-3"
