"""Masking of stored payloads for display: identifying data is hidden unless revealed on purpose."""

from __future__ import annotations

from gateway.core.errors import MessageError
from gateway.hl7.charsets import CHARSETS
from gateway.hl7.er7 import Message

# Segments that carry no patient data: shown as they are.
_CLEAR_SEGMENTS = frozenset({"MSH", "MSA", "ERR", "EVN"})
MASK = "***"


def mask_hl7(raw: bytes, default_charset: str = "ASCII") -> str:
    """Keep the structure (segments, field positions) and the header; replace every other value."""
    try:
        msg = Message.decode(raw, default_charset=default_charset)
    except MessageError:
        return f"<{len(raw)} bytes, unreadable, masked>"
    f = msg.separators.field
    lines = []
    for seg in msg.segments:
        fields = [seg.field(i) for i in range(1, len(seg) + 1)]
        if seg.name == "MSH":
            lines.append("MSH" + f + f.join(fields[1:]))
        elif seg.name in _CLEAR_SEGMENTS:
            lines.append(seg.name + f + f.join(fields))
        else:
            lines.append(seg.name + "".join(f + (MASK if v else "") for v in fields))
    return "\r".join(lines) + "\r"


def payload_text(raw: bytes, charset: str) -> str:
    """Stored bytes as text for JSON, decoded with the message's own charset when it is known."""
    codec = CHARSETS.get(charset, "utf-8")
    return raw.decode(codec, errors="replace")
