"""The compiled rules map exactly as the rule interpreter does.

Every feed's authored messages (and the conformance suite's HL7v2 files) are mutated by Hypothesis
(fields rewritten with separators, escapes, repetitions and the codes the concept maps know,
segments dropped, doubled or added) and mapped both ways: same Bundle byte for byte (the random
``urn:uuid`` numbered in order of appearance), same warnings, same unmapped content, or the same
error.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance.suite import DATA_DIR
from gateway.core.errors import PasserelleError
from gateway.hl7.er7 import Message
from gateway.mapping import catalog, engine
from gateway.mapping.engine import Library, run
from gateway.mapping.namespaces import Namespaces
from tests.documents.mdm_messages import mdm
from tests.mapping import checked_conversion as checked
from tests.mapping import test_adt_updates as updates
from tests.mapping import test_allergy_updates as allergy
from tests.mapping import test_financial as fin
from tests.mapping import test_mdm_notifications as notifications
from tests.mapping import test_oul as oul
from tests.mapping import test_pharmacy as rx
from tests.mapping import test_ppr_ref as ppr
from tests.mapping.test_actors import a01_with_actors
from tests.mapping.test_adt import A01, LIB, identity_event, segment
from tests.mapping.test_adt_triggers import MOVEMENTS, message
from tests.mapping.test_oru import oru
from tests.mapping.test_oru_groups import two_orders

MSH = "MSH|^~\\&|APP|CHU-EST|PASSERELLE|GHT|20261123110000||{}|X1|P|2.5|||||FRA|UNICODE UTF-8"
PID = "PID|||552233^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI||GÉRARD^Zoé^^^^^L||19750425|F"
OID = "1.2.250.1.71.4.2.2.4455"
SENDER = Namespaces(policy="sender")


def _texts() -> Iterator[str]:
    yield A01
    yield a01_with_actors()
    for trigger, kind, action, original, *_ in MOVEMENTS:
        yield message(trigger, kind, action, original)
    yield identity_event("ADT^A40^ADT_A39", f"111^^^CHU-EST&{OID}&ISO^PI")
    yield identity_event("ADT^A47^ADT_A30", f"111^^^CHU-EST&{OID}&ISO^PI")
    values = [("NM", "42"), ("SN", "^10^-^20"), ("TX", "ligne 1~ligne 2"), ("CE", "10828004^Positif^SCT")]
    obx = [
        segment("OBX", {1: str(i), 2: kind, 3: "X-1^Essai^L", 5: value, 6: "mmol/L", 11: "F"})
        for i, (kind, value) in enumerate(values, 1)
    ]
    yield oru(*obx).to_er7()
    yield two_orders()
    yield mdm("T02", "C-1", "DOC-1").decode()
    yield mdm("T10", "C-2", "DOC-2", parent="DOC-1").decode()
    yield "\r".join([MSH.format("SIU^S12^SIU_S12"), PID, segment("SCH", {2: f"RDV-9^AGENDA^{OID}^ISO"})])
    yield "\r".join(
        [
            MSH.format("ORM^O01^ORM_O01"),
            PID,
            segment(
                "ORC", {1: "NW", 2: f"CMD-77^SIH^{OID}^ISO", 12: "10000000001^MARTIN^Paul^^^^^^^^^^RPPS"}
            ),
            segment("OBR", {4: "24331-1^Bilan lipidique^LN"}),
        ]
    )
    yield "\r".join(
        [
            MSH.format("VXU^V04^VXU_V04"),
            PID,
            segment("ORC", {3: f"VAC-3^SIH^{OID}^ISO"}),
            segment("RXA", {3: "20261110103000", 5: "3421012^VAXIGRIPTETRA^L", 20: "CP"}),
        ]
    )
    yield from _clinical_feeds()
    yield from _adt_triggers()
    for path in sorted((DATA_DIR / "hl7").glob("*.hl7")):
        try:
            decoded = Message.decode(path.read_bytes())
        except PasserelleError:
            continue  # the suite's deliberately broken files
        if LIB.for_event(f"{decoded.message_type}^{decoded.trigger}") is not None:
            yield decoded.to_er7()


def _clinical_feeds() -> Iterator[str]:
    """Laboratory automation, pharmacy, problems, referrals, document notifications and accounting."""
    yield oul.r22()
    yield checked.message("OUL^R24^OUL_R24", checked.PID, oul.OBR, oul.ORC, oul.SPM, *oul.RESULTS)
    yield checked.message(
        "RDS^O13^RDS_O13", checked.PID, rx.orc(), rx.RXO, rx.RXE, rx.TQ1, rx.RXR, rx.RXD, rx.RXR
    )
    yield checked.message("PPR^PC1^PPR_PC1", checked.PID, ppr.prb(), "NTE|1||Suivi")
    yield checked.message("REF^I12^REF_I12", ppr.RF1, ppr.REFERRER, ppr.REFERRED, checked.PID)
    yield notifications.notification("T05", "DOC-72", parent="DOC-71")
    yield fin.bar("P01", fin.PID, fin.PV1, fin.DG1, fin.PR1, fin.GT1, fin.IN1)
    yield fin.bar("P02", fin.PID, fin.PV1, fin.pid(ipp="778900", nda=fin.account_number("2027000456")))
    yield fin.dft("P03", fin.PID, fin.PV1, fin.ft1(), fin.PR1, fin.DG1, fin.GT1, fin.IN1)


def _adt_triggers() -> Iterator[str]:
    """The ADT triggers beyond PAM FR's movements: A08, A09/A10 tracking, A45, A60 (IAM)."""
    for event, place in (("A08^ADT_A01", {"f42": "USIC^12^2"}), ("A09^ADT_A09", {"f11": "RADIO^S3"})):
        yield updates.text(updates.msh(f"ADT^{event}", "S-1"), updates.pid(), updates.pv1(**place))
    yield updates.text(updates.msh("ADT^A10^ADT_A10", "S-10"), updates.pid(), updates.pv1(f43="RADIO^S3"))
    yield updates.a45()
    yield allergy.a60(allergy.PEANUT, allergy.iam(2, "DA-1^Pénicilline^L", action="D", f23=allergy.DUPONT))


SEEDS = [text.rstrip("\r").split("\r") for text in _texts()]

# Codes the concept maps and conditions test, so that mutations reach both sides of each branch.
CODES = sorted(
    {code for table in LIB.concept_maps.values() for code in table}
    | {"BDL", "VALI", "PROV", "VIDE", "INSERT", "UPDATE", "CANCEL", "M", "N", "ISO", "RPPS", "ADELI", "D"}
)
PIECE = st.one_of(
    st.sampled_from(CODES),
    st.text(alphabet="AZaz09 éÉ.-/\\EFSTRX+", max_size=8),
    st.sampled_from(["20261123", "202611231015+0100", "19750425", OID, "\\X0D\\", "\\F\\", "\\.br\\"]),
)
# A field: repetitions of components of subcomponents.
FIELD = st.lists(
    st.lists(st.lists(PIECE, min_size=1, max_size=3).map("&".join), min_size=1, max_size=8).map("^".join),
    min_size=1,
    max_size=3,
).map("~".join)
HEADER_FIELDS = [3, 4, 5, 6, 7, 10]  # MSH-9 picks the mapping, MSH-18 the charset: left alone


@st.composite
def mutated(draw: st.DrawFn) -> str:
    lines = [line.split("|") for line in draw(st.sampled_from(SEEDS))]
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["set", "set", "set", "clear", "drop", "double", "add"]))
        i = draw(st.integers(0, len(lines) - 1))
        name = lines[i][0]
        if kind in ("set", "clear"):
            if name == "MSH":
                n = draw(st.sampled_from(HEADER_FIELDS)) - 1  # MSH-1 is the separator itself
            else:
                n = draw(st.integers(1, max(len(lines[i]) + 2, 12)))
            fields = lines[i]
            fields.extend([""] * (n + 1 - len(fields)))
            fields[n] = draw(FIELD) if kind == "set" else ""
        elif kind == "drop" and name != "MSH":
            del lines[i]
        elif kind == "double" and name != "MSH":
            lines.insert(i + 1, list(lines[i]))
        elif kind == "add":
            seg = draw(st.sampled_from(["ZBE", "ZFA", "ZFD", "ZXY", "OBX", "PV1", "PV2", "ROL", "NK1"]))
            lines.insert(draw(st.integers(1, len(lines))), [seg, *draw(st.lists(FIELD, max_size=6))])
    return "\r".join("|".join(fields) for fields in lines) + "\r"


_UUID = re.compile(r"urn:uuid:[0-9a-f-]{36}")


def _numbered(result: engine.MappingResult) -> str:
    """The whole result as text, each random urn:uuid replaced by its rank of first appearance."""
    text = json.dumps(
        [result.bundle, result.warnings, result.unmapped, result.mapping, result.degraded],
        ensure_ascii=False,
        default=str,
    )
    ranks: dict[str, str] = {}
    return _UUID.sub(lambda m: ranks.setdefault(m.group(), f"urn:uuid:#{len(ranks)}"), text)


def _outcome(do: Callable[[], engine.MappingResult]) -> tuple[str, str]:
    try:
        return ("ok", _numbered(do()))
    except Exception as exc:  # noqa: BLE001 - any error must be the same error both ways
        return (type(exc).__name__, str(exc))


def _both(text: str, library: Library = LIB, **options: Any) -> tuple[tuple[str, str], tuple[str, str]]:
    raw = text.encode()
    options.setdefault("namespaces", SENDER)  # mutations drop authorities: namespaced by the sender
    compiled = _outcome(lambda: library.map(Message.decode(raw), **options))

    def interpreted() -> engine.MappingResult:
        msg = Message.decode(raw)
        mapping = library.for_event(f"{msg.message_type}^{msg.trigger}")
        assert mapping is not None
        return run(mapping, msg, library, interpret=True, **options)

    return compiled, _outcome(interpreted)


def test_the_seeds_cover_every_feed() -> None:
    served = set()
    for lines in SEEDS:
        msg = Message.parse("\r".join(lines) + "\r")
        mapping = LIB.for_event(f"{msg.message_type}^{msg.trigger}")
        assert mapping is not None
        served.add(mapping.name)
    assert served == {m.name for m in LIB.mappings if m.events}


def test_the_authored_messages_map_the_same_both_ways() -> None:
    for lines in SEEDS:
        compiled, interpreted = _both("\r".join(lines) + "\r")
        assert compiled[0] == "ok", compiled
        assert compiled == interpreted


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.sampled_from(["2.1.0", "2.2.0"]))
def test_mutated_messages_map_the_same_both_ways(text: str, fr_core: str) -> None:
    compiled, interpreted = _both(text, fr_core_version=fr_core)
    assert compiled == interpreted


def test_the_rules_are_compiled_once_at_load() -> None:
    for mapping in LIB.mappings:
        assert LIB.plan(mapping) is LIB.plan(mapping)


FAULTY = """
name: faulty
events: [ADT^A01]
resources:
  - key: patient
    type: Patient
    rules:
      - {set: gender, from: PID-8, map: g}
      - {set: birthDate, from: ".1"}
"""


def test_a_rule_that_fails_fails_the_same_way(tmp_path: Path) -> None:
    (tmp_path / "conceptmaps").mkdir()
    (tmp_path / "conceptmaps" / "maps.yaml").write_text("g: {F: female}\n")
    (tmp_path / "feed.yaml").write_text(FAULTY)
    library = Library.load(tmp_path, catalog.available())
    compiled, interpreted = _both(A01 + "\r", library)
    assert compiled[0] == "ValidationError"
    assert "relative path .1 outside an 'each'" in compiled[1]
    assert compiled == interpreted


# -- _prune, rewritten for speed, against the plain algorithm it replaces -------------------------


def _reference_prune(node: Any) -> Any:
    if isinstance(node, dict):
        for key in list(node):
            value = node[key]
            if isinstance(value, (dict, list)):
                _reference_prune(value)
                if not value:
                    del node[key]
            elif value is None or value == "":
                del node[key]
    elif isinstance(node, list):
        kept = []
        for value in node:
            if isinstance(value, (dict, list)):
                _reference_prune(value)
                if value:
                    kept.append(value)
            elif not (value is None or value == ""):
                kept.append(value)
        node[:] = kept
    return node


JSON = st.recursive(
    st.one_of(st.none(), st.just(""), st.booleans(), st.integers(-2, 2), st.sampled_from(["a", " ", "0"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["", "a", "b", "c"]), inner, max_size=4)
    ),
    max_leaves=25,
)


@given(JSON)
def test_prune_drops_what_the_plain_algorithm_drops(tree: Any) -> None:
    expected = _reference_prune(json.loads(json.dumps(tree)))
    got = engine._prune(json.loads(json.dumps(tree)))
    assert json.dumps(got) == json.dumps(expected)


@given(st.integers(0, 40))
def test_random_urns_are_version_4_uuids(count: int) -> None:
    urns = engine._random_urns(count)
    assert len(urns) == count == len(set(urns))
    for urn in urns:
        assert urn.startswith("urn:uuid:")
        parsed = uuid.UUID(urn.removeprefix("urn:uuid:"))
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert f"urn:uuid:{parsed}" == urn  # the same text uuid4() gives: lower-case, dashed
