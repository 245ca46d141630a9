"""The local stack with real processes: up / status / down, failure paths, client environment.

    .venv/bin/pytest tests/test_stack.py -x -q
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from omnidiff import stack as stack_mod
from omnidiff import stack_services


def _omnidiff(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "omnidiff.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _group_members(pgids: set[int]) -> list[int]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in pgids and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_session_stack_answers_and_sets_env(stack):
    services = stack["services"]
    assert requests.get(f"{services['prefect']['url']}/api/health", timeout=5).json() is True
    assert requests.get(f"{services['mlflow']['url']}/health", timeout=5).text.strip() == "OK"
    assert os.environ["MLFLOW_TRACKING_URI"] == services["mlflow"]["url"]
    assert os.environ["PREFECT_API_URL"] == services["prefect"]["url"] + "/api"
    assert os.environ["RAY_ADDRESS"] == services["ray"]["url"]
    report = stack_mod.status()
    assert {name: info["healthy"] for name, info in report.items()} == {"prefect": True, "mlflow": True, "ray": True}


def test_ensure_ray_connects_to_the_stack(stack):
    ray = stack_mod.ensure_ray()
    assert stack_mod.ensure_ray() is ray  # idempotent
    # The head's logical CPU count (4), not a private 2-CPU Ray.
    assert ray.cluster_resources()["CPU"] == 4
    home = ray.get(ray.remote(lambda: os.environ["OMNIDIFF_HOME"]).remote())
    assert home == os.environ["OMNIDIFF_HOME"]
    # Single-node loopback mode: the node registered on 127.0.0.1, not the machine's address.
    assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == ["127.0.0.1"]


PROBE = """
from omnidiff import tracking
with tracking.start_run("s3-probe", run_name="s3-probe") as run:
    tracking.log_json({"stored": "on s3"}, "probe/answer.json")
    print("run_id", run.info.run_id)
"""


def _check_object_storage(state: dict, started: str, env: dict[str, str]) -> None:
    """``--object-storage`` (issue 17 item 3): SeaweedFS's S3 API on loopback beside the other servers, its secret
    out of state.json, the AWS variables handed to clients, and MLflow's artifacts stored in the bucket (proxied
    by the MLflow server, nothing in the local artifact folder)."""
    import pyarrow.fs as pafs

    weed = state["services"]["seaweedfs"]
    assert "weed" in Path(weed["argv"][0]).name and "-ip.bind=127.0.0.1" in weed["argv"]
    assert weed["url"] in started and _port_open(weed["port"])
    secret_file = Path(state["s3_secret_file"])
    secret = secret_file.read_text().strip()
    assert oct(secret_file.stat().st_mode & 0o777) == "0o600" and secret not in json.dumps(state)
    exported = _omnidiff(["stack", "env"], env, timeout=60)
    assert f"export AWS_ENDPOINT_URL={weed['url']}" in exported.stdout
    assert f"export AWS_SECRET_ACCESS_KEY={secret}" in exported.stdout
    # A client that found the stack by itself (apply_env) logs an artifact: it lands in the bucket.
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    run_id = next(line.split()[1] for line in probe.stdout.splitlines() if line.startswith("run_id "))
    fs = pafs.S3FileSystem(endpoint_override=weed["url"], access_key=state["env"]["AWS_ACCESS_KEY_ID"],
                           secret_key=secret, region=state["env"]["AWS_REGION"])
    found = [i.path for i in fs.get_file_info(pafs.FileSelector("omnidiff/mlflow-artifacts", recursive=True))
             if i.type == pafs.FileType.File]
    answer = [p for p in found if run_id in p and p.endswith("probe/answer.json")]
    assert len(answer) == 1, found
    with fs.open_input_stream(answer[0]) as fh:
        assert json.loads(fh.read()) == {"stored": "on s3"}
    local_artifacts = Path(env["OMNIDIFF_HOME"]) / "stack" / "mlflow" / "artifacts"
    assert not any(p.is_file() for p in local_artifacts.rglob("*"))


@pytest.mark.e2e
def test_cli_up_status_down_leaves_nothing(tmp_path):
    """``omnidiff stack up`` with every server (Prefect, MLflow, Ray, SeaweedFS's S3 API when ``weed`` is installed,
    and the deployment-serving process), ``status``, ``env``, then ``down`` leaves no process, port or file."""
    from tests.fixtures_s3 import weed_binary

    object_storage = weed_binary() is not None  # the test extra installs it; without it, the other servers only
    # A long OMNIDIFF_HOME on purpose: Ray's socket paths must still fit (short symlink).
    fake_home = tmp_path / "home"
    fake_home.mkdir()
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH",
                "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        env.pop(key, None)
    env.update(HOME=str(fake_home), OMNIDIFF_HOME=str(tmp_path / "a_rather_long_project_working_directory"))
    state_file = Path(env["OMNIDIFF_HOME"]) / "stack" / "state.json"
    servers = ["prefect", "mlflow", "ray", *(["seaweedfs"] if object_storage else [])]

    t0 = time.monotonic()
    started = _omnidiff(["stack", "up", "--free-ports", "--ray-cpus", "2",
                         *(["--object-storage"] if object_storage else [])], env, timeout=240)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        print(f"stack up: all healthy after {time.monotonic() - t0:.1f} s (wall, incl. CLI start)")
        state = json.loads(state_file.read_text())
        services = state["services"]
        assert sorted(services) == sorted(servers)
        for name in servers:
            assert services[name]["url"] in started.stdout
            assert _port_open(services[name]["port"]), name
            assert Path(services[name]["log"]).is_file()
        token = Path(state["env"]["RAY_AUTH_TOKEN_PATH"])
        assert token.is_relative_to(env["OMNIDIFF_HOME"]) and oct(token.stat().st_mode & 0o777) == "0o600"
        # The Prefect API's auth string: its own 0600 file, named at `up`, never in state.json.
        prefect_auth = Path(state["prefect_auth_file"])
        assert prefect_auth.is_relative_to(env["OMNIDIFF_HOME"]) and oct(prefect_auth.stat().st_mode & 0o777) == "0o600"
        assert prefect_auth.read_text().strip() not in state_file.read_text()
        assert "omnidiff stack secret" in started.stdout

        status = _omnidiff(["stack", "status"], env, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("healthy") == len(servers)
        if object_storage:
            _check_object_storage(state, started.stdout, env)

        recorded = [svc["pid"] for svc in services.values()]
        recorded += [pid for svc in services.values() for pid in svc.get("children", [])]
        assert len(recorded) > len(servers)  # the tree, not just the leaders
    finally:
        stopped = _omnidiff(["stack", "down"], env, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(pid) for pid in recorded):
        time.sleep(0.2)
    assert [pid for pid in recorded if not _gone(pid)] == []
    assert _group_members({svc["pgid"] for svc in services.values()}) == []
    assert not any(_port_open(services[name]["port"]) for name in services)
    assert not state_file.exists()
    assert _omnidiff(["stack", "status"], env, timeout=60).returncode == 3
    # Nothing in the home directory: no ~/.ray/auth_token, no ~/.prefect, no ~/.mlflow, no ~/.aws.
    assert sorted(p.relative_to(fake_home) for p in fake_home.rglob("*")) == []


def test_fate_shared_servers_die_with_their_parent(tmp_path):
    """What the `stack` fixture relies on: a SIGKILLed test session leaves no server behind.

    The mechanism (supervisor.launch with fate_share) on a stand-in server; that each real
    server exits cleanly on SIGTERM is what `down` tests above.
    """
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from omnidiff import supervisor\n"
        "argv = [sys.executable, '-c', 'import time; time.sleep(600)']\n"
        f"p = supervisor.launch(argv, {{}}, Path({str(tmp_path / 'sleeper.log')!r}), fate_share=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        assert os.getpgid(child) == child  # its own process group, as `down` expects
    finally:
        parent.kill()  # no teardown, no `down`
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _gone(child):
        time.sleep(0.1)
    assert _gone(child)


def test_stop_all_names_what_needed_sigkill(tmp_path):
    """A server that ignores SIGTERM is SIGKILLed after the grace, and the result names it by its command line, so
    `stack down` (and the test session's end) can say which server did not stop; one that stops is not named."""
    from omnidiff import supervisor

    stubborn = supervisor.launch([sys.executable, "-c", "import signal,time;signal.signal(15,signal.SIG_IGN);"
                                  "print('up',flush=True);time.sleep(600)", "stubborn-server"],
                                 {}, tmp_path / "stubborn.log")
    polite = supervisor.launch([sys.executable, "-c", "import time; time.sleep(600)", "polite-server"], {},
                               tmp_path / "polite.log")
    deadline = time.monotonic() + 10  # the handler is installed before "up" is printed (on a line of its own)
    while time.monotonic() < deadline and "\nup\n" not in (tmp_path / "stubborn.log").read_text():
        time.sleep(0.05)
    records = [supervisor.record(stubborn, tmp_path / "stubborn.log"), supervisor.record(polite, tmp_path / "polite.log")]
    result = supervisor.stop_all(records, grace_s=0.5)
    assert result["killed"] == [stubborn.pid] and sorted(result["stopped"]) == sorted([stubborn.pid, polite.pid])
    assert len(result["killed_names"]) == 1 and result["killed_names"][0].startswith(f"{stubborn.pid} ")
    assert "stubborn-server" in result["killed_names"][0] and "polite-server" not in result["killed_names"][0]
    assert _gone(stubborn.pid) and _gone(polite.pid)


def test_up_refuses_a_busy_port_and_names_it(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNIDIFF_HOME", str(tmp_path / "h"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        prefect_port, ray_port = stack_services.free_ports(2)
        with pytest.raises(stack_mod.StackError, match=rf"mlflow: port {port} .*--free-ports"):
            stack_mod.up(prefect_port=prefect_port, mlflow_port=port, ray_port=ray_port, quiet=True)
    assert stack_mod.read_state() is None


@pytest.mark.e2e
def test_up_timeout_names_services_shows_logs_and_cleans_up(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNIDIFF_HOME", str(tmp_path / "h"))
    with pytest.raises(stack_mod.StackError) as err:
        stack_mod.up(free_ports=True, timeout_s=0.5, quiet=True)
    message = str(err.value)
    for name in ("prefect", "mlflow", "ray"):
        assert f"{name}: not healthy after" in message
        assert f"logs/{name}.log" in message
    assert "omnidiff stack:" in message  # the log tail: each log starts with the launch line
    last = json.loads((tmp_path / "h" / "stack" / "state.last.json").read_text())
    pids = [svc["pid"] for svc in last["services"].values()]
    assert pids and all(_gone(pid) for pid in pids)
    assert _group_members({svc["pgid"] for svc in last["services"].values()}) == []
    assert stack_mod.read_state() is None


def test_apply_env_fills_only_unset_variables(monkeypatch):
    state = {"env": {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:1", "PREFECT_API_URL": "http://127.0.0.1:2/api",
        "RAY_ADDRESS": "127.0.0.1:3", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/x/auth_token",
    }}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    applied = stack_mod.apply_env(state)
    assert applied == {"PREFECT_API_URL": "http://127.0.0.1:2/api"}
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://elsewhere:5000"
    # The token goes with its RAY_ADDRESS: never paired with someone else's cluster.
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ
    stack_mod.apply_env(state, override=True)
    assert os.environ["RAY_ADDRESS"] == "127.0.0.1:3"
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == "/x/auth_token"


def test_apply_env_ignores_a_stack_that_is_not_running(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNIDIFF_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dead = {"pid": 2**22 + 7, "create_time": 0.0}  # above the default pid_max: never a live pid
    state = {"services": {name: dict(dead) for name in stack_mod.SERVICES},
             "env": {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}}
    stack_mod.stack_dir().joinpath("state.json").write_text(json.dumps(state))
    assert stack_mod.apply_env() == {}
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_short_path_keeps_ray_sockets_under_the_unix_limit(tmp_path):
    long_dir = tmp_path / ("x" * 80)
    long_dir.mkdir()
    link = stack_services.short_path(long_dir)
    try:
        assert len(str(link)) <= stack_services._RAY_TEMP_MAX_CHARS
        assert link.resolve() == long_dir.resolve()
        assert stack_services.short_path(long_dir) == link  # stable
        assert stack_services.short_path(link) == link  # a path short enough already comes back unchanged
    finally:
        link.unlink()


@pytest.mark.e2e
def test_ensure_ray_without_a_stack_starts_a_private_ray_under_home(tmp_path):
    fake_home = tmp_path / "home"
    fake_home.mkdir()
    omnidiff_home = tmp_path / "a_rather_long_project_working_directory_for_ray"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_TRACKING", "PREFECT_API"))}
    env.update(HOME=str(fake_home), OMNIDIFF_HOME=str(omnidiff_home))
    code = (
        "import os, psutil\n"
        "import ray  # imported before ensure_ray sets the auth variables: it must still work\n"
        "from omnidiff import stack\n"
        "ray = stack.ensure_ray()\n"
        "assert stack.ensure_ray() is ray\n"
        "print('CPU', ray.cluster_resources()['CPU'])\n"
        "print('ANSWER', ray.get(ray.remote(lambda: 6 * 7).remote()))\n"
        "print('TREE', ' '.join(str(p.pid) for p in psutil.Process().children(recursive=True)))\n"
        "ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ", 1)[0].isupper())
    assert float(lines["CPU"]) == 2.0 and lines["ANSWER"] == "42"
    assert list((omnidiff_home / "ray").glob("session_*")), "Ray's temp dir is not under OMNIDIFF_HOME/ray"
    assert (omnidiff_home / "ray" / "auth_token").is_file()
    tree = [int(pid) for pid in lines["TREE"].split()]
    assert tree, "a private Ray starts processes"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(_gone(pid) for pid in tree):
        time.sleep(0.2)
    assert [pid for pid in tree if not _gone(pid)] == []
    assert sorted(p.relative_to(fake_home) for p in fake_home.rglob("*")) == []


@pytest.mark.e2e
def test_ray_train_state_api_warning_does_not_reach_the_driver(tmp_path):
    """Issue 14: Ray Train's placement-group cleaner warns every few seconds that the state API
    (the dashboard, which the stack does not start) is unavailable; 803 lines in one demo's log.
    A driver connected by ensure_ray drops exactly those forwarded lines and keeps the others."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_TRACKING", "PREFECT_API"))}
    env.update(OMNIDIFF_HOME=str(tmp_path / "h"))
    code = (
        "import logging, time\n"
        "from omnidiff import stack\n"
        "ray = stack.ensure_ray(num_cpus=1)\n"
        "@ray.remote\n"
        "class Cleaner:\n"
        "    def go(self):\n"
        "        log = logging.getLogger('ray.train.v2._internal.execution.controller.placement_group_cleaner')\n"
        "        for _ in range(3):\n"
        "            log.warning('Failed to query Ray Train Controller actor state. State API may be temporarily '\n"
        "                        'unavailable. Continuing to monitor.')\n"
        "            print('an ordinary line', flush=True)\n"
        "            time.sleep(0.2)\n"
        "ray.get(Cleaner.remote().go.remote())\n"
        "time.sleep(3)  # the log monitor forwards in batches\n"
        "ray.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    console = out.stdout + out.stderr
    assert "an ordinary line" in console
    assert "Failed to query Ray Train Controller actor state" not in console
