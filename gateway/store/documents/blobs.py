"""A document's bytes as the store keeps them: once, keyed by SHA-256 (content-addressed), with the
SHA-1 that ``attachment.hash`` carries; the base64 they travel in; the Binary URLs naming them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from gateway.core.errors import BadRequest

# "Binary/id" at the end of an attachment URL (relative or absolute).
BINARY_URL = re.compile(r"(?:^|/)Binary/([A-Za-z0-9\-.]{1,64})$")


@dataclass(slots=True)
class Blob:
    """One document's bytes, the Binary that stands for them, and their digests."""

    data: bytes
    content_type: str | None
    binary_id: str = ""
    sha256: str = field(init=False)
    sha1: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.sha1 = hashlib.sha1(self.data, usedforsecurity=False).digest()


def decode_base64(text: Any, where: str) -> bytes:
    """Strict base64 (a BadRequest naming ``where`` otherwise)."""
    if not isinstance(text, str):
        raise BadRequest(f"{where} must be base64 text", location=where)
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise BadRequest(f"{where} is not valid base64", location=where) from exc
