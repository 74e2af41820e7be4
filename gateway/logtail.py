"""``passerelle tail``: follow the gateway's JSON log lines, filtered, in readable colour.

Reads a file (following it as it grows, like ``tail -f``) or stdin. Lines that are not
JSON objects are shown dimmed rather than dropped: a crash trace must stay visible.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import orjson
from rich.console import Console
from rich.text import Text

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_STYLES = {
    "debug": "dim",
    "info": "green",
    "warning": "yellow",
    "error": "bold red",
    "critical": "bold white on red",
}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
# Shown first, in this order, after the event name; the rest follow sorted.
_FIRST = ("channel", "source", "message_id", "control_id", "status", "peer")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """ "15m", "2h", "1d", "30s" back from now, or an ISO date/time (UTC when no zone is given)."""
    now = now or datetime.now(UTC)
    match = _DURATION.match(text.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"--since: expected 30s/15m/2h/1d or an ISO time, got {text!r}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Filter:
    channel: str | None = None
    level: str | None = None
    message_id: str | None = None
    since: datetime | None = None

    def accepts(self, entry: Mapping[str, Any]) -> bool:
        if self.channel is not None and entry.get("channel") != self.channel:
            return False
        if self.message_id is not None and self.message_id not in (
            entry.get("message_id"),
            entry.get("id"),
            entry.get("trace_id"),
        ):
            return False
        level = LEVELS.get(str(entry.get("level", "info")).lower(), 20)
        if self.level is not None and level < LEVELS[self.level]:
            return False
        if self.since is not None:
            stamp = entry.get("timestamp")
            if not isinstance(stamp, str):
                return False
            try:
                moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            except ValueError:
                return False
            if (moment if moment.tzinfo else moment.replace(tzinfo=UTC)) < self.since:
                return False
        return True


def render(entry: Mapping[str, Any]) -> Text:
    level = str(entry.get("level", "info")).lower()
    stamp = str(entry.get("timestamp", ""))
    short = stamp[11:23] if len(stamp) >= 23 else stamp
    text = Text()
    text.append(short + " ", style="dim")
    text.append(f"{level.upper():<8}", style=_STYLES.get(level, ""))
    text.append(str(entry.get("event", "")), style="bold")
    rest = {k: v for k, v in entry.items() if k not in ("timestamp", "level", "event")}
    for key in (*[k for k in _FIRST if k in rest], *sorted(k for k in rest if k not in _FIRST)):
        value = rest[key]
        shown = value if isinstance(value, str) else orjson.dumps(value).decode()
        text.append(f" {key}=", style="cyan")
        text.append(shown)
    return text


def parse_line(line: str) -> dict[str, Any] | None:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def follow(stream: TextIO, *, keep_following: bool, poll_s: float = 0.2) -> Iterator[str]:
    """Lines as they come; at EOF, wait for more when following a file."""
    while True:
        line = stream.readline()
        if line:
            yield line.rstrip("\n")
            continue
        if not keep_following:
            return
        time.sleep(poll_s)


def tail_lines(lines: Iterable[str], flt: Filter, console: Console) -> int:
    shown = 0
    for line in lines:
        if not line.strip():
            continue
        entry = parse_line(line)
        if entry is None:
            if flt == Filter():
                console.print(Text(line, style="dim"))
                shown += 1
            continue
        if flt.accepts(entry):
            console.print(render(entry), soft_wrap=True)
            shown += 1
    return shown


def run_tail(args: argparse.Namespace) -> int:
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(f"passerelle tail: {exc}", file=sys.stderr)
        return 2
    flt = Filter(channel=args.channel, level=args.level, message_id=args.message_id, since=since)
    force = {"always": True, "never": False}.get(args.color)
    console = Console(force_terminal=force, no_color=args.color == "never", highlight=False)
    try:
        if args.file == "-":
            tail_lines(follow(sys.stdin, keep_following=False), flt, console)
            return 0
        path = Path(args.file)
        if not path.is_file():
            print(f"passerelle tail: no such file: {path}", file=sys.stderr)
            return 2
        with path.open("r", encoding="utf-8", errors="replace") as stream:
            tail_lines(follow(stream, keep_following=not args.no_follow), flt, console)
    except KeyboardInterrupt:
        pass
    return 0
