"""Is this text base64 (RFC 4648 §4), and is it the canonical encoding of its bytes?

Three answers: canonical (None); decodable but not canonical (a warning: whitespace inside,
missing or incomplete '=' padding, non-zero unused bits in the last character, all of which
lenient decoders accept); not base64 at all (an error: a character outside the alphabet, '='
before the end, more '=' than the length needs, or a length that leaves a lone 6-bit
character, which no decoder can turn into a byte). Never raises; linear in the text.
"""

from __future__ import annotations

import re
from typing import Final, Literal

ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
WHITESPACE: Final = " \t\n\r\f\v"

_DROP_WHITESPACE: Final = str.maketrans("", "", WHITESPACE)
_BODY: Final = re.compile(r"[A-Za-z0-9+/]*")
_VALUE: Final = {c: i for i, c in enumerate(ALPHABET)}

Issue = tuple[Literal["error", "warning"], str]


def base64_issue(text: str) -> Issue | None:
    """None when ``text`` is canonical base64, else (severity, what is wrong) without the data."""
    compact = text.translate(_DROP_WHITESPACE)
    spaced = len(compact) != len(text)
    body = compact.rstrip("=")
    padding = len(compact) - len(body)
    if _BODY.fullmatch(body) is None:
        where = "'=' before its end" if "=" in body else "a character outside the base64 alphabet"
        return "error", f"not base64 ({where})"
    rest = len(body) % 4
    if rest == 1:
        return "error", "not base64 (its length leaves a lone final character: truncated?)"
    needed = (4 - rest) % 4
    if padding > needed:
        return "error", "not base64 (more '=' padding than its length needs)"
    notes = []
    if rest and _VALUE[body[-1]] & (0x0F if rest == 2 else 0x03):
        notes.append("non-zero unused bits in its last character")
    if padding < needed:
        notes.append("missing '=' padding")
    if spaced:
        notes.append("whitespace inside")
    if notes:
        return "warning", f"decodable but not canonical base64 ({', '.join(notes)})"
    return None
