"""HL7 character sets (MSH-18, HL7 table 0211) and the Python codecs that read them.

Only names whose mapping is certain are listed. Every codec here is a superset
of ASCII, which is what lets ``Message.decode`` read MSH-18 from the raw bytes
before it knows the codec. Values such as plain "UNICODE" (UCS-2? UTF-16? which
byte order?) or the ISO 2022 ones are deliberately absent: an unknown MSH-18 is
rejected, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from gateway.core.errors import EncodingError

__all__ = ["CHARSETS", "DEFAULT_CHARSET", "codec_for"]

# HL7's own default when MSH-18 is empty.
DEFAULT_CHARSET = "ASCII"

CHARSETS: Mapping[str, str] = MappingProxyType(
    {
        "ASCII": "ascii",
        "8859/1": "latin-1",
        "8859/2": "iso8859_2",
        "8859/3": "iso8859_3",
        "8859/4": "iso8859_4",
        "8859/5": "iso8859_5",
        "8859/6": "iso8859_6",
        "8859/7": "iso8859_7",
        "8859/8": "iso8859_8",
        "8859/9": "iso8859_9",
        "8859/15": "iso8859_15",
        "UNICODE UTF-8": "utf-8",
    }
)


def codec_for(msh18: str) -> str:
    """The Python codec for an MSH-18 value (surrounding spaces ignored, names exact).

    Raises ``EncodingError`` (location MSH-18) for an empty or unknown value: the
    caller substitutes its configured default for an empty MSH-18 itself.
    """
    name = msh18.strip(" ")
    codec = CHARSETS.get(name)
    if codec is None:
        if not name:
            raise EncodingError("empty character set name", location="MSH-18")
        # repr() keeps control characters from a hostile message out of the logs.
        raise EncodingError(f"unknown character set {name[:40]!r} in MSH-18", location="MSH-18")
    return codec
