"""The web console end to end, in a real headless Chromium driven over the DevTools protocol."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.core.status import Status
from tests.conftest import ADMIN_TOKEN, FakeDestination, GatewayFactory, make_config, wait_for
from tests.messages import adt
from tests.ops.conftest import PROFESSIONAL, TOKENS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


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
    cfg.data["auth"] = {"tokens": TOKENS}
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
        cells[0] == "adt" and cells[1] == "running" and cells[2] == "1" and cells[7] == "1"
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
    await page.until("document.querySelector('#trace-raw').textContent.includes('PID|')")
    raw = await page.js("document.querySelector('#trace-raw').textContent")
    assert "LEFÈVRE" not in raw and "***" in raw
    await page.js("document.querySelector('#reveal').click(); true")
    await page.until("document.querySelector('#trace-raw').textContent.includes('LEFÈVRE')")
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
