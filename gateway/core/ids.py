"""Message ids: 26 characters, sortable by creation time, unique across nodes.

The layout is a ULID's (48-bit milliseconds, then 80 random bits), written in
base32 with Crockford's alphabet from the most significant bit, so that string
order is time order.
"""

from __future__ import annotations

import base64
import os
import threading
import time

# base32hex and Crockford's alphabet are both in ascending ASCII order, so mapping one onto
# the other keeps the sort order; the standard codec does the bit work in C.
_TO_CROCKFORD = bytes.maketrans(b"0123456789ABCDEFGHIJKLMNOPQRSTUV", b"0123456789ABCDEFGHJKMNPQRSTVWXYZ")

# Random bits are read from the OS in blocks (one syscall per _BLOCK ids, not per id). Each
# id consumes its own 10 fresh bytes, so the randomness is the same as one urandom per id.
_BLOCK = 256
_pool = b""
_pos = 0
_lock = threading.Lock()  # ids are also made in worker threads


def _reset_pool() -> None:
    # A forked child must not hand out the bytes its parent will also use.
    global _pool, _pos, _lock
    _pool, _pos, _lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_reset_pool)


def new_id(now: float | None = None) -> str:
    global _pool, _pos
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    with _lock:
        pos = _pos
        if pos + 10 > len(_pool):
            _pool, pos = os.urandom(10 * _BLOCK), 0
        _pos = pos + 10
        rand = _pool[pos : pos + 10]
    raw = ms.to_bytes(6, "big") + rand
    return base64.b32hexencode(raw)[:26].translate(_TO_CROCKFORD).decode("ascii")
