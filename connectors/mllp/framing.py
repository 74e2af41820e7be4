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
    """

    __slots__ = ("_buf", "_discarding", "_in_frame", "_scanned", "junk_bytes", "max_size", "prefix_size")

    def __init__(self, max_size: int = 16 * 1024 * 1024, prefix_size: int = 4096) -> None:
        self.max_size = max_size
        self.prefix_size = prefix_size
        self._buf = bytearray()
        self._in_frame = False
        self._discarding = False
        self._scanned = 0  # bytes of the open frame already searched: large frames stay O(n)
        self.junk_bytes = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        return self._in_frame

    def feed(self, data: bytes) -> list[bytes | Oversize]:
        out: list[bytes | Oversize] = []
        buf = self._buf
        buf += data
        while buf:
            if not self._in_frame:
                start = buf.find(_SB)
                stray = buf if start < 0 else buf[:start]
                self.junk_bytes += len(stray) - stray.count(_CR) - stray.count(_LF)
                if start < 0:
                    buf.clear()
                    break
                del buf[: start + 1]
                self._in_frame = True
                self._discarding = False
                self._scanned = 0
                continue
            end = buf.find(_EB, 0 if self._discarding else self._scanned)
            if self._discarding:
                # Past the limit: drop bytes until the end block, keeping nothing.
                if end < 0:
                    buf.clear()
                    break
                del buf[: end + 1]
                self._in_frame = self._discarding = False
                continue
            body_end = end if end >= 0 else len(buf)
            restart = buf.rfind(_SB, self._scanned, body_end)
            if restart >= 0:
                self.junk_bytes += restart
                del buf[: restart + 1]
                self._scanned = 0
                continue
            if end < 0:
                self._scanned = len(buf)
                if len(buf) > self.max_size:
                    out.append(Oversize(bytes(buf[: self.prefix_size]), self.max_size))
                    buf.clear()
                    self._discarding = True
                    self._scanned = 0
                break
            if end > self.max_size:
                out.append(Oversize(bytes(buf[: self.prefix_size]), self.max_size))
            else:
                out.append(bytes(buf[:end]))
            cut = end + 1
            if cut < len(buf) and buf[cut] == _CR:
                cut += 1
            del buf[:cut]
            self._in_frame = False
        return out
