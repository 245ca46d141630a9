"""The playground page in a real headless browser (Debian's chromium), driven over the DevTools protocol.

    apt-get install chromium        # once
    .venv/bin/pytest tests/test_serve_browser.py -x -q

The test types a Chinese prompt and the token into the page with synthetic keyboard input,
clicks Generate with a synthetic mouse click, and waits for the image the page renders from
the server's answer. It also checks that the page asks no host but the server (offline, and
its Content-Security-Policy allows nothing else) and logs no JavaScript error, that its example
prompts are the served model card's and its sizes the model's, and that an error clears the
images of an earlier answer.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import requests

from tests.fixtures_serve import EXAMPLE_PROMPTS

pytestmark = pytest.mark.e2e


def test_playground_generates_an_image_in_a_real_browser(served, browser, tmp_path):
    for domain in ("Page", "Runtime", "Network", "Log"):
        browser.call(f"{domain}.enable")
    browser.call("Page.navigate", url=f"{served.url}/")
    browser.wait_for("document.readyState === 'complete' && document.getElementById('size').options.length > 1")
    # The server wants a token, so the page shows its field.
    assert browser.evaluate("document.getElementById('token').getBoundingClientRect().width > 0") is True
    # Before any token: the examples are the served model card's (what it was trained on), nothing else.
    shown = browser.wait_for("(() => { const b = [...document.querySelectorAll('#examples button')];"
                             " return b.length ? b.map(x => x.textContent) : null; })()")
    assert shown == [e["prompt"] for e in EXAMPLE_PROMPTS]
    browser.click("#examples button:nth-child(2)")
    assert browser.evaluate("document.getElementById('prompt').value") == EXAMPLE_PROMPTS[1]["prompt"]
    browser.evaluate("document.getElementById('prompt').value = ''")
    # Only the sizes the model supports (its card: 16x16, the size it was made at).
    options = browser.evaluate("[...document.getElementById('size').options].map(o => o.value)")
    assert options == ["auto", "16x16"]

    browser.type_into("#token", served.token)
    browser.evaluate("document.getElementById('token').dispatchEvent(new Event('change'))")
    browser.wait_for("document.getElementById('model').textContent.includes('serve-test')")
    browser.type_into("#prompt", "蓝色背景上的红色圆形")
    browser.evaluate("document.getElementById('steps').value = '3'; document.getElementById('seed').value = '11';"
                     "document.getElementById('size').value = '16x16'")
    browser.click("#generate")

    size = browser.wait_for("(() => { const img = document.querySelector('#images img');"
                            " return img && img.complete && img.naturalWidth ? [img.naturalWidth, img.naturalHeight]"
                            " : null; })()")
    assert size == [16, 16]
    status = browser.evaluate("document.getElementById('status').textContent")
    assert "seed 11" in status and "error" not in browser.evaluate("document.getElementById('status').className")
    alt = browser.evaluate("document.querySelector('#images img').alt")
    assert alt.startswith("蓝色背景上的红色圆形")
    shot = browser.call("Page.captureScreenshot", format="png")
    (tmp_path / "playground.png").write_bytes(base64.b64decode(shot["data"]))

    # The same request outside the browser gives the same picture (the page shows what the API made).
    page_png = browser.evaluate("document.querySelector('#images img').src").split(",", 1)[1]
    direct = requests.post(f"{served.url}/v1/generate", headers=served.headers, timeout=120,
                           json={"prompt": "蓝色背景上的红色圆形", "steps": 3, "seed": 11, "size": "16x16",
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
    # ... and the image of the earlier answer is gone: it does not answer the request that failed.
    assert browser.evaluate("document.querySelectorAll('#images img').length") == 0

    requested = {e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"}
    assert requested and all(u.startswith(served.url) or u.startswith("data:") for u in requested), requested
    problems = browser.problems(ignore=("400",))  # the bad request's answer, asked for above
    assert not problems, problems


def test_page_is_served_without_a_token_and_has_a_strict_csp(served):
    page = requests.get(f"{served.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "__PLAYGROUND_CONFIG__" not in page.text and served.token not in page.text
    assert Path(__file__).parents[1].joinpath("serve", "playground.html").is_file()
