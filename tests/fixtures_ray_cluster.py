"""A multi-node Ray cluster on this machine, for the tests (issue 17): a head started with ``ray start --head`` and
more nodes joined with ``ray start --address``, each with its own temp dir, its own ``OMNIDIFF_HOME`` and its own
custom resource (``{"node_a": 1}``, ``{"node_b": 1}``, ...), all on loopback addresses.

    with ray_cluster(root, [RayNodeSpec("node_a", cpus=1), RayNodeSpec("node_b", cpus=1)]) as cluster:
        with cluster.connected():          # RAY_ADDRESS + the token variables for this process and its children
            ...                             # ensure_ray() / the stages' own code connect to it
        cluster.logs_mention("node_b", "EncodeShardActor")   # did an actor run on node_b?

Each node gets its own loopback address (127.0.0.2, 127.0.0.3, ...): Ray rewrites 127.0.0.1 to the machine's
network address once a second node may join (``ray._private.services.resolve_ip_for_localhost``), and a node
address other than "127.0.0.1"/"localhost" is kept as given. One auth token (mode 0600) for the cluster and its
clients, as ``omnidiff stack up`` does. Nodes are stopped by their own pids (SIGTERM to the ``ray start --block``
process, which stops that node's raylet and workers; SIGKILL of the same pid if it hangs), never ``ray stop``,
which would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
NODE_PORTS = ("object-manager-port", "node-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port")
HEAD_PORTS = ("port", "ray-client-server-port", "dashboard-port")


@dataclass(frozen=True)
class RayNodeSpec:
    name: str  # also the node's custom resource: {name: 1}
    cpus: int = 1
    object_store_mb: int = 128


@dataclass
class RayNode:
    spec: RayNodeSpec
    ip: str
    temp_dir: Path  # Ray's session files, logs and sockets of this node only
    home: Path  # this node's OMNIDIFF_HOME: what its workers see as "local"
    proc: subprocess.Popen
    log: Path


@dataclass
class RayCluster:
    address: str
    token: Path
    nodes: dict[str, RayNode] = field(default_factory=dict)

    def client_env(self) -> dict[str, str]:
        """What a driver needs to join (the project's ensure_ray reads RAY_ADDRESS)."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token)}

    @contextlib.contextmanager
    def connected(self) -> Iterator[RayCluster]:
        """This process (and what it starts) points at the cluster; disconnected and restored on leaving."""
        from omnidiff.stack import _reload_ray_auth

        def disconnect() -> None:
            if "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()

        disconnect()  # an earlier test's Ray (another cluster, another token) must not be reused
        saved = {key: os.environ.get(key) for key in self.client_env()}
        os.environ.update(self.client_env())
        _reload_ray_auth()
        try:
            yield self
        finally:
            disconnect()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _reload_ray_auth()

    def logs_mention(self, node: str, text: str) -> list[Path]:
        """This node's worker log files that contain ``text`` (Ray names the actor class in its worker's log)."""
        found = []
        for path in sorted(self.nodes[node].temp_dir.glob("session_*/logs/*")):
            if path.is_file() and path.suffix in (".out", ".err", ".log"):
                with contextlib.suppress(OSError):
                    if text in path.read_text(errors="replace"):
                        found.append(path)
        return found

    def alive_nodes(self) -> dict[str, dict]:
        """``{node ip: total resources}`` of the alive nodes the GCS knows (asked from a subprocess: this
        process's Ray stays unconnected)."""
        code = ("import json, sys; from ray._raylet import GcsClient; "
                "nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=5).values(); "
                "print(json.dumps({n.node_manager_address: dict(n.resources_total) for n in nodes if n.state == 0}))")
        env = {**os.environ, **self.client_env()}
        env.pop("RAY_ADDRESS")
        out = subprocess.run([sys.executable, "-c", code, self.address], capture_output=True, text=True, env=env,
                             timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"cannot list the nodes of {self.address}: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def _ray() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.is_file() else "ray"


def _node_env(home: Path, token: Path) -> dict[str, str]:
    from omnidiff.env import TELEMETRY_OFF

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env.update(TELEMETRY_OFF)
    env.update({"OMNIDIFF_HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                # the stack switches Ray to single-node mode (loopback only); a second node needs cluster mode
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
    return env


def _start_node(spec: RayNodeSpec, ip: str, root: Path, token: Path, head: str | None) -> tuple[RayNode, int | None]:
    from omnidiff.stack_services import free_ports

    names = NODE_PORTS + (HEAD_PORTS if head is None else ())
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    # Ray's unix sockets live under the temp dir: keep it short (AF_UNIX paths are limited to 107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix=f"r{spec.name[-1]}-", dir="/tmp"))
    home = root / spec.name / "home"
    home.mkdir(parents=True)
    cmd = [_ray(), "start", "--block", "--node-ip-address", ip, "--num-cpus", str(spec.cpus), "--num-gpus", "0",
           "--resources", json.dumps({spec.name: 1}), "--object-store-memory", str(spec.object_store_mb << 20),
           "--disable-usage-stats", "--temp-dir", str(temp_dir)]
    if head is None:
        cmd += ["--head", "--include-dashboard", "false"]
    else:
        cmd += ["--address", head]
    cmd += [x for key, port in ports.items() for x in (f"--{key}", str(port))]
    log = root / spec.name / "ray-start.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_node_env(home, token), cwd=home, start_new_session=True)
    return RayNode(spec, ip, temp_dir, home, proc, log), ports.get("port")


def _stop(node: RayNode) -> None:
    if node.proc.poll() is None:
        os.kill(node.proc.pid, signal.SIGTERM)
        try:
            node.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait(timeout=STOP_TIMEOUT_S)
    import shutil

    shutil.rmtree(node.temp_dir, ignore_errors=True)


def _wait_for(cluster: RayCluster, count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | str = "no answer"
    while time.monotonic() < deadline:
        for node in cluster.nodes.values():
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start of {node.spec.name} exited with {node.proc.returncode}:\n"
                                   f"{node.log.read_text(errors='replace')[-3000:]}")
        try:
            alive = cluster.alive_nodes()
            if len(alive) >= count:
                return
            last = f"{len(alive)} of {count} nodes alive"
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            last = exc
        time.sleep(1.0)
    raise RuntimeError(f"the Ray cluster at {cluster.address} did not come up in {START_TIMEOUT_S:.0f} s: {last}")


@contextlib.contextmanager
def ray_cluster(root: Path, specs: list[RayNodeSpec]) -> Iterator[RayCluster]:
    """Start a head (``specs[0]``) and join the other nodes; every node stopped by pid on leaving."""
    from omnidiff.stack_services import write_token

    root.mkdir(parents=True, exist_ok=True)
    token = write_token(root / "auth_token")
    started: list[RayNode] = []
    try:
        head, port = _start_node(specs[0], "127.0.0.2", root, token, None)
        started.append(head)
        cluster = RayCluster(address=f"127.0.0.2:{port}", token=token, nodes={specs[0].name: head})
        _wait_for(cluster, 1)
        for i, spec in enumerate(specs[1:], start=3):
            started.append(_start_node(spec, f"127.0.0.{i}", root, token, cluster.address)[0])
            cluster.nodes[spec.name] = started[-1]
        _wait_for(cluster, len(specs))
        yield cluster
    finally:
        for node in reversed(started):  # joined nodes first, the head (GCS) last
            _stop(node)
