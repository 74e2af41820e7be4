"""Message ids: 26 characters, sortable by creation time, unique across nodes.

The layout is a ULID's (48-bit milliseconds, then 80 random bits), written in
base32 with Crockford's alphabet from the most significant bit, so that string
order is time order.
"""

from __future__ import annotations

import os
import threading
import time

# Crockford's alphabet is in ascending ASCII order, so string order is numeric order. The
# 128 bits, shifted left by 2, are written as 13 pairs of characters (10 bits each), from a
# table: several times faster than base64's codec, which works in Python byte by byte.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]

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
    return encode(ms, rand)


def encode(ms: int, rand: bytes) -> str:
    """The id of 48 bits of milliseconds and 10 random bytes."""
    n = ((ms << 80) | int.from_bytes(rand, "big")) << 2
    t = _PAIRS
    return "".join(
        (
            t[(n >> 120) & 1023],
            t[(n >> 110) & 1023],
            t[(n >> 100) & 1023],
            t[(n >> 90) & 1023],
            t[(n >> 80) & 1023],
            t[(n >> 70) & 1023],
            t[(n >> 60) & 1023],
            t[(n >> 50) & 1023],
            t[(n >> 40) & 1023],
            t[(n >> 30) & 1023],
            t[(n >> 20) & 1023],
            t[(n >> 10) & 1023],
            t[n & 1023],
        )
    )
