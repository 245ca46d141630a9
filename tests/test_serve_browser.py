"""The playground page in a real headless browser (Debian's chromium), driven over the DevTools protocol.

    apt-get install chromium        # once
    .venv/bin/pytest tests/test_serve_browser.py -x -q

The test types a Chinese prompt and the token into the page with synthetic keyboard input,
clicks Generate with a synthetic mouse click, and waits for the image the page renders from
the server's answer. It also checks that the page asks no host but the server (offline, and
its Content-Security-Policy allows nothing else) and logs no JavaScript error.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-extensions",
         "--disable-default-apps", "--mute-audio", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", "--window-size=1000,900"]


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=30)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, timeout_s: float = 60, **params) -> dict:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 120):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"not true after {timeout_s}s: {expression}")

    def click(self, selector: str) -> None:
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type_into(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)  # as an IME would: works for Chinese too

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tmp_path / "profile"
    log = (tmp_path / "chromium.log").open("w")
    process = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start: {(tmp_path / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        pages = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(p for p in pages if p["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_playground_generates_an_image_in_a_real_browser(served, browser, tmp_path):
    for domain in ("Page", "Runtime", "Network", "Log"):
        browser.call(f"{domain}.enable")
    browser.call("Page.navigate", url=f"{served.url}/")
    browser.wait_for("document.readyState === 'complete' && document.getElementById('size').options.length > 1")
    # The server wants a token, so the page shows its field.
    assert browser.evaluate("document.getElementById('token').getBoundingClientRect().width > 0") is True

    browser.type_into("#token", served.token)
    browser.evaluate("document.getElementById('token').dispatchEvent(new Event('change'))")
    browser.wait_for("document.getElementById('model').textContent.includes('serve-test')")
    browser.type_into("#prompt", "蓝色背景上的红色圆形")
    browser.evaluate("document.getElementById('steps').value = '3'; document.getElementById('seed').value = '11';"
                     "document.getElementById('size').value = '32x32'")
    browser.click("#generate")

    size = browser.wait_for("(() => { const img = document.querySelector('#images img');"
                            " return img && img.complete && img.naturalWidth ? [img.naturalWidth, img.naturalHeight]"
                            " : null; })()")
    assert size == [32, 32]
    status = browser.evaluate("document.getElementById('status').textContent")
    assert "seed 11" in status and "error" not in browser.evaluate("document.getElementById('status').className")
    alt = browser.evaluate("document.querySelector('#images img').alt")
    assert alt.startswith("蓝色背景上的红色圆形")
    shot = browser.call("Page.captureScreenshot", format="png")
    (tmp_path / "playground.png").write_bytes(base64.b64decode(shot["data"]))

    # The same request outside the browser gives the same picture (the page shows what the API made).
    page_png = browser.evaluate("document.querySelector('#images img').src").split(",", 1)[1]
    direct = requests.post(f"{served.url}/v1/generate", headers=served.headers, timeout=120,
                           json={"prompt": "蓝色背景上的红色圆形", "steps": 3, "seed": 11, "size": "32x32",
                                 "guidance_scale": 3.0})
    import io

    import numpy as np
    from PIL import Image

    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(page_png))), dtype=int)
    made = np.asarray(Image.open(io.BytesIO(base64.b64decode(direct.json()["images"][0]))), dtype=int)
    assert np.abs(shown - made).max() <= 1

    # A bad request shows the server's error, naming the field.
    browser.evaluate("document.getElementById('steps').value = '999'")
    browser.click("#generate")
    error = browser.wait_for("document.getElementById('status').className === 'error'"
                             " && document.getElementById('status').textContent")
    assert "[steps]" in error

    requested = {e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"}
    assert requested and all(u.startswith(served.url) or u.startswith("data:") for u in requested), requested
    problems = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
                    and "400" not in e["params"]["entry"].get("text", ""))]
    assert not problems, problems


def test_page_is_served_without_a_token_and_has_a_strict_csp(served):
    page = requests.get(f"{served.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "__PLAYGROUND_CONFIG__" not in page.text and served.token not in page.text
    assert Path(__file__).parents[1].joinpath("serve", "playground.html").is_file()
