"""HL7v2 acknowledgements: original mode (AA/AE/AR) and enhanced mode (CA/CE/CR).

Rules (HL7 v2.5 §2.9, IHE ITI original mode as PAM FR uses it):
- MSA-1 is the code, MSA-2 echoes the inbound MSH-10.
- Every AE/AR/CE/CR carries an ERR segment: ERR-2 location (ERL), ERR-3 the
  table 0357 code, ERR-4 the severity (table 0516), ERR-8 a short text.
- The ACK is written in the sender's character set (MSH-18 echoed) so it can
  always read it; MSH-12 and MSH-17 are echoed too.
"""

from __future__ import annotations

import os
import threading
import time
import unicodedata
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


# HL7 table 0155 (accept/application acknowledgment conditions).
ACK_CONDITIONS = frozenset({"AL", "NE", "ER", "SU"})


@dataclass(frozen=True, slots=True)
class AckRequest:
    """Whether, and how, a message asks to be acknowledged (MSH-15/MSH-16).

    Only NE, ER on success and SU on failure leave a message unanswered: any other MSH-15 is
    answered. A value outside table 0155 is read as AL, with a warning (``warnings``) that the
    intake records on the message; a value of spaces only is read as empty.
    """

    enhanced: bool
    accept_ack_type: str  # AL, NE, ER, SU ("" in original mode)
    warnings: tuple[str, ...] = ()

    def wants_commit_ack(self, success: bool) -> bool:
        if not self.enhanced:
            return True
        kind = self.accept_ack_type or "AL"
        if kind == "NE":
            return False
        if kind == "ER":
            return not success
        if kind == "SU":
            return success
        return True  # AL, and anything that is not a known condition


_ORIGINAL_MODE = AckRequest(False, "")


def ack_request(msg: Message | None) -> AckRequest:
    if msg is None:
        return _ORIGINAL_MODE
    accept_raw, app_raw = msg.accept_ack_type, msg.application_ack_type
    if not (accept_raw or app_raw):
        return _ORIGINAL_MODE  # the usual case: original mode, nothing to check
    warnings: list[str] = []
    accept = _condition(accept_raw, "MSH-15", warnings, "answered as AL")
    app = _condition(app_raw, "MSH-16", warnings, "read as AL")
    return AckRequest(bool(accept or app), accept, tuple(warnings))


def _condition(raw: str, field: str, warnings: list[str], fallback: str) -> str:
    """One of table 0155's values, "" when absent (or only spaces), "AL" for anything else."""
    value = raw.strip().upper()
    if value in ACK_CONDITIONS:
        return value
    if not value:
        if raw:
            warnings.append(f"{field} holds only spaces: read as empty")
        return ""
    shown = (
        value if len(value) <= 10 and value.isprintable() else value[:10].encode("unicode_escape").decode()
    )
    warnings.append(f"{field} '{shown}' is not a value of HL7 table 0155 (AL, NE, ER, SU): {fallback}")
    return "AL"


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


# ACK control ids (MSH-10, ST, at most 20 characters in v2.5): 9 characters of milliseconds, 3 of
# a sequence within the millisecond, then 8 naming this process, all in Crockford's base32 (whose
# alphabet is in ASCII order). Ids of one process are strictly increasing, so they sort in the
# order they were made; the process tag keeps nodes and restarts apart (40 random bits).
_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _B32 for b in _B32]
_SEQ_LIMIT = 32**3
_MS_LIMIT = 32**9  # the year 3084


def _b32(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 32)
        out.append(_B32[r])
    return "".join(reversed(out))


def _new_process_tag() -> str:
    return _b32(int.from_bytes(os.urandom(5), "big"), 8)


_id_lock = threading.Lock()
_last = (-1, 0)  # (milliseconds, sequence) of the last id made
_tag = _new_process_tag()


def _after_fork() -> None:
    global _id_lock, _last, _tag
    _id_lock, _last, _tag = threading.Lock(), (-1, 0), _new_process_tag()


os.register_at_fork(after_in_child=_after_fork)


def _control_id(now: float) -> str:
    global _last
    ms = int(now * 1000) % _MS_LIMIT
    with _id_lock:
        last_ms, seq = _last
        if ms <= last_ms:  # the same millisecond, or the clock stepped back: keep increasing
            ms, seq = last_ms, seq + 1
            if seq >= _SEQ_LIMIT:
                ms, seq = last_ms + 1, 0
        else:
            seq = 0
        _last = (ms, seq)
    n = (ms << 15) | seq  # 60 bits: 12 characters, written as 6 pairs
    t = _PAIRS
    return (
        t[n >> 50]
        + t[(n >> 40) & 1023]
        + t[(n >> 30) & 1023]
        + t[(n >> 20) & 1023]
        + t[(n >> 10) & 1023]
        + t[n & 1023]
        + _tag
    )


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
    if error is not None:  # MSA-3 holds 80 characters in v2.5; ERR-8 carries the longer text
        msa.append(_fit(error.message, 80, seps))
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
            _fit(error.message, 250, seps),  # ERR-8's v2.5 length
        ]
        segments.append(f.join(err))
    text_out = "\r".join(segments) + "\r"
    try:
        return text_out.encode(codec)
    except UnicodeEncodeError:
        # The error text may hold a character the sender's charset lacks: its compatibility
        # form (NFKD: é → e + accent) where that fits, else "?".
        return "".join(_fold(ch, codec) for ch in text_out).encode(codec, errors="replace")


def _fold(ch: str, codec: str) -> str:
    try:
        ch.encode(codec)
    except UnicodeEncodeError:
        return "".join(c for c in unicodedata.normalize("NFKD", ch) if c.isascii()) or "?"
    return ch


def _fit(text: str, limit: int, seps: Separators) -> str:
    """``text`` escaped and shortened to ``limit`` characters as sent (escapes count)."""
    room = limit
    out = escape(_short(text, room), seps)
    if len(out) > limit:  # escapes took room: start from the proportion, then step down
        room = max(1, room * limit // len(out))
        out = escape(_short(text, room), seps)
        while len(out) > limit and room > 1:
            room -= 1
            out = escape(_short(text, room), seps)
    return out


def _short(text: str, limit: int = 200) -> str:
    one_line = " ".join(text.replace("…", "...").split())
    # ASCII dots: every charset a sender may name has them (an ellipsis became "?" in ISO 8859-15)
    return one_line if len(one_line) <= limit else one_line[: max(limit - 3, 0)] + "..."


def parse_ack(raw: bytes) -> tuple[str, str, str]:
    """Read an ACK we received: (MSA-1, MSA-2, ERR-3.1). Raises ParseError/EncodingError."""
    msg = Message.decode(raw, default_charset="UNICODE UTF-8")
    return msg.get("MSA-1"), msg.get("MSA-2"), msg.get("ERR-3.1")
