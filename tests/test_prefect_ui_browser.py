"""Issue 14: the Prefect UI's "Run > Custom run" page shows a typed form, filled in with the deployment's config.

    apt-get install chromium        # once
    .venv/bin/pytest tests/test_prefect_ui_browser.py -x -q

The deployments are served by ``omnidiff flows deploy`` on the test stack (as in
tests/test_pipeline_flow.py). Headless chromium opens the Prefect server's own UI at
``/deployments/deployment/<id>/run`` (the v1 UI's route for a deployment's custom run; the
server's root sends a browser to the v2 UI, whose form is the same schema form), waits for the
form to render and reads back, for every form field, its path of labels (``cfg / Align / Clip
Windows``), its input controls and their values. Every scalar of the deployment's parameters must
be shown in a typed control holding its value: a number input for a number (a select for an enum
such as ``stage``), a checkbox for a bool, a text field for a string, a nested section for a config
section, "None" picked for a null. An untyped ``dict`` parameter renders as one JSON editor, so its
field paths are missing and the test fails.

The stack's Prefect API wants its auth string (issue 15): the browser first opens a deployment's
page as a new user would, is sent to the UI's login page, and logs in with what `omnidiff stack
secret` prints.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from omnidiff.config import to_dict
from tests.browser import CHROMIUM, MISSING, open_page

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pipeline_test.yaml"
pytestmark = pytest.mark.e2e

# For every schema form field (a .schema-form-property), its path of labels, the value of each of
# its own input controls (not those of nested fields) and the option picked in its type switch
# (a field whose schema is anyOf, e.g. "AlignSection" / "None").
FORM_FIELDS_JS = r"""
(() => {
  const own = (el, sel) => [...el.querySelectorAll(sel)].filter(c => c.closest('.schema-form-property') === el);
  const label = el => (own(el, '.schema-form-property__label')[0]?.textContent ?? '').replace(/\s*\(Optional\)\s*$/, '').trim();
  const value = c => c.type === 'checkbox' ? c.checked
    : c.type === 'select-multiple' ? [...c.selectedOptions].map(o => o.value) : c.value;
  return [...document.querySelectorAll('.schema-form-property')].map(el => {
    const path = [];
    for (let p = el; p; p = p.parentElement && p.parentElement.closest('.schema-form-property')) path.unshift(label(p));
    // (a select input draws an empty placeholder <select> beside the real one)
    const controls = own(el, 'fieldset.schema-form-property__fields :is(input, select, textarea)')
      .filter(c => !(c.tagName === 'SELECT' && c.options.length === 0));
    return {path: path.join(' / '), kinds: controls.map(c => c.type), values: controls.map(value),
            picked: own(el, '.p-button-group [aria-pressed="true"], .p-button-group [aria-selected="true"]')
                      .map(b => b.textContent.trim())};
  });
})()
"""

# The dict[str, ...] fields (free keys): the form edits them as JSON. Every other dict is a config
# section and must be a nested form; an untyped `cfg: dict` parameter would be one JSON editor.
FREE_DICTS = {"Languages", "Aesthetic Options", "models"}


def _title(key: str) -> str:
    return key.replace("_", " ").title()  # pydantic's default field title: max_steps -> "Max Steps"


def _same(shown, expected) -> bool:
    if isinstance(expected, bool):
        return shown is expected
    if isinstance(expected, int | float):
        try:
            return float(shown) == float(expected)
        except (TypeError, ValueError):
            return False
    return shown == expected


def form_mismatches(fields: list[dict], parameters: dict) -> tuple[list[str], int]:
    """What the form shows wrong for ``parameters``, and how many values it was checked on."""
    by_path = {f["path"]: f for f in fields}
    problems: list[str] = []
    checked = 0

    def check(path: str, expected) -> None:
        nonlocal checked
        field = by_path.get(path)
        if field is None:
            problems.append(f"{path}: no such field in the form")
            return
        kinds, values = field["kinds"], field["values"]
        checked += 1
        if expected is None:
            if field["picked"] != ["None"]:
                problems.append(f"{path}: expected None picked, the form shows {field}")
        elif isinstance(expected, dict):
            if path.rsplit(" / ", 1)[-1] in FREE_DICTS:
                if kinds != ["textarea"] or json.loads(values[0]) != expected:
                    problems.append(f"{path}: expected {expected}, the form shows {values[0]}")
                return
            if kinds or field["picked"] == ["None"]:
                problems.append(f"{path}: expected a section, the form shows {field}")
            for key, value in expected.items():
                check(f"{path} / {_title(key)}", value)
        elif isinstance(expected, list):
            if kinds == ["select-multiple"]:
                values = values[0]
            if len(values) != len(expected) or not all(map(_same, values, expected)):
                problems.append(f"{path}: expected the list {expected}, the form shows {values}")
        else:
            typed = {bool: ("checkbox",), int: ("number", "select-one"), float: ("number", "select-one"),
                     str: ("textarea", "select-one")}[type(expected)]
            if len(kinds) != 1 or kinds[0] not in typed or not _same(values[0], expected):
                problems.append(f"{path}: expected {expected!r} in a {'/'.join(typed)} input, the form shows {field}")

    for name, value in parameters.items():
        check(name, value)
    return problems, checked


@pytest.fixture(scope="module")
def deployments(stack):
    from flows import cli as flows_cli

    state = flows_cli.deploy(str(CONFIG), timeout_s=240, quiet=True)
    yield state
    flows_cli.stop()


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip(MISSING)
    with open_page(tmp_path) as tools:
        for domain in ("Page", "Runtime", "Log"):
            tools.call(f"{domain}.enable")
        yield tools


def _parameters(name: str) -> dict:
    from prefect.client.orchestration import get_client

    async def read() -> dict:
        async with get_client() as client:
            return (await client.read_deployment_by_name(name)).parameters

    return json.loads(json.dumps(asyncio.run(read()), default=str))


def form_fields(browser, server: str, deployment_id: str, tmp_path: Path) -> list[dict]:
    """Open the deployment's custom-run page; the fields once its parameter form has rendered."""
    browser.call("Page.navigate", url=f"{server}/deployments/deployment/{deployment_id}/run")
    browser.wait_for("document.readyState === 'complete'"
                     " && document.querySelectorAll('.schema-form-property__label').length > 0", timeout_s=120)
    # The form fills in nested sections a moment after the first labels appear: wait until it stops growing.
    fields, last = None, None
    for _ in range(50):
        fields = browser.evaluate(FORM_FIELDS_JS)
        if fields == last:
            break
        last = fields
        browser.evaluate("new Promise(r => setTimeout(r, 300))")
    shot = browser.call("Page.captureScreenshot", format="png")
    (tmp_path / f"run-{deployment_id}.png").write_bytes(base64.b64decode(shot["data"]))
    return fields


def log_in(browser, server: str, target: str, secret: str) -> None:
    """Open ``target`` without credentials: the UI must send the browser to its login page; log in there."""
    browser.call("Page.navigate", url=f"{server}{target}")
    browser.wait_for("location.pathname === '/login' && !!document.querySelector('form input[type=password]')",
                     timeout_s=120)
    assert browser.evaluate("localStorage.getItem('prefect-password')") is None
    browser.type_into("form input[type=password]", secret)
    browser.click("form button[type=submit]")
    stored = base64.b64encode(secret.encode()).decode()
    browser.wait_for(f"localStorage.getItem('prefect-password') === {json.dumps(stored)}"
                     " && location.pathname !== '/login'", timeout_s=60)


def _stack_secret() -> str:
    """The auth string as a user gets it: `omnidiff stack secret` (finds the stack by OMNIDIFF_HOME)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    shown = subprocess.run([sys.executable, "-m", "omnidiff.cli", "stack", "secret"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return shown.stdout.strip()


def test_custom_run_forms_are_typed_and_filled_in(deployments, browser, tmp_path):
    from flows.config import load_pipeline_config

    api = os.environ["PREFECT_API_URL"]
    server = api.removesuffix("/api")
    # The UI asks the API its server tells it to: on the stack's free port, not Prefect's default 4200.
    assert requests.get(f"{server}/ui-settings", timeout=10).json()["api_url"] == api

    cfg = load_pipeline_config(CONFIG)
    ids = deployments["deployments"]

    # A new browser: the UI asks for the stack's secret before it shows anything, then goes where it was sent.
    secret = _stack_secret()
    assert secret == os.environ["PREFECT_API_AUTH_STRING"]
    log_in(browser, server, f"/deployments/deployment/{ids['train/train']}", secret)
    assert browser.evaluate("location.pathname") == f"/deployments/deployment/{ids['train/train']}"
    # What the page loaded before it had the secret was refused (401) by design, and the UI logs those
    # failures (and throws on some, as a minified error); everything after the login must be clean.
    browser.events.clear()

    # The pipeline: one "config" parameter, the whole pipeline config as nested sections.
    params = _parameters("omnidiff-pipeline/omnidiff-pipeline")
    assert params["config"]["stage1"]["max_steps"] == cfg.stage1.max_steps
    fields = form_fields(browser, server, ids["omnidiff-pipeline/omnidiff-pipeline"], tmp_path)
    by_path = {f["path"]: f for f in fields}
    problems, checked = form_mismatches(fields, params)
    assert not problems, "\n".join(problems[:40])
    assert checked > 300, checked
    # A few values read from the YAML files themselves, in the typed controls the brief names.
    assert by_path["config / Stage1 / Max Steps"] == {"path": "config / Stage1 / Max Steps", "kinds": ["number"],
                                                      "values": ["12"], "picked": []}
    assert by_path["config / Stage2 / Stage"]["kinds"] == ["select-one"]
    assert by_path["config / Stage2 / Stage"]["values"] == ["2"]
    assert by_path["config / Stage1 / Align"]["picked"] == ["AlignSection"]
    assert by_path["config / Stage1 / Diffusion"]["picked"] == ["None"]
    assert by_path["config / Stage2 / Diffusion"]["picked"] == ["DiffusionSection"]
    assert by_path["config / Stage1 / Align / Clip Windows"]["values"] == ["3"]
    assert by_path["config / Serve / Route Prefix"]["values"] == [cfg.serve.route_prefix]

    # The train deployment: stage 1's config as its "cfg" parameter.
    params = _parameters("train/train")
    expected = json.loads(json.dumps(to_dict(cfg.stage1), default=str))
    expected.pop("kind", None)
    assert params["cfg"] == expected
    fields = form_fields(browser, server, ids["train/train"], tmp_path)
    by_path = {f["path"]: f for f in fields}
    problems, checked = form_mismatches(fields, params)
    assert not problems, "\n".join(problems[:40])
    assert checked > 60, checked
    assert by_path["cfg / Max Steps"]["kinds"] == ["number"] and by_path["cfg / Max Steps"]["values"] == ["12"]
    assert by_path["cfg / Stage"]["kinds"] == ["select-one"] and by_path["cfg / Stage"]["values"] == ["1"]
    assert by_path["cfg / Name"]["values"] == ["test-stage1"]
    assert by_path["cfg / Align"]["picked"] == ["AlignSection"] and by_path["cfg / Diffusion"]["picked"] == ["None"]
    assert by_path["cfg / Optim / Schedule"] == {"path": "cfg / Optim / Schedule", "kinds": ["select-one"],
                                                 "values": ["cosine"], "picked": []}

    # Every other deployment: a form with its parameters filled in too.
    for name, deployment_id in ids.items():
        if name in ("omnidiff-pipeline/omnidiff-pipeline", "train/train"):
            continue
        problems, checked = form_mismatches(form_fields(browser, server, deployment_id, tmp_path), _parameters(name))
        assert not problems and checked, (name, problems[:20])

    problems = browser.problems(ignore_urls=("/favicon.ico",))  # the server has none
    assert not problems, problems
