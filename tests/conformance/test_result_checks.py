"""Result checks of the receiver suite: declared as data, identifiers unique per run, and they bite.

The wrong receivers are real servers on 127.0.0.1 port 0: a gateway whose destination gives up
(its messages go DEAD), and a FHIR API that answers what a faulty identity service would hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from conformance.per_run import PerRun, other_nir, parse_rules, targets
from conformance.report import Assertion, SuiteResult, to_html, to_json, to_junit
from conformance.runner import run_suite
from conformance.suite import DATA_DIR, Suite, SuiteError, find, load
from gateway.hl7.er7 import Message
from tests.conftest import ADMIN_TOKEN, GatewayFactory, mllp_port

IPP = "urn:oid:1.2.250.1.71.4.2.2.1234"
INS_NIR = "urn:oid:1.2.250.1.213.1.4.8"
MERGE = "merge-then-ins-change-then-movement-update"


def receiver_suite(*ids: str) -> Suite:
    suite = find("pam-fr-receiver")
    return dataclasses.replace(suite, cases=[c for c in suite.cases if c.id in ids])


def message(name: str) -> bytes:
    return (DATA_DIR / "hl7" / name).read_bytes()


def assertions(result: SuiteResult, case_id: str) -> list[Assertion]:
    return next(c for c in result.cases if c.id == case_id).assertions


# -- the suite as data ---------------------------------------------------------------------------


def suite_file(tmp_path: Path, then: str, per_run: str = "[{field: PID-3, type: PI}]") -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\nkind: mllp-receiver\n"
        f"per_run: {per_run}\n"
        "cases:\n"
        "  - id: one\n"
        "    steps:\n"
        "      - send: hl7/a31-ins-qualified.hl7\n"
        f"    then:\n{then}"
    )
    return path


GOOD_CHECK = (
    "      - search: Patient?identifier=urn:oid:1.2.250.1.71.4.2.2.1234|{run:200001}\n        count: 1\n"
)


def test_a_suite_of_my_own_with_checks_loads(tmp_path: Path) -> None:
    suite = load(suite_file(tmp_path, GOOD_CHECK))
    (check,) = suite.cases[0].then
    assert (check.key, check.resource_type, check.count) == ("then[0]", "Patient", 1)
    assert check.query == f"identifier={IPP}|{{run:200001}}"


@pytest.mark.parametrize(
    ("then", "key", "reason"),
    [
        (
            "      - search: Patient?identifier=a|b\n        cont: 1\n",
            r"then\[0\]\.cont",
            "unknown",
        ),
        ("      - search: Patient?identifier=a|b\n        count: -1\n", r"then\[0\]\.count", "whole number"),
        ("      - search: Patient?identifier=a|b\n        count: one\n", r"then\[0\]\.count", "whole number"),
        ("      - search: identifier=a|b\n", r"then\[0\]\.search", "FHIR search"),
        (
            "      - search: Patient?identifier=a|b\n        holds: ['foo(']\n",
            r"then\[0\]\.holds\[0\]",
            "does not compile",
        ),
        (
            "      - search: Patient?identifier=a|b\n        has_identifier: nobar\n",
            r"then\[0\]\.has_identifier",
            "SYSTEM",
        ),
        (
            "      - search: Patient?identifier=a|b\n        equals: [active]\n",
            r"then\[0\]\.equals",
            "mapping",
        ),
        ("      - search: Patient?identifier=a|b\n        linked: {type: x}\n", r"then\[0\]\.linked", "to:"),
        (
            "      - search: Patient?identifier=a|{run:999}\n",
            r"then\[0\]",
            r"\{run:999\} names no",
        ),
        ("      - Patient?identifier=a|b\n", r"then\[0\]", "mapping"),
    ],
)
def test_a_bad_check_is_named_by_file_and_key(tmp_path: Path, then: str, key: str, reason: str) -> None:
    with pytest.raises(SuiteError, match=rf"mine\.yaml: key 'cases\[0\]\.{key}'.*{reason}"):
        load(suite_file(tmp_path, then))


@pytest.mark.parametrize(
    ("per_run", "key", "reason"),
    [
        ("[{field: PID3}]", r"per_run\[0\]\.field", "a field such as PID-3"),
        ("[{field: MSH-10}]", r"per_run\[0\]\.field", "always made unique"),
        ("[{field: PID-3, as: rot13}]", r"per_run\[0\]\.as", "not one of suffix, nir"),
        ("[{field: PID-3, kind: PI}]", r"per_run\[0\]\.kind", "unknown"),
        ("{field: PID-3}", "per_run", "a list"),
        # the IPP is no NIR: said at load, with the step that carries it
        ("[{field: PID-3, type: PI, as: nir}]", r"cases\[0\]\.steps\[0\]\.send", "PID-3 \\(PI\\).*not a NIR"),
    ],
)
def test_a_bad_per_run_rule_is_named_by_file_and_key(
    tmp_path: Path, per_run: str, key: str, reason: str
) -> None:
    with pytest.raises(SuiteError, match=rf"mine\.yaml: key '{key}'.*{reason}"):
        load(suite_file(tmp_path, GOOD_CHECK, per_run))


def test_checks_belong_to_receiver_suites_and_steps_name_existing_files(tmp_path: Path) -> None:
    files = tmp_path / "files.yaml"
    files.write_text("name: f\nkind: files\ncases:\n  - id: x\n    then: []\n")
    with pytest.raises(SuiteError, match=r"files\.yaml: key 'cases\[0\]\.then': result checks are for"):
        load(files)
    missing = tmp_path / "missing.yaml"
    missing.write_text("name: m\nkind: mllp-receiver\ncases:\n  - id: x\n    steps: [{send: hl7/none.hl7}]\n")
    with pytest.raises(SuiteError, match=r"missing\.yaml: key 'cases\[0\]\.steps\[0\]\.send': data file"):
        load(missing)


def test_the_shipped_checks_load_with_their_run_values() -> None:
    suite = find("pam-fr-receiver")
    merge = next(c for c in suite.cases if c.id == MERGE)
    assert [c.count for c in merge.then] == [1, 1, 1, 0]
    merged = merge.then[2]
    assert merged.equals == (("active", False),)
    assert merged.linked[0].type == "replaced-by"
    assert merged.linked[0].to == f"{IPP}|{{run:300030}}"
    assert {r.label for r in suite.per_run} >= {"PID-3 (PI)", "PID-3 (INS)", "PV1-19", "ZBE-1", "MRG-1 (PI)"}


# -- identifiers unique per run --------------------------------------------------------------------


def test_a_run_sends_its_own_identifiers_and_checks_name_them() -> None:
    run = PerRun(find("pam-fr-receiver").per_run)
    sent, control_id = run.prepare(message("a31-ins-qualified.hl7"))
    msg = Message.decode(sent, default_charset="UNICODE UTF-8")
    assert control_id == msg.get("MSH-10") == f"CF{run.run_id}0001"
    assert msg.get("PID-3[1].1") == "200001" + run.digits
    assert msg.get("PID-3[1].4") == "HOPITAL-NORD&1.2.250.1.71.4.2.2.1234&ISO"  # the rest is kept
    ins = msg.get("PID-3[2].1")
    assert ins == other_nir("282032123456789", run.number) and ins != "282032123456789"
    assert msg.get("PID-3[2].5") == "INS"
    assert msg.get("PV1-19[1].1") == ""  # nothing authored, nothing sent
    # the same authored value gives the same run value in every message of the run
    second, second_id = run.prepare(message("a47-ins-change.hl7"))
    a47 = Message.decode(second, default_charset="UNICODE UTF-8")
    assert second_id == f"CF{run.run_id}0002"
    assert a47.get("PID-3[1].1") == msg.get("PID-3[1].1")
    assert a47.get("MRG-1[1].1") == ins  # the old INS of A47 is the one A31 sent
    assert (
        run.expand(f"Patient?identifier={IPP}|{{run:200001}}")
        == f"Patient?identifier={IPP}|200001{run.digits}"
    )
    with pytest.raises(SuiteError, match=r"\{run:999\}"):
        run.expand("{run:999}")
    # another run, other values
    other = PerRun(run.rules)
    again = Message.decode(
        other.prepare(message("a31-ins-qualified.hl7"))[0], default_charset="UNICODE UTF-8"
    )
    assert other.run_id != run.run_id
    assert again.get("PID-3[1].1") != msg.get("PID-3[1].1") and again.get("PID-3[2].1") != ins


def test_every_listed_field_of_the_shipped_messages_is_rewritten() -> None:
    suite = find("pam-fr-receiver")
    run = PerRun(suite.per_run)
    seen = set()
    for case in suite.cases:
        for step in case.steps:
            if step.get("raw"):
                continue
            original = Message.decode(suite.data(step["send"]).read_bytes(), default_charset="UNICODE UTF-8")
            authored = {(path, value) for path, value, _ in targets(original, suite.per_run)}
            sent = Message.decode(run.prepare(suite.data(step["send"]).read_bytes())[0])
            for path, value in authored:
                assert sent.get(path) not in ("", value), (step["send"], path)
                seen.add(path.split("[")[0])
    # IPP, INS, NDA, visit, movement, merged IPP and order numbers all occur in the shipped data
    assert {"PID", "PV1", "ZBE", "MRG", "OBR"} <= seen


def test_a_type_limits_the_rewrite_to_its_repetitions() -> None:
    run = PerRun(parse_rules([{"field": "PID-3", "type": "PI"}]))
    msg = Message.decode(run.prepare(message("a31-ins-qualified.hl7"))[0])
    assert msg.get("PID-3[1].1") == "200001" + run.digits
    assert msg.get("PID-3[2].1") == "282032123456789"  # INS: not listed, not touched


@given(st.integers(0, 10**13 - 1), st.integers(0, 10**13 - 1), st.integers(0, 999_999))
def test_another_nir_keeps_its_head_and_has_a_valid_key(a: int, b: int, shift: int) -> None:
    first, second = f"{a:013d}00", f"{a // 10**6:07d}{b % 10**6:06d}00"
    made = other_nir(first, shift)
    assert len(made) == 15 and made[:7] == first[:7]
    assert (int(made[:13]) + int(made[13:])) % 97 == 0  # the NIR key: 97 - (number mod 97)
    if first[:13] != second[:13]:
        assert other_nir(second, shift) != made  # distinct authored values stay distinct


# -- against receivers -----------------------------------------------------------------------------


Answer = Callable[[str, str], list[dict[str, Any]]]  # (system, value) searched → the Patients found
FhirFactory = Callable[[Answer], Awaitable["FakeFhir"]]


class FakeFhir:
    """A FHIR API answering Patient searches with what ``answer(system, value)`` returns."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.searches: list[str] = []  # the identifiers searched, as the server received them
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeFhir:
        app = web.Application()
        app.router.add_get("/fhir/Patient", self.search)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/fhir"
        return self

    async def search(self, request: web.Request) -> web.Response:
        token = request.query.get("identifier", "")
        self.searches.append(token)
        system, _, value = token.partition("|")
        entries = [{"resource": r, "search": {"mode": "match"}} for r in self.answer(system, value)]
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
        return web.Response(body=orjson.dumps(bundle), content_type="application/fhir+json")

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def fake_fhir() -> AsyncIterator[FhirFactory]:
    started: list[FakeFhir] = []

    async def make(answer: Answer) -> FakeFhir:
        server = FakeFhir(answer)
        started.append(server)
        return await server.start()

    yield make
    for server in started:
        await server.close()


def patient(id_: str, *identifiers: tuple[str, str], **fields: Any) -> dict[str, Any]:
    found = [{"system": s, "value": v} for s, v in identifiers]
    return {"resourceType": "Patient", "id": id_, "identifier": found, **fields}


async def test_two_patients_for_one_ipp_fail_the_identity_case(
    start_gateway: GatewayFactory, fake_fhir: FhirFactory
) -> None:
    gw = await start_gateway()  # ACKs AA, as a receiver that duplicated the patient still would
    fhir = await fake_fhir(
        lambda system, value: [patient("a", (system, value)), patient("b", (system, value))]
    )
    result = await run_suite(
        receiver_suite(MERGE), f"mllp://127.0.0.1:{mllp_port(gw)}", fhir=fhir.url, settle=0.5
    )
    assert not result.passed
    # the checks searched this run's IPP, not the authored one
    assert f"{IPP}|300030" not in fhir.searches
    assert any(s.startswith(f"{IPP}|300030") and len(s) > len(f"{IPP}|300030") for s in fhir.searches)
    found = assertions(result, MERGE)
    assert all(a.passed for a in found if a.check.startswith("ACK"))  # the ACKs alone said PASSED
    count = next(a for a in found if a.check == "FHIR-COUNT" and not a.passed)
    assert count.location.startswith(f"then[0] Patient?identifier={IPP}|300030")
    assert "one Patient for the survivor's IPP: exactly 1 expected; 2 match(es) (Patient/a, Patient/b)" in (
        count.message
    )
    # without --api the message statuses are skipped, not failed
    assert [a.result for a in found if a.check == "MSG-STATUS"] == ["SKIPPED"]


async def test_an_ins_kept_without_vali_fails_the_check_that_names_it(
    start_gateway: GatewayFactory, fake_fhir: FhirFactory
) -> None:
    gw = await start_gateway()

    def answer(system: str, value: str) -> list[dict[str, Any]]:
        # the IPP's patient, holding an INS although its identity was only provisional
        return [patient("p", (system, value), (INS_NIR, "290062199999999"))]

    fhir = await fake_fhir(answer)
    result = await run_suite(
        receiver_suite("ins-without-vali"), f"mllp://127.0.0.1:{mllp_port(gw)}", fhir=fhir.url, settle=0.2
    )
    assert not result.passed
    failed = {
        (a.check, a.location.split(" ")[0]) for a in assertions(result, "ins-without-vali") if a.is_error
    }
    assert failed == {("FHIR-HOLDS", "then[0]"), ("FHIR-COUNT", "then[1]")}
    holds = next(a for a in assertions(result, "ins-without-vali") if a.check == "FHIR-HOLDS")
    assert "not so on Patient/p" in holds.message
    assert "290062199999999" not in holds.message  # what the server holds is not reported


async def test_a_merged_record_left_active_and_unlinked_fails(
    start_gateway: GatewayFactory, fake_fhir: FhirFactory
) -> None:
    gw = await start_gateway()

    def answer(system: str, value: str) -> list[dict[str, Any]]:
        if value.startswith("300031"):  # the merged record: still active, linked to nothing
            return [patient("m", (system, value), active=True)]
        return [patient("s", (system, value))] if system == IPP else []

    fhir = await fake_fhir(answer)
    result = await run_suite(
        receiver_suite(MERGE), f"mllp://127.0.0.1:{mllp_port(gw)}", fhir=fhir.url, settle=0.2
    )
    failed = {a.check: a for a in assertions(result, MERGE) if a.is_error}
    assert {"FHIR-EQUALS", "FHIR-LINK", "FHIR-IDENTIFIER"} <= set(failed)
    assert "active = false; found true on Patient/m" in failed["FHIR-EQUALS"].message
    assert "has a link of type replaced-by" in failed["FHIR-LINK"].message


async def test_a_message_left_dead_fails_the_case_with_its_id_and_status(
    start_gateway: GatewayFactory,
) -> None:
    # the destination refuses for good: the message is ACKed AA, then goes DEAD
    gw = await start_gateway(
        queue=True, destinations=[{"name": "far", "type": "fake", "plan": ["permanent"]}]
    )
    result = await run_suite(
        receiver_suite("admission"),
        f"mllp://127.0.0.1:{mllp_port(gw)}",
        api=f"http://127.0.0.1:{gw.http_port_bound}/api",
        token=ADMIN_TOKEN,
        settle=10,
    )
    assert not result.passed
    (dead,) = await gw.store.list_messages(
        status="DEAD", control_id=None, channel=None, limit=10, before_seq=None
    )
    (status,) = [a for a in assertions(result, "admission") if a.check == "MSG-STATUS"]
    assert status.is_error
    assert status.location == f"step 1 MSH-10 {dead['control_id']}"
    assert f"message {dead['id']} (channel adt) is DEAD" in status.message


async def test_without_apis_the_result_checks_are_skipped_and_reported(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway()
    result = await run_suite(
        receiver_suite("prov-then-vali", "thin-result-keeps-identity"), f"mllp://127.0.0.1:{mllp_port(gw)}"
    )
    assert result.passed  # the ACK checks ran and passed; nothing was failed for want of an API
    report = orjson.loads(to_json(result))
    skipped = [a for c in report["cases"] for a in c["assertions"] if a["result"] == "SKIPPED"]
    assert report["counts"]["skipped"] == len(skipped) == 2 + 3  # 2 MSG-STATUS, 3 FHIR checks
    fhir = next(a for a in skipped if a["check"] == "FHIR")
    assert fhir["message"].endswith("not checked: no FHIR API given (--fhir URL)")
    assert fhir["location"].startswith(f"then[0] Patient?identifier={IPP}|300020")
    status = next(a for a in skipped if a["check"] == "MSG-STATUS")
    assert "no admin API given (--api" in status["message"]
    junit = ET.fromstring(to_junit(result))  # noqa: S314 - our own report, just written
    out = "".join(node.text or "" for node in junit.iter("system-out"))
    assert "[skipped] FHIR at then[0]" in out and junit.find(".//failure") is None
    page = to_html(result).decode()
    assert 'class="skipped"' in page and "SKIPPED" in page


async def test_the_identity_cases_pass_against_the_gateways_own_repository(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    mappings = Path(__file__).resolve().parents[2] / "mappings"
    gw = await start_gateway(
        queue=True,
        steps=[{"type": "fhir_mapping", "directory": str(mappings)}],
        destinations=[
            {"name": "repository", "type": "fhir_repository", "path": str(tmp_path / "var" / "fhir.db")}
        ],
    )
    http = f"http://127.0.0.1:{gw.http_port_bound}"
    result = await run_suite(
        receiver_suite("ins-without-vali", "prov-then-vali", MERGE, "thin-result-keeps-identity"),
        f"mllp://127.0.0.1:{mllp_port(gw)}",
        fhir=f"{http}/fhir",
        api=f"{http}/api",
        token=ADMIN_TOKEN,
    )
    failures = [
        (c.id, a.check, a.location, a.message) for c in result.cases for a in c.assertions if a.is_error
    ]
    assert result.passed, failures
    assert not any(a.skipped for c in result.cases for a in c.assertions)
