"""The local stack: a Prefect server, an MLflow tracking server and a Ray head, all on 127.0.0.1.

    omnidiff stack up [--free-ports] [--prefect-port 4200] [--mlflow-port 5000] [--ray-port 6379]
                      [--ray-cpus 4] [--ray-object-store-mb 1024] [--timeout 120]
    omnidiff stack status
    omnidiff stack down

``up`` starts the three servers in parallel, each in its own process group,
waits until each answers (Prefect ``/api/health``, MLflow ``/health``, Ray: a
GCS client sees an alive node), prints their URLs and records what it started
in ``state.json``. ``down`` stops exactly those processes, by recorded process
group and pid; it never runs ``ray stop``, which would kill every Ray on the
machine. ``status`` asks each recorded server whether it is healthy.

Everything lives under ``$OMNIDIFF_HOME/stack/``::

    state.json        pids, process groups, ports, urls, client environment
    logs/<name>.log   each server's stdout + stderr
    prefect/          PREFECT_HOME of the server (SQLite prefect.db)
    mlflow/           mlflow.db (SQLite backend store) + artifacts/ (artifact root, proxied by the server)
    ray/              Ray's temp dir (session logs, sockets, spilled objects) + auth_token

Ray token authentication (a choice; ../shared/NOTES.md): Ray 2.60 turns token
auth on for a new cluster and writes the token to ``~/.ray/auth_token``. Its
internal ports listen on every interface even with node ip 127.0.0.1, so
instead of disabling auth we keep it on and keep the token in the project:
``up`` writes a random token to ``stack/ray/auth_token`` (mode 0600) and starts
the head with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` pointing at
it; :func:`apply_env` hands clients the same two variables. :func:`ensure_ray`
does the same for a private local Ray. Nothing is written to ``~``.

Other entry points call :func:`apply_env` to find the stack, and
:func:`ensure_ray` to get a Ray connection.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import requests

from omnidiff.env import home, subdir

HOST = "127.0.0.1"
SERVICES = ("prefect", "mlflow", "ray")
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "ray": 6379}
STATE_VERSION = 1
# AF_UNIX paths are limited to 107 bytes; Ray puts its sockets at
# <temp>/session_<date>_<time>_<usec>_<pid>/sockets/<name> (~70 bytes after <temp>).
_RAY_TEMP_MAX_CHARS = 36

# Popen objects of servers this process started, so that `down` in the same
# process can reap them (a dead child stays a zombie, and so "alive", until waited).
_CHILDREN: dict[int, subprocess.Popen] = {}


class StackError(RuntimeError):
    """The stack could not be started, found or stopped; the message says which service and why."""


# ----------------------------------------------------------------------------- paths and state


def stack_dir() -> Path:
    return subdir("stack")


def state_path() -> Path:
    return stack_dir() / "state.json"


def read_state() -> dict[str, Any] | None:
    """The recorded state of the last ``up`` under this home, or None."""
    path = state_path()
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StackError(f"{path} is not valid JSON ({exc}); remove it after checking no server is left") from None


def _write_state(state: dict[str, Any]) -> None:
    tmp = state_path().with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_path())


def _short_path(path: Path) -> Path:
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


def _ray_env(token: Path) -> dict[str, str]:
    """Environment a Ray head and its clients share (see the module docstring on auth)."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        # `ray start --node-ip-address 127.0.0.1` swaps loopback for the machine's
        # address (services.resolve_ip_for_localhost) so that other nodes could
        # join. Ray's single-node mode (the default on macOS/Windows, switched on
        # here) keeps node and driver addresses on 127.0.0.1.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


def _write_token(path: Path) -> Path:
    if not path.is_file() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


# ----------------------------------------------------------------------------- ports and processes


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))  # Ray binds some ports on every interface
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
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


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the venv's own script first
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name}: executable not found beside {sys.executable} or on PATH; is the project installed?")
    return found


def _pid_alive(pid: int, create_time: float | None = None) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A recycled pid belongs to a process created later than ours.
        return create_time is None or abs(proc.create_time() - create_time) < 1.0
    except psutil.NoSuchProcess:
        return False


def _log_tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (log is empty)"


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the process that started it dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, 15)  # PR_SET_PDEATHSIG = 1, SIGTERM = 15


def _launch(name: str, argv: list[str], env: dict[str, str], log_path: Path,
            fate_share: bool = False) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} omnidiff stack: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            # Own session = own process group: `down` signals the whole group,
            # and Ctrl-C in the shell that ran `up` does not reach the servers.
            start_new_session=True,
            preexec_fn=_die_with_parent if fate_share and sys.platform.startswith("linux") else None,
        )
    _CHILDREN[proc.pid] = proc
    return proc


# ----------------------------------------------------------------------------- health checks

# Runs in a subprocess with the Ray client's environment (token variables):
# polls the GCS until an alive node has registered, i.e. a driver can connect.
_RAY_PROBE = r"""
import sys, time
from ray._raylet import GcsClient
address, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
last = "no answer from the GCS"
while True:
    try:
        nodes = GcsClient(address=address).get_all_node_info(timeout=2)
        alive = [n for n in nodes.values() if n.state == 0]
        if alive:
            print(f"ok: {len(alive)} alive node(s)")
            sys.exit(0)
        last = "GCS answers but no node is alive yet"
    except Exception as exc:
        last = f"{type(exc).__name__}: {exc}"
    if time.monotonic() > deadline:
        print(last)
        sys.exit(1)
    time.sleep(0.5)
"""


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def _health_url(name: str, svc: dict[str, Any]) -> str | None:
    return {"prefect": f"{svc.get('url')}/api/health", "mlflow": f"{svc.get('url')}/health"}.get(name)


def _start_ray_probe(address: str, env: dict[str, str], timeout_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _RAY_PROBE, address, str(timeout_s)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )


def _ray_client_env(state_env: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({k: v for k, v in state_env.items() if k.startswith("RAY_")})
    env.pop("RAY_ADDRESS", None)
    return env


# ----------------------------------------------------------------------------- up / down / status


def _commands(ports: dict[str, int], ray_ports: dict[str, int], ray_cpus: int, object_store_mb: int,
              mlflow_workers: int, ray_temp: Path) -> dict[str, list[str]]:
    root = stack_dir()
    mlflow_dir = root / "mlflow"
    (mlflow_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    return {
        "prefect": [_executable("prefect"), "server", "start", "--host", HOST, "--port", str(ports["prefect"])],
        "mlflow": [
            _executable("mlflow"), "server", "--host", HOST, "--port", str(ports["mlflow"]),
            "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination", str(mlflow_dir / "artifacts"),
            "--workers", str(mlflow_workers),
        ],
        "ray": [
            _executable("ray"), "start", "--head", "--block",
            "--node-ip-address", HOST, "--port", str(ports["ray"]),
            "--num-cpus", str(ray_cpus), "--num-gpus", "0",
            "--object-store-memory", str(object_store_mb * 1024 * 1024),
            "--include-dashboard", "false", "--disable-usage-stats",
            "--temp-dir", str(ray_temp),
            # Ray's secondary ports have fixed defaults (10001, 52365, ...):
            # pick free ones so that several stacks (one per test session) coexist.
            *(x for key, port in ray_ports.items() for x in (f"--{key}", str(port))),
        ],
    }


def _service_env(name: str, base: dict[str, str], ray_env: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS"):
        env.pop(key, None)  # a server must not talk to some other stack
    env["OMNIDIFF_HOME"] = str(home())  # Ray workers inherit it: same home as the driver
    if name == "prefect":
        env["PREFECT_HOME"] = str(stack_dir() / "prefect")
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    elif name == "mlflow":
        # Without it the server forks a job runner: 8 processes and ~2.3 GB (NOTES.md).
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    elif name == "ray":
        env.update(ray_env)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _running(state: dict[str, Any] | None) -> list[str]:
    if not state:
        return []
    return [
        name for name, svc in state.get("services", {}).items()
        if _pid_alive(svc["pid"], svc.get("create_time"))
    ]


def up(
    prefect_port: int = DEFAULT_PORTS["prefect"],
    mlflow_port: int = DEFAULT_PORTS["mlflow"],
    ray_port: int = DEFAULT_PORTS["ray"],
    free_ports: bool = False,
    ray_cpus: int = 4,
    ray_object_store_mb: int = 1024,
    mlflow_workers: int = 1,
    timeout_s: float = 120.0,
    quiet: bool = False,
    fate_share: bool = False,
) -> dict[str, Any]:
    """Start Prefect, MLflow and a Ray head on 127.0.0.1 in parallel; return the recorded state.

    ``ray_cpus`` is the head's *logical* CPU count: more than the 2 physical
    cores here, so Serve replicas, Data actors and Train workers can be placed
    side by side instead of waiting for each other. ``fate_share=True`` (the
    test fixture) makes each server get SIGTERM when this process dies, so a
    killed test session leaves no stack behind. Raises :class:`StackError`
    naming the service (and the tail of its log) when one fails or is not
    healthy within ``timeout_s``; then nothing of this call is left running.
    """
    say = (lambda *a: None) if quiet else print
    existing = read_state()
    alive = _running(existing)
    if alive:
        if sorted(alive) == sorted(SERVICES):
            say(f"stack already running under {stack_dir()} (omnidiff stack status | down)")
            return existing
        raise StackError(
            f"a partial stack is running under {stack_dir()} ({', '.join(alive)} alive); "
            "run `omnidiff stack down` first"
        )
    for name, value in (("ray_cpus", ray_cpus), ("ray_object_store_mb", ray_object_store_mb),
                        ("mlflow_workers", mlflow_workers), ("timeout_s", timeout_s)):
        if value <= 0:
            raise StackError(f"{name}={value!r}: must be positive")
    if ray_object_store_mb < 80:
        raise StackError(f"ray_object_store_mb={ray_object_store_mb}: Ray needs at least 80 MB")

    if free_ports:
        picked = _free_ports(3 + 8)
        ports = dict(zip(SERVICES, picked[:3], strict=True))
        extra = picked[3:]
    else:
        ports = {"prefect": prefect_port, "mlflow": mlflow_port, "ray": ray_port}
        for name, port in ports.items():
            if not _port_free(port):
                raise StackError(
                    f"{name}: port {port} on {HOST} is already in use; pick another with "
                    f"--{name}-port or use --free-ports"
                )
        extra = _free_ports(8)
    ray_ports = dict(zip(
        ("ray-client-server-port", "object-manager-port", "node-manager-port", "dashboard-agent-listen-port",
         "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "dashboard-port"),
        extra,
        strict=True,
    ))

    root = stack_dir()
    logs = root / "logs"
    ray_dir = root / "ray"
    ray_dir.mkdir(parents=True, exist_ok=True)
    ray_temp = _short_path(ray_dir)
    token = _write_token(ray_dir / "auth_token")
    urls = {
        "prefect": f"http://{HOST}:{ports['prefect']}",
        "mlflow": f"http://{HOST}:{ports['mlflow']}",
        "ray": f"{HOST}:{ports['ray']}",
    }
    client_env = {
        "MLFLOW_TRACKING_URI": urls["mlflow"],
        "PREFECT_API_URL": f"{urls['prefect']}/api",
        "RAY_ADDRESS": urls["ray"],
        **_ray_env(token),
    }
    ray_env = _ray_env(token)
    commands = _commands(ports, ray_ports, ray_cpus, ray_object_store_mb, mlflow_workers, ray_temp)

    t0 = time.monotonic()
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "home": str(home()),
        "started_at": time.time(),
        "services": {},
        "env": client_env,
        "ray_temp_link": str(ray_temp) if ray_temp != ray_dir else None,
    }
    base_env = dict(os.environ)
    try:
        for name in SERVICES:
            log_path = logs / f"{name}.log"
            proc = _launch(name, commands[name], _service_env(name, base_env, ray_env), log_path, fate_share)
            state["services"][name] = {
                "pid": proc.pid,
                "pgid": os.getpgid(proc.pid),
                "create_time": psutil.Process(proc.pid).create_time(),
                "port": ports[name],
                "url": urls[name],
                "log": str(log_path),
                "argv": commands[name],
                "healthy": False,
            }
            if name == "ray":
                state["services"][name]["extra_ports"] = ray_ports
            # Written after each launch: if `up` itself dies now, `down` still finds them.
            _write_state(state)
        _wait_healthy(state, timeout_s, t0, say)
    except BaseException:
        down(quiet=True)
        raise
    state["ready_s"] = round(time.monotonic() - t0, 1)
    for svc in state["services"].values():
        svc["healthy"] = True
        # Informational: the process tree as started (down re-reads it at stop time).
        with contextlib.suppress(psutil.NoSuchProcess):
            svc["children"] = [c.pid for c in psutil.Process(svc["pid"]).children(recursive=True)]
    _write_state(state)
    say(format_urls(state))
    say(f"all healthy in {state['ready_s']:.1f} s; logs in {logs}")
    return state


def _wait_healthy(state: dict[str, Any], timeout_s: float, t0: float, say) -> None:
    services = state["services"]
    ray_probe = _start_ray_probe(services["ray"]["url"], _ray_client_env(state["env"]), timeout_s)
    pending = set(SERVICES)
    failures: dict[str, str] = {}
    try:
        while pending:
            for name in sorted(pending):
                svc = services[name]
                proc = _CHILDREN.get(svc["pid"])
                if proc is not None and proc.poll() is not None:
                    failures[name] = f"exited with code {proc.returncode} before it was healthy"
                elif name == "ray":
                    rc = ray_probe.poll()
                    if rc == 0:
                        pending.discard(name)
                    elif rc is not None:
                        failures[name] = f"no client could connect: {ray_probe.stdout.read().strip()}"
                elif _http_ok(_health_url(name, svc), timeout=1.0):
                    pending.discard(name)
                if name in pending and name not in failures:
                    continue
                if name not in failures:
                    say(f"  {name:<8} healthy after {time.monotonic() - t0:.1f} s")
                pending.discard(name)
            if failures:
                break
            if time.monotonic() - t0 > timeout_s:
                for name in pending:
                    failures[name] = f"not healthy after {timeout_s:.0f} s"
                break
            time.sleep(0.5)
    finally:
        if ray_probe.poll() is None:
            ray_probe.kill()
        ray_probe.wait()
        if ray_probe.stdout:
            ray_probe.stdout.close()
    if failures:
        parts = [
            f"{name}: {why}\n  log {services[name]['log']}:\n{_log_tail(services[name]['log'])}"
            for name, why in failures.items()
        ]
        raise StackError("the local stack did not come up:\n" + "\n".join(parts))


def format_urls(state: dict[str, Any]) -> str:
    svc = state["services"]
    return "\n".join([
        f"prefect  {svc['prefect']['url']}   (API {state['env']['PREFECT_API_URL']})",
        f"mlflow   {svc['mlflow']['url']}",
        f"ray      {svc['ray']['url']}   (RAY_ADDRESS; token in {state['env']['RAY_AUTH_TOKEN_PATH']})",
    ])


def _stack_processes(state: dict[str, Any]) -> list[psutil.Process]:
    """Every live process that `up` started: the recorded groups and the recorded process trees."""
    started_at = state.get("started_at", 0.0) - 1.0
    pgids = {svc["pgid"] for svc in state.get("services", {}).values()}
    found: dict[int, psutil.Process] = {}
    for svc in state.get("services", {}).values():
        if _pid_alive(svc["pid"], svc.get("create_time")):
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(svc["pid"])
                for proc in [root, *root.children(recursive=True)]:
                    found[proc.pid] = proc
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            # A process created before `up` cannot be ours, whatever its group id says now.
            if os.getpgid(proc.pid) in pgids and proc.info["create_time"] >= started_at:
                found[proc.pid] = proc
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return [p for p in found.values() if p.pid != os.getpid()]


def down(quiet: bool = False, grace_s: float = 15.0) -> dict[str, Any]:
    """Stop exactly what ``up`` recorded (SIGTERM to each process group, SIGKILL after ``grace_s``).

    Returns ``{"stopped": [pids], "killed": [pids]}``; removes ``state.json``.
    Raises :class:`StackError` if a process survives SIGKILL.
    """
    say = (lambda *a: None) if quiet else print
    state = read_state()
    if state is None:
        say(f"no stack recorded under {stack_dir()}")
        return {"stopped": [], "killed": []}
    _stop_flows_server(grace_s)
    procs = _stack_processes(state)
    services = state.get("services", {})
    # 1. SIGTERM to each server's own process: `ray start --block` then drains
    #    and stops its children in order (~2 s). Signalling Ray's whole group at
    #    once instead leaves gcs_server and the `ray start` process hanging.
    leaders = []
    for svc in services.values():
        if _pid_alive(svc["pid"], svc.get("create_time")):
            with contextlib.suppress(psutil.NoSuchProcess):
                leader = psutil.Process(svc["pid"])
                leader.terminate()
                leaders.append(leader)
    psutil.wait_procs(leaders, timeout=grace_s, callback=lambda p: _reap_children())
    # 2. SIGTERM to whatever is left of the recorded groups and trees, 3. then SIGKILL.
    # Re-scan: a server killed mid start-up may have spawned children after the first look.
    seen = {p.pid: p for p in [*procs, *_stack_processes(state)]}
    procs = list(seen.values())
    left = [p for p in procs if _still_running(p)]
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=5.0, callback=lambda p: _reap_children())
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, survivors = psutil.wait_procs(alive, timeout=5.0)
    _reap_children()
    if survivors:
        raise StackError(f"processes survived SIGKILL: {[p.pid for p in survivors]}")
    link = state.get("ray_temp_link")
    if link and Path(link).is_symlink():
        Path(link).unlink()
    state_path().replace(stack_dir() / "state.last.json")
    result = {"stopped": sorted(p.pid for p in procs), "killed": sorted(p.pid for p in alive)}
    say(f"stopped {len(procs)} processes ({len(left)} after the servers themselves, {len(alive)} by SIGKILL)")
    return result


def _stop_flows_server(grace_s: float) -> None:
    """Stop the Prefect deployment-serving process (``omnidiff flows deploy``) before its server.

    NOTES.md: a serving process still running when the Prefect server stops hangs on shutdown.
    Its pid is in ``stack/flows.json`` (written by flows/cli.py); it leads its own process group.
    """
    path = stack_dir() / "flows.json"
    if not path.is_file():
        return
    pid = json.loads(path.read_text()).get("pid")
    with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.2)
        if _pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)


def start_flows_server(config: str | Path, timeout_s: float = 240.0) -> int:
    """Run ``omnidiff flows deploy --config CONFIG`` against this stack (a child process; no import of flows)."""
    state = read_state()
    env = {**os.environ, **(state or {}).get("env", {})}
    cmd = [sys.executable, "-m", "flows.cli", "deploy", "--config", str(config)]
    return subprocess.run(cmd, env=env, timeout=timeout_s).returncode


def _still_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap_children() -> None:
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


def status(timeout_s: float = 15.0) -> dict[str, Any]:
    """``{service: {"pid", "alive", "healthy", "url", "log"}}`` for the recorded stack ({} if none)."""
    state = read_state()
    if state is None:
        return {}
    out: dict[str, Any] = {}
    probe = None
    for name, svc in state["services"].items():
        alive = _pid_alive(svc["pid"], svc.get("create_time"))
        out[name] = {"pid": svc["pid"], "alive": alive, "healthy": False, "url": svc["url"], "log": svc["log"]}
        if not alive:
            continue
        if name == "ray":
            probe = _start_ray_probe(svc["url"], _ray_client_env(state["env"]), timeout_s)
        else:
            out[name]["healthy"] = _http_ok(_health_url(name, svc), timeout=timeout_s)
    if probe is not None:
        try:
            output, _ = probe.communicate(timeout=timeout_s + 10)
            out["ray"]["healthy"] = probe.returncode == 0
            out["ray"]["detail"] = output.strip()
        except subprocess.TimeoutExpired:
            probe.kill()
            probe.communicate()
    return out


# ----------------------------------------------------------------------------- clients


def apply_env(state: dict[str, Any] | None = None, override: bool = False) -> dict[str, str]:
    """Point this process at the running stack: MLFLOW_TRACKING_URI, PREFECT_API_URL, RAY_ADDRESS.

    Only variables that are unset are filled (``override=True`` replaces them);
    Ray's token variables go with RAY_ADDRESS. Does nothing when no stack is
    recorded or its servers are not running. Returns what it set.
    """
    if state is None:
        state = read_state()
        if state is None or sorted(_running(state)) != sorted(SERVICES):
            return {}
    env = state["env"]
    groups = [
        ("MLFLOW_TRACKING_URI",),
        ("PREFECT_API_URL",),
        ("RAY_ADDRESS", *(key for key in env if key.startswith("RAY_") and key != "RAY_ADDRESS")),
    ]
    applied: dict[str, str] = {}
    for group in groups:
        if override or not os.environ.get(group[0]):
            for key in group:
                os.environ[key] = env[key]
                applied[key] = env[key]
    return applied


def _reload_ray_auth() -> None:
    """Make an already imported Ray see the auth variables set since (it reads them once, at import)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def ensure_ray(num_cpus: int = 2):
    """Connect this process to Ray once: to ``RAY_ADDRESS`` if set, else a private local Ray.

    The private Ray has ``num_cpus`` logical CPUs, no dashboard, its temp dir
    under ``$OMNIDIFF_HOME/ray`` and its auth token beside it (not in ``~``).
    Idempotent: returns the ``ray`` module, initialised.
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return sys.modules["ray"]
    apply_env()
    address = os.environ.get("RAY_ADDRESS")
    ray_dir = None if address else subdir("ray")
    if ray_dir is not None and not os.environ.get("RAY_AUTH_MODE"):
        for key, value in _ray_env(_write_token(ray_dir / "auth_token")).items():
            os.environ.setdefault(key, value)
    import ray

    _reload_ray_auth()
    from omnidiff.ray_logging import SETUP_HOOK  # drops a Ray Train warning that floods the log

    if address:
        ray.init(address=address, log_to_driver=True, runtime_env={"worker_process_setup_hook": SETUP_HOOK})
        return ray
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=str(_short_path(ray_dir)),
        log_to_driver=True,
        runtime_env={"worker_process_setup_hook": SETUP_HOOK},
    )
    return ray


# ----------------------------------------------------------------------------- CLI


def _print_status(report: dict[str, Any]) -> None:
    for name, info in report.items():
        word = "healthy" if info["healthy"] else ("UNHEALTHY" if info["alive"] else "DOWN")
        print(f"{name:<8} {word:<9} pid {info['pid']:<8} {info['url']}")
        if not info["healthy"]:
            print(f"         log: {info['log']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnidiff stack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start Prefect, MLflow and a Ray head on 127.0.0.1 and wait until healthy")
    p_up.add_argument("--prefect-port", type=int, default=DEFAULT_PORTS["prefect"])
    p_up.add_argument("--mlflow-port", type=int, default=DEFAULT_PORTS["mlflow"])
    p_up.add_argument("--ray-port", type=int, default=DEFAULT_PORTS["ray"])
    p_up.add_argument("--free-ports", action="store_true", help="pick free ports instead of the defaults")
    p_up.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the Ray head (default 4)")
    p_up.add_argument("--ray-object-store-mb", type=int, default=1024)
    p_up.add_argument("--mlflow-workers", type=int, default=1)
    p_up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all three to be healthy")
    p_up.add_argument("--flows-config", default="configs/pipeline.yaml",
                      help="pipeline config whose deployments the flows-serving process creates")
    p_up.add_argument("--no-flows", action="store_true", help="do not start the Prefect deployment-serving process")
    sub.add_parser("down", help="stop exactly what `up` started")
    sub.add_parser("status", help="report each service's health")
    sub.add_parser("env", help="print shell exports pointing at the running stack")
    args = parser.parse_args(argv)

    try:
        if args.command == "up":
            state = up(
                prefect_port=args.prefect_port, mlflow_port=args.mlflow_port, ray_port=args.ray_port,
                free_ports=args.free_ports, ray_cpus=args.ray_cpus, ray_object_store_mb=args.ray_object_store_mb,
                mlflow_workers=args.mlflow_workers, timeout_s=args.timeout,
            )
            if state and not args.no_flows:
                if Path(args.flows_config).is_file():
                    if start_flows_server(args.flows_config) != 0:
                        print("omnidiff stack: the deployment-serving process did not start (see "
                              f"{stack_dir() / 'logs' / 'flows.log'})", file=sys.stderr)
                        return 1
                else:
                    print(f"flows: {args.flows_config} not found; deployments not served (--flows-config)")
            print("shell: eval \"$(omnidiff stack env)\"   (omnidiff commands find the stack themselves)")
            return 0 if state else 1
        if args.command == "down":
            down()
            return 0
        if args.command == "env":
            state = read_state()
            if not state or sorted(_running(state)) != sorted(SERVICES):
                print(f"no running stack under {stack_dir()}", file=sys.stderr)
                return 1
            for key, value in state["env"].items():
                print(f"export {key}={value}")
            return 0
        report = status()
        if not report:
            print(f"no stack recorded under {stack_dir()} (omnidiff stack up)")
            return 3
        _print_status(report)
        return 0 if all(info["healthy"] for info in report.values()) else 1
    except StackError as exc:
        print(f"omnidiff stack: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
