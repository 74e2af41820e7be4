"""Tier (a): MLLP framing fed straight in, no socket."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from connectors.mllp.framing import FrameDecoder, Oversize, frame

MSG = b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\rPID|||1\r"


def test_one_frame_in_one_chunk() -> None:
    assert FrameDecoder().feed(frame(MSG)) == [MSG]


def test_many_frames_in_one_chunk_come_out_in_order() -> None:
    msgs = [MSG.replace(b"|1|P", f"|{i}|P".encode()) for i in range(5)]
    assert FrameDecoder().feed(b"".join(frame(m) for m in msgs)) == msgs


def test_frame_split_byte_by_byte() -> None:
    dec = FrameDecoder()
    out: list[bytes | Oversize] = []
    for b in frame(MSG) + frame(MSG):
        out += dec.feed(bytes([b]))
    assert out == [MSG, MSG]
    assert dec.junk_bytes == 0


def test_bytes_outside_frames_are_counted_and_dropped() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"garbage" + frame(MSG) + b"\r\n") == [MSG]
    assert dec.junk_bytes == len(b"garbage")


def test_end_block_without_carriage_return_still_ends_the_frame() -> None:
    assert FrameDecoder().feed(b"\x0b" + MSG + b"\x1c" + frame(MSG)) == [MSG, MSG]


def test_start_block_inside_a_frame_restarts_it() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"\x0bhalf a mess" + frame(MSG)) == [MSG]
    assert dec.junk_bytes == len(b"half a mess")


def test_oversize_frame_yields_its_prefix_then_decoding_resumes() -> None:
    dec = FrameDecoder(max_size=100, prefix_size=20)
    big = MSG + b"X" * 500
    out = dec.feed(frame(big) + frame(MSG[:90]))
    assert out[0] == Oversize(big[:20], 100)
    assert out[1] == MSG[:90]


def test_oversize_detected_before_the_end_block_arrives() -> None:
    dec = FrameDecoder(max_size=100, prefix_size=10)
    out = dec.feed(b"\x0b" + b"Y" * 150)
    assert out == [Oversize(b"Y" * 10, 100)]
    assert dec.feed(b"Z" * 1000) == []  # still discarding
    assert dec.feed(b"\x1c\x0d" + frame(b"ok")) == [b"ok"]


def test_large_frame_in_small_chunks_is_linear() -> None:
    dec = FrameDecoder(max_size=8 * 1024 * 1024)
    payload = b"A" * (4 * 1024 * 1024)
    data = frame(payload)
    out: list[bytes | Oversize] = []
    for i in range(0, len(data), 4096):
        out += dec.feed(data[i : i + 4096])
    assert out == [payload]


@given(
    messages=st.lists(
        st.binary(min_size=1, max_size=300).map(lambda b: b.translate(None, b"\x0b\x1c")).filter(bool),
        min_size=1,
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=64), max_size=40),
)
def test_any_chunking_gives_the_same_frames(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(m) for m in messages)
    dec = FrameDecoder()
    out: list[bytes | Oversize] = []
    pos = 0
    for cut in cuts:
        out += dec.feed(stream[pos : pos + cut])
        pos += cut
    out += dec.feed(stream[pos:])
    assert out == messages


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash_and_never_overflow(data: bytes) -> None:
    dec = FrameDecoder(max_size=256, prefix_size=16)
    for item in dec.feed(data):
        assert isinstance(item, (bytes, Oversize))
        if isinstance(item, bytes):
            assert len(item) <= 256
    assert dec.buffered <= 256 + len(data)


def test_abandon_returns_the_beginning_releases_the_rest_and_drops_the_frame_to_its_end() -> None:
    dec = FrameDecoder(max_size=1000, prefix_size=10)
    assert dec.feed(b"\x0b" + b"A" * 500) == []
    assert dec.buffered == 500
    assert dec.abandon() == b"A" * 10
    assert dec.buffered == 0 and dec.discarding and dec.in_frame
    assert dec.abandon() == b""  # already refused
    assert dec.feed(b"B" * 5000) == []
    assert dec.buffered == 0  # the rest of it is never held
    assert dec.feed(b"\x1c\x0d" + frame(MSG)) == [MSG]
    assert not dec.discarding


def test_reset_forgets_the_open_frame() -> None:
    dec = FrameDecoder()
    dec.feed(b"\x0bhalf")
    dec.reset()
    assert dec.buffered == 0 and not dec.in_frame
    assert dec.feed(b"rest\x1c\x0d" + frame(MSG)) == [MSG]


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=300), max_size=40),
)
def test_any_chunking_gives_the_same_frames_and_refusals(sizes: list[int], cuts: list[int]) -> None:
    messages = [bytes([65 + i % 26]) * n for i, n in enumerate(sizes)]
    stream = b"".join(frame(m) for m in messages)
    whole = FrameDecoder(max_size=256, prefix_size=16).feed(stream)
    assert whole == [m if len(m) <= 256 else Oversize(m[:16], 256) for m in messages]
    dec = FrameDecoder(max_size=256, prefix_size=16)
    out: list[bytes | Oversize] = []
    pos = 0
    for cut in cuts:
        out += dec.feed(stream[pos : pos + cut])
        assert dec.buffered <= 256 + cut  # an oversize frame is never held past one read
        pos += cut
    out += dec.feed(stream[pos:])
    assert out == whole
