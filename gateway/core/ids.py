"""Message ids: 26 characters, sortable by creation time, unique across nodes.

The layout is a ULID's (48-bit milliseconds, then 80 random bits), written in
base32 with Crockford's alphabet from the most significant bit, so that string
order is time order.
"""

from __future__ import annotations

import base64
import os
import time

# base32hex and Crockford's alphabet are both in ascending ASCII order, so mapping one onto
# the other keeps the sort order; the standard codec does the bit work in C.
_TO_CROCKFORD = str.maketrans("0123456789ABCDEFGHIJKLMNOPQRSTUV", "0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def new_id(now: float | None = None) -> str:
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    raw = ms.to_bytes(6, "big") + os.urandom(10)
    return base64.b32hexencode(raw)[:26].decode("ascii").translate(_TO_CROCKFORD)
