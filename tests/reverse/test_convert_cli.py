"""``passerelle convert FILE… --to hl7v2``: the gateway's own step, offline."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from gateway.cli import main, split_messages
from gateway.hl7.er7 import Message
from tests.reverse import fhir_data as d

ROOT = Path(__file__).resolve().parents[2]
REVERSE = str(ROOT / "mappings" / "reverse")


def test_prints_the_messages_one_segment_a_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bundle.json").write_bytes(orjson.dumps(d.report_bundle()))
    (tmp_path / "patient.json").write_bytes(orjson.dumps(d.patient()))
    files = [str(tmp_path / "bundle.json"), str(tmp_path / "patient.json")]
    assert main(["convert", *files, "--to", "hl7v2", "--mappings", REVERSE]) == 0
    out = capsys.readouterr().out
    messages = [Message.decode(m) for m in split_messages(out.encode())]
    assert [f"{m.message_type}^{m.trigger}" for m in messages] == ["ORU^R01", "ADT^A28"]
    assert messages[0].get("OBX[2]-5[1]") == "Prélèvement hémolysé | à refaire"


def test_update_flag_and_charset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.json").write_bytes(orjson.dumps(d.patient("PROV")))
    args = ["convert", str(tmp_path / "p.json"), "--to", "hl7v2", "--mappings", REVERSE, "--update"]
    assert main([*args, "--charset", "8859/15"]) == 0
    captured = capsys.readouterr()
    msg = Message.parse(captured.out)
    assert msg.trigger == "A31" and msg.get("MSH-18") == "8859/15"
    assert "INS without identity status VALI" in captured.err


def test_unmappable_file_fails_and_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "o.json").write_bytes(orjson.dumps({"resourceType": "Organization", "name": "Cabinet"}))
    assert main(["convert", str(tmp_path / "o.json"), "--to", "hl7v2", "--mappings", REVERSE]) == 1
    assert "no reverse mapping for Organization" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "o.json"), "--to", "hl7v2", "--mappings", str(tmp_path)]) == 2
