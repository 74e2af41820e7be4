"""HTTP edge findings: rate limiting by caller, ITI-68 headers, audit fail-closed on reads."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.core.errors import StoreError
from tests.conftest import ADMIN_TOKEN, GatewayFactory
from tests.fhir.conftest import patient
from tests.ops.conftest import OPERATOR, base_url, bearer, ops_config


async def test_rotating_unknown_tokens_share_their_address_bucket(
    tmp_path: Path, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(ops_config(tmp_path, http={"rate_limit": {"requests_per_s": 0.01, "burst": 3}}))
    statuses = []
    for _ in range(6):
        async with http.get(base_url(gw) + "/api/stats", headers=bearer(secrets.token_urlsafe(24))) as resp:
            statuses.append(resp.status)
    assert statuses[:3] == [401, 401, 401]
    assert statuses[3:] == [429, 429, 429]  # a fresh made-up token buys no fresh bucket
    # a recognised caller is keyed on its subject, not on the address the forgers used up
    async with http.get(base_url(gw) + "/api/stats", headers=bearer(OPERATOR)) as resp:
        assert resp.status == 200


def _batch_of(*entries: dict[str, Any]) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": list(entries)})


async def test_reads_by_post_are_refused_when_they_cannot_be_audited(
    tmp_path: Path,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = await start_gateway(ops_config(tmp_path))
    base = base_url(gw)
    headers = {**bearer(ADMIN_TOKEN), "Content-Type": "application/fhir+json"}

    async def cannot_write(resource: Any) -> None:
        raise StoreError("audit database unavailable")

    monkeypatch.setattr(gw.audit, "write", cannot_write)
    async with http.get(f"{base}/fhir/Patient?_id=p1", headers=bearer(ADMIN_TOKEN)) as resp:
        assert resp.status == 503
    reads = _batch_of({"request": {"method": "GET", "url": "Patient?_id=p1"}})
    async with http.post(f"{base}/fhir", data=reads, headers=headers) as resp:
        assert resp.status == 503  # a Bundle made of reads is a read
        assert (await resp.json(content_type=None))["issue"][0]["code"] == "transient"
    writes = _batch_of({"request": {"method": "PUT", "url": "Patient/p2"}, "resource": patient()})
    async with http.post(f"{base}/fhir", data=writes, headers=headers) as resp:
        assert resp.status == 200  # a write is answered: refusing it would not undo it


async def test_a_crashing_request_is_audited_as_a_serious_failure(
    tmp_path: Path,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = await start_gateway(ops_config(tmp_path))

    async def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(gw.fhir, "read", crash)
    async with http.get(f"{base_url(gw)}/fhir/Patient/p9", headers=bearer(ADMIN_TOKEN)) as resp:
        assert resp.status == 500
    await gw.audit.flush()
    found = await gw.audit.search(action="R")
    failures = [r for _, r in found if r["outcome"] == "8"]
    assert len(failures) == 1
    assert failures[0]["entity"][0]["what"]["reference"] == "Patient/p9"
