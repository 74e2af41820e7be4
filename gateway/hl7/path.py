"""The one location grammar of ER7: ``SEG[occ]-FIELD[rep].COMP.SUB``, and relative ``.COMP.SUB``.

Every part that reads or writes a place in a message speaks it: the codec (``Message.get``), the
inbound mapping rules (``from: PID-5.1``, ``each: PID-3``, ``.4.2`` inside an ``each``), the outbound
rules' targets, the unmapped report and the ERR locations of the ACKs.

- Occurrence and repetition are 1-based; ``[*]`` (every repetition) is allowed where the caller
  says so.
- A leaf is reported as :func:`leaf_path` writes it: the segment occurrence only when it is not the
  first, the repetition always, the component when the repetition has several, the subcomponent
  when the component has several: ``PID-8[1]``, ``PID-13[1].4``, ``PID-3[2].4.2``, ``OBX[3]-5[1].2``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final

ALL: Final = -1  # the repetition written "[*]"

_ABSOLUTE: Final = re.compile(
    r"([A-Z][A-Z0-9]{2})(?:\[([1-9][0-9]*)\])?-([1-9][0-9]*)(?:\[([1-9][0-9]*|\*)\])?"
    r"(?:\.([1-9][0-9]*)(?:\.([1-9][0-9]*))?)?"
)
_RELATIVE: Final = re.compile(r"\.([1-9][0-9]*)(?:\.([1-9][0-9]*))?")
_SEGMENT: Final = re.compile(r"[A-Z][A-Z0-9]{2}")


@dataclass(frozen=True, slots=True)
class Location:
    """A parsed path; ``segment`` is "" for a relative one (``.2.1``)."""

    segment: str
    occurrence: int | None  # None: not written
    field: int  # 0 for a relative path
    repetition: int | None  # None: not written; ALL for [*]
    component: int | None
    subcomponent: int | None

    @property
    def relative(self) -> bool:
        return not self.segment


@functools.lru_cache(maxsize=8192)
def parse(path: str, *, relative: bool = False, every: bool = False) -> Location:
    """``path`` parsed once. ``relative`` admits ``.C[.S]``; ``every`` admits ``[*]``.

    Raises ValueError naming the path: paths come from code and mapping files, never from messages.
    """
    if relative:
        rel = _RELATIVE.fullmatch(path)
        if rel is not None:
            comp, sub = rel.groups()
            return Location("", None, 0, None, int(comp), int(sub) if sub else None)
    match = _ABSOLUTE.fullmatch(path)
    if match is None:
        shape = "SEG[occ]-FIELD[rep].COMP.SUB, e.g. PID-3[2].4" + (" or .COMP.SUB" if relative else "")
        raise ValueError(f"bad HL7 path {path!r}: expected {shape}")
    seg, occ, fld, rep, comp, sub = match.groups()
    if rep == "*" and not every:
        raise ValueError(f"bad HL7 path {path!r}: [*] is not allowed here")
    return Location(
        seg,
        int(occ) if occ else None,
        int(fld),
        ALL if rep == "*" else int(rep) if rep else None,
        int(comp) if comp else None,
        int(sub) if sub else None,
    )


def location(text: str | None) -> Location | None:
    """An error's location (``PID-3[2].4``, ``MSH-9``, or a whole segment ``ZBE[2]``) for an ERR
    segment; None for anything else (a FHIRPath, say), which the ACK then leaves out."""
    if not text:
        return None
    whole = _WHOLE_SEGMENT.fullmatch(text)
    if whole is not None:
        return Location(whole.group(1), int(whole.group(2)) if whole.group(2) else None, 0, None, None, None)
    try:
        return parse(text, every=False)
    except ValueError:
        return None


_WHOLE_SEGMENT: Final = re.compile(r"([A-Z][A-Z0-9]{2})(?:\[([1-9][0-9]*)\])?")


def is_segment(name: str) -> bool:
    """A segment name (``OBX``), as opposed to a field path (``OBX-5``)."""
    return _SEGMENT.fullmatch(name) is not None


def leaf_path(
    segment: str,
    occurrence: int,
    field: int,
    repetition: int,
    component: int | None = None,
    subcomponent: int | None = None,
) -> str:
    """The reported form of a leaf: pass ``component`` only when the repetition has several
    components, ``subcomponent`` only when that component has several subcomponents."""
    text = (
        f"{segment}[{occurrence}]-{field}[{repetition}]"
        if occurrence > 1
        else f"{segment}-{field}[{repetition}]"
    )
    if component is not None:
        text += f".{component}"
        if subcomponent is not None:
            text += f".{subcomponent}"
    return text


def field_path(segment: str, occurrence: int, field: int) -> str:
    """A field as the ERR segment and warnings name it: ``PID-3``, ``OBX[2]-5``."""
    return f"{segment}[{occurrence}]-{field}" if occurrence > 1 else f"{segment}-{field}"
