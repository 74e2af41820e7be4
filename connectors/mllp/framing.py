"""MLLP framing: 0x0B <message> 0x1C 0x0D. Bytes and frames only; nothing here knows HL7.

The decoder is a pure object fed with whatever the socket delivered, so it can be
tested without a socket and reused by the server and the client alike.
"""

from __future__ import annotations

from dataclasses import dataclass

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
_SB, _EB, _CR, _LF = 0x0B, 0x1C, 0x0D, 0x0A


def frame(payload: bytes) -> bytes:
    return b"\x0b" + payload + b"\x1c\x0d"


@dataclass(frozen=True, slots=True)
class Oversize:
    """A frame grew past the limit; ``prefix`` is its beginning, enough to read MSH."""

    prefix: bytes
    limit: int


class FrameDecoder:
    """Incremental MLLP decoder: ``feed`` returns complete frames (bytes) and Oversize markers.

    Bytes outside frames are counted in ``junk_bytes`` and dropped (CR/LF between
    frames are tolerated silently). A start block inside a frame restarts it: the
    sender evidently gave up on the previous one. An end block not followed by CR
    still ends the frame.

    The open frame is held as the pieces that arrived (small ones gathered into pieces of
    ``_PIECE`` bytes), not as one growing buffer: joined once when the frame ends, with no
    reallocation as it grows, so that memory held for many large frames still arriving is
    what they weigh, not what a fragmented heap keeps of their successive copies.
    """

    __slots__ = (
        "_discarding",
        "_in_frame",
        "_pieces",
        "_size",
        "_tail",
        "junk_bytes",
        "max_size",
        "prefix_size",
    )

    _PIECE = 64 * 1024

    def __init__(self, max_size: int = 16 * 1024 * 1024, prefix_size: int = 4096) -> None:
        self.max_size = max_size
        self.prefix_size = prefix_size
        self._pieces: list[bytes] = []  # the open frame's body so far, in order, then _tail
        self._tail = bytearray()  # small reads gathered, so that a trickle costs no per-read overhead
        self._size = 0  # bytes in _pieces and _tail
        self._in_frame = False
        self._discarding = False
        self.junk_bytes = 0

    @property
    def buffered(self) -> int:
        """Bytes of the open frame held (0 between frames and while a refused frame is dropped)."""
        return self._size

    @property
    def in_frame(self) -> bool:
        """A start block has been read and its end block not yet (also while a refused frame is dropped)."""
        return self._in_frame

    @property
    def discarding(self) -> bool:
        """The open frame was refused: its bytes are dropped up to its end block, nothing is kept."""
        return self._discarding

    def abandon(self) -> bytes:
        """Refuse the frame being read: return its beginning (up to ``prefix_size`` bytes, enough to
        read MSH; empty when no frame is open or it was already refused), release what is held, and
        drop the rest of it up to its end block, as for an oversize frame."""
        prefix = b""
        if self._in_frame and not self._discarding:
            prefix = self._prefix()
            self._discarding = True
        self._drop()
        return prefix

    def reset(self) -> None:
        """Forget everything: no frame open, nothing held (what follows is read as between frames)."""
        self._drop()
        self._in_frame = self._discarding = False

    def _drop(self) -> None:
        self._pieces = []
        self._tail = bytearray()
        self._size = 0

    def _hold(self, piece: bytes) -> None:
        if len(piece) >= self._PIECE:
            if self._tail:
                self._pieces.append(bytes(self._tail))
                self._tail = bytearray()
            self._pieces.append(piece)
        else:
            self._tail += piece
            if len(self._tail) >= self._PIECE:
                self._pieces.append(bytes(self._tail))
                self._tail = bytearray()
        self._size += len(piece)

    def _prefix(self, last: bytes = b"") -> bytes:
        out = bytearray()
        pieces: list[bytes | bytearray] = [*self._pieces, self._tail, last]
        for piece in pieces:
            out += piece[: self.prefix_size - len(out)]
            if len(out) >= self.prefix_size:
                break
        return bytes(out)

    def _body(self, last: bytes) -> bytes:
        if not self._size:
            return last
        return b"".join((*self._pieces, self._tail, last))

    def feed(self, data: bytes) -> list[bytes | Oversize]:
        out: list[bytes | Oversize] = []
        data = bytes(data)
        pos, n = 0, len(data)
        while pos < n:
            if not self._in_frame:
                start = data.find(_SB, pos)
                stop = n if start < 0 else start
                self.junk_bytes += stop - pos - data.count(_CR, pos, stop) - data.count(_LF, pos, stop)
                if start < 0:
                    break
                pos = start + 1
                self._in_frame = True
                self._discarding = False
                continue
            end = data.find(_EB, pos)
            if self._discarding:
                # Past the limit or refused: drop bytes until the end block, keeping nothing.
                if end < 0:
                    break
                pos = end + 1
                self._in_frame = self._discarding = False
                continue
            body_end = end if end >= 0 else n
            restart = data.rfind(_SB, pos, body_end)
            if restart >= 0:
                self.junk_bytes += self._size + restart - pos
                self._drop()
                pos = restart + 1
                continue
            piece = data[pos:body_end]  # the whole of ``data`` when it continues a frame: no copy
            if end < 0:
                if self._size + len(piece) > self.max_size:
                    out.append(Oversize(self._prefix(piece), self.max_size))
                    self._drop()
                    self._discarding = True
                else:
                    self._hold(piece)
                break
            if self._size + len(piece) > self.max_size:
                out.append(Oversize(self._prefix(piece), self.max_size))
            else:
                out.append(self._body(piece))
            self._drop()
            pos = end + 1
            if pos < n and data[pos] == _CR:
                pos += 1
            self._in_frame = False
        return out
