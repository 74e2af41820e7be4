"""``passerelle coverage`` and gateway.mapping.coverage: leaf counts, aggregation, renderings, the CLI.

The leaf count follows the mapping engine's own enumeration (``unmapped_leaves`` with nothing
mapped) and the independent checker's (tests/hl7_leaves.py), on generated messages and on the
shared corpus (../shared/corpus, read in place); what reached FHIR is that count less the unmapped
report, never negative. The reports hold no leaf value.
"""

from __future__ import annotations

import functools
import html
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from gateway.core.errors import MessageError, UnsupportedMessage
from gateway.engine.steps import FhirMapping
from gateway.hl7.er7 import Message, split_messages
from gateway.mapping import coverage
from gateway.mapping.coverage import Coverage, MessageCoverage
from gateway.mapping.engine import MappingResult, unmapped_leaves
from tests.hl7_leaves import leaves as independent_leaves

ROOT = Path(__file__).parents[2]
MAPPINGS = ROOT / "mappings"
CORPUS = ROOT.parent / "shared" / "corpus"
SETTINGS = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
OID = "1.2.250.1.71.4.2.2.1"
MSH = f"MSH|^~\\&|APP|FAC^{OID}^ISO|GW|GHT|20240306111154||{{event}}|C1|P|2.5|||||FRA|UNICODE UTF-8"
CORE = [
    "EVN||20240306111154",
    f"PID|||123^^^HOSP&{OID}&ISO^PI||DOE^JOHN||19800101|F",
    f"PV1||I|||||||||||||||||V1^^^HOSP&{OID}&ISO^VN",
]


@functools.cache
def step() -> FhirMapping:
    """The mapping step as ``passerelle convert`` (and ``coverage``) make it by default."""
    return FhirMapping(
        "coverage", {"directory": str(MAPPINGS), "missing_namespace": "sender", "timezone": "Europe/Paris"}
    )


def message(*segments: str, event: str = "ADT^A01^ADT_A01") -> bytes:
    return ("\r".join([MSH.format(event=event), *segments]) + "\r").encode()


def decode(raw: bytes) -> Message:
    return Message.decode(raw, default_charset="8859/15")


def independent(raw: bytes) -> list[str]:
    return [leaf.path for leaf in independent_leaves(raw) if not leaf.exempt]


# -- leaves ------------------------------------------------------------------------------------------


def test_leaf_paths_follow_the_engine_notation() -> None:
    raw = message("ZXY|a^b&c~d|  |x&|^^e", "ZXY|f")
    assert coverage.leaf_paths(decode(raw)) == [
        "ZXY-1[1].1",
        "ZXY-1[1].2.1",
        "ZXY-1[1].2.2",
        "ZXY-1[2]",
        "ZXY-3[1].1.1",
        "ZXY-4[1].3",
        "ZXY[2]-1[1]",
    ]


def test_header_fields_the_gateway_reads_are_not_content_but_the_others_are() -> None:
    header = (
        "MSH|^~\\&|APP|FAC|GW|GHT|20240306111154|SEC|ADT^A01^ADT_A01|C1|P|2.5|42|CONT|AL|NE|FRA"
        "|UNICODE UTF-8|FR|ALT|2.1^PROFILE"
    )
    raw = (header + "\r").encode()
    assert coverage.leaf_paths(decode(raw)) == [
        "MSH-8[1]",
        "MSH-13[1]",
        "MSH-14[1]",
        "MSH-19[1]",
        "MSH-20[1]",
    ]


def test_the_explicit_null_is_a_leaf_as_the_engine_counts_it() -> None:
    # The engine carries "" as a removal (an update) or reports it: it is content either way.
    msg = decode(message('ZXY|""|""^x'))
    assert coverage.leaf_paths(msg) == ["ZXY-1[1]", "ZXY-2[1].1", "ZXY-2[1].2"]
    assert coverage.count_leaves(msg) == len(unmapped_leaves(msg, set()))


def test_general_path_drops_occurrences_and_repetitions() -> None:
    assert coverage.general_path("OBX[3]-5[1].2") == "OBX-5.2"
    assert coverage.general_path("PID-13[2].4") == "PID-13.4"
    assert coverage.general_path("PID-3[1].4.2") == "PID-3.4.2"
    assert coverage.general_path("ZBE[12]-1[10]") == "ZBE-1"


PIECE = st.text(alphabet='ab é1 "\\', max_size=4)


@st.composite
def field_texts(draw: st.DrawFn) -> str:
    reps = []
    for _ in range(draw(st.integers(1, 3))):
        comps = [
            "&".join(draw(st.lists(PIECE, min_size=1, max_size=3))) for _ in range(draw(st.integers(1, 3)))
        ]
        reps.append("^".join(comps))
    return "~".join(reps)


@st.composite
def any_messages(draw: st.DrawFn) -> bytes:
    """A header with random optional fields, then random segments of random fields."""
    header = MSH.format(event=draw(st.sampled_from(["ADT^A01^ADT_A01", "ORU^R01^ORU_R01", "ZZZ^Z01"])))
    parts = header.split("|")
    for n in draw(st.lists(st.sampled_from([8, 13, 14, 19, 20, 22]), max_size=3, unique=True)):
        parts += [""] * max(0, n - len(parts))
        parts[n - 1] = draw(field_texts())
    segments = ["|".join(parts)]
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(["PID", "PV1", "OBX", "NTE", "ZXY"]))
        segments.append("|".join([name, *draw(st.lists(field_texts(), max_size=6))]))
    return ("\r".join(segments) + "\r").encode()


@SETTINGS
@given(any_messages())
def test_leaf_count_is_the_engines_and_the_independent_checkers(raw: bytes) -> None:
    msg = decode(raw)
    mine = coverage.leaf_paths(msg)
    assert mine == unmapped_leaves(msg, set())
    assert mine == independent(raw)
    assert coverage.count_leaves(msg) == len(mine)


# -- one message through the real mapping ------------------------------------------------------------

VALUES = st.one_of(
    st.sampled_from(["Lilas", "Zoé", "rue des Écoles", "75007", "0102030405", "F", "Y", '""', "A\\T\\B"]),
    st.integers(0, 99999).map(str),
)


@st.composite
def values(draw: st.DrawFn) -> str:
    reps = []
    for _ in range(draw(st.integers(1, 2))):
        comps = [
            "&".join(draw(st.lists(VALUES, min_size=1, max_size=2))) for _ in range(draw(st.integers(1, 3)))
        ]
        reps.append("^".join(comps))
    return "~".join(reps)


@st.composite
def adt_messages(draw: st.DrawFn) -> bytes:
    """A valid ADT^A01 core, given random PID fields and random extra segments."""
    pid = CORE[1].split("|")
    for n in draw(st.lists(st.sampled_from([2, 6, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 22]), unique=True)):
        pid += [""] * max(0, n + 1 - len(pid))
        pid[n] = draw(values())
    extra = [
        "|".join([name, *draw(st.lists(values(), min_size=1, max_size=5))])
        for name in draw(st.lists(st.sampled_from(["ZXY", "NTE", "NK1", "ROL", "OBX"]), max_size=3))
    ]
    return message(CORE[0], "|".join(pid), CORE[2], *extra)


def check_one(one: MessageCoverage) -> None:
    assert one.refused is not None or one.leaves > 0
    assert 0 <= one.reached <= one.leaves
    assert len(one.unmapped) == one.leaves - one.reached


@SETTINGS
@given(adt_messages())
def test_reached_plus_unmapped_is_every_leaf(raw: bytes) -> None:
    msg = decode(raw)
    refusal: tuple[str, str] | None = None
    try:
        result = step().convert(msg)
    except MessageError as exc:
        note(f"refused: {exc.hl7_error_code} {exc.message}")
        refusal = (exc.hl7_error_code, type(exc).__name__)
    if refusal is not None:
        one = coverage.measure(msg, step().convert)
        assert (one.refused, one.leaves) == (refusal, 0)
        return
    leaves = coverage.leaf_paths(msg)
    assert set(result.unmapped) <= set(leaves)  # the engine reports only leaves counted here
    one = coverage.measure(msg, step().convert)
    check_one(one)
    assert one.event == "ADT^A01"
    assert one.leaves == len(leaves)
    assert set(one.unmapped) == set(result.unmapped)
    total = Coverage()
    total.add(one)
    share = total.total().share
    assert share is not None and 0.0 <= share <= 100.0


def test_a_mapped_message_counts_its_content_and_its_unmapped_leaves() -> None:
    raw = message(*CORE, 'ZXY|SECRET^x&y~""| |')
    one = coverage.measure(decode(raw), step().convert)
    assert one.refused is None
    assert set(one.unmapped) >= {"ZXY-1[1].1", "ZXY-1[1].2.1", "ZXY-1[1].2.2", "ZXY-1[2]"}
    assert one.leaves == len(independent(raw))
    assert one.reached == one.leaves - len(one.unmapped) > 0


def test_a_refused_or_unreadable_message_is_counted_with_its_code() -> None:
    refused = coverage.measure_raw(
        message(*CORE, event="ADT^A08^ADT_A01"), step().convert, default_charset=""
    )
    assert (refused.event, refused.refused, refused.leaves) == ("ADT^A08", ("200", "UnsupportedMessage"), 0)
    unreadable = coverage.measure_raw(b"not HL7 at all\r", step().convert, default_charset="8859/15")
    assert unreadable.event == coverage.UNPARSED
    assert unreadable.refused is not None and unreadable.refused[0] in {"100", "101", "102"}


# -- aggregation and renderings ----------------------------------------------------------------------

EVENTS = st.sampled_from(["ADT^A01", "ORU^R01", "MDM^T02", coverage.UNPARSED])
PATHS = st.sampled_from(
    ["PID-13[1].4", "PID-13[2].4", "OBX[3]-5[1].2", "OBX-5[1].2", "ZXY[2]-1[1]", "EVN-2[1]"]
)
REFUSALS = st.sampled_from([("200", "UnsupportedMessage"), ("101", "ValidationError"), ("102", "ParseError")])


@st.composite
def measures(draw: st.DrawFn) -> MessageCoverage:
    event = draw(EVENTS)
    if event == coverage.UNPARSED or draw(st.booleans()):
        return MessageCoverage(event, refused=draw(REFUSALS))
    unmapped = tuple(draw(st.lists(PATHS, unique=True)))
    return MessageCoverage(event, len(unmapped) + draw(st.integers(0, 50)), unmapped)


def check_type(figures: dict[str, Any], top: int) -> None:
    assert figures["messages"] == figures["mapped"] + figures["refused"]
    assert figures["refused"] == sum(r["messages"] for r in figures["refusals"])
    assert figures["reached"] + figures["unmapped"] == figures["leaves"]
    assert 0 <= figures["reached"] <= figures["leaves"]
    share = figures["share"]
    assert (share is None) == (figures["leaves"] == 0)
    assert share is None or 0.0 <= share <= 100.0
    ranked = figures["top_unmapped"]
    assert len(ranked) <= top and len(ranked) <= figures["unmapped_paths"]
    assert [r["messages"] for r in ranked] == sorted((r["messages"] for r in ranked), reverse=True)
    for item in ranked:
        assert "[" not in item["path"]
        assert 1 <= item["messages"] <= figures["mapped"]
        assert item["messages"] <= item["leaves"]


@SETTINGS
@given(st.lists(measures(), max_size=30), st.integers(0, 8))
def test_aggregates_add_up(items: list[MessageCoverage], top: int) -> None:
    report = Coverage(files=len(items))
    for item in items:
        report.add(item)
    data = json.loads(json.dumps(report.as_json(top)))  # JSON-able as it is
    assert set(data) == {"files", "top", "total", "types"}
    assert data["top"] == top
    total = data["total"]
    check_type(total, top)
    assert total["messages"] == len(items)
    assert total["mapped"] == sum(1 for i in items if i.refused is None)
    assert total["leaves"] == sum(i.leaves for i in items)
    assert total["reached"] == sum(i.reached for i in items)
    for figures in data["types"]:
        check_type(figures, top)
    assert [t["type"] for t in data["types"]] == sorted(
        {i.event for i in items}, key=lambda e: (e == coverage.UNPARSED, e)
    )
    assert sum(t["messages"] for t in data["types"]) == len(items)
    # a path is counted once per message, however many occurrences or repetitions carry it
    mapped = [i for i in items if i.refused is None]
    expected = Counter(p for i in mapped for p in {coverage.general_path(u) for u in i.unmapped})
    assert {r["path"]: r["messages"] for r in total["top_unmapped"]}.items() <= expected.items()
    assert total["unmapped_paths"] == len(expected)
    text = report.text(top)
    assert text.count("\n") >= 3
    page = report.html(top)
    assert "<script" not in page.lower()


def test_json_shape() -> None:
    report = Coverage(files=2)
    report.add(MessageCoverage("ADT^A01", 10, ("PID-13[1].4", "PID-13[2].4", "OBX[3]-5[1].2")))
    report.add(MessageCoverage("ADT^A01", 4, ("PID-13[1].4",)))
    report.add(MessageCoverage("ADT^A08", refused=("200", "UnsupportedMessage")))
    data = report.as_json(top=1)
    a01 = data["types"][0]
    assert a01 == {
        "type": "ADT^A01",
        "messages": 2,
        "mapped": 2,
        "refused": 0,
        "refusals": [],
        "leaves": 14,
        "reached": 10,
        "unmapped": 4,
        "share": round(100 * 10 / 14, 2),
        "unmapped_paths": 2,
        "top_unmapped": [{"path": "PID-13.4", "messages": 2, "leaves": 3}],
    }
    a08 = data["types"][1]
    assert a08["refusals"] == [{"code": "200", "error": "UnsupportedMessage", "messages": 1}]
    assert a08["share"] is None and a08["top_unmapped"] == []
    assert data["total"]["type"] == "all types" and data["total"]["messages"] == 3
    assert data["files"] == 2


def test_text_table_shows_each_type_and_the_total() -> None:
    report = Coverage(files=1)
    report.add(MessageCoverage("ADT^A01", 8, ("PID-13[1].4", "ZXY-1[1]")))
    report.add(MessageCoverage("ADT^A08", refused=("200", "UnsupportedMessage")))
    text = report.text()
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("ADT^", "all "))}
    assert rows["ADT^A01"][1:] == ["1", "1", "0", "8", "6", "75.0%"]
    assert rows["ADT^A08"][1:] == ["1", "0", "1", "(200×1)", "0", "0", "-"]
    assert "200 UnsupportedMessage: 1" in text
    assert re.search(r"PID-13\.4\s+1/1\s+1", text)


HOSTILE = st.text(alphabet=st.sampled_from(list("<>&\"'/ab =")), min_size=1, max_size=12)


@SETTINGS
@given(HOSTILE, HOSTILE)
def test_html_escapes_types_and_paths(event: str, path: str) -> None:
    report = Coverage(files=1)
    report.add(MessageCoverage(event, 3, (path,)))
    report.add(MessageCoverage(event, refused=(event, "X")))
    page = report.html()
    assert "<script" not in page.lower()
    assert html.escape(event) in page
    assert html.escape(path) in page
    if any(c in event for c in "<>&"):
        assert f">{event}<" not in page
    # only the page's own tags: every "<" opens one of them (the charts are the plotting library's SVG)
    charts = re.search(r'<div class="charts">(.*?)</div>', page, re.DOTALL)
    assert charts is not None and charts.group(1).startswith("<svg")
    tags = set(re.findall(r"</?([a-zA-Z0-9!]+)", page.replace(charts.group(0), "")))
    assert tags <= {"!DOCTYPE", "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p"} | {
        "table",
        "thead",
        "tbody",
        "tfoot",
        "tr",
        "th",
        "td",
    }


def test_reports_hold_no_leaf_value_nor_file_name(tmp_path: Path) -> None:
    secret_file = tmp_path / "DUPONT_Jeanne.hl7"
    secret_file.write_bytes(message(*CORE, "ZXY|SECRETVALUE^MOTDEPASSE", f"NTE|1||{'TRESSECRET'}"))
    report = coverage.measure_files([secret_file], step().convert, default_charset="8859/15")
    outputs = [report.text(), report.html(), json.dumps(report.as_json())]
    for out in outputs:
        for word in ("SECRETVALUE", "MOTDEPASSE", "TRESSECRET", "DUPONT", "Jeanne", "19800101", "DOE"):
            assert word not in out
        assert "ZXY-1.1" in out


# -- files -------------------------------------------------------------------------------------------


def test_message_files_reads_directories_recursively_and_only_hl7(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.hl7").write_bytes(message(*CORE))
    (tmp_path / "sub" / "deeper" / "b.txt").write_bytes(b"\xef\xbb\xbf\n" + message(*CORE))
    (tmp_path / "README.md").write_text("# not a message\n")
    (tmp_path / "sub" / "x-expected.json").write_text("{}")
    named = tmp_path / "README.md"
    found = coverage.message_files([tmp_path, named])
    assert found == [tmp_path / "a.hl7", tmp_path / "sub" / "deeper" / "b.txt", named]
    with pytest.raises(FileNotFoundError):
        coverage.message_files([tmp_path / "missing.hl7"])


def test_a_file_may_hold_several_messages(tmp_path: Path) -> None:
    path = tmp_path / "batch.hl7"
    path.write_bytes(message(*CORE) + message(*CORE, event="ADT^A08^ADT_A01") + message(*CORE))
    report = coverage.measure_files([path], step().convert, default_charset="8859/15")
    assert report.files == 1
    assert report.types["ADT^A01"].mapped == 2
    assert report.types["ADT^A08"].refusals == Counter({("200", "UnsupportedMessage"): 1})


def fake_convert(unmapped: list[str]) -> coverage.Convert:
    def convert(msg: Message) -> MappingResult:
        if msg.trigger == "A08":
            raise UnsupportedMessage("no", location="MSH-9")
        return MappingResult({"resourceType": "Bundle"}, [], list(unmapped), "fake")

    return convert


def test_paths_not_counted_as_leaves_are_not_subtracted() -> None:
    # A report naming a path that is no leaf (an engine bug) cannot make reached negative.
    msg = decode(message("ZXY|a"))
    one = coverage.measure(msg, fake_convert(["ZXY-1[1]", "ZXY-9[1]", "ZXY-1[1]"]))
    assert (one.leaves, one.unmapped, one.reached) == (1, ("ZXY-1[1]",), 0)


# -- the command -------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "coverage", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.fixture
def feed(tmp_path: Path) -> Path:
    """A directory of messages: two A01 (one file with a second message), an A08, an unreadable one."""
    root = tmp_path / "feed"
    (root / "day2").mkdir(parents=True)
    (root / "one.hl7").write_bytes(message(*CORE, "ZXY|private^x~y"))
    (root / "day2" / "two.er7").write_bytes(message(*CORE) + message(*CORE, event="ADT^A08^ADT_A01"))
    (root / "broken.hl7").write_bytes(b"MSH|^~\\\r")
    (root / "notes.md").write_text("not a message\n")
    return root


def test_cli_json(feed: Path) -> None:
    run = cli(str(feed), "--json", "--top", "3", "--mappings", str(MAPPINGS))
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["files"] == 3
    types = {t["type"]: t for t in data["types"]}
    assert set(types) == {"ADT^A01", "ADT^A08", coverage.UNPARSED}
    a01 = types["ADT^A01"]
    assert (a01["messages"], a01["mapped"]) == (2, 2)
    assert a01["leaves"] == len(independent(message(*CORE, "ZXY|private^x~y"))) + len(
        independent(message(*CORE))
    )
    assert {"path": "ZXY-1.1", "messages": 1, "leaves": 1} in a01["top_unmapped"]
    assert len(a01["top_unmapped"]) <= 3
    assert types["ADT^A08"]["refusals"] == [{"code": "200", "error": "UnsupportedMessage", "messages": 1}]
    assert types[coverage.UNPARSED]["refused"] == 1
    assert "private" not in run.stdout


def test_cli_text_and_html(feed: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    run = cli(str(feed / "one.hl7"), str(feed / "day2"), "--html", str(out))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].startswith("Mapping coverage: 3 messages in 2 files")
    assert re.search(r"^ADT\^A01\s+2\s+2\s+0\s", run.stdout, re.MULTILINE)
    page = out.read_text("utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page.lower()
    assert "ADT^A01" in page and "private" not in page


def test_cli_usage_errors(feed: Path, tmp_path: Path) -> None:
    missing = cli(str(feed / "nowhere.hl7"))
    assert missing.returncode == 2 and "nowhere.hl7" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = cli(str(feed), "--mappings", str(empty))
    assert bad.returncode == 2 and "mapping error" in bad.stderr
    nodir = cli(str(feed), "--mappings", str(tmp_path / "none"))
    assert nodir.returncode == 2
    unwritable = cli(str(feed), "--html", str(tmp_path / "no" / "such" / "dir.html"))
    assert unwritable.returncode == 2
    assert cli(str(feed), "--top", "-1").returncode == 2
    assert cli(str(feed), "--timezone", "Nowhere/Else").returncode == 2
    assert cli(str(feed), "--config", str(tmp_path / "none.yaml")).returncode == 2


def test_cli_takes_the_namespaces_of_a_config(feed: Path) -> None:
    run = cli(str(feed), "--config", str(ROOT / "config.yaml"), "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["total"]["messages"] == 4


# -- the shared corpus -------------------------------------------------------------------------------

corpus = pytest.mark.skipif(
    not CORPUS.is_dir(),
    reason=f"the shared corpus of real messages is not at {CORPUS} (tests read it there, never a copy)",
)


def corpus_messages() -> list[tuple[str, bytes]]:
    files = coverage.message_files([CORPUS])
    return [(p.relative_to(CORPUS).as_posix(), raw) for p in files for raw in split_messages(p.read_bytes())]


@corpus
def test_corpus_leaf_count_matches_the_engine_and_the_independent_checker() -> None:
    checked = 0
    for name, raw in corpus_messages():
        try:
            msg = decode(raw)
        except MessageError:
            continue  # refused as unreadable: nothing counted
        mine = coverage.leaf_paths(msg)
        assert mine == unmapped_leaves(msg, set()), name
        assert mine == independent(raw), name
        try:
            result = step().convert(msg)
        except MessageError:
            continue
        unknown = set(result.unmapped) - set(mine)
        assert not unknown, f"{name}: unmapped paths that are no leaf: {sorted(unknown)[:5]}"
        one = coverage.measure(msg, step().convert)
        check_one(one)
        assert one.leaves - len(result.unmapped) == one.reached >= 0
        checked += 1
    assert checked > 0


@corpus
def test_corpus_figures_for_every_mapped_type() -> None:
    report = coverage.measure_files(
        coverage.message_files([CORPUS]), step().convert, default_charset="8859/15"
    )
    expected: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for _, raw in corpus_messages():
        try:
            msg = decode(raw)
        except MessageError:
            seen[coverage.UNPARSED] += 1
            continue
        event = f"{msg.message_type}^{msg.trigger}"
        seen[event] += 1
        try:
            step().convert(msg)
        except MessageError:
            continue
        expected[event] += 1
    assert expected, "the corpus has no message the mappings take"
    assert {k: v.messages for k, v in report.types.items()} == dict(seen)
    data = report.as_json()
    check_type(data["total"], 20)
    for figures in data["types"]:
        check_type(figures, 20)
        assert figures["mapped"] == expected.get(figures["type"], 0)
        if figures["mapped"]:
            assert figures["leaves"] > 0 and figures["share"] is not None, figures["type"]
        else:
            assert figures["share"] is None
