"""Every ANS reference message with a readable MSH, sent over MLLP as a hospital would, reaches the
built-in repository and the document store: acknowledged, delivered (never ERROR or DEAD), its
Patient found by its IPP, its documents published. The ANS files are read where they are kept
(``../shared/corpus/ans``), never copied."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from connectors.mllp.client import MllpClient
from gateway.engine.steps import FhirMapping
from gateway.hl7.er7 import Message
from tests.conftest import AUTH, make_config, mllp_port
from tests.hl7_leaves import read
from tests.mapping.test_corpus import CORPUS, LEGAL_MSH2, MAPPINGS

ANS = CORPUS / "ans"
# A document's life in the order a sender lives it: published, replaced, deleted.
_STAGE = ("initiale", "INIT", "Remplacement", "RPLC", "Suppression", "DEL")


def _stage(path: Path) -> int:
    return next((i // 2 for i, word in enumerate(_STAGE) if word in path.name), 0)


def _readable(path: Path) -> bool:
    try:
        return read(path.read_bytes()).raw("MSH", 2) in LEGAL_MSH2
    except ValueError:
        return False


FILES = sorted(
    (p for p in ANS.glob("*") if p.is_file() and "_ack" not in p.name and _readable(p)),
    key=lambda p: (_stage(p), p.name),
)


def _config(tmp_path: Path) -> Any:
    cfg = make_config(
        tmp_path,
        name="ans",
        steps=[{"type": "fhir_mapping", "directory": str(MAPPINGS), "missing_namespace": "sender"}],
        destinations=[{"name": "repository", "type": "fhir_repository", "path": "{data_dir}/fhir.db"}],
    )
    for source in cfg.data["sources"]:
        source["max_frame_bytes"] = 16 * 1024 * 1024  # the CDA-carrying ORUs are about 1 MB
    # The examples reuse control ids across different messages (a real sender would be answered
    # AE 205): each is taken as its own message here.
    cfg.data["channels"][0]["dedupe"] = False
    return cfg


async def _settled(gw: Any, count: int) -> dict[str, list[dict[str, Any]]]:
    by_status: dict[str, list[dict[str, Any]]] = {}
    for _ in range(600):
        by_status = {
            status: await gw.store.list_messages(
                status=status, control_id=None, channel="ans", limit=200, before_seq=None
            )
            for status in ("SENT", "ERROR", "DEAD")
        }
        if sum(len(rows) for rows in by_status.values()) >= count:
            break
        await asyncio.sleep(0.05)
    return by_status


@pytest.mark.skipif(not ANS.is_dir(), reason=f"the ANS reference messages are not at {ANS}")
async def test_every_ans_message_reaches_the_repository_and_the_document_store(
    start_gateway: Any, tmp_path: Path
) -> None:
    assert FILES, "no ANS message to send"
    gw = await start_gateway(_config(tmp_path))
    answers = {}
    for path in FILES:
        client = MllpClient("127.0.0.1", mllp_port(gw))
        try:
            ack = Message.decode(await client.send(path.read_bytes(), timeout=30))
            answers[path.name] = (ack.get("MSA-1"), ack.get("ERR-3.1"), ack.get("ERR-8"))
        finally:
            await client.close()
    refused = {name: answer for name, answer in answers.items() if answer[0] not in ("AA", "CA")}
    assert not refused
    settled = await _settled(gw, len(FILES))
    failed = [
        (row["control_id"], row["message_type"], row.get("error"))
        for row in settled["ERROR"] + settled["DEAD"]
    ]
    assert not failed, failed
    assert len(settled["SENT"]) == len(FILES)
    # each message's patient is in the repository, found by the IPP it was sent with
    base = f"http://127.0.0.1:{gw.http_port_bound}/fhir"
    async with aiohttp.ClientSession(headers=AUTH) as http:
        for path in FILES:
            ipp = read(path.read_bytes()).value("PID", 3, comp=1)
            async with http.get(f"{base}/Patient", params={"identifier": ipp}) as resp:
                found = await resp.json(content_type=None)
            assert resp.status == 200 and found["total"] >= 1, path.name
    # every document the mapping makes of these messages is in the repository (the examples reuse
    # document ids across files: one DocumentReference may stand for several messages)
    mapping = FhirMapping("ans", {"directory": str(MAPPINGS), "missing_namespace": "sender"})
    wanted = {
        f"{ident['system']}|{ident['value']}"
        for path in FILES
        for entry in mapping.convert(Message.decode(path.read_bytes())).bundle["entry"]
        if entry["resource"]["resourceType"] == "DocumentReference"
        for ident in entry["resource"]["identifier"][:1]
    }
    assert wanted
    for token in sorted(wanted):
        assert (await gw.fhir.search("DocumentReference", [("identifier", token)])).total == 1, token
