"""HL7v2: the ER7 codec, character sets and acknowledgements."""

from gateway.hl7.charsets import CHARSETS, DEFAULT_CHARSET, codec_for
from gateway.hl7.er7 import DEFAULT_SEPARATORS, Message, Segment, Separators, escape, unescape

__all__ = [
    "CHARSETS",
    "DEFAULT_CHARSET",
    "DEFAULT_SEPARATORS",
    "Message",
    "Segment",
    "Separators",
    "codec_for",
    "escape",
    "unescape",
]
