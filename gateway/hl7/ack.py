"""HL7v2 acknowledgements: original mode (AA/AE/AR) and enhanced mode (CA/CE/CR).

Rules (HL7 v2.5 §2.9, IHE ITI original mode as PAM FR uses it):
- MSA-1 is the code, MSA-2 echoes the inbound MSH-10.
- Every AE/AR/CE/CR carries an ERR segment: ERR-2 location (ERL), ERR-3 the
  table 0357 code, ERR-4 the severity (table 0516), ERR-8 a short text.
- The ACK is written in the sender's character set (MSH-18 echoed) so it can
  always read it; MSH-12 and MSH-17 are echoed too.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from gateway.core.errors import AckCode, PasserelleError, Severity
from gateway.hl7.charsets import CHARSETS
from gateway.hl7.er7 import DEFAULT_SEPARATORS, Message, Separators, escape
from gateway.hl7.path import location as parse_location

# HL7 table 0357 (message error condition codes).
TABLE_0357 = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}


@dataclass(frozen=True, slots=True)
class AckRequest:
    """Whether, and how, a message asks to be acknowledged (MSH-15/MSH-16)."""

    enhanced: bool
    accept_ack_type: str  # AL, NE, ER, SU ("" in original mode)

    def wants_commit_ack(self, success: bool) -> bool:
        if not self.enhanced:
            return True
        kind = self.accept_ack_type or "AL"
        return kind == "AL" or (kind == "ER" and not success) or (kind == "SU" and success)


def ack_request(msg: Message | None) -> AckRequest:
    if msg is None:
        return AckRequest(False, "")
    accept, app = msg.accept_ack_type.upper(), msg.application_ack_type.upper()
    return AckRequest(bool(accept or app), accept)


def location_to_erl(location: str | None, seps: Separators) -> str:
    """'PID-3[2].4' → 'PID^1^3^2^4' (ERR-2, data type ERL)."""
    loc = parse_location(location)
    if loc is None:
        return ""
    parts = [loc.segment, str(loc.occurrence or 1)]
    if loc.field:
        parts += [str(loc.field), str(loc.repetition or 1)]
        if loc.component is not None:
            parts.append(str(loc.component))
            if loc.subcomponent is not None:
                parts.append(str(loc.subcomponent))
    return seps.component.join(parts)


_counter = itertools.count(1)


def _control_id(now: float) -> str:
    # Unique per process and sortable: time plus a rolling counter.
    return f"ACK{int(now * 1000)}{next(_counter) % 100000:05d}"


_stamp_cache: tuple[int, str] = (-1, "")


def _timestamp(now: float) -> str:
    # Many ACKs leave within the same second: format each second once.
    global _stamp_cache
    second = int(now)
    if _stamp_cache[0] != second:
        _stamp_cache = (second, time.strftime("%Y%m%d%H%M%S", time.gmtime(second)) + "+0000")
    return _stamp_cache[1]


def build_ack(
    msg: Message | None,
    code: AckCode,
    error: PasserelleError | None = None,
    *,
    control_id: str | None = None,
    now: float | None = None,
    sending_application: str = "PASSERELLE",
) -> bytes:
    """Build and encode an ACK for ``msg`` (``None`` when nothing of it could be read)."""
    now = time.time() if now is None else now
    seps = msg.separators if msg is not None else DEFAULT_SEPARATORS
    f, c = seps.field, seps.component
    if msg is not None:
        trigger = msg.trigger
        # The header is split already: read its fields (first repetition, raw) directly.
        parts = msg._msh_parts
        count = len(parts)
        rep = seps.repetition

        def raw(n: int) -> str:
            value = parts[n] if n < count else ""
            return value.split(rep, 1)[0] if rep in value else value

        msh = [
            "MSH",
            seps.encoding_characters,
            raw(5) or escape(sending_application, seps),
            raw(6),
            raw(3),
            raw(4),
            _timestamp(now),
            "",
            f"ACK{c}{trigger}{c}ACK" if trigger else f"ACK{c}{c}ACK",
            control_id or _control_id(now),
            raw(11) or "P",
            raw(12) or "2.5",
            "",
            "",
            "",
            "",
            raw(17),
            raw(18),
        ]
        echo = raw(10)
        codec = msg.codec
    else:
        msh = [
            "MSH",
            seps.encoding_characters,
            escape(sending_application, seps),
            "",
            "",
            "",
            _timestamp(now),
            "",
            f"ACK{c}{c}ACK",
            control_id or _control_id(now),
            "P",
            "2.5",
        ]
        echo, codec = "", CHARSETS["ASCII"]
    while msh and msh[-1] == "":
        msh.pop()
    segments = ["MSH" + f + msh[1] + f + f.join(msh[2:])]
    msa = ["MSA", code.value, echo]
    if error is not None:
        msa.append(escape(_short(error.message), seps))
    segments.append(f.join(msa))
    if error is not None and code not in (AckCode.AA, AckCode.CA):
        text = TABLE_0357.get(error.hl7_error_code, "")
        err = [
            "ERR",
            "",
            location_to_erl(error.location, seps),
            c.join([error.hl7_error_code, escape(text, seps), "HL70357"]),
            Severity.ERROR.value,
            "",
            "",
            "",
            escape(_short(error.message), seps),
        ]
        segments.append(f.join(err))
    text_out = "\r".join(segments) + "\r"
    try:
        return text_out.encode(codec)
    except UnicodeEncodeError:
        # The error text may hold a character the sender's charset lacks; ASCII-fold it.
        return text_out.encode(codec, errors="replace")


def _short(text: str, limit: int = 200) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"


def parse_ack(raw: bytes) -> tuple[str, str, str]:
    """Read an ACK we received: (MSA-1, MSA-2, ERR-3.1). Raises ParseError/EncodingError."""
    msg = Message.decode(raw, default_charset="UNICODE UTF-8")
    return msg.get("MSA-1"), msg.get("MSA-2"), msg.get("ERR-3.1")
