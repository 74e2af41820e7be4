"""`passerelle convert` takes directories, read recursively, as `coverage` does."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from tests.messages import adt


def test_convert_reads_a_directory_recursively(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    feed = tmp_path / "feed"
    (feed / "day2").mkdir(parents=True)
    (feed / "one.hl7").write_bytes(adt("DIR1"))
    (feed / "day2" / "two.hl7").write_bytes(adt("DIR2") + adt("DIR3"))
    (feed / "notes.txt").write_text("not a message", "utf-8")
    assert main(["convert", str(feed), "--missing-namespace", "sender"]) == 0
    out = capsys.readouterr().out
    assert out.count('"file": ') == 3 and "notes.txt" not in out
    assert f'"file": "{feed / "day2" / "two.hl7"}"' in out and '"message": 2' in out
    assert main(["convert", str(tmp_path / "nowhere")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
