"""`passerelle tail`: filters and readable output over a JSON log stream."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from gateway.logtail import Filter, follow, parse_line, parse_since, render, tail_lines

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _line(event: str, level: str = "info", minutes_ago: int = 0, **kw: object) -> str:
    stamp = (NOW - timedelta(minutes=minutes_ago)).isoformat().replace("+00:00", "Z")
    return orjson.dumps({"event": event, "level": level, "timestamp": stamp, **kw}).decode()


LINES = [
    _line("gateway_started", minutes_ago=60),
    _line("message_received", channel="adt", message_id="M1", minutes_ago=30),
    _line("message_received", channel="lab", message_id="M2", minutes_ago=20),
    _line("delivery_failed", level="warning", channel="adt", message_id="M1", minutes_ago=10),
    _line("journal_unavailable", level="error", source="hospital", minutes_ago=1),
    "Traceback (most recent call last):",
]


def _events(flt: Filter) -> list[str]:
    return [line.split()[2] for line in _run(flt)]


def _run(flt: Filter) -> list[str]:
    out = StringIO()
    console = Console(file=out, width=200, no_color=True, highlight=False)
    tail_lines(iter(LINES), flt, console)
    return out.getvalue().splitlines()


def test_filters_by_channel_level_message_and_time() -> None:
    assert len(_run(Filter())) == 6  # a non-JSON line is shown, not dropped
    assert [line.split()[2] for line in _run(Filter(channel="adt"))] == [
        "message_received",
        "delivery_failed",
    ]
    assert [line.split()[2] for line in _run(Filter(level="warning"))] == [
        "delivery_failed",
        "journal_unavailable",
    ]
    assert len(_run(Filter(message_id="M1"))) == 2
    since = parse_since("15m", now=NOW)
    assert [line.split()[2] for line in _run(Filter(since=since))] == [
        "delivery_failed",
        "journal_unavailable",
    ]


def test_render_puts_ids_first_and_colours_by_level() -> None:
    text = render(orjson.loads(_line("delivery_failed", level="error", message_id="M9", channel="adt", z=1)))
    assert text.plain.split()[1:] == ["ERROR", "delivery_failed", "channel=adt", "message_id=M9", "z=1"]
    assert any("red" in str(span.style) for span in text.spans)


def test_since_accepts_durations_and_iso_times() -> None:
    assert parse_since("2h", now=NOW) == NOW - timedelta(hours=2)
    assert parse_since("2026-11-23T10:00:00", now=NOW) == datetime(2026, 11, 23, 10, tzinfo=UTC)
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday")


_ENTRIES = st.builds(
    lambda level, event, extra: orjson.dumps({"level": level, "event": event, **extra}).decode(),
    st.sampled_from(["debug", "info", "warning", "error", "critical", "other"]),
    st.from_regex(r"[a-z][a-z_]{0,20}", fullmatch=True),
    st.dictionaries(st.sampled_from(["channel", "message_id", "z"]), st.text(max_size=10), max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), _ENTRIES))
def test_any_line_is_handled_and_shown_only_when_it_passes_the_filter(line: str) -> None:
    out = StringIO()
    flt = Filter(level="info")
    shown = tail_lines(iter([line]), flt, Console(file=out, no_color=True, width=10_000))
    entry = parse_line(line) if line.strip() else None
    expected = entry is not None and flt.accepts(entry)
    assert shown == int(expected)
    assert bool(out.getvalue().strip()) == expected
    if expected and entry is not None and str(entry.get("event", "")).isidentifier():
        assert str(entry["event"]) in out.getvalue()


def test_follow_stops_at_the_end_without_follow(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    with path.open() as stream:
        assert list(follow(stream, keep_following=False)) == LINES


def test_the_command_reads_a_file_and_stdin(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    cmd = [sys.executable, "-m", "gateway.cli", "tail"]
    run = subprocess.run(
        [*cmd, str(path), "--no-follow", "--channel", "lab", "--color", "never"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and "message_id=M2" in run.stdout and "M1" not in run.stdout
    run = subprocess.run(
        [*cmd, "--level", "error", "--color", "always"],
        input="\n".join(LINES),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and "journal_unavailable" in run.stdout and "\x1b[" in run.stdout
    assert "message_received" not in run.stdout
    bad = subprocess.run([*cmd, "--since", "soon"], capture_output=True, text=True, timeout=60, input="")
    assert bad.returncode == 2


def test_the_suite_wide_phi_scan_catches_patient_data_in_log_lines() -> None:
    from tests.phi_scan import find_phi

    hits = find_phi(
        [
            '{"event": "message_received", "family": "LEF\\u00c8VRE"}',  # JSON-escaped
            "2026-11-23 10:00:00 [info     ] mllp_frame pid=2840775123456",  # console renderer
            '{"event": "ok", "message_id": "M1"}',
            "a Bundle printed by a CLI with Lefèvre is not a log line",
        ]
    )
    assert [term.upper() for term, _ in hits] == ["LEFÈVRE", "2840775123456"]
    assert find_phi(["Besançon"], every_line=True) == [("Besançon", "Besançon")]
    # a line's own time is not patient data, even when its microseconds spell an identifier
    stamped = '{"event": "message_received", "timestamp": "2026-11-24T01:31:10.552233Z"}'
    assert find_phi([stamped, "2026-11-24 01:31:10.552233 [info     ] message_received"]) == []
    assert find_phi(['{"event": "x", "latency_s": 0.552233, "n": 15522334}']) == []
    assert find_phi(['{"event": "x", "ipp": "552233"}']) == [("552233", '{"event": "x", "ipp": "552233"}')]
