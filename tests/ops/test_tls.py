"""TLS and mTLS on MLLP (source and destination) and HTTP, with certificates made by the tests."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml

from connectors.mllp.client import MllpClient
from connectors.mllp.destination import MllpDestination
from gateway import config as config_mod
from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.errors import ConfigError, RetryLater
from gateway.core.status import Status
from gateway.core.tls import client_context, server_context
from gateway.hl7.ack import parse_ack
from tests.conftest import AUTH, GatewayFactory, mllp_port
from tests.fakes import Receiver
from tests.messages import adt
from tests.ops.conftest import ops_config


class Pki:
    """A throwaway CA, the server's certificate for 127.0.0.1, and client certificates, as files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA(organization_name="Passerelle Test CA")
        self.ca_file = root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_cert, self.server_key = root / "server.pem", root / "server.key"
        for blob in server.cert_chain_pems:
            blob.write_to_path(str(self.server_cert), append=True)
        server.private_key_pem.write_to_path(str(self.server_key))

    def client(self, name: str, *, ca: trustme.CA | None = None) -> tuple[Path, Path]:
        issued = (ca or self.ca).issue_cert(
            f"{name}.example", common_name=name, organization_name="Hopital Nord"
        )
        cert, key = self.root / f"{name}.pem", self.root / f"{name}.key"
        for blob in issued.cert_chain_pems:
            blob.write_to_path(str(cert), append=True)
        issued.private_key_pem.write_to_path(str(key))
        return cert, key

    def server_tls(self, **extra: Any) -> dict[str, Any]:
        return {"cert": str(self.server_cert), "key": str(self.server_key), "ca": str(self.ca_file), **extra}

    def client_ssl(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        settings: dict[str, Any] = {"ca": str(self.ca_file)}
        if cert is not None:
            settings.update(cert=str(cert[0]), key=str(cert[1]))
        return client_context(settings)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    root = tmp_path / "pki"
    root.mkdir()
    return Pki(root)


def _tls_config(tmp_path: Path, source: dict[str, Any], **channel: Any) -> Any:
    cfg = ops_config(tmp_path)
    cfg.data["sources"][0].update(source)
    cfg.data["channels"][0].update(channel)

    return config_mod.parse(yaml.safe_dump(cfg.data), cfg.file)


async def _send(port: int, ctx: ssl.SSLContext | None, raw: bytes) -> bytes:
    client = MllpClient("127.0.0.1", port, ssl=ctx)
    try:
        return await client.send(raw, timeout=10)
    finally:
        await client.close()


async def test_mllp_source_over_tls(tmp_path: Path, pki: Pki, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(_tls_config(tmp_path, {"tls": pki.server_tls()}))
    answer = await _send(mllp_port(gw), pki.client_ssl(), adt("TLS1"))
    assert parse_ack(answer)[:2] == ("AA", "TLS1")
    # a plain-text sender gets no HL7 answer from a TLS port
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(gw))
    writer.write(b"\x0b" + adt("PLAIN1") + b"\x1c\r")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 10)
    assert b"MSA|" not in data
    writer.close()
    rows = await gw.store.list_messages(
        status=None, control_id="PLAIN1", channel=None, limit=5, before_seq=None
    )
    assert rows == []


async def test_mtls_refuses_a_client_without_a_certificate(
    tmp_path: Path, pki: Pki, start_gateway: GatewayFactory
) -> None:
    source = {"tls": pki.server_tls(require_client_cert=True)}
    gw = await start_gateway(_tls_config(tmp_path, source))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await _send(mllp_port(gw), pki.client_ssl(), adt("NOCERT"))
    # a certificate from another authority is refused too
    stranger = pki.client("stranger", ca=trustme.CA())
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await _send(mllp_port(gw), pki.client_ssl(stranger), adt("OTHERCA"))
    # and one signed by the configured CA is served
    lab = pki.client("lab")
    answer = await _send(mllp_port(gw), pki.client_ssl(lab), adt("WITHCERT"))
    assert parse_ack(answer)[0] == "AA"


async def test_certificate_subject_maps_to_a_sender_allowed_on_given_channels(
    tmp_path: Path, pki: Pki, start_gateway: GatewayFactory
) -> None:
    source = {
        "tls": pki.server_tls(require_client_cert=True),
        "allow": {"subjects": ["O=Hopital Nord"]},
        "senders": [
            {"subject": "CN=lab", "channels": ["adt"]},
            {"subject": "CN=radiology", "channels": ["elsewhere"]},
        ],
    }
    gw = await start_gateway(_tls_config(tmp_path, source))
    lab, radiology, unknown = pki.client("lab"), pki.client("radiology"), pki.client("pharmacy")
    assert parse_ack(await _send(mllp_port(gw), pki.client_ssl(lab), adt("LAB1")))[0] == "AA"
    # radiology may not feed this channel: answered AR, kept as ERROR
    code, cid, err = parse_ack(await _send(mllp_port(gw), pki.client_ssl(radiology), adt("RAD1")))
    assert (code, cid, err) == ("AR", "RAD1", "207")
    rows = await gw.store.list_messages(
        status="ERROR", control_id=None, channel=None, limit=5, before_seq=None
    )
    assert len(rows) == 1
    # a subject no sender entry names is refused at connection
    with pytest.raises((ConnectionError, OSError, TimeoutError)):
        await _send(mllp_port(gw), pki.client_ssl(unknown), adt("PHARMA1"))
    assert gw.sources["hospital"].refused_connections >= 1  # type: ignore[attr-defined]


async def test_ip_allowlist_refuses_other_addresses(tmp_path: Path, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(_tls_config(tmp_path, {"allow": {"networks": ["10.0.0.0/8"]}}))
    with pytest.raises((ConnectionError, OSError, TimeoutError)):
        await _send(mllp_port(gw), None, adt("IP1"))
    gw2_cfg = _tls_config(tmp_path / "b", {"allow": {"networks": ["127.0.0.0/8", "::1/128"]}})
    gw2 = await start_gateway(gw2_cfg)
    assert parse_ack(await _send(mllp_port(gw2), None, adt("IP2")))[0] == "AA"


async def test_per_address_connection_limit(tmp_path: Path, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(_tls_config(tmp_path, {"max_connections_per_address": 1}))
    first = MllpClient("127.0.0.1", mllp_port(gw))
    try:
        assert parse_ack(await first.send(adt("C1"), timeout=10))[0] == "AA"
        with pytest.raises((ConnectionError, OSError, TimeoutError)):
            await _send(mllp_port(gw), None, adt("C2"))
    finally:
        await first.close()


async def test_mllp_destination_with_mtls(pki: Pki) -> None:
    receiver = Receiver(["AA"])
    receiver.server = await asyncio.start_server(
        receiver.handle, "127.0.0.1", 0, ssl=server_context(pki.server_tls(require_client_cert=True))
    )
    env = Envelope(
        id="m1", channel="c", source="s", raw=adt("OUT1"), content_type=HL7_V2, sender="A^B",
        control_id="OUT1", message_type="ADT^A01", partition_key="p", received_at=0.0, trace_id="m1",
        charset="UNICODE UTF-8",
    )  # fmt: skip
    try:
        cert, key = pki.client("gateway")
        dest = MllpDestination(
            "sih",
            {
                "host": "127.0.0.1",
                "port": receiver.port,
                "tls": {"ca": str(pki.ca_file), "cert": str(cert), "key": str(key)},
            },
        )
        result = await dest.send(env, env.raw)
        assert result.status is Status.SENT and receiver.received == [env.raw]
        await dest.aclose()
        # without a client certificate the far end refuses the handshake: retried later, not lost
        bare = MllpDestination(
            "sih", {"host": "127.0.0.1", "port": receiver.port, "tls": {"ca": str(pki.ca_file)}}
        )
        with pytest.raises(RetryLater):
            await bare.send(env, env.raw)
        await bare.aclose()
    finally:
        await receiver.close()


async def test_http_over_tls_with_client_certificates(
    tmp_path: Path, pki: Pki, start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway(ops_config(tmp_path, http={"tls": pki.server_tls(require_client_cert=True)}))
    url = f"https://127.0.0.1:{gw.http_port_bound}/api/stats"
    ctx = pki.client_ssl(pki.client("console"))
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(url, ssl=ctx) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):
            async with http.get(url, ssl=pki.client_ssl()) as resp:
                await resp.read()


def test_tls_settings_errors_name_the_key(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        server_context({"cert": str(tmp_path / "missing.pem"), "key": str(pki.server_key)}, where="http.tls")
    with pytest.raises(ConfigError, match="require_client_cert needs ca"):
        server_context(
            {"cert": str(pki.server_cert), "key": str(pki.server_key), "require_client_cert": True}
        )
    with pytest.raises(ConfigError, match="cannot load"):
        server_context({"cert": str(pki.ca_file), "key": str(pki.ca_file)})
