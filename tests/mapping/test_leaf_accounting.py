"""Leaf accounting on generated messages: every non-empty leaf reaches the Bundle or the unmapped report.

ADT^A01 (PID, PV1, ZBE) and ORU^R01 (ORC/OBR/OBX groups) are built around a valid core (an
OID-qualified MSH-4, namespaced identifiers), then given random extra segments, fields,
components and repetitions whose values mix words, numbers, HL7 dates, codes, escape sequences
and the explicit null. The independent checker (tests/hl7_leaves.py) then finds no silent leaf
and no invented path in the report. Every generated message carries what its event requires, so
the mapping has no reason to refuse one: any MessageError fails.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from gateway.engine.steps import FhirMapping
from gateway.hl7.er7 import Message
from tests.hl7_leaves import silent_leaves, unknown_paths

MAPPINGS = Path(__file__).parents[2] / "mappings"
SETTINGS = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@functools.cache
def step() -> FhirMapping:
    return FhirMapping("leaves", {"directory": str(MAPPINGS), "missing_namespace": "sender"})


# -- values ---------------------------------------------------------------------------------------

WORDS = st.sampled_from(
    ["Lilas", "Zoé", "Hôpital Nord", "rue des Écoles", "remarque libre", "O'Neil", "x-ray", "Saint-Étienne"]
)
NUMBERS = st.one_of(
    st.integers(-500, 100_000).map(str),
    st.decimals(-1000, 1000, places=2, allow_nan=False, allow_infinity=False).map(str),
)
CODES = st.sampled_from(
    ["F", "M", "U", "I", "O", "PI", "VN", "ISO", "LN", "CE", "VALI", "Y", "N", "H", "C", "XX9"]
)
ESCAPES = st.sampled_from(
    [
        "A\\T\\B",
        "x\\S\\y",
        "\\H\\gras\\N\\",
        "ligne 1\\.br\\ligne 2",
        "chemin\\E\\dossier",
        "p\\F\\q",
        "r\\R\\s",
    ]
)
NULL = st.just('""')


@st.composite
def hl7_dates(draw: st.DrawFn) -> str:
    day = draw(st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 12, 31)))
    text = day.strftime("%Y%m%d")
    precision = draw(st.sampled_from(["date", "minute", "second", "zoned"]))
    if precision != "date":
        text += f"{draw(st.integers(0, 23)):02d}{draw(st.integers(0, 59)):02d}"
    if precision in ("second", "zoned"):
        text += f"{draw(st.integers(0, 59)):02d}"
    if precision == "zoned":
        text += draw(st.sampled_from(["+0100", "+0200", "-0500"]))
    return text


VALUES = st.one_of(WORDS, NUMBERS, hl7_dates(), CODES, ESCAPES, NULL)


@st.composite
def extra_values(draw: st.DrawFn) -> str:
    """A field value: 1-2 repetitions of 1-3 components of 1-2 subcomponents."""
    reps = []
    for _ in range(draw(st.integers(1, 2))):
        comps = [
            "&".join(draw(st.lists(VALUES, min_size=1, max_size=2))) for _ in range(draw(st.integers(1, 3)))
        ]
        reps.append("^".join(comps))
    return "~".join(reps)


# -- segments -------------------------------------------------------------------------------------


@dataclass
class Segment:
    name: str
    fields: dict[int, str]
    width: int = 0  # how far extra fields may go
    extras: dict[int, str] = field(default_factory=dict)

    def render(self) -> str:
        values = {**self.fields, **self.extras}
        last = max(values, default=0)
        return "|".join([self.name, *(values.get(n, "") for n in range(1, last + 1))])


@st.composite
def messy(draw: st.DrawFn, seg: Segment) -> Segment:
    """The segment with random extra fields, and extra repetitions or trailing components on its own."""
    free = [n for n in range(1, seg.width + 1) if n not in seg.fields]
    if free:
        for n in draw(st.lists(st.sampled_from(free), max_size=3, unique=True)):
            seg.extras[n] = draw(extra_values())
    for n in list(seg.fields):
        kind = draw(st.sampled_from(["keep", "keep", "keep", "repetition", "component"]))
        if kind == "repetition":
            seg.fields[n] += "~" + draw(extra_values())
        elif kind == "component":
            first, *rest = seg.fields[n].split("~")
            gap = "^" * draw(st.integers(1, 3))
            seg.fields[n] = "~".join([first + gap + draw(VALUES), *rest])
    return seg


OIDS = st.integers(1, 9999).map(lambda n: f"1.2.250.1.71.4.2.2.{n}")
AUTHORITIES = st.sampled_from(["CHU-EST", "CLINIQUE-SUD", "LABO-CENTRE"])
IDS = st.from_regex(r"[A-Z]{0,2}[0-9]{3,8}", fullmatch=True)


@st.composite
def header(draw: st.DrawFn, event: str, oid: str) -> str:
    msh = (
        f"MSH|^~\\&|APP|FAC^{oid}^ISO|PASSERELLE|GHT|{draw(hl7_dates())}||{event}|{draw(IDS)}|P|2.5"
        "|||||FRA|UNICODE UTF-8"
    )
    # header fields the gateway does not read itself are ordinary leaves
    parts = msh.split("|")
    for n in draw(st.lists(st.sampled_from([8, 13, 14, 19, 20]), max_size=2, unique=True)):
        while len(parts) <= n - 1:
            parts.append("")
        parts[n - 1] = draw(extra_values())
    return "|".join(parts)


@st.composite
def extra_segments(draw: st.DrawFn, names: list[str]) -> list[str]:
    out = []
    for name in draw(st.lists(st.sampled_from(names), max_size=2)):
        seg = Segment(name, {1: str(len(out) + 1)}, width=6)
        out.append(draw(messy(seg)).render())
    return out


@st.composite
def patient(draw: st.DrawFn, oid: str, authority: str) -> Segment:
    seg = Segment(
        "PID",
        {
            3: f"{draw(IDS)}^^^{authority}&{oid}&ISO^PI",
            5: f"{draw(WORDS)}^{draw(WORDS)}^^^^^L",
            7: draw(st.dates(min_value=date(1900, 1, 1), max_value=date(2026, 1, 1))).strftime("%Y%m%d"),
            8: draw(st.sampled_from(["F", "M", "U"])),
        },
        width=39,
    )
    return draw(messy(seg))


@st.composite
def adt_a01(draw: st.DrawFn) -> str:
    oid, authority, when = draw(OIDS), draw(AUTHORITIES), draw(hl7_dates())
    segments = [
        draw(header("ADT^A01^ADT_A01", oid)),
        draw(messy(Segment("EVN", {2: when}, width=7))).render(),
        draw(patient(oid, authority)).render(),
        *draw(extra_segments(["NK1"])),
        draw(
            messy(
                Segment(
                    "PV1",
                    {
                        2: draw(st.sampled_from(["I", "O", "E"])),
                        19: f"{draw(IDS)}^^^{authority}&{oid}&ISO^VN",
                        44: when,
                    },
                    width=52,
                )
            )
        ).render(),
        draw(
            messy(
                Segment(
                    # movements are numbered in their own domain: the same number in the visits'
                    # domain would name the same Encounter twice (and the message be refused)
                    "ZBE",
                    {1: f"{draw(IDS)}^{authority}^{oid}.1^ISO", 2: when, 4: "INSERT", 5: "N"},
                    width=9,
                )
            )
        ).render(),
        *draw(extra_segments(["ZXY", "ZPV"])),
    ]
    return "\r".join(segments) + "\r"


@st.composite
def observation(draw: st.DrawFn, n: int) -> str:
    kind = draw(st.sampled_from(["NM", "ST", "CE"]))
    value = {
        "NM": draw(NUMBERS),
        "ST": draw(WORDS),
        "CE": f"{draw(CODES)}^{draw(WORDS)}^L",
    }[kind]
    fields = {
        1: str(n),
        2: kind,
        3: f"{draw(IDS)}^{draw(WORDS)}^LN",
        5: value,
        11: draw(st.sampled_from("FCP")),
    }
    if kind == "NM":
        fields[6] = "mmol/L^^UCUM"
    fields[14] = draw(hl7_dates())
    return draw(messy(Segment("OBX", fields, width=25))).render()


@st.composite
def oru_r01(draw: st.DrawFn) -> str:
    oid, authority = draw(OIDS), draw(AUTHORITIES)
    segments = [draw(header("ORU^R01^ORU_R01", oid)), draw(patient(oid, authority)).render()]
    obx = 0
    for g in range(1, draw(st.integers(1, 2)) + 1):
        placer = f"{draw(IDS)}-{g}^{authority}^{oid}^ISO"
        filler = f"{draw(IDS)}-{g}^LABO^{oid}^ISO"
        segments.append(draw(messy(Segment("ORC", {1: "RE", 2: placer, 3: filler}, width=30))).render())
        obr = {
            1: str(g),
            2: placer,
            3: filler,
            4: f"{draw(IDS)}^{draw(WORDS)}^LN",
            7: draw(hl7_dates()),
            25: "F",
        }
        segments.append(draw(messy(Segment("OBR", obr, width=50))).render())
        for _ in range(draw(st.integers(1, 3))):
            obx += 1
            segments.append(draw(observation(obx)))
            segments += draw(extra_segments(["NTE"]))
    segments += draw(extra_segments(["ZXY"]))
    return "\r".join(segments) + "\r"


# -- the property ---------------------------------------------------------------------------------


def check_accounted(text: str) -> None:
    note(text.replace("\r", "\n"))
    raw = text.encode("utf-8")
    result = step().convert(Message.decode(raw, default_charset="8859/15"))
    silent = [f"{leaf.path} = {leaf.value!r}" for leaf in silent_leaves(raw, result.bundle, result.unmapped)]
    assert not silent, "silent leaves:\n" + "\n".join(silent)
    unknown = unknown_paths(raw, result.unmapped)
    assert not unknown, "report paths that are no leaf:\n" + "\n".join(unknown)


@SETTINGS
@given(adt_a01())
def test_adt_a01_leaves_are_all_accounted_for(text: str) -> None:
    check_accounted(text)


@SETTINGS
@given(oru_r01())
def test_oru_r01_leaves_are_all_accounted_for(text: str) -> None:
    check_accounted(text)
