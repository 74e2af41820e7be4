"""FHIR search parameters as the specification defines them, before any database: the ones served,
the result options, escaping, dates and the interval their precision covers, conditional criteria."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import parse_qsl

from gateway.core.errors import BadRequest

MAX_COUNT = 500
DEFAULT_COUNT = 50
MAX_OFFSET = 10**9
REFERENCE_PARAMS = ("patient", "subject", "encounter")
CHAINED_PARAMS = ("patient.identifier", "subject.identifier")
SEARCH_PARAMS = ("_id", "identifier", *REFERENCE_PARAMS, *CHAINED_PARAMS, "_lastUpdated")
RESULT_PARAMS = ("_count", "_offset", "_include", "_sort")

_DATE_RE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
    r"(Z|[+\- ]\d{2}:\d{2})?)?)?)?"
)
_PREFIXES = ("eq", "ge", "gt", "le", "lt")
_ESCAPED = re.compile(r"\\(.)", re.S)
_DIGITS = re.compile(r"[0-9]{1,10}")


def split_value(text: str, sep: str) -> list[str]:
    """Split on ``sep`` unless it is escaped with a backslash (FHIR search escaping)."""
    if "\\" not in text:
        return text.split(sep)  # nothing escaped: the common case, without the loop below
    return _split_escaped(text, sep)


def _split_escaped(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def unescape(text: str) -> str:
    if "\\" not in text:
        return text
    return _ESCAPED.sub(lambda m: m.group(1), text)


def instant(moment: datetime) -> str:
    """The one text form of an instant: fixed width, so text order is time order."""
    utc = moment.astimezone(UTC)
    if utc.year < 1000:
        return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # %Y is not padded there, as it never was
    return utc.isoformat(timespec="microseconds")[:-6] + "Z"  # the same text, for less: "+00:00" → "Z"


def date_range(text: str, name: str) -> tuple[str, str | None]:
    """A FHIR date/dateTime → [low, high) as instants; high None means "after every date"."""
    match = _DATE_RE.fullmatch(text)
    if match is None:
        raise BadRequest(f"{name}: not a date or dateTime", location=name)
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        tz = UTC
        if zone and zone != "Z":
            # A '+' left unencoded in a query string arrives as a space.
            sign = -1 if zone[0] == "-" else 1
            tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
        micro = int((fraction or "0")[:6].ljust(6, "0"))
        low = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            micro,
            tzinfo=tz,
        )
        low_text = instant(low)
    except (ValueError, OverflowError) as exc:
        raise BadRequest(f"{name}: not a valid date", location=name) from exc
    # The value stands for the whole interval its precision covers (FHIR date search semantics).
    try:
        if month is None:
            high = low.replace(year=low.year + 1)
        elif day is None:
            high = low.replace(year=low.year + low.month // 12, month=low.month % 12 + 1)
        elif hour is None:
            high = low + timedelta(days=1)
        elif second is None:
            high = low + timedelta(minutes=1)
        elif fraction is None:
            high = low + timedelta(seconds=1)
        else:
            high = low + timedelta(microseconds=10 ** max(0, 6 - len(fraction)))
        high_text: str | None = instant(high)
    except (ValueError, OverflowError):
        high_text = None  # past the end of year 9999
    return low_text, high_text


def date_prefix(token: str, name: str) -> tuple[str, str]:
    """A date search value → (its comparison prefix, "eq" when it has none; the date itself)."""
    if not token[:2].isalpha():
        return "eq", token
    prefix = token[:2]
    if prefix not in _PREFIXES:
        raise BadRequest(f"{name}: unsupported prefix {prefix!r} (eq ge gt le lt)", location=name)
    return prefix, token[2:]


def bounded_int(name: str, value: str, high: int) -> int:
    if not _DIGITS.fullmatch(value):
        raise BadRequest(f"{name} must be a non-negative integer", location=name)
    return min(int(value), high)


def query_params(query: str) -> list[tuple[str, str]]:
    """``parse_qsl(query, keep_blank_values=True)``, without its cost when nothing is encoded."""
    if "%" in query or "+" in query:
        return parse_qsl(query, keep_blank_values=True)
    return [(name, value) for name, _, value in (p.partition("=") for p in query.split("&") if p)]


def criteria(query: str) -> list[tuple[str, str]]:
    """A conditional URL's query part ("Type?criteria" or the bare criteria) → its parameters."""
    params = query_params(query.partition("?")[2] if "?" in query else query)
    if not [p for p in params if p[0] not in RESULT_PARAMS and p[1]]:
        raise BadRequest("a conditional operation needs search criteria", location="query")
    return params
