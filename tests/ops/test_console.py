"""The web console end to end, in a real headless Chromium driven over the DevTools protocol."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.core.status import Status
from tests.conftest import (
    ADMIN_TOKEN,
    FakeDestination,
    GatewayFactory,
    make_config,
    mllp_port,
    wait_for,
    with_settings,
)
from tests.messages import adt
from tests.ops.conftest import PROFESSIONAL, TOKENS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]


class Page:
    """One browser tab over the DevTools websocket: evaluate JavaScript, navigate."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        cid = next(self.ids)
        await self.ws.send_str(orjson.dumps({"id": cid, "method": method, "params": params}).decode())
        async for msg in self.ws:
            data = orjson.loads(msg.data)
            if data.get("id") == cid:
                if "error" in data:
                    raise AssertionError(f"{method}: {data['error']}")
                result: dict[str, Any] = data.get("result", {})
                return result
        raise AssertionError("the browser closed the connection")

    async def js(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, directory: Path, name: str) -> Path:
        """A PNG of the tab, into ``directory`` and, when PASSERELLE_SCREENSHOTS names one, there too."""
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        data = base64.b64decode(shot["data"])
        path = directory / f"{name}.png"
        path.write_bytes(data)
        extra = os.environ.get("PASSERELLE_SCREENSHOTS")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            (Path(extra) / f"{name}.png").write_bytes(data)
        return path

    async def until(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"never true in the page: {expression}")
            await asyncio.sleep(0.1)


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Page]:
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        await wait_for(active.exists, timeout=60)
        await wait_for(lambda: len(active.read_text().splitlines()) >= 2, timeout=10)
        port = int(active.read_text().splitlines()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with http.ws_connect(url, max_msg_size=0) as ws:
                yield Page(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_console_login_channels_trace_and_dlq_replay(
    tmp_path: Path, start_gateway: GatewayFactory, client_for: Any, page: Page
) -> None:
    cfg = make_config(tmp_path)
    cfg = with_settings(cfg, auth={"tokens": TOKENS})
    cfg.data["channels"][0]["destinations"][0].update(plan=["permanent", "ok"], retry={"max_attempts": 1})
    gw = await start_gateway(cfg)
    await client_for(gw).send(adt("WEB1"))
    await wait_for(lambda: FakeDestination.instances["far"].attempts == 1)

    async def status_of(control_id: str) -> str:
        rows = await gw.store.list_messages(
            status=None, control_id=control_id, channel=None, limit=1, before_seq=None
        )
        return str(rows[0]["status"]) if rows else ""

    deadline = asyncio.get_running_loop().time() + 10
    while await status_of("WEB1") != Status.DEAD.value:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)

    await page.call("Page.enable")
    await page.call("Page.navigate", url=f"http://127.0.0.1:{gw.http_port_bound}/console/")
    await page.until("document.readyState === 'complete' && !!document.querySelector('#login-form')")
    assert await page.js("document.querySelector('#login').hidden") is False

    # a professional's token is refused by the console (operator role needed)
    login = (
        "document.querySelector('#token').value = {token!r};"
        "document.querySelector('#login-form').requestSubmit(); true"
    )
    await page.js(login.format(token=PROFESSIONAL))
    await page.until("document.querySelector('#login-error').textContent.includes('operator')")

    await page.js(login.format(token=ADMIN_TOKEN))
    await page.until("!document.querySelector('#overview').hidden")
    await page.until("!!document.querySelector('#channels tbody tr[data-channel=\"adt\"]')")
    row = '#channels tbody tr[data-channel="adt"] td'
    cells = await page.js(f"[...document.querySelectorAll('{row}')].map(td => td.textContent)")
    assert (
        cells[0] == "adt" and cells[1] == "running" and cells[2] == "1" and cells[6] == "1"
    )  # 1 received, 1 dead
    assert await page.js("sessionStorage.getItem('passerelle.token') !== null")

    # message search and trace: masked by default
    await page.js("location.hash = '#search'; true")
    await page.until("!document.querySelector('#search').hidden")
    await page.js(
        "document.querySelector('#search-form [name=control_id]').value = 'WEB1';"
        "document.querySelector('#search-form').requestSubmit(); true"
    )
    await page.until("document.querySelectorAll('#results tbody tr').length === 1")
    # the time window is the store's filter: the API is asked with since/until
    await page.js(
        "window.asked = []; const plain = window.fetch;"
        "window.fetch = (url, init) => { window.asked.push(String(url)); return plain(url, init); }; true"
    )
    await page.js(
        "document.querySelector('#search-form [name=to]').value = '2000-01-01T00:00';"
        "document.querySelector('#search-form').requestSubmit(); true"
    )
    await page.until("document.querySelectorAll('#results tbody tr').length === 0")
    asked = await page.js("window.asked.filter(u => u.includes('/api/messages?'))")
    assert len(asked) == 1 and "until=" in asked[0] and "since=" not in asked[0]
    await page.js(
        "document.querySelector('#search-form [name=to]').value = '';"
        "document.querySelector('#search-form [name=from]').value = '2000-01-01T00:00';"
        "document.querySelector('#search-form').requestSubmit(); true"
    )
    await page.until("document.querySelectorAll('#results tbody tr').length === 1")
    asked = await page.js("window.asked.filter(u => u.includes('/api/messages?'))")
    assert len(asked) == 2 and "since=" in asked[1] and "until=" not in asked[1]
    await page.js("document.querySelector('#results tbody tr').click(); true")
    await page.until("!!document.querySelector('#segments tr[data-field=\"PID-5\"]')")
    shown = await page.js("document.querySelector('#segments').textContent")
    assert "LEFÈVRE" not in shown and "***" in shown
    await page.js("document.querySelector('#reveal').click(); true")
    await page.until("document.querySelector('#segments').textContent.includes('LEFÈVRE')")
    await gw.audit.flush()
    reveals = [r for _, r in await gw.audit.search(agent="test-admin") if r.get("outcomeDesc")]
    assert len(reveals) == 1  # the reveal was audited

    # the dead letter is listed, and replayed from the console
    await page.js("location.hash = '#problems'; true")
    await page.until("document.querySelectorAll('#dlq tbody tr').length === 1")
    assert "WEB1" in await page.js("document.querySelector('#dlq tbody tr').textContent")
    await page.js("document.querySelector('#dlq tbody tr button[data-action=replay]').click(); true")
    await page.until("document.querySelector('#action-result').textContent === 'Replay done.'")
    await wait_for(lambda: len(FakeDestination.instances["far"].received) == 1)
    deadline = asyncio.get_running_loop().time() + 10
    while await status_of("WEB1") != Status.SENT.value:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    await page.until("document.querySelectorAll('#dlq tbody tr').length === 0")

    # logging out forgets the token
    await page.js("document.querySelector('#logout').click(); true")
    await page.until("!document.querySelector('#login').hidden")
    assert await page.js("sessionStorage.getItem('passerelle.token')") is None


ORU = (
    "MSH|^~\\&|LABO|LABO-NORD|PASSERELLE|GHT|20261123101500||ORU^R01^ORU_R01|{cid}|P|2.5^FRA^2.11|||||FRA"
    "|UNICODE UTF-8\r"
    "PID|||200002^^^HOPITAL-NORD&1.2.250.1.71.4.2.2.1234&ISO^PI||MARCHAND^Hélène^^^^^L||19620130|F|||"
    "3 place du Marché^^Dole^^39100^FRA^H||0384000000\r"
    "OBR|1|CMD{cid}^LABO-NORD|RES{cid}^LABO-NORD|2345-7^Glucose^LN|||20261123093000\r"
    "OBX|1|NM|2345-7^Glucose^LN||5.4|mmol/L|3.9-6.1|N|||F\r"
)
# A frame the intake refuses: its MSH-18 names no character set the gateway knows.
REFUSED = (
    "MSH|^~\\&|DXCARE|HOPITAL-NORD|PASSERELLE|GHT|20261123101500||ADT^A01^ADT_A01|{cid}|P|2.5|||||FRA|KLINGON\r"
    "PID|||300003^^^HOPITAL-NORD^PI||DURAND^Paul\r"
)


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_console_plots_message_view_fhir_links_rejections_and_retries(
    tmp_path: Path, start_gateway: GatewayFactory, client_for: Any, page: Page
) -> None:
    """An operator's tour: plots that move with the traffic, a message as fields (masked leaf by
    leaf) and the FHIR it made, its link to the stored Patient, an intake rejection found by its
    control id, and a failing destination's next attempt."""
    shots = tmp_path / "screenshots"
    shots.mkdir()
    cfg = make_config(
        tmp_path,
        steps=[{"type": "fhir_mapping", "directory": str(ROOT / "mappings"), "missing_namespace": "sender"}],
        destinations=[
            {"name": "repository", "type": "fhir_repository", "path": "{data_dir}/fhir.db"},
            {
                "name": "ehr",
                "type": "fhir_rest",
                "base_url": f"http://127.0.0.1:{_closed_port()}/fhir",
                "retry": {"max_attempts": 5, "initial_backoff_s": 600},
            },
        ],
    )
    cfg = with_settings(cfg, auth={"tokens": TOKENS})
    cfg = with_settings(cfg, console={"locale": "fr-FR"})
    gw = await start_gateway(cfg)
    client = client_for(gw)

    await page.call("Page.enable")
    await page.call(
        "Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False
    )
    await page.call("Page.navigate", url=f"http://127.0.0.1:{gw.http_port_bound}/console/")
    await page.until("document.readyState === 'complete' && !!document.querySelector('#login-form')")
    # the login page shows neither the navigation nor the Log out button
    assert await page.js("getComputedStyle(document.querySelector('#nav')).display") == "none"
    assert await page.js("document.querySelector('#logout').getClientRects().length") == 0
    await page.screenshot(shots, "login")

    await page.js(
        f"document.querySelector('#token').value = {ADMIN_TOKEN!r};"
        "document.querySelector('#login-form').requestSubmit(); true"
    )
    await page.until("!document.querySelector('#overview').hidden")
    assert await page.js("getComputedStyle(document.querySelector('#nav')).display") == "flex"
    # the plots are drawn from the second sample on; nothing has flowed yet
    await page.until("Number(document.querySelector('#chart-throughput').dataset.samples) >= 1")
    assert await page.js("Number(document.querySelector('#chart-throughput').dataset.peak)") == 0
    first_src = await page.js("document.querySelector('#chart-throughput').src")

    # traffic over MLLP: the throughput plot rises and the queue/latency plots have points
    for i in range(6):
        answer = await client.send(adt(f"TOUR{i}", patient=f"40000{i}"))
        assert b"MSA|AA|" in answer
    answer = await client.send(ORU.format(cid="LAB1").encode())
    assert b"MSA|AA|" in answer
    await page.until("Number(document.querySelector('#chart-throughput').dataset.peak) > 0", timeout=30)
    assert await page.js("document.querySelector('#chart-throughput').src") != first_src
    assert await page.js("document.querySelector('#chart-throughput').naturalWidth") > 0
    # each plot is fetched on its own: the latency one may come a refresh later
    await page.until("Number(document.querySelector('#chart-latency').dataset.peak) > 0", timeout=30)
    await page.until(
        "document.querySelector('#channels tr[data-channel=\"adt\"] td:nth-child(3)').textContent === '7'"
    )
    # the failing destination sits under its channel with its retry state and next attempt
    retry = '#channels tr[data-of="adt"][data-destination="ehr"] .retry'
    await page.until(f"document.querySelectorAll('{retry}').length >= 1")
    text = await page.js(f"document.querySelector('{retry}').textContent")
    # attempt 1 of 5, or a later one when the machine is slow enough for the first retry to have run
    assert re.search(r"attempt [1-5]/5", text) and "next attempt" in text and "cannot reach" in text
    # French dates by default: day first, 24-hour clock
    assert re.search(r"next attempt \d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2}", text), text
    # the listener, its connection, and the sender's last message
    listener = await page.js("document.querySelector('#listeners tr[data-source=\"hospital\"]').textContent")
    assert "listening" in listener and f":{mllp_port(gw)}" in listener and "127.0.0.1:" in listener
    await page.until("!!document.querySelector('#senders tr[data-sender=\"LABO^LABO-NORD\"]')")
    sender = await page.js(
        "document.querySelector('#senders tr[data-sender=\"LABO^LABO-NORD\"]').textContent"
    )
    assert re.search(r"\d{2}/\d{2}/\d{4}", sender) and "adt" in sender
    await page.screenshot(shots, "overview")

    # an intake rejection: not a stopped channel, found by its control id with its reason
    await client.send(REFUSED.format(cid="REJ42").encode())
    await page.until(
        "document.querySelector('#listeners tr[data-source=\"hospital\"] td:last-child').textContent === '1'"
    )
    channels = await page.js(
        "[...document.querySelectorAll('#channels tr.channel')].map(r => r.dataset.channel)"
    )
    assert channels == ["adt"]
    await page.js("location.hash = '#rejections'; true")
    await page.until("!document.querySelector('#rejections').hidden")
    await page.js(
        "document.querySelector('#rejections-form [name=control_id]').value = 'REJ42';"
        "document.querySelector('#rejections-form').requestSubmit(); true"
    )
    await page.until("(document.querySelector('#rejections-table tbody tr') || {}).dataset?.id !== undefined")
    first = "#rejections-table tbody tr:first-child td"
    cells = await page.js(f"[...document.querySelectorAll('{first}')].map(td => td.textContent)")
    assert cells[1] == "hospital" and cells[3] == "REJ42" and cells[5] == "102" and cells[6] == "MSH-18"
    assert "KLINGON" in cells[7]
    assert await page.js("document.querySelectorAll('#rejections-table button').length") == 0
    await page.screenshot(shots, "rejections")
    # nor is it listed among the channels' errors
    await page.js("location.hash = '#problems'; true")
    await page.until("document.querySelector('#errors tbody').textContent.includes('TOUR5')")
    problems = await page.js("document.querySelector('#errors').textContent")
    assert "REJ42" not in problems and "cannot reach the FHIR server" in problems
    await page.screenshot(shots, "problems")

    # the laboratory message: fields masked leaf by leaf, codes readable
    await page.js("location.hash = '#search'; true")
    await page.js(
        "document.querySelector('#search-form [name=control_id]').value = 'LAB1';"
        "document.querySelector('#search-form').requestSubmit(); true"
    )
    await page.until("document.querySelectorAll('#results tbody tr').length === 1")
    await page.screenshot(shots, "search")
    await page.js("document.querySelector('#results tbody tr').click(); true")
    await page.until("!document.querySelector('#message').hidden")
    await page.until("!!document.querySelector('#segments tr[data-field=\"OBX-3\"]')")

    def field(name: str) -> str:
        return f"document.querySelector('#segments tr[data-field=\"{name}\"] td:last-child').textContent"

    assert await page.js(field("OBX-3")) == "2345-7^Glucose^LN"
    assert await page.js(field("OBX-6")) == "mmol/L"
    assert await page.js(field("OBX-5")) == "5.4"
    assert await page.js(field("PID-5")) == "***^***^^^^^L"
    assert (await page.js(field("PID-3"))).startswith("***^^^HOPITAL-NORD")
    assert await page.js(field("PID-13")) == "***"
    segments = await page.js("document.querySelector('#segments').textContent")
    assert "MARCHAND" not in segments and "19620130" not in segments and "Dole" not in segments

    # its FHIR: a collapsed tree; expand the Patient, follow its link to the stored resource
    await page.until("!document.querySelector('#fhir-block').hidden")
    link = '#fhir-tree a.stored[data-fhir-path^="/fhir/Patient/"]'
    await page.until(f"!!document.querySelector('{link}')")
    patient = f"document.querySelector('{link}').closest('details')"
    assert await page.js(f"{patient}.open") is False
    await page.js(f"{patient}.querySelector('summary').click(); true")
    await page.until(f"{patient}.open")
    await page.until(f"{patient}.querySelector('details') !== null")
    await page.js(f"{patient}.querySelectorAll('details').forEach(d => d.open = true); true")
    tree_text = await page.js(f"{patient}.innerText")
    assert '"female"' in tree_text and '"***"' in tree_text
    assert "MARCHAND" not in tree_text and "200002" not in tree_text  # nor in the conditional request
    await page.screenshot(shots, "message")
    path = await page.js(f"document.querySelector('{link}').dataset.fhirPath")
    await page.js(f"document.querySelector('{link}').click(); true")
    await page.until("!document.querySelector('#resource').hidden")
    await page.until(f"document.querySelector('#resource-tree').dataset.loaded === {path!r}")
    stored = await page.js("document.querySelector('#resource-tree').innerText")
    assert "Patient" in stored and "MARCHAND" not in stored
    type_, id_ = path.split("/")[2:]
    assert (await gw.fhir.read(type_, id_))["name"][0]["family"] == "MARCHAND"  # the real one, masked above
    await page.screenshot(shots, "resource")

    for name in ("login", "overview", "rejections", "problems", "search", "message", "resource"):
        assert (shots / f"{name}.png").stat().st_size > 1000
