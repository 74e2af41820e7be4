"""TLS for ``passerelle send`` (mllps://) and for the FHIR REST destination: real handshakes with
certificates made by the tests (trustme)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from aiohttp import web

from connectors.fhir_rest import FhirRestDestination
from gateway.cli import main
from gateway.core.errors import ConfigError, RetryLater
from gateway.core.status import Status
from gateway.core.tls import peer_subject, server_context
from tests.conftest import GatewayFactory, mllp_port
from tests.messages import adt
from tests.ops.test_tls import Pki, _tls_config
from tests.test_fhir_rest import BUNDLE, envelope


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    root = tmp_path / "pki"
    root.mkdir()
    return Pki(root)


# -- passerelle send mllps:// ------------------------------------------------------------------------


async def run_cli(*argv: str) -> int:
    # main() runs its own event loop: in a thread, beside the test's loop serving the gateway.
    return await asyncio.to_thread(main, list(argv))


async def test_send_over_mtls_with_ca_cert_and_key(
    tmp_path: Path, pki: Pki, start_gateway: GatewayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = await start_gateway(_tls_config(tmp_path, {"tls": pki.server_tls(require_client_cert=True)}))
    message = tmp_path / "a01.hl7"
    message.write_bytes(adt("SENDTLS1"))
    cert, key = pki.client("lab")
    to = f"mllps://127.0.0.1:{mllp_port(gw)}"
    code = await run_cli("send", str(message), "--to", to, "--tls-ca", str(pki.ca_file),
                         "--tls-cert", str(cert), "--tls-key", str(key))  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "MSA|AA|SENDTLS1" in out

    # the server asks for a client certificate: without one there is no answer (exit 1)
    message.write_bytes(adt("SENDTLS2"))
    assert await run_cli("send", str(message), "--to", to, "--tls-ca", str(pki.ca_file)) == 1
    assert "no answer" in capsys.readouterr().err
    # a server whose authority is not trusted (the system store does not know the test CA): exit 1
    assert (
        await run_cli("send", str(message), "--to", to, "--tls-cert", str(cert), "--tls-key", str(key)) == 1
    )
    assert "no answer" in capsys.readouterr().err
    rows = await gw.store.list_messages(
        status=None, control_id="SENDTLS2", channel=None, limit=5, before_seq=None
    )
    assert rows == []


async def test_send_over_tls_without_client_certificate(
    tmp_path: Path, pki: Pki, start_gateway: GatewayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = await start_gateway(_tls_config(tmp_path, {"tls": pki.server_tls()}))
    message = tmp_path / "a01.hl7"
    message.write_bytes(adt("SENDTLS3"))
    to = f"mllps://127.0.0.1:{mllp_port(gw)}"
    assert await run_cli("send", str(message), "--to", to, "--tls-ca", str(pki.ca_file)) == 0
    assert "MSA|AA|SENDTLS3" in capsys.readouterr().out
    # plain MLLP to a TLS port gets no HL7 answer
    assert (
        await run_cli("send", str(message), "--to", f"mllp://127.0.0.1:{mllp_port(gw)}", "--timeout", "3")
        == 1
    )


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--to", "mllp://127.0.0.1:2575", "--tls-ca", "ca.pem"], "mllps://"),  # TLS options need mllps
        (["--to", "mllps://127.0.0.1:2575", "--tls-cert", "lab.pem"], "together"),
        (["--to", "mllps://127.0.0.1:2575", "--tls-ca", "missing.pem"], "no such file"),
        (["--to", "https://127.0.0.1:2575"], "mllps://HOST:PORT"),
    ],
)
async def test_send_tls_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    message = tmp_path / "a01.hl7"
    message.write_bytes(adt("USAGE1"))
    assert await run_cli("send", str(message), *extra) == 2
    assert needle in capsys.readouterr().err


# -- FHIR REST destination over https -----------------------------------------------------------------


class HttpsFhirServer:
    """An https FHIR endpoint on 127.0.0.1 that records each request's client-certificate subject."""

    def __init__(self) -> None:
        self.subjects: list[str | None] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.subjects.append(
            peer_subject(request.transport.get_extra_info("ssl_object") if request.transport else None)
        )
        return web.json_response({"resourceType": "Bundle", "type": "transaction-response"})


async def serve_https(pki: Pki, **tls: Any) -> AsyncIterator[HttpsFhirServer]:
    server = HttpsFhirServer()
    app = web.Application()
    app.router.add_post("/fhir", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(pki.server_tls(**tls)))
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def mtls_server(pki: Pki) -> AsyncIterator[HttpsFhirServer]:
    async for server in serve_https(pki, require_client_cert=True):
        yield server


async def deliver(settings: dict[str, Any]) -> Any:
    dest = FhirRestDestination("ehr", settings)
    try:
        return await dest.send(envelope(), BUNDLE)
    finally:
        await dest.aclose()


async def test_fhir_rest_over_mtls(pki: Pki, mtls_server: HttpsFhirServer) -> None:
    cert, key = pki.client("passerelle")
    base = f"https://127.0.0.1:{mtls_server.port}/fhir"
    result = await deliver(
        {"base_url": base, "tls": {"ca": str(pki.ca_file), "cert": str(cert), "key": str(key)}}
    )
    assert result.status is Status.SENT
    assert orjson.loads(result.response)["type"] == "transaction-response"
    (subject,) = mtls_server.subjects
    assert (
        subject is not None and subject.startswith("CN=passerelle,") and subject.endswith(",O=Hopital Nord")
    )

    # no client certificate: the handshake fails, and the delivery is retried later
    with pytest.raises(RetryLater):
        await deliver({"base_url": base, "tls": {"ca": str(pki.ca_file)}})
    # a server certificate from an authority not trusted: refused too
    with pytest.raises(RetryLater):
        await deliver({"base_url": base, "tls": {"cert": str(cert), "key": str(key)}})
    other = trustme.CA()
    other_file = pki.root / "other-ca.pem"
    other.cert_pem.write_to_path(str(other_file))
    with pytest.raises(RetryLater):
        await deliver({"base_url": base, "tls": {"ca": str(other_file), "cert": str(cert), "key": str(key)}})
    assert len(mtls_server.subjects) == 1  # none of the refused handshakes reached the handler


def test_fhir_rest_tls_settings_are_checked_at_load(pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"https://") as http_only:
        FhirRestDestination("ehr", {"base_url": "http://127.0.0.1:1/fhir", "tls": {"ca": str(pki.ca_file)}})
    assert http_only.value.key == "destinations.ehr.tls"
    with pytest.raises(ConfigError, match="no such file") as missing:
        FhirRestDestination(
            "ehr", {"base_url": "https://127.0.0.1:1/fhir", "tls": {"ca": "/nonexistent/ca.pem"}}
        )
    assert missing.value.key == "destinations.ehr.tls.ca"


async def test_gateway_config_rejects_a_client_cert_without_its_key(
    tmp_path: Path, pki: Pki, start_gateway: GatewayFactory
) -> None:
    cert, _ = pki.client("passerelle")
    cfg = _tls_config(tmp_path, {})
    cfg.data["channels"][0]["destinations"] = [
        {
            "name": "ehr",
            "type": "fhir_rest",
            "base_url": "https://127.0.0.1:1/fhir",
            "tls": {"cert": str(cert)},
        }
    ]
    with pytest.raises(ConfigError, match="key"):
        await start_gateway(cfg)
