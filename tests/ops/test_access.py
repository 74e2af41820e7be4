"""Access control on by default: 401 without a credential, 403 without the role, per route."""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from structlog.testing import capture_logs

from gateway.http.auth import JwtAuthenticator, Role, TokenTable, ensure_admin_token, rule_for
from tests.conftest import ADMIN_TOKEN, GatewayFactory
from tests.messages import adt
from tests.ops.conftest import (
    HS_SECRET,
    OPERATOR,
    PATIENT,
    PROFESSIONAL,
    base_url,
    bearer,
    ops_config,
)


async def _get(http: aiohttp.ClientSession, url: str, token: str | None = None) -> tuple[int, Any]:
    async with http.get(url, headers=bearer(token) if token else {}) as resp:
        body = await resp.json(content_type=None) if resp.content_type.endswith("json") else await resp.text()
        return resp.status, body


async def test_every_protected_route_needs_a_token_and_the_right_role(
    tmp_path: Path, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(ops_config(tmp_path))
    base = base_url(gw)
    # open routes
    for path in ("/health", "/ready", "/fhir/metadata", "/console/"):
        status, _ = await _get(http, base + path)
        assert status == 200, path
    # no credential: 401 with a FHIR OperationOutcome, code "login"
    for path in ("/api/messages", "/api/stats", "/api/dlq", "/fhir/Patient", "/fhir/AuditEvent", "/metrics"):
        status, body = await _get(http, base + path)
        assert status == 401, path
        assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "login"
    # an unknown credential is a 401 too
    status, _ = await _get(http, base + "/api/messages", "not-a-known-token-at-all")
    assert status == 401
    # role table: (path, token) -> status
    expected = {
        ("/api/messages", ADMIN_TOKEN): 200,
        ("/api/messages", OPERATOR): 200,
        ("/api/messages", PROFESSIONAL): 403,
        ("/api/messages", PATIENT): 403,
        ("/metrics", OPERATOR): 200,
        ("/metrics", PATIENT): 403,
        ("/fhir/AuditEvent", OPERATOR): 200,
        ("/fhir/AuditEvent", PROFESSIONAL): 403,
    }
    for (path, token), want in expected.items():
        status, body = await _get(http, base + path, token)
        assert status == want, (path, token[:8], body)
        if want == 403:
            assert body["issue"][0]["code"] == "forbidden"
    # /fhir lets any authenticated caller through to the handlers, which apply the per-resource rules
    for token in (PROFESSIONAL, PATIENT, OPERATOR):
        status, _ = await _get(http, base + "/fhir/Patient?_count=1", token)
        assert status not in (401, 404), token[:8]


async def test_reveal_needs_the_operator_role_and_is_audited(
    tmp_path: Path, start_gateway: GatewayFactory, client_for: Any, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(ops_config(tmp_path))
    await client_for(gw).send(adt("REVEAL1"))
    base = base_url(gw)
    status, listed = await _get(http, base + "/api/messages?control_id=REVEAL1", OPERATOR)
    mid = listed["messages"][0]["id"]
    status, masked = await _get(http, f"{base}/api/messages/{mid}", OPERATOR)
    assert status == 200 and masked["masked"] is True and "LEFÈVRE" not in masked["raw"]
    status, shown = await _get(http, f"{base}/api/messages/{mid}?reveal=true", OPERATOR)
    assert status == 200 and shown["masked"] is False and "LEFÈVRE" in shown["raw"]
    await gw.audit.flush()
    rows = await gw.audit.search(agent="op-1")
    reveals = [r for _, r in rows if r.get("outcomeDesc") == "reveal of masked message data"]
    assert len(reveals) == 1
    assert reveals[0]["entity"][0]["what"]["identifier"]["value"] == mid
    assert reveals[0]["outcome"] == "0"


async def test_first_start_writes_an_admin_token_file_and_logs_only_its_path(
    tmp_path: Path, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    with capture_logs() as logs:
        gw = await start_gateway(ops_config(tmp_path, auth={}))
    path = gw.data_dir / "admin-token"
    token = path.read_text().strip()
    assert len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    events = [e for e in logs if e["event"] == "admin_token_file"]
    assert events == [{"event": "admin_token_file", "path": str(path), "log_level": "info"}]
    assert all(token not in repr(e) for e in logs)
    status, _ = await _get(http, base_url(gw) + "/api/stats", token)
    assert status == 200
    await gw.stop()
    # a second start keeps the same token
    assert ensure_admin_token(path) == token


async def test_configured_admin_means_no_token_file(tmp_path: Path, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(ops_config(tmp_path))
    assert not (gw.data_dir / "admin-token").exists()


def _hs(claims: dict[str, Any], key: str = HS_SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


def test_jwt_hs256_claims_become_a_caller() -> None:
    auth = JwtAuthenticator({"keys": [{"algorithm": "HS256", "secret": HS_SECRET}], "issuer": "idp"})
    now = int(time.time())
    good = {
        "sub": "u-42",
        "role": "professional",
        "practitioner": "8|810000000001",
        "exp": now + 60,
        "iss": "idp",
    }
    caller = auth.authenticate(_hs(good))
    assert caller is not None
    assert (caller.subject, caller.role, caller.practitioner) == ("u-42", Role.PROFESSIONAL, "8|810000000001")
    patient = auth.authenticate(
        _hs({**good, "role": "patient", "patients": ["s|1"], "scope": "read write", "practitioner": None})
    )
    assert patient is not None and patient.patients == ("s|1",) and patient.scopes == {"read", "write"}
    refused = [
        {**good, "exp": now - 3600},  # expired
        {k: v for k, v in good.items() if k != "exp"},  # no expiry
        {**good, "iss": "someone-else"},  # wrong issuer
        {**good, "role": "superuser"},  # unknown role
        {k: v for k, v in good.items() if k != "sub"},  # no subject
        {**good, "role": "patient", "patients": ["552233"]},  # an identifier without its system
    ]
    for claims in refused:
        assert auth.authenticate(_hs(claims)) is None, claims
    assert auth.authenticate(_hs(good, key="another-secret-of-sufficient-length-000000")) is None
    unsigned = jwt.encode(good, key=None, algorithm="none")  # type: ignore[arg-type]
    assert auth.authenticate(unsigned) is None
    assert auth.authenticate("not.a.jwt") is None


def test_jwt_rs256_with_a_public_key_file(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "idp.pem").write_bytes(pem)
    auth = JwtAuthenticator(
        {"keys": [{"algorithm": "RS256", "public_key_file": "idp.pem"}]}, base_dir=tmp_path
    )
    claims = {"sub": "op-9", "role": "operator", "exp": int(time.time()) + 60}
    token = jwt.encode(claims, private, algorithm="RS256")
    caller = auth.authenticate(token)
    assert caller is not None and caller.role is Role.OPERATOR
    # An HS256 token signed with the public key as a secret (algorithm confusion) is refused.
    forged = jwt.encode(claims, "x" * 64, algorithm="HS256")
    assert auth.authenticate(forged) is None


async def test_jwt_tokens_work_against_the_running_gateway(
    tmp_path: Path, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    jwt_settings = {"audience": "passerelle", "keys": [{"algorithm": "HS256", "secret": HS_SECRET}]}
    gw = await start_gateway(ops_config(tmp_path, auth={"jwt": jwt_settings}))
    exp = int(time.time()) + 60
    operator = _hs({"sub": "op-7", "role": "operator", "exp": exp, "aud": "passerelle"})
    patient = _hs({"sub": "pat-7", "role": "patient", "exp": exp, "aud": "passerelle"})
    assert (await _get(http, base_url(gw) + "/api/stats", operator))[0] == 200
    assert (await _get(http, base_url(gw) + "/api/stats", patient))[0] == 403
    assert (await _get(http, base_url(gw) + "/api/stats"))[0] == 401
    assert not (gw.data_dir / "admin-token").exists()  # JWT keys are an admin credential


def test_token_table_accepts_digests_and_rules_default_to_authenticated() -> None:
    import hashlib

    table = TokenTable(
        [{"token_sha256": hashlib.sha256(b"t" * 20).hexdigest(), "subject": "s", "role": "admin"}]
    )
    caller = table.authenticate("t" * 20)
    assert caller is not None and caller.role is Role.ADMIN
    assert rule_for("/somewhere/else").roles == ()
    assert rule_for("/fhir/AuditEvent/1").roles == (Role.OPERATOR,)
    assert rule_for("/fhirx").roles == ()  # a prefix is a path segment, not a string prefix
    assert rule_for("/health").roles is None


async def test_request_rate_is_limited_per_client_with_429(
    tmp_path: Path, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(ops_config(tmp_path, http={"rate_limit": {"requests_per_s": 0.5, "burst": 3}}))
    statuses = [(await _get(http, base_url(gw) + "/api/stats", OPERATOR))[0] for _ in range(5)]
    assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
    async with http.get(base_url(gw) + "/api/stats", headers=bearer(OPERATOR)) as resp:
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) >= 1
        body = await resp.json(content_type=None)
        assert body["issue"][0]["code"] == "throttled"
    # another client has its own bucket; health stays open
    assert (await _get(http, base_url(gw) + "/api/stats", ADMIN_TOKEN))[0] == 200
    assert (await _get(http, base_url(gw) + "/health"))[0] == 200


@pytest.mark.parametrize("size", [20_000])
async def test_oversized_headers_are_refused(
    tmp_path: Path, start_gateway: GatewayFactory, http: aiohttp.ClientSession, size: int
) -> None:
    gw = await start_gateway(ops_config(tmp_path, http={"max_header_bytes": 4096}))
    async with http.get(base_url(gw) + "/health", headers={"X-Big": "a" * size}) as resp:
        assert resp.status in (400, 431)
    async with http.get(base_url(gw) + "/health") as resp:
        assert resp.status == 200  # and the server still serves


async def test_console_files_carry_a_strict_content_security_policy(
    tmp_path: Path, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(ops_config(tmp_path))
    for name in ("", "app.js", "style.css"):
        async with http.get(f"{base_url(gw)}/console/{name}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
    async with http.get(f"{base_url(gw)}/console/../config.yaml") as resp:
        assert resp.status == 401  # normalised to /config.yaml: no such open route
    async with http.get(f"{base_url(gw)}/console/secrets.txt") as resp:
        assert resp.status == 404
