"""Lenient Base64 for documents sent in OBX-5.

A document whose Base64 lacks its ``=`` padding, or carries spaces or (escaped) line breaks, is read
when the intent is certain, with a warning; data that is not Base64 even then is reported (warning,
its leaves in the unmapped report) and only that document is left out: the other documents of the
message are published. Nothing ever raises.

Before: the ANS ORU CR-Bio SEGUR replacement (CDA without its padding), the LPS deletion (idem) and
the LPS 1.0 MDM (35 characters) were refused ("not valid Base64"), so no document at all.
"""

from __future__ import annotations

import base64
import binascii
import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mapping.documents import lenient_b64decode
from gateway.mapping.validate import bundle_errors
from tests.documents.cisis_messages import all_flags, convert, mdm_with_flags, oru_with_flags
from tests.documents.mdm_messages import CDA_V1, mdm
from tests.hl7_leaves import silent_leaves

SETTINGS = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
WHITESPACE = st.sampled_from([" ", "\n", "\r\n", "\t", "  "])


@st.composite
def mangled(draw: st.DrawFn) -> tuple[bytes, str]:
    """Any bytes, encoded, the padding stripped (or not) and whitespace put anywhere."""
    data = draw(st.binary(max_size=300))
    text = base64.b64encode(data).decode()
    if draw(st.booleans()):
        text = text.rstrip("=")
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces, start = [], 0
    for cut in cuts:
        pieces += [text[start:cut], draw(WHITESPACE)]
        start = cut
    pieces.append(text[start:])
    return data, "".join(pieces)


@SETTINGS
@given(mangled())
def test_padding_and_whitespace_are_repaired(case: tuple[bytes, str]) -> None:
    data, text = case
    decoded, repaired = lenient_b64decode(text)
    assert decoded == data
    assert set(repaired) <= {"whitespace", "padding"}
    assert ("whitespace" in repaired) == (text != "".join(text.split()))


@SETTINGS
@given(st.text(max_size=200))
def test_anything_else_is_refused_with_a_value_error_only(text: str) -> None:
    try:
        decoded, _ = lenient_b64decode(text)
    except ValueError:
        return
    # what it accepts is Base64 once whitespace is dropped and the padding completed
    compact = "".join(text.split()).rstrip("=")
    assert decoded == base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)


def test_what_no_padding_completes_is_refused() -> None:
    for text in ("A", "QUJDR", "QQ===", "QUJD=", "Q!==", "-_-_", "=", "Q\u00e9=="):
        try:
            lenient_b64decode(text)
        except ValueError:
            continue
        raise AssertionError(f"{text!r} was accepted")
    assert lenient_b64decode("") == (b"", ())
    with contextlib.suppress(binascii.Error):  # what the strict decoder refuses, the lenient one reads
        base64.b64decode("QQ", validate=True)
    assert lenient_b64decode("QQ") == (b"A", ("padding",))


# -- in a message ---------------------------------------------------------------------------------


CDA = CDA_V1 + b"\n"  # a length Base64 pads
assert base64.b64encode(CDA).endswith(b"=")


def _ed(payload: str) -> bytes:
    """The authored MDM with its document's data replaced by ``payload`` (ER7 text)."""
    text = mdm("T02", "C-1", "58132", data=CDA).decode()
    return text.replace(base64.b64encode(CDA).decode(), payload).encode()


def _document(result: object) -> dict[str, object] | None:
    bundle = result.bundle  # type: ignore[attr-defined]
    return next(
        (e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"), None
    )


def test_a_cda_without_its_padding_is_published_with_a_warning() -> None:
    unpadded = base64.b64encode(CDA).decode().rstrip("=")
    raw = _ed(unpadded)
    result = convert(raw)
    doc = _document(result)
    assert doc is not None
    att = doc["content"][0]["attachment"]  # type: ignore[index]
    assert base64.b64decode(att["data"]) == CDA and att["size"] == len(CDA)
    assert any("Base64 without its '=' padding: padded and decoded" in w for w in result.warnings)
    assert "OBX-5[1].5" not in result.unmapped  # the text as sent is in the output, padded
    assert silent_leaves(raw, result.bundle, result.unmapped) == []


def test_a_cda_with_spaces_and_line_breaks_is_published_and_the_text_as_sent_reported() -> None:
    encoded = base64.b64encode(CDA).decode()
    spaced = encoded[:20] + " " + encoded[20:60] + "\\X0D0A\\" + encoded[60:100] + "\\.br\\" + encoded[100:]
    raw = _ed(spaced)
    result = convert(raw)
    doc = _document(result)
    assert doc is not None
    assert base64.b64decode(doc["content"][0]["attachment"]["data"]) == CDA  # type: ignore[index]
    assert any("line breaks or spaces" in w for w in result.warnings)
    assert "OBX-5[1].5" in result.unmapped
    assert silent_leaves(raw, result.bundle, result.unmapped) == []


@SETTINGS
@given(
    st.text(
        alphabet=st.characters(blacklist_characters="|^~\\&\r\n", blacklist_categories=("Cs", "Cc")),
        min_size=1,
        max_size=60,
    )
)
def test_garbage_is_reported_never_raised(payload: str) -> None:
    raw = _ed(payload)
    result = convert(raw)  # never raises
    assert bundle_errors(result.bundle) == []
    if _document(result) is None:
        assert any("not valid Base64" in w or "ED without data" in w for w in result.warnings)
        assert "OBX-5[1].5" in result.unmapped or not payload.strip()
    assert silent_leaves(raw, result.bundle, result.unmapped) == []


def test_a_corrupt_mail_body_is_kept_apart_and_the_documents_published() -> None:
    """The ANS ORU examples carry a 93-character CORPSMAIL_PS: no padding completes it."""
    mail_text = "Cher confrère, vous trouverez ci-joint le CR d’imagerie de M.Dupont"
    broken = base64.b64encode(mail_text.encode()).decode()[:93]
    assert len(broken) % 4 == 1
    mail = f"OBX|2|ED|CORPSMAIL_PS^Corps du mail pour un PS^MetaDMPMSS||^TEXT^^Base64^{broken}||||||F"
    second = "OBX|3|ED|11502-2^CR d'examens biologiques^LN||^TEXT^XML^Base64^PENEQS8+||||||F"
    raw = oru_with_flags("C-1", all_flags(), extra_obx=[mail, second])
    result = convert(raw)
    docs = [
        e["resource"] for e in result.bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"
    ]
    assert len(docs) == 2  # both CDA published
    assert any(w.startswith("OBX[2]-5.5: the data is not valid Base64") for w in result.warnings)
    assert {"OBX[2]-5[1].5", "OBX[2]-3[1].1"} <= set(result.unmapped)
    assert silent_leaves(raw, result.bundle, result.unmapped) == []


def test_the_lps_mdm_cda_sent_without_padding() -> None:
    """The LPS volume 1.0 MDM example sends 35 characters (a truncated sample): padded, decoded."""
    raw = (
        mdm_with_flags("T02", "C-1", "58132", {})
        .decode()
        .replace(base64.b64encode(CDA_V1).decode(), "PD94bWwgdmVyc2lvbj0iMS4wIiBlbmNvZGl")
    )
    result = convert(raw.encode())
    doc = _document(result)
    assert doc is not None
    assert base64.b64decode(doc["content"][0]["attachment"]["data"]) == b'<?xml version="1.0" encodi'  # type: ignore[index]
    assert silent_leaves(raw.encode(), result.bundle, result.unmapped) == []


def test_an_ed_of_blanks_is_no_document() -> None:
    result = convert(_ed(" "))
    assert _document(result) is None
    assert any("ED without data" in w for w in result.warnings)
