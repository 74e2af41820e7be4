"""HTTP edge findings: rate limiting by caller, ITI-68 headers, audit fail-closed on reads."""

from __future__ import annotations

import secrets
from pathlib import Path

import aiohttp

from tests.conftest import GatewayFactory
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
