"""The shared corpus of real HL7v2 messages (../shared/corpus) through the FHIR mapping and over MLLP.

Per message file (acknowledgements and Microsoft's expected Bundles aside): the mapping refuses it
only as the mappings say (``mappings/unsupported.yaml``), or its Bundle loses no leaf silently
(tests/hl7_leaves.py), its unmapped report names only real leaves, every conditional key is
namespaced, and the Bundle passes the R4B models and the profiles it claims.

Then every file, acknowledgements and corrupted ones included, is sent to a real gateway, which
must answer by the ACK rules. Nothing here hard-codes what a corpus file holds: expectations are
read from each file's own header.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import yaml

from conformance.fhir.registry import default_registry
from connectors.mllp.client import MllpClient
from gateway.core.errors import FrameError, MessageError
from gateway.engine.steps import FhirMapping
from gateway.hl7.er7 import Message
from gateway.mapping.validate import bundle_errors
from tests.conftest import make_config, mllp_port
from tests.hl7_leaves import Er7, leaves, read, silent_leaves, unknown_paths

ROOT = Path(__file__).parents[2]
CORPUS = ROOT.parent / "shared" / "corpus"
MAPPINGS = ROOT / "mappings"
UNSUPPORTED = MAPPINGS / "unsupported.yaml"

if not CORPUS.is_dir():
    pytest.skip(
        f"the shared corpus of real messages is not at {CORPUS} (tests read it there, never a copy)",
        allow_module_level=True,
    )


def _is_message_file(path: Path) -> bool:
    if not path.is_file() or "expected" in path.relative_to(CORPUS).parts:
        return False
    return not path.name.upper().startswith(("README", "LICENSE")) and path.suffix not in (".md", ".json")


FILES = sorted(p for p in CORPUS.rglob("*") if _is_message_file(p))
MAPPED = [p for p in FILES if "_ack." not in p.name]


def name_of(path: Path) -> str:
    return path.relative_to(CORPUS).as_posix()


@functools.cache
def step() -> FhirMapping:
    return FhirMapping("corpus", {"directory": str(MAPPINGS), "missing_namespace": "sender"})


def unsupported_events() -> dict[str, Any]:
    """``mappings/unsupported.yaml`` as data: event (``ADT^A08``, ``BAR^*``) → reason."""
    if not UNSUPPORTED.is_file():
        return {}
    data = yaml.safe_load(UNSUPPORTED.read_text("utf-8"))
    return {str(k): v for k, v in data.items()} if isinstance(data, dict) else {}


def event_of(msg: Er7) -> tuple[str, str]:
    return msg.value("MSH", 9, comp=1), msg.value("MSH", 9, comp=2)


# -- conditional keys --------------------------------------------------------------------------


def _search_params(query: str) -> Iterator[tuple[str, str]]:
    for part in query.split("&"):
        name, _, value = part.partition("=")
        for alternative in value.split(","):
            yield unquote(name), unquote(alternative)


def keys_without_system(bundle: dict[str, Any]) -> list[str]:
    """Conditional keys (``Type?identifier=…``, ``ifNoneExist``) whose token has no system."""
    bad = []
    for i, entry in enumerate(bundle.get("entry", [])):
        request = entry.get("request") or {}
        url = str(request.get("url", ""))
        queries = [url.split("?", 1)[1]] if "?" in url else []
        if request.get("ifNoneExist") is not None:
            queries.append(str(request["ifNoneExist"]))
        for query in queries:
            for name, value in _search_params(query):
                is_identifier = name.split(":")[0].split(".")[-1] == "identifier"
                # a bare value or "|value" (the "=|" form) would match another sender's identifier
                system, bar, _ = value.partition("|")
                if (is_identifier and not bar) or (bar and not system.strip()):
                    bad.append(f"entry[{i}].request: {name}={value}")
    return bad


def profile_errors(bundle: dict[str, Any]) -> list[str]:
    out = []
    for i, entry in enumerate(bundle.get("entry", [])):
        resource = entry.get("resource") or {}
        if not resource.get("meta", {}).get("profile"):
            continue
        for finding in default_registry().validate(resource):
            if finding.is_error:
                out.append(f"entry[{i}] {finding.rule} {finding.location}: {finding.message}")
    return out


def test_keys_without_system_are_found() -> None:
    bundle = {
        "entry": [
            {"request": {"method": "PUT", "url": "Patient?identifier=urn:oid:1.2|123"}},
            {"request": {"method": "PUT", "url": "Encounter?identifier=|V1"}},
            {"request": {"method": "PUT", "url": "Observation?identifier=O1"}},
            {"request": {"method": "POST", "url": "Basic", "ifNoneExist": "identifier=%7CX"}},
            {"request": {"method": "POST", "url": "List", "ifNoneExist": "identifier=urn:ietf:rfc:3986|L"}},
        ]
    }
    assert keys_without_system(bundle) == [
        "entry[1].request: identifier=|V1",
        "entry[2].request: identifier=O1",
        "entry[3].request: identifier=|X",
    ]


# -- mapping each file -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def silent_summary(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Collects one line per file; printed once the module's mapping tests have run."""
    lines: dict[str, str] = {}
    yield lines
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and lines:
        reporter.write_line("")
        reporter.write_line("corpus leaves (file: leaves, silent, unknown report paths):")
        for name, line in sorted(lines.items()):
            reporter.write_line(f"  {name}: {line}")


@pytest.mark.parametrize("path", MAPPED, ids=name_of)
def test_corpus_message_maps_without_silent_loss(
    path: Path, silent_summary: dict[str, str], record_property: Any
) -> None:
    name = name_of(path)
    raw = path.read_bytes()
    try:
        message = Message.decode(raw, default_charset="8859/15")
    except MessageError as exc:
        # an acceptable refusal (a corrupted MSH-2, say): recorded, and answered by the ACK test below
        record_property("refused", f"decode: {type(exc).__name__}: {exc.message}")
        silent_summary[name] = f"refused at decoding ({type(exc).__name__})"
        return
    try:
        result = step().convert(message)
    except MessageError as exc:
        refusal: MessageError | None = exc
    else:
        refusal = None
    if refusal is not None:
        msg_type, trigger = event_of(read(raw))
        event = f"{msg_type}^{trigger}"
        listed = unsupported_events()
        reason = next((listed[k] for k in (event, f"{msg_type}^*", msg_type) if k in listed), None)
        what = f"{type(refusal).__name__}: {refusal.message}"
        record_property("refused", f"mapping: {what}")
        silent_summary[name] = f"refused {event} ({type(refusal).__name__})"
        assert isinstance(reason, str) and reason.strip(), (
            f"{name}: {event} refused ({what}) but not listed with a reason in {UNSUPPORTED.name}"
        )
        return
    bundle, unmapped = result.bundle, list(result.unmapped)
    silent = silent_leaves(raw, bundle, unmapped)
    unknown = unknown_paths(raw, unmapped)
    count = sum(1 for leaf in leaves(raw) if not leaf.exempt)
    summary = f"{count} leaves, {len(silent)} silent, {len(unknown)} unknown"
    silent_summary[name] = summary
    record_property("silent_leaves", len(silent))
    print(f"{name}: {summary}")
    problems = {
        "silent leaves": [f"{leaf.path} = {leaf.value[:40]!r}" for leaf in silent],
        "report paths that are no leaf": unknown,
        "conditional keys without a system": keys_without_system(bundle),
        "Bundle errors": bundle_errors(bundle),
        "profile errors": profile_errors(bundle),
    }
    found = {k: v for k, v in problems.items() if v}
    assert not found, f"{name}:\n" + "\n".join(
        f"  {kind} ({len(items)}):\n" + "\n".join(f"    {item}" for item in items[:40])
        for kind, items in found.items()
    )


# -- over MLLP -----------------------------------------------------------------------------------

LEGAL_MSH2 = ("^~\\&", "^~\\&#")  # the four usual encoding characters, and v2.7's truncation one
QUIET_S = 2.0  # how long an unanswered message is watched for an answer that must not come
ANSWER_S = 30.0
FAILURES = ("AE", "AR", "CE", "CR")
SUCCESSES = ("AA", "CA")


def hospital_channel() -> dict[str, Any]:
    """The repository's config.yaml channel that maps to FHIR, pointed at this checkout's mappings."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text("utf-8"))
    channel = next(
        c for c in config["channels"] if any(s["type"] == "fhir_mapping" for s in c.get("steps", []))
    )
    for s in channel["steps"]:
        if s["type"] == "fhir_mapping":
            s["directory"] = str(MAPPINGS)
            s["missing_namespace"] = "sender"
    return channel


def ack_problems(name: str, raw: bytes, answer: bytes | None) -> list[str]:
    """What the answer (None: nothing came) does wrong for this file by the ACK rules."""
    try:
        sent: Er7 | None = read(raw)
    except ValueError:
        sent = None
    corrupted = sent is not None and sent.raw("MSH", 2) not in LEGAL_MSH2
    accept = sent.value("MSH", 15).upper() if sent is not None and not corrupted else ""
    if answer is None:
        if accept == "NE" or accept == "ER":
            return []  # NE never answers, ER only a failure
        if accept == "SU":
            return []  # SU answers only a success; unanswered means it failed
        return [f"{name}: no answer"]
    if accept == "NE":
        return [f"{name}: answered though MSH-15 is NE"]
    try:
        ack = read(answer)
    except ValueError:
        return [f"{name}: the answer is no HL7 message: {answer[:40]!r}"]
    out = []
    code = ack.value("MSA", 1)
    if accept == "ER" and code in SUCCESSES:
        out.append(f"{name}: MSH-15 is ER but a success ({code}) was sent")
    if sent is not None and (control_id := sent.value("MSH", 10)) and ack.value("MSA", 2) != control_id:
        out.append(f"{name}: MSA-2 {ack.value('MSA', 2)!r} does not echo MSH-10 {control_id!r}")
    errs = [seg.occurrence for seg in ack.segments if seg.name == "ERR"]
    if code in FAILURES and not any(ack.value("ERR", 3, occurrence=n) for n in errs):
        out.append(f"{name}: {code} without an ERR carrying ERR-3")
    if code not in FAILURES + SUCCESSES:
        out.append(f"{name}: MSA-1 is {code!r}")
    if corrupted:
        at_msh2 = any(
            ack.value("ERR", 2, comp=1, occurrence=n) == "MSH"
            and ack.value("ERR", 2, comp=3, occurrence=n) == "2"
            for n in errs
        )
        if code != "AR" or not at_msh2:
            out.append(f"{name}: corrupted MSH-2 answered {code} without an ERR-2 at MSH-2")
    return out


def test_ack_problems_follow_the_rules() -> None:
    msg = b"MSH|^~\\&|A|F|G|H|20240306||ADT^A01|C1|P|2.5\rPID|||1\r"
    good = b"MSH|^~\\&|G|H|A|F|20240306||ACK^A01^ACK|X|P|2.5\rMSA|AA|C1\r"
    assert ack_problems("m", msg, good) == []
    assert ack_problems("m", msg, None) == ["m: no answer"]
    assert ack_problems("m", msg, good.replace(b"|C1", b"|C2")) == ["m: MSA-2 'C2' does not echo MSH-10 'C1'"]
    assert ack_problems("m", msg, good.replace(b"AA", b"AE")) == ["m: AE without an ERR carrying ERR-3"]
    refused = good.replace(b"AA", b"AE") + b"ERR||PID^1^3|101^x^HL70357|E\r"
    assert ack_problems("m", msg, refused) == []
    never = msg.replace(b"2.5\r", b"2.5|||NE\r")
    assert ack_problems("m", never, None) == []
    assert ack_problems("m", never, good) == ["m: answered though MSH-15 is NE"]
    on_error = msg.replace(b"2.5\r", b"2.5|||ER|AL\r")
    assert ack_problems("m", on_error, None) == []
    assert ack_problems("m", on_error, good.replace(b"AA", b"CA")) == [
        "m: MSH-15 is ER but a success (CA) was sent"
    ]
    tilde = "MSH|^˜\\&|A|F|G|H|20240306||ORU^R01|015|P|2.5|||NE\r".encode()
    assert ack_problems("m", tilde, None) == ["m: no answer"]  # unreadable: MSH-15 cannot be trusted
    at_msh2 = b"MSH|^~\\&|G|H|A|F|20240306||ACK|X|P|2.5\rMSA|AR|015\rERR||MSH^1^2^1|102^x^HL70357|E\r"
    assert ack_problems("m", tilde, at_msh2) == []
    assert ack_problems("m", tilde, at_msh2.replace(b"MSH^1^2^1", b"MSH^1^9")) == [
        "m: corrupted MSH-2 answered AR without an ERR-2 at MSH-2"
    ]


async def test_every_corpus_file_is_answered_by_the_ack_rules(start_gateway, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, **hospital_channel())
    for source in cfg.data["sources"]:
        source["max_frame_bytes"] = 16 * 1024 * 1024  # the CDA-carrying ORUs are about 1 MB
    gw = await start_gateway(cfg)
    problems: list[str] = []
    for path in FILES:
        raw = path.read_bytes()
        try:
            header: Er7 | None = read(raw)
        except ValueError:
            header = None
        quiet = header is not None and header.value("MSH", 15).upper() in ("NE", "ER", "SU")
        # one connection per file: an answer that comes late cannot be taken for the next file's
        client = MllpClient("127.0.0.1", mllp_port(gw))
        try:
            answer: bytes | None = await client.send(raw, timeout=QUIET_S if quiet else ANSWER_S)
        except (TimeoutError, ConnectionError, FrameError):
            answer = None
        finally:
            await client.close()
        problems += ack_problems(name_of(path), raw, answer)
    assert not problems, "\n".join(problems)
