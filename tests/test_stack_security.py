"""Issue 15: the local stack refuses other web origins and hosts, and no server reports usage.

    .venv/bin/pytest tests/test_stack_security.py -x -q

A page open in the user's browser must not drive the stack: neither cross-origin (the browser asks
the server first with a CORS preflight; the server must not allow the page's origin) nor by DNS
rebinding (the page's own name resolves to 127.0.0.1, so its requests are same-origin but carry
``Host: evil.example``). Each probe below is a request such a page would make, sent with requests
to the real servers of the session's stack; the project's own clients (a flow run, the CLI) must
still work with the secret the stack hands them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psutil
import pytest
import requests

from omnidiff import env as env_mod
from omnidiff import prefect_server, stack_services
from omnidiff import stack as stack_mod

EVIL = "http://evil.example"
# The preflight a browser sends before a cross-origin POST with a JSON body and credentials.
PREFLIGHT = {"Origin": EVIL, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


def _basic(secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}


def _allow_origin(response: requests.Response) -> str | None:
    return response.headers.get("access-control-allow-origin")


def _client_env_without_stack_vars() -> dict[str, str]:
    """This process's environment less every pointer at the stack: a child finds it by OMNIDIFF_HOME alone."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING", "RAY_"))}


# ----------------------------------------------------------------------------- what the servers are started with


def test_every_server_runs_with_telemetry_off_whatever_the_caller_says(tmp_path):
    # A caller whose environment turns every switch on: the servers still get them off.
    noisy = {key: "1" if value in ("0", "false", "False") else "0" for key, value in env_mod.TELEMETRY_OFF.items()}
    noisy |= {"MLFLOW_DISABLE_TELEMETRY": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "true",
              "RAY_USAGE_STATS_ENABLED": "1", "HF_HUB_DISABLE_TELEMETRY": "0", "PATH": "/usr/bin"}
    for name in stack_services.SERVICES:
        server_env = stack_services.service_env(name, noisy, {"RAY_AUTH_MODE": "token"}, {"X": "1"})
        assert server_env["MLFLOW_DISABLE_TELEMETRY"] == "true", name
        assert server_env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false", name
        assert server_env["RAY_USAGE_STATS_ENABLED"] == "0", name
        assert server_env["HF_HUB_DISABLE_TELEMETRY"] == "1", name
        assert server_env["DO_NOT_TRACK"] == "1", name
        assert {k: server_env[k] for k in env_mod.TELEMETRY_OFF} == env_mod.TELEMETRY_OFF, name
        assert server_env["PATH"] == "/usr/bin"  # the rest of the caller's environment is kept
    # This process too (import omnidiff): what every entry point, flow and Ray worker inherits.
    for key in ("MLFLOW_DISABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED", "RAY_USAGE_STATS_ENABLED",
                "HF_HUB_DISABLE_TELEMETRY"):
        assert os.environ[key] == env_mod.TELEMETRY_OFF[key]
    argvs = stack_services.commands({"prefect": 1, "mlflow": 2, "ray": 3}, {}, 2, 100, 1, tmp_path)
    assert "--disable-usage-stats" in argvs["ray"]


def test_prefect_server_settings_allow_only_its_own_origin(tmp_path):
    settings = stack_services.prefect_server_env("http://127.0.0.1:4321", "omnidiff:s3cret")
    assert settings["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"].split(",") == ["http://127.0.0.1:4321",
                                                                          "http://localhost:4321"]
    for key in ("PREFECT_SERVER_CORS_ALLOWED_ORIGINS", "PREFECT_SERVER_CORS_ALLOWED_METHODS",
                "PREFECT_SERVER_CORS_ALLOWED_HEADERS"):
        assert "*" not in settings[key], key
    assert settings["PREFECT_SERVER_API_AUTH_STRING"] == "omnidiff:s3cret"
    assert settings["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"
    # The server's argv: its own launcher, with the Host check on.
    argv = stack_services.commands({"prefect": 4321, "mlflow": 2, "ray": 3}, {}, 2, 100, 1, tmp_path)["prefect"]
    assert argv[1:3] == ["-m", "omnidiff.prefect_server"]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--allowed-host"] == ["127.0.0.1", "localhost"]
    with pytest.raises(SystemExit):
        prefect_server.main(["--port", "4321", "--allowed-host", "*"])


def test_secret_file_is_private_and_kept(tmp_path):
    path = stack_services.write_token(tmp_path / "s" / "prefect_auth", prefix="omnidiff:")
    secret = stack_services.read_secret(path)
    assert secret.startswith("omnidiff:") and len(secret) == len("omnidiff:") + 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stack_services.read_secret(stack_services.write_token(path, prefix="omnidiff:")) == secret  # not remade
    path.chmod(0o644)
    with pytest.raises(stack_services.StackError, match=r"prefect_auth: readable by group/others \(mode 0o644\)"):
        stack_services.write_token(path)
    with pytest.raises(stack_services.StackError, match="secret file is missing"):
        stack_services.read_secret(tmp_path / "nothing")


def test_apply_env_hands_the_prefect_secret_with_its_url_only(monkeypatch, tmp_path):
    secret_file = stack_services.write_token(tmp_path / "prefect_auth", prefix="omnidiff:")
    state = {"env": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "PREFECT_API_URL": "http://127.0.0.1:2/api",
                     "RAY_ADDRESS": "127.0.0.1:3"},
             "prefect_auth_file": str(secret_file)}
    secret = secret_file.read_text()
    assert "PREFECT_API_AUTH_STRING" not in json.dumps(state)  # state.json never holds the secret
    # Pointed at another Prefect: neither its URL nor the secret is touched.
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.elsewhere/api")
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    assert "PREFECT_API_AUTH_STRING" not in stack_mod.apply_env(state)
    assert "PREFECT_API_AUTH_STRING" not in os.environ
    # Unset: both.
    monkeypatch.delenv("PREFECT_API_URL")
    applied = stack_mod.apply_env(state)
    assert applied["PREFECT_API_URL"] == "http://127.0.0.1:2/api" and applied["PREFECT_API_AUTH_STRING"] == secret
    # Already pointed at this stack by an older `stack env` without the secret: the secret is filled in.
    monkeypatch.delenv("PREFECT_API_AUTH_STRING")
    assert stack_mod.apply_env(state) == {"PREFECT_API_AUTH_STRING": secret}


# ----------------------------------------------------------------------------- Prefect


@pytest.fixture(scope="module")
def prefect(stack) -> tuple[str, str]:
    """(server url, auth string) of the session stack's Prefect."""
    return stack["services"]["prefect"]["url"], stack_services.read_secret(stack["prefect_auth_file"])


def test_prefect_refuses_a_foreign_origin_preflight(prefect):
    url, _ = prefect
    for path in ("/api/deployments/filter", "/api/deployments/00000000-0000-0000-0000-000000000000/create_flow_run"):
        refused = requests.options(f"{url}{path}", headers=PREFLIGHT, timeout=10)
        assert refused.status_code == 400, refused.text
        assert _allow_origin(refused) is None
    # Its own UI origin (as the UI loaded from localhost would ask) is allowed.
    own = requests.options(f"{url}/api/deployments/filter", headers={**PREFLIGHT, "Origin": url}, timeout=10)
    assert own.status_code == 200 and _allow_origin(own) == url
    localhost = url.replace("127.0.0.1", "localhost")
    assert _allow_origin(requests.options(f"{url}/api/flows/filter", headers={**PREFLIGHT, "Origin": localhost},
                                          timeout=10)) == localhost
    # A simple cross-origin request (no preflight) carries no allow-origin either: the page cannot read it.
    simple = requests.post(f"{url}/api/flows/filter", json={}, headers={"Origin": EVIL}, timeout=10)
    assert simple.status_code == 401 and _allow_origin(simple) is None


def test_prefect_refuses_a_foreign_host_even_with_the_secret(prefect):
    url, secret = prefect
    for method, path, headers in (("GET", "/api/health", {}), ("GET", "/", {}), ("GET", "/ui-settings", {}),
                                  ("POST", "/api/deployments/filter", _basic(secret))):
        answer = requests.request(method, f"{url}{path}", json={} if method == "POST" else None,
                                  headers={**headers, "Host": "evil.example"}, timeout=10)
        assert answer.status_code == 400 and answer.text == "Invalid host header", (path, answer.text)
    # The same names the stack allows: 127.0.0.1 and localhost, with the server's port.
    port = url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert requests.get(f"{url}/api/health", headers={"Host": host}, timeout=10).json() is True


def test_prefect_api_wants_the_secret(prefect):
    url, secret = prefect
    assert requests.post(f"{url}/api/deployments/filter", json={}, timeout=10).status_code == 401
    assert requests.post(f"{url}/api/deployments/filter", json={}, headers=_basic("omnidiff:wrong"),
                         timeout=10).status_code == 401
    ok = requests.post(f"{url}/api/deployments/filter", json={}, headers=_basic(secret), timeout=10)
    assert ok.status_code == 200 and isinstance(ok.json(), list)
    # Health stays open (status probes); the UI is told to ask for the secret.
    assert requests.get(f"{url}/api/health", timeout=10).json() is True
    assert requests.get(f"{url}/ui-settings", timeout=10).json()["auth"] == "BASIC"
    # The server's own view of its settings: analytics off, the allow-list as set.
    settings = requests.get(f"{url}/api/admin/settings", headers=_basic(secret), timeout=10).json()
    assert settings["server"]["analytics_enabled"] is False
    assert settings["server"]["api"]["cors_allowed_origins"].split(",")[0] == url
    assert secret not in json.dumps(settings)  # a SecretStr: shown masked


def test_a_flow_run_through_the_stack_with_the_secret_and_not_without(stack, prefect, tmp_path):
    """The project's own client: a child finds the stack by OMNIDIFF_HOME (apply_env, as every
    entry point does), gets the secret with the URL, and runs a flow through the API."""
    marker = f"security-{uuid.uuid4().hex[:8]}"
    code = textwrap.dedent(f"""
        import sys
        from omnidiff.stack import apply_env
        applied = apply_env()
        print("APPLIED", " ".join(sorted(applied)))
        from prefect import flow

        @flow(name={marker!r})
        def double(x: int) -> int:
            return 2 * x

        print("RESULT", double(21))
    """)
    env = _client_env_without_stack_vars()
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "RESULT 42" in run.stdout
    assert "PREFECT_API_AUTH_STRING" in run.stdout.split("APPLIED", 1)[1].splitlines()[0].split()

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def runs():
        async with get_client() as client:
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[marker])))

    found = asyncio.run(runs())
    assert [r.state.type.value for r in found] == ["COMPLETED"]

    # Pointed at the same server with a wrong secret (a set value is never replaced): refused.
    env.update(PREFECT_API_URL=os.environ["PREFECT_API_URL"], PREFECT_API_AUTH_STRING="omnidiff:wrong")
    refused = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0 and "RESULT" not in refused.stdout
    assert "401 Unauthorized" in refused.stdout + refused.stderr


def test_the_cli_hands_out_the_secret_and_reaches_prefect(stack, prefect):
    url, secret = prefect
    env = _client_env_without_stack_vars()

    def omnidiff(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "omnidiff.cli", *args], env=env, capture_output=True,
                              text=True, timeout=180)

    shown = omnidiff("stack", "secret")
    assert shown.returncode == 0 and shown.stdout.strip() == secret
    exports = omnidiff("stack", "env")
    assert exports.returncode == 0
    assert f"export PREFECT_API_AUTH_STRING={secret}" in exports.stdout.splitlines()
    assert f"export PREFECT_API_URL={url}/api" in exports.stdout.splitlines()
    # A command that asks the Prefect API (deployments by name) gets an answer, not a 401.
    status = omnidiff("flows", "status")
    assert "serving process:" in status.stdout, status.stdout + status.stderr
    assert "omnidiff-pipeline/omnidiff-pipeline" in status.stdout
    assert "Traceback" not in status.stderr and "401" not in status.stderr, status.stderr


# ----------------------------------------------------------------------------- MLflow


def test_mlflow_refuses_a_foreign_host_and_origin(stack):
    url = stack["services"]["mlflow"]["url"]
    search = "/api/2.0/mlflow/experiments/search"
    foreign_host = requests.get(f"{url}{search}?max_results=1", headers={"Host": "evil.example"}, timeout=10)
    assert foreign_host.status_code == 403, foreign_host.text
    preflight = requests.options(f"{url}{search}", headers=PREFLIGHT, timeout=10)
    assert preflight.status_code == 400 and _allow_origin(preflight) is None
    cross = requests.post(f"{url}{search}", json={"max_results": 1}, headers={"Origin": EVIL}, timeout=10)
    assert cross.status_code == 403 and _allow_origin(cross) is None
    # Its own clients (no Origin, Host 127.0.0.1) are served.
    assert requests.post(f"{url}{search}", json={"max_results": 1}, timeout=10).status_code == 200
    # Telemetry: the server tells its UI that usage reporting is off, and drops what the UI sends.
    assert requests.get(f"{url}/ajax-api/3.0/mlflow/ui-telemetry", timeout=10).json()["disable_ui_telemetry"] is True
    assert requests.post(f"{url}/ajax-api/3.0/mlflow/ui-telemetry", json={"records": []},
                         timeout=10).json() == {"status": "disabled"}


# ----------------------------------------------------------------------------- Ray


def _ray_listening_ports(stack) -> dict[int, str]:
    """Every TCP port the stack's Ray processes listen on -> the process name.

    All on loopback, except one known exception: a Ray Serve replica starts its inter-deployment gRPC
    server on ``[::]:0`` (ray/serve/_private/replica.py ``_on_initialized``; no option changes it),
    so each replica has one such port. docs/architecture.md says so; it speaks gRPC (HTTP/2), which a
    web page cannot send."""
    head = psutil.Process(stack["services"]["ray"]["pid"])
    ports = {}
    for proc in [head, *head.children(recursive=True)]:
        try:
            wildcard = []
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    if conn.laddr.ip in ("::", "0.0.0.0") and proc.name().startswith("ray::ServeReplica"):
                        wildcard.append(conn.laddr.port)
                        continue
                    assert conn.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1"), (proc.name(), conn.laddr)
                    ports[conn.laddr.port] = proc.name()
            assert len(wildcard) <= 1, (proc.name(), wildcard)  # the inter-deployment gRPC server only
        except psutil.NoSuchProcess:
            continue
    return ports


def test_ray_http_endpoints_want_the_token_or_are_read_only_metrics(stack):
    extra = stack["services"]["ray"]["extra_ports"]
    ports = _ray_listening_ports(stack)
    assert extra["dashboard-port"] not in ports  # no dashboard (UI, job submission API) is started
    agent = f"http://127.0.0.1:{extra['dashboard-agent-listen-port']}"
    runtime_env_agent = f"http://127.0.0.1:{extra['runtime-env-agent-port']}"
    assert {extra["dashboard-agent-listen-port"], extra["runtime-env-agent-port"]} <= set(ports)
    token = Path(stack["env"]["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    # The agent's REST API (jobs, serve) and the runtime-env agent: nothing without Ray's token
    # (a 0600 file no page can read), from a foreign Origin or Host alike.
    for base, path in ((agent, "/api/job_agent/jobs/"), (agent, "/api/serve/applications/"),
                       (runtime_env_agent, "/get_or_create_runtime_env")):
        for headers in ({"Origin": EVIL}, {"Host": "evil.example"}):
            answer = requests.post(f"{base}{path}", data=b"{}", headers={**headers, "Content-Type": "text/plain"},
                                   timeout=10)
            assert answer.status_code == 401, (path, answer.status_code, answer.text)
            assert answer.text == "Unauthorized: Missing authentication token"
        preflight = requests.options(f"{base}{path}", headers=PREFLIGHT, timeout=10)
        assert preflight.status_code == 401, (path, preflight.status_code)
    # The agent also refuses anything that looks like a browser's request, token or not (its CORS
    # headers echo any origin, but on this refusal only).
    from_page = requests.post(f"{agent}/api/job_agent/jobs/", data=b"{}",
                              headers={"Origin": EVIL, "Authorization": f"Bearer {token}"}, timeout=10)
    assert from_page.status_code == 403 and from_page.text == "Browser requests not allowed."
    # The Prometheus exporter answers any Host (no Ray option checks it) with read-only metrics, and
    # allows no other origin to read them; docs/architecture.md says so.
    metrics = f"http://127.0.0.1:{extra['metrics-export-port']}/metrics"
    answer = requests.get(metrics, headers={"Origin": EVIL}, timeout=10)
    assert answer.status_code == 200 and _allow_origin(answer) is None
    assert _allow_origin(requests.options(metrics, headers=PREFLIGHT, timeout=10)) is None


# ----------------------------------------------------------------------------- the serve API


def test_serve_api_gives_no_foreign_origin_and_refuses_a_foreign_host(served):
    body = {"prompt": "a red circle", "n": 1, "size": "16x16"}
    route = f"{served.url}/v1/images/generations"
    preflight = requests.options(route, headers=PREFLIGHT, timeout=10)
    assert _allow_origin(preflight) is None, preflight.headers
    cross = requests.post(route, json=body, headers={"Origin": EVIL}, timeout=60)
    assert _allow_origin(cross) is None
    rebound = requests.post(route, json=body, headers={"Host": "evil.example"}, timeout=60)
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host", rebound.text
    rebound_page = requests.get(f"{served.url}/", headers={"Host": "evil.example:8000"}, timeout=60)
    assert rebound_page.status_code == 400, rebound_page.text
