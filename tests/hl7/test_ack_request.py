"""MSH-15/16 as senders write them (defect 8), and the ACK's own MSH-10 (defect 16)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance.hl7v2.validator import validate_hl7
from gateway.core.errors import AckCode, ValidationError
from gateway.hl7 import ack as ack_module
from gateway.hl7.ack import ack_request, build_ack
from gateway.hl7.er7 import Message


def header(msh15: str = "", msh16: str = "", version: str = "2.5") -> Message:
    text = f"MSH|^~\\&|APP|FAC|GW|GHT|20261123101500||ADT^A01|C1|P|{version}|||{msh15}|{msh16}\rPID|1\r"
    return Message.parse(text)


@pytest.mark.parametrize(
    ("msh15", "msh16", "success", "failure"),
    [
        ("", "", True, True),  # original mode: always answered
        ("AL", "", True, True),
        ("al", "", True, True),
        ("NE", "", False, False),
        ("ER", "", False, True),
        ("SU", "", True, False),
        ("", "AL", True, True),  # enhanced mode, MSH-15 empty: AL
        (" ", "", True, True),
        ("XX", "", True, True),
        (" NE ", "", False, False),
        ("XX", "NE", True, True),
        ("\\T\\", "", True, True),
    ],
)
def test_only_ne_er_on_success_and_su_on_failure_go_unanswered(
    msh15: str, msh16: str, success: bool, failure: bool
) -> None:
    request = ack_request(header(msh15, msh16))
    assert request.wants_commit_ack(True) is success
    assert request.wants_commit_ack(False) is failure


def test_spaces_are_read_as_empty_and_unknown_values_as_al_with_a_warning() -> None:
    spaces = ack_request(header(" "))
    assert not spaces.enhanced  # the v2.3 sender with a trailing space wants an original-mode AA
    assert spaces.warnings == ("MSH-15 holds only spaces: read as empty",)
    unknown = ack_request(header("XX"))
    assert unknown.enhanced and unknown.accept_ack_type == "AL"
    assert unknown.warnings == (
        "MSH-15 'XX' is not a value of HL7 table 0155 (AL, NE, ER, SU): answered as AL",
    )
    app = ack_request(header("", "ZZ"))
    assert app.enhanced and app.accept_ack_type == ""
    assert app.warnings == ("MSH-16 'ZZ' is not a value of HL7 table 0155 (AL, NE, ER, SU): read as AL",)
    assert ack_request(header("ER", "AL")).warnings == ()
    assert ack_request(header()).warnings == ()


def test_ack_control_ids_fit_msh10_are_unique_and_sort_in_the_order_made() -> None:
    msg = header()
    now = 1_800_000_000.123
    made = [Message.decode(build_ack(msg, AckCode.AA, now=now)).get("MSH-10") for _ in range(2000)]
    assert max(len(c) for c in made) <= 20  # MSH-10 is ST, 20 characters in v2.5
    assert len(set(made)) == len(made)
    assert made == sorted(made)
    later = Message.decode(build_ack(msg, AckCode.AA, now=now + 0.002)).get("MSH-10")
    assert later > made[-1]
    # the clock steps back: still increasing
    earlier = Message.decode(build_ack(msg, AckCode.AA, now=now - 5)).get("MSH-10")
    assert earlier > later and len(earlier) == 20
    assert all(c.isdigit() or (c.isalpha() and c.isupper()) for c in made[0])


def test_ack_control_ids_made_on_several_threads_do_not_collide() -> None:
    made: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        ids = [ack_module._control_id(1_800_000_000.0) for _ in range(2000)]
        with lock:
            made.extend(ids)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8000
    assert {len(c) for c in made} == {20}


@given(st.text(min_size=1, max_size=400) | st.text("|^~\\&", min_size=80, max_size=300))
def test_an_ack_s_error_text_fits_msa_3_and_err_8_carries_more(text: str) -> None:
    """MSA-3 holds 80 characters in v2.5 (escapes count); the ACK passes the gateway's own check."""
    ack = Message.decode(build_ack(header(), AckCode.AE, ValidationError(text + "|^~\\&")))
    raw_msa3 = ack.segment("MSA").field(3)
    assert len(raw_msa3) <= 80
    assert not any(
        f.rule == "HL7-FLD-004" for f in validate_hl7(build_ack(header(), AckCode.AE, ValidationError(text)))
    )
    if len(" ".join(text.split())) > 80:
        assert len(ack.get("ERR-8")) > len(ack.get("MSA-3"))


def test_a_shortened_error_text_stays_readable_in_the_senders_charset() -> None:
    """A sender in ISO 8859-15 gets ASCII dots where the text was cut, and a character its charset
    lacks in its plain form (… → ...), never a "?" in place of a letter."""
    msh = Message.parse("MSH|^~\\&|APP|FAC|GW|GHT|20261123101500||ADT^A01|C1|P|2.5|||||FRA|8859/15\rPID|1\r")
    text = "MSH-10 déjà utilisé … " + "x" * 120
    ack = build_ack(msh, AckCode.AE, ValidationError(text))
    msa3 = Message.decode(ack).get("MSA-3")
    assert msa3.endswith("...") and len(msa3) <= 80
    assert "déjà utilisé ..." in msa3 and "?" not in msa3
