"""The gateway's ACK to each ANS reference message matches the ACK the ANS publishes with it, in the
fields the specification fixes: MSH-3 to MSH-6 (the sender's, swapped), MSH-9 (ACK^<trigger>^ACK),
MSH-11, MSH-12 (the message's version), MSH-17, MSA-1 and MSA-2. MSH-18 follows the message (one
ANS ACK says 8859/15 for a UTF-8 message: the ACK travels in the message's own charset)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.errors import AckCode, MessageError
from gateway.hl7.ack import build_ack
from gateway.hl7.er7 import Message

ANS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "ans"
FIXED = ("MSH-3", "MSH-4", "MSH-5", "MSH-6", "MSH-9", "MSH-11", "MSH-12", "MSH-17", "MSA-1", "MSA-2")


def _readable(path: Path) -> Message | None:
    try:
        return Message.decode(path.read_bytes())
    except MessageError:
        return None


def _pairs() -> list[tuple[Path, Path]]:
    out = []
    for ack in sorted(ANS.glob("*_ack*")) if ANS.is_dir() else []:
        prefix = ack.name.split("_ack")[0]
        # a message with a corrupted MSH-2 gets AR at MSH-2 instead (tests/mapping/test_corpus.py)
        out += [(m, ack) for m in sorted(ANS.glob(prefix + "_message*")) if _readable(m) is not None]
    return out


@pytest.mark.skipif(not ANS.is_dir(), reason=f"the ANS reference messages are not at {ANS}")
@pytest.mark.parametrize(("message", "expected"), _pairs(), ids=lambda p: p.name[:60])
def test_the_ack_is_the_one_the_ans_publishes(message: Path, expected: Path) -> None:
    sent = _readable(message)
    assert sent is not None
    ours = Message.decode(build_ack(sent, AckCode.AA))
    theirs = Message.decode(expected.read_bytes())
    assert {k: ours.get(k) for k in FIXED} == {k: theirs.get(k) for k in FIXED}
    assert ours.get("MSH-18") == sent.get("MSH-18")
