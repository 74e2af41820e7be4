"""Mapping coverage over a set of HL7v2 messages: how much of each message type reaches FHIR.

``passerelle coverage FILE…|DIR`` maps every message with the channel's own mapping step (the
caller hands in its ``convert``) and counts, per message type (MSH-9.1^MSH-9.2):

- the messages, mapped or refused (by HL7 table 0357 code and error class);
- the non-empty content leaves of the mapped messages, and how many reached the Bundle: every
  leaf less those in the unmapped report. Leaves are enumerated here by the mapping engine's own
  rules (:func:`gateway.mapping.engine.unmapped_leaves`): a repetition, component or subcomponent
  whose raw text is not blank, HL7's explicit null ``""`` included (the engine carries it as a
  removal, or reports it); MSH-1, MSH-2 and the header fields the gateway reads itself
  (``HEADER_FIELDS``) are not content;
- the unmapped paths, without occurrence or repetition numbers so that they add up across
  messages (``OBX[3]-5[1].2`` counts as ``OBX-5.2``), ranked by how many messages carry data
  there.

The renderings (text, JSON, HTML) hold only message types, paths, counts and percentages: never
a leaf's value, a file name or an error's text, so a report can be shared without patient data.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gateway.core.errors import MessageError
from gateway.hl7.er7 import Message, split_messages
from gateway.mapping.engine import HEADER_FIELDS, MappingResult

__all__ = [
    "UNPARSED",
    "Convert",
    "Coverage",
    "MessageCoverage",
    "TypeCoverage",
    "count_leaves",
    "general_path",
    "leaf_paths",
    "measure",
    "measure_files",
    "measure_raw",
    "message_files",
]

Convert = Callable[[Message], MappingResult]  # the mapping step's convert: a result, or a MessageError
Refusal = tuple[str, str]  # HL7 table 0357 code, error class ("200", "UnsupportedMessage")

UNPARSED: Final = "(unparsed)"  # the type of a message that could not be read: its MSH-9 is not known
ALL: Final = "all types"
DEFAULT_TOP: Final = 20
# What makes a file of a directory an HL7v2 file: its first segment (a BOM and blank lines aside).
_HEADERS: Final = (b"MSH", b"FHS", b"BHS")
_BOM: Final = b"\xef\xbb\xbf"
_INDEX = re.compile(r"\[\d+\]")


# -- leaves ----------------------------------------------------------------------------------------


def leaf_paths(message: Message) -> list[str]:
    """Every non-empty content leaf of ``message`` by its full path, in message order.

    The engine's rules (``unmapped_leaves`` with nothing mapped gives the same list): a piece
    of a field split on repetitions, components and subcomponents is a leaf when its raw text is
    not blank; the path shows ``[repetition]`` always, ``.component`` when the repetition has
    several, ``.component.subcomponent`` when the component has several. MSH-1, MSH-2 and the
    header fields the gateway reads itself are left out.
    """
    seps = message.separators
    rep_sep, comp_sep, sub_sep = seps.repetition, seps.component, seps.subcomponent
    out: list[str] = []
    occurrences: dict[str, int] = {}
    for segment in message.segments:
        name = segment.name
        occ = occurrences[name] = occurrences.get(name, 0) + 1
        label = f"{name}[{occ}]-" if occ > 1 else f"{name}-"
        header = name == "MSH"
        for number, raw in enumerate(segment.fields(), 1):
            if not raw or (header and (number <= 2 or number in HEADER_FIELDS)):
                continue
            for r, rep in enumerate(raw.split(rep_sep), 1):
                components = rep.split(comp_sep)
                several = len(components) > 1
                for c, component in enumerate(components, 1):
                    subs = component.split(sub_sep)
                    if len(subs) == 1:
                        if component.strip():
                            out.append(f"{label}{number}[{r}].{c}" if several else f"{label}{number}[{r}]")
                        continue
                    out.extend(
                        f"{label}{number}[{r}].{c}.{s}" for s, sub in enumerate(subs, 1) if sub.strip()
                    )
    return out


def count_leaves(message: Message) -> int:
    """How many non-empty content leaves ``message`` holds (see ``leaf_paths``)."""
    return len(leaf_paths(message))


def general_path(path: str) -> str:
    """A leaf's path without occurrence and repetition numbers: ``OBX[3]-5[1].2`` → ``OBX-5.2``."""
    return _INDEX.sub("", path)


# -- one message -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageCoverage:
    """What one message gave: its type, its content leaves and those the Bundle left out."""

    event: str  # MSH-9.1^MSH-9.2, or UNPARSED
    leaves: int = 0  # non-empty content leaves (0 for a refused message: nothing was counted)
    unmapped: tuple[str, ...] = ()  # full paths of the leaves no rule put into the Bundle
    refused: Refusal | None = None

    @property
    def reached(self) -> int:
        return self.leaves - len(self.unmapped)


def event_of(message: Message) -> str:
    return f"{message.message_type}^{message.trigger}"


def _refusal(exc: MessageError) -> Refusal:
    return (exc.hl7_error_code, type(exc).__name__)


def measure(message: Message, convert: Convert) -> MessageCoverage:
    """Map ``message`` and count what reached the Bundle; a refusal is recorded, not raised."""
    event = event_of(message)
    try:
        result = convert(message)
    except MessageError as exc:
        return MessageCoverage(event, refused=_refusal(exc))
    leaves = leaf_paths(message)
    known = set(leaves)
    # Only leaves counted here are subtracted, so reached is never negative; the engine's report
    # holds no other path (the tests check it on generated messages and on the corpus).
    unmapped = tuple(p for p in dict.fromkeys(result.unmapped) if p in known)
    return MessageCoverage(event, len(leaves), unmapped)


def measure_raw(raw: bytes, convert: Convert, *, default_charset: str) -> MessageCoverage:
    """``measure`` for one message's bytes; one that cannot be read is refused as UNPARSED."""
    try:
        message = Message.decode(raw, default_charset=default_charset)
    except MessageError as exc:
        return MessageCoverage(UNPARSED, refused=_refusal(exc))
    return measure(message, convert)


# -- aggregation -----------------------------------------------------------------------------------


@dataclass(slots=True)
class TypeCoverage:
    """The figures of one message type (or of all of them)."""

    event: str
    messages: int = 0
    mapped: int = 0
    refusals: Counter[Refusal] = field(default_factory=Counter)
    leaves: int = 0  # over the mapped messages
    reached: int = 0
    path_messages: Counter[str] = field(default_factory=Counter)  # general path → messages with data there
    path_leaves: Counter[str] = field(default_factory=Counter)  # general path → unmapped leaves

    @property
    def refused(self) -> int:
        return self.messages - self.mapped

    @property
    def unmapped(self) -> int:
        return self.leaves - self.reached

    @property
    def share(self) -> float | None:
        """Percentage of the content leaves that reached FHIR; None when there were none."""
        return 100.0 * self.reached / self.leaves if self.leaves else None

    def add(self, one: MessageCoverage) -> None:
        self.messages += 1
        if one.refused is not None:
            self.refusals[one.refused] += 1
            return
        self.mapped += 1
        self.leaves += one.leaves
        self.reached += one.reached
        general = [general_path(p) for p in one.unmapped]
        self.path_leaves.update(general)
        self.path_messages.update(set(general))

    def merge(self, other: TypeCoverage) -> None:
        self.messages += other.messages
        self.mapped += other.mapped
        self.refusals.update(other.refusals)
        self.leaves += other.leaves
        self.reached += other.reached
        self.path_messages.update(other.path_messages)
        self.path_leaves.update(other.path_leaves)

    def top(self, n: int) -> list[tuple[str, int, int]]:
        """(general path, messages with unmapped data there, unmapped leaves), most messages first."""
        ranked = sorted(
            self.path_messages.items(), key=lambda kv: (-kv[1], -self.path_leaves[kv[0]], _natural(kv[0]))
        )
        return [(path, count, self.path_leaves[path]) for path, count in ranked[: max(n, 0)]]

    def as_json(self, top: int) -> dict[str, Any]:
        share = self.share
        return {
            "type": self.event,
            "messages": self.messages,
            "mapped": self.mapped,
            "refused": self.refused,
            "refusals": [
                {"code": code, "error": kind, "messages": count}
                for (code, kind), count in sorted(self.refusals.items())
            ],
            "leaves": self.leaves,
            "reached": self.reached,
            "unmapped": self.unmapped,
            "share": round(share, 2) if share is not None else None,
            "unmapped_paths": len(self.path_messages),
            "top_unmapped": [
                {"path": path, "messages": count, "leaves": leaves} for path, count, leaves in self.top(top)
            ],
        }


def _type_order(event: str) -> tuple[bool, str]:
    return (event == UNPARSED, event)


@dataclass(slots=True)
class Coverage:
    """The figures of a set of messages, per message type."""

    files: int = 0
    types: dict[str, TypeCoverage] = field(default_factory=dict)

    def add(self, one: MessageCoverage) -> None:
        kind = self.types.get(one.event)
        if kind is None:
            kind = self.types[one.event] = TypeCoverage(one.event)
        kind.add(one)

    def ordered(self) -> list[TypeCoverage]:
        return [self.types[k] for k in sorted(self.types, key=_type_order)]

    def total(self) -> TypeCoverage:
        out = TypeCoverage(ALL)
        for kind in self.types.values():
            out.merge(kind)
        return out

    # -- renderings ---------------------------------------------------------------------------

    def as_json(self, top: int = DEFAULT_TOP) -> dict[str, Any]:
        return {
            "files": self.files,
            "top": top,
            "total": self.total().as_json(top),
            "types": [kind.as_json(top) for kind in self.ordered()],
        }

    def text(self, top: int = DEFAULT_TOP) -> str:
        total = self.total()
        lines = [
            f"Mapping coverage: {total.messages} messages in {self.files} files; "
            f"{total.mapped} mapped, {total.refused} refused.",
            "Share: the non-empty content leaves of the mapped messages that reached FHIR "
            "(all leaves less the unmapped report).",
            "",
        ]
        rows = [_row(kind) for kind in self.ordered()]
        lines += _table(_HEADINGS, [*rows, _row(total)], rule_before_last=bool(rows))
        if total.refusals:
            lines += ["", "Refusals (HL7 table 0357 code, error):"]
            lines += [f"  {code} {kind}: {count}" for (code, kind), count in sorted(total.refusals.items())]
        lines += [
            "",
            f"Unmapped paths, top {top} per type, ranked by the mapped messages that carry data there:",
        ]
        for kind in [total, *self.ordered()]:
            ranked = kind.top(top)
            if not ranked:
                continue
            lines += ["", f"{kind.event}: {kind.mapped} mapped, {len(kind.path_messages)} unmapped paths"]
            rows = [[path, f"{count}/{kind.mapped}", str(leaves)] for path, count, leaves in ranked]
            lines += ["  " + line for line in _table(("Path", "Messages", "Leaves"), rows)]
        return "\n".join(lines) + "\n"

    def charts(self) -> str:
        """The summary as SVG: the share of content reaching FHIR, and messages mapped or refused,
        per type (inline in the HTML report; the same library as the console's plots)."""
        from gateway.core.charts import FAIL, PASS, bar_chart, side_by_side

        kinds = self.ordered()
        labels = [k.event for k in kinds]
        height = max(240, 60 + 22 * len(kinds))
        share = bar_chart(
            "Content reaching FHIR (%)",
            labels,
            {"share of the leaves": [None if k.share is None else round(k.share, 1) for k in kinds]},
            horizontal=True,
            width=520,
            height=height,
            value_range=(0, 100),
        )
        outcome = bar_chart(
            "Messages",
            labels,
            {"mapped": [k.mapped for k in kinds], "refused": [k.refused for k in kinds]},
            horizontal=True,
            stacked=True,
            width=520,
            height=height,
            colors=(PASS, FAIL),
        )
        return side_by_side([share, outcome])

    def html(self, top: int = DEFAULT_TOP) -> str:
        """One self-contained page: no script, no external resource, every value escaped."""
        total = self.total()
        esc = html.escape
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta http-equiv="Content-Security-Policy" '
            "content=\"default-src 'none'; style-src 'unsafe-inline'\">",
            "<title>Passerelle mapping coverage</title>",
            f"<style>{_CSS}</style></head><body>",
            "<h1>Mapping coverage</h1>",
            f"<p>{total.messages} messages in {self.files} files; {total.mapped} mapped, "
            f"{total.refused} refused. Share: the non-empty content leaves of the mapped messages "
            "that reached FHIR (all leaves less the unmapped report).</p>",
            "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in _HEADINGS) + "</tr></thead><tbody>",
        ]
        for kind in self.ordered():
            parts.append(_html_row(kind, "td"))
        parts.append("</tbody><tfoot>" + _html_row(total, "th") + "</tfoot></table>")
        parts.append(f'<div class="charts">{self.charts()}</div>')
        if total.refusals:
            parts.append("<h2>Refusals</h2><table><thead><tr><th>Code (HL7 0357)</th><th>Error</th>")
            parts.append("<th>Messages</th></tr></thead><tbody>")
            parts += [
                f'<tr><td>{esc(code)}</td><td>{esc(kind)}</td><td class="n">{count}</td></tr>'
                for (code, kind), count in sorted(total.refusals.items())
            ]
            parts.append("</tbody></table>")
        parts.append(
            f"<h2>Unmapped paths, top {top} per type</h2><p>Ranked by the mapped messages that carry "
            "data there; paths without occurrence or repetition numbers.</p>"
        )
        for kind in [total, *self.ordered()]:
            ranked = kind.top(top)
            if not ranked:
                continue
            parts.append(
                f"<h3>{esc(kind.event)}</h3><p>{kind.mapped} mapped messages, "
                f"{len(kind.path_messages)} unmapped paths.</p>"
            )
            parts.append(
                "<table><thead><tr><th>Path</th><th>Messages with data there</th><th>%</th>"
                "<th>Unmapped leaves</th></tr></thead><tbody>"
            )
            parts += [
                f'<tr><td>{esc(path)}</td><td class="n">{count}</td>'
                f'<td class="n">{esc(_percent(100.0 * count / kind.mapped))}</td>'
                f'<td class="n">{leaves}</td></tr>'
                for path, count, leaves in ranked
            ]
            parts.append("</tbody></table>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"


_HEADINGS: Final = ("Type", "Messages", "Mapped", "Refused", "Leaves", "Reached", "Share")
_CSS: Final = (
    "body{font-family:sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #bbb;padding:.25em .6em;text-align:left}"
    "td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}"
    "thead th{background:#eee}tfoot th{background:#f6f6f6}"
)


def _natural(path: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key: numbers by value (``PID-5.2`` before ``PID-5.10``)."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.findall(r"\d+|\D+", path))


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _refused_cell(kind: TypeCoverage) -> str:
    if not kind.refused:
        return "0"
    codes: Counter[str] = Counter()
    for (code, _), count in kind.refusals.items():
        codes[code] += count
    return f"{kind.refused} (" + ", ".join(f"{code}×{n}" for code, n in sorted(codes.items())) + ")"


def _row(kind: TypeCoverage) -> list[str]:
    return [
        kind.event,
        str(kind.messages),
        str(kind.mapped),
        _refused_cell(kind),
        str(kind.leaves),
        str(kind.reached),
        _percent(kind.share),
    ]


def _html_row(kind: TypeCoverage, cell: str) -> str:
    values = _row(kind)
    first = f"<{cell}>{html.escape(values[0])}</{cell}>"
    rest = "".join(f'<{cell} class="n">{html.escape(v)}</{cell}>' for v in values[1:])
    return f"<tr>{first}{rest}</tr>"


def _table(
    headings: Sequence[str], rows: Sequence[Sequence[str]], *, rule_before_last: bool = False
) -> list[str]:
    """Plain-text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [headings, *rows]) for i in range(len(headings))]

    def line(values: Sequence[str]) -> str:
        cells = [values[0].ljust(widths[0])] + [
            v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    out = [line(headings), "  ".join("-" * w for w in widths)]
    for i, row in enumerate(rows):
        if rule_before_last and i == len(rows) - 1:
            out.append("  ".join("-" * w for w in widths))
        out.append(line(row))
    return out


# -- files -----------------------------------------------------------------------------------------


def _looks_like_hl7(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    head = head.removeprefix(_BOM).lstrip(b" \t\r\n")
    return head.startswith(_HEADERS)


def message_files(targets: Iterable[str | Path]) -> list[Path]:
    """The files to read: each file named, and in each directory named (recursively) the files whose
    first segment is MSH (or a batch header), in name order."""
    return named_files(targets, _looks_like_hl7)


def named_files(targets: Iterable[str | Path], wanted: Callable[[Path], bool]) -> list[Path]:
    """Each file named, and in each directory named (recursively) the files ``wanted`` takes, in
    name order. Raises FileNotFoundError for a name that is neither a file nor a directory."""
    out: list[Path] = []
    for target in targets:
        path = Path(target)
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += sorted(
                (p for p in path.rglob("*") if p.is_file() and wanted(p)),
                key=lambda p: p.relative_to(path).as_posix(),
            )
        else:
            raise FileNotFoundError(str(target))
    return out


def measure_files(files: Iterable[Path], convert: Convert, *, default_charset: str) -> Coverage:
    """Every message of every file (a file may hold several), mapped and counted."""
    coverage = Coverage()
    for path in files:
        coverage.files += 1
        for raw in split_messages(path.read_bytes()):
            coverage.add(measure_raw(raw, convert, default_charset=default_charset))
    return coverage
