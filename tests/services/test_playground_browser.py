"""The playground page in a REAL headless Chromium (Debian's `chromium`, installed by `make setup`;
this test installs nothing), driven over the DevTools protocol against the live stack: type a
search, see ranked results with scores, model version and reasons, click items with the mouse,
check the click events (request_id + position) on the behaviour topic, and watch the session's
recommendations change. A screenshot is saved to artifacts/playground.png.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from confluent_kafka import Consumer
from live_stack import KEY, LiveStack

from recstream.config import REPO_ROOT
from recstream.contracts.topics import TOPICS

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]

ARTIFACTS = REPO_ROOT / "artifacts"


class Chromium:
    """Headless Chromium with the DevTools endpoint on a port it picks itself."""

    def __init__(self, root: Path) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            pytest.fail("chromium is not installed: run `make setup` (apt-get install -y chromium chromium-driver)")
        profile = root / "profile"
        self.log = root / "chromium.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--remote-debugging-port=0",
                    f"--user-data-dir={profile}",
                    "--window-size=1400,900",
                    "--no-first-run",
                    "about:blank",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        port_file = profile / "DevToolsActivePort"
        while not port_file.exists() or not port_file.read_text().strip():
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, "chromium did not open DevTools in 60 s"
            time.sleep(0.2)
        self.port = int(port_file.read_text().split()[0])

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the browser and its renderer/zygote children
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass


class Page:
    """A minimal DevTools-protocol client for one page target (commands by id, events collected)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        # 30 s: a screenshot or navigation on a loaded 2-core machine; anything longer is a hang.
        reply = await asyncio.wait_for(fut, 30)
        assert "error" not in reply, (method, reply)
        return reply["result"]

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        status = await self.js("document.getElementById('status').textContent")
        raise AssertionError(f"timed out waiting for {expression!r}; page status: {status}")

    async def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (pressed and released), as a user would."""
        box = await self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    async def type(self, selector: str, text: str) -> None:
        await self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", text=text)


def behaviour_clicks(stack: LiveStack, user: str, n: int, timeout_s: float = 20.0) -> list[dict]:
    topic = TOPICS["behaviour"].name(stack.settings.topic_prefix)
    consumer = Consumer(
        {
            "bootstrap.servers": stack.settings.kafka_bootstrap,
            "group.id": f"browser-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    found: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < n and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                if msg.error():
                    continue
                try:  # other tests on the shared stack put deliberately malformed messages here
                    event = json.loads(msg.value())
                except ValueError:
                    continue
                if event.get("user_id") == user and event.get("type") == "click":
                    found.append(event)
    finally:
        consumer.close()
    return found


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    browser = Chromium(tmp_path)
    try:
        yield browser
    finally:
        browser.stop()


async def drive(stack: LiveStack, chromium: Chromium, user: str, session: str) -> dict[str, Any]:
    # 10 s: the DevTools HTTP endpoint is local
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(f"http://127.0.0.1:{chromium.port}/json/list") as resp:
            target = next(t for t in await resp.json() if t["type"] == "page")
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024) as ws:
            page = Page(ws)
            await page.send("Runtime.enable")
            await page.send("Page.enable")
            await page.send("Page.navigate", url=f"{stack.base_url}/?apiKey={KEY}&user={user}&session={session}")
            await page.wait_for("document.readyState === 'complete' && !!document.getElementById('query')")
            await page.type("#query", "haunted ghosts")
            await page.click("#search-btn")
            await page.wait_for("document.querySelectorAll('#results li.item').length >= 5")
            await page.wait_for("document.querySelectorAll('#recs li.item').length >= 5")
            out: dict[str, Any] = {
                "search_request": await page.js("document.getElementById('results').dataset.requestId"),
                "results": await page.js(
                    "[...document.querySelectorAll('#results li.item')].map(li => "
                    "[li.dataset.itemId, li.querySelector('.title').textContent])"
                ),
                "recs_before": await page.js("document.getElementById('recs').dataset.signature"),
                "recs_request_before": await page.js("document.getElementById('recs').dataset.requestId"),
            }
            await page.click("#results li.item:nth-child(1)")
            await page.click("#results li.item:nth-child(3)")
            out["recs_after"] = await page.wait_for(
                f"(() => {{ const s = document.getElementById('recs').dataset.signature;"
                f" return s !== {json.dumps(out['recs_before'])} && s; }})()",
                timeout_s=20,
            )
            out["recs_request_after"] = await page.js("document.getElementById('recs').dataset.requestId")
            out["clicked"] = await page.js("document.querySelectorAll('#results li.item.clicked').length")
            out["model_version"] = await page.js("document.querySelector('#search-meta .model-version').textContent")
            out["scores"] = await page.js("[...document.querySelectorAll('#recs .score')].map(e => e.textContent)")
            # Every card explains itself: reason badges, or a note that the model reported none (the
            # API test holds the worker to filling reasons; this one tests the page).
            out["reasons"] = await page.js(
                "[...document.querySelectorAll('#results li.item')].every(li => li.querySelector('.reasons .reason'))"
            )
            out["status"] = await page.js("document.getElementById('status').className")
            await asyncio.sleep(1.0)  # let the last render's highlight fade before the screenshot
            shot = await page.send("Page.captureScreenshot", format="png")
            out["screenshot"] = base64.b64decode(shot["data"])
            out["js_errors"] = [e for e in page.events if e.get("method") == "Runtime.exceptionThrown"]
            page.reader.cancel()
            return out


def test_playground_search_click_and_live_recommendations(live_stack: LiveStack, chromium: Chromium) -> None:
    user, session = f"b{uuid.uuid4().hex[:8]}", f"s{uuid.uuid4().hex[:6]}"
    out = asyncio.run(drive(live_stack, chromium, user, session))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "playground.png").write_bytes(out["screenshot"])

    assert not out["js_errors"], out["js_errors"]
    assert out["status"] == "", "the page reported an error"
    assert out["model_version"] and out["reasons"] and all(out["scores"]), out
    assert out["clicked"] == 2
    assert out["recs_request_after"] != out["recs_request_before"]
    assert out["recs_after"] != out["recs_before"], "recommendations did not change after the clicks"
    clicks = behaviour_clicks(live_stack, user, 2)
    expected = {(out["results"][0][0], 0), (out["results"][2][0], 2)}
    assert {(c["item_id"], c["position"]) for c in clicks} == expected, clicks
    assert all(c["request_id"] == out["search_request"] and c["session_id"] == session for c in clicks), clicks
