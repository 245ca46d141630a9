"""The local stack: a Prefect server, an MLflow tracking server and a Ray head, all on 127.0.0.1
(and SeaweedFS, an S3-compatible object store, with ``--object-storage``).

(Processes are started and stopped by omnidiff/supervisor.py, the services' commands and health
checks are in omnidiff/stack_services.py; this file is the up / down / status sequence, a little
over 400 lines because each step's failure message says what to do.)

    omnidiff stack up [--free-ports] [--prefect-port 4200] [--mlflow-port 5000] [--ray-port 6379]
                      [--ray-cpus 4] [--ray-object-store-mb 1024] [--timeout 120]
                      [--object-storage [--s3-port 8333]]
    omnidiff stack status
    omnidiff stack down

``up`` starts the three servers in parallel, each in its own process group,
waits until each answers (Prefect ``/api/health``, MLflow ``/health``, Ray: a
GCS client sees an alive node), prints their URLs and records what it started
in ``state.json``. ``down`` stops exactly those processes, by recorded process
group and pid; it never runs ``ray stop``, which would kill every Ray on the
machine. ``status`` asks each recorded server whether it is healthy.

Everything lives under ``$OMNIDIFF_HOME/stack/``::

    state.json        pids, process groups, ports, urls, client environment (no secret in it)
    prefect_auth      the Prefect API's auth string (mode 0600), made by the first ``up``
    logs/<name>.log   each server's stdout + stderr
    prefect/          PREFECT_HOME of the server (SQLite prefect.db)
    mlflow/           mlflow.db (SQLite backend store) + artifacts/ (artifact root, proxied by the server)
    ray/              Ray's temp dir (session logs, sockets, spilled objects) + auth_token
    s3_secret         the S3 API's secret key (mode 0600; --object-storage), key id ``omnidiff``
    seaweedfs/        SeaweedFS's data/ and its identity file s3.json (mode 0600; --object-storage)

With ``--object-storage`` the stack also runs ``weed server ... -s3`` (omnidiff/stack_services.py),
healthy once bucket ``omnidiff`` takes a PUT; MLflow's artifacts then go to
``s3://omnidiff/mlflow-artifacts`` (proxied by the MLflow server), and :func:`apply_env` hands clients
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (read from ``s3_secret``),
``AWS_REGION`` and ``MLFLOW_S3_ENDPOINT_URL``, so a stage config with ``storage.root: s3://omnidiff/...``
(configs/s3/) reaches it. ``down`` stops it like the others (SIGTERM, then up to ``grace_s`` for it
to flush and exit: it needs several seconds).

Closed to other web origins and hosts (issue 15): a page open in the user's browser must not
drive the servers, neither cross-origin (CORS) nor by rebinding its own DNS name to 127.0.0.1.
Prefect's API wants the auth string of ``stack/prefect_auth`` as HTTP Basic credentials
(``PREFECT_SERVER_API_AUTH_STRING``; the UI asks for it once), allows CORS from its own UI origin
only, and answers only ``Host: 127.0.0.1`` or ``localhost`` (omnidiff/prefect_server.py). The
project's own clients get the auth string from :func:`apply_env` (``PREFECT_API_AUTH_STRING``,
read from the file, never stored in state.json). MLflow refuses a foreign Host (403) and Origin
(400) by itself. Every server runs with telemetry off (``omnidiff.env.TELEMETRY_OFF``).

Ray token authentication (a choice; ../shared/NOTES.md): Ray 2.60 turns token
auth on for a new cluster and writes the token to ``~/.ray/auth_token``. Its
internal ports listen on every interface even with node ip 127.0.0.1, so
instead of disabling auth we keep it on and keep the token in the project:
``up`` writes a random token to ``stack/ray/auth_token`` (mode 0600) and starts
the head with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` pointing at
it; :func:`apply_env` hands clients the same two variables. :func:`ensure_ray`
does the same for a private local Ray. Nothing is written to ``~``.

Other entry points call :func:`apply_env` to find the stack, and
:func:`ensure_ray` to get a Ray connection. The servers' commands, ports and health checks are
in omnidiff/stack_services.py; starting and stopping processes in omnidiff/supervisor.py; the
command line in omnidiff/stack_cli.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from omnidiff import supervisor
from omnidiff.env import home, subdir
from omnidiff.stack_services import (
    DEFAULT_PORTS,
    HOST,
    OBJECT_STORAGE,
    PREFECT_AUTH_FILE,
    RAY_EXTRA_PORTS,
    S3_SECRET_FILE,
    SERVICES,
    WEED_EXTRA_PORTS,
    StackError,
    commands,
    health_url,
    http_ok,
    port_free,
    prefect_server_env,
    ray_client_env,
    ray_env,
    read_secret,
    s3_client_env,
    s3_ready,
    service_env,
    short_path,
    stack_dir,
    start_ray_probe,
    weed_command,
    write_token,
)
from omnidiff.stack_services import free_ports as pick_free_ports

STATE_VERSION = 1
FLOWS_STATE = "flows.json"  # the deployment-serving process's record (flows/cli.py writes it)
# Ray Train's placement-group cleaner asks the state API (served by the dashboard, which the stack
# does not start) every few seconds and warns each time it cannot: hundreds of lines per training
# run, forwarded to every driver's console. A driver whose environment has this regex drops them
# (ray._private.ray_logging.LogDeduplicator); the warning stays in the actor's own log file.
RAY_LOG_SKIP = {"RAY_DEDUP_LOGS_SKIP_REGEX": "Failed to query Ray Train Controller actor state"}


# ----------------------------------------------------------------------------- state


def state_path() -> Path:
    return stack_dir() / "state.json"


def read_state() -> dict[str, Any] | None:
    """The recorded state of the last ``up`` under this home, or None."""
    try:
        return supervisor.read_json(state_path())
    except json.JSONDecodeError as exc:
        raise StackError(f"{state_path()} is not valid JSON ({exc}); remove it after checking no server is left") from None


def recorded_services(state: dict[str, Any] | None) -> list[str]:
    """The services the recorded ``up`` started (the three, plus SeaweedFS when it was asked for)."""
    return sorted((state or {}).get("services", {})) or sorted(SERVICES)


def running_services(state: dict[str, Any] | None) -> list[str]:
    if not state:
        return []
    return [name for name, svc in state.get("services", {}).items()
            if supervisor.is_alive(svc["pid"], svc.get("create_time"))]


# ----------------------------------------------------------------------------- up


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
    object_storage: bool = False,
    s3_port: int = DEFAULT_PORTS[OBJECT_STORAGE],
) -> dict[str, Any]:
    """Start Prefect, MLflow and a Ray head on 127.0.0.1 in parallel; return the recorded state.

    ``ray_cpus`` is the head's *logical* CPU count: more than the 2 physical
    cores here, so Serve replicas, Data actors and Train workers can be placed
    side by side instead of waiting for each other. ``fate_share=True`` (the
    test fixture) makes each server get SIGTERM when this process dies, so a
    killed test session leaves no stack behind. Raises :class:`StackError`
    naming the service (and the tail of its log) when one fails or is not
    healthy within ``timeout_s``; then nothing of this call is left running. ``object_storage``: also
    SeaweedFS's S3 API on ``s3_port`` (module docstring).
    """
    say = (lambda *a: None) if quiet else print
    existing = read_state()
    alive = running_services(existing)
    if alive:
        if sorted(alive) == recorded_services(existing):
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

    names = SERVICES + ((OBJECT_STORAGE,) if object_storage else ())
    asked = {"prefect": prefect_port, "mlflow": mlflow_port, "ray": ray_port}
    if object_storage:
        asked[OBJECT_STORAGE] = s3_port
    ports, ray_ports = _pick_ports(free_ports, asked)
    weed_ports = dict(zip(WEED_EXTRA_PORTS, pick_free_ports(len(WEED_EXTRA_PORTS)), strict=True)) if object_storage else {}
    root = stack_dir()
    logs = root / "logs"
    ray_dir = root / "ray"
    ray_dir.mkdir(parents=True, exist_ok=True)
    ray_temp = short_path(ray_dir)
    ray_vars = ray_env(write_token(ray_dir / "auth_token"))
    urls = {
        "prefect": f"http://{HOST}:{ports['prefect']}",
        "mlflow": f"http://{HOST}:{ports['mlflow']}",
        "ray": f"{HOST}:{ports['ray']}",
    }
    prefect_auth = write_token(root / PREFECT_AUTH_FILE, prefix="omnidiff:")  # "user:password", as Prefect asks
    prefect_vars = prefect_server_env(urls["prefect"], read_secret(prefect_auth))
    client_env = {
        "MLFLOW_TRACKING_URI": urls["mlflow"],
        "PREFECT_API_URL": f"{urls['prefect']}/api",
        "RAY_ADDRESS": urls["ray"],
        **ray_vars,
    }
    argvs = commands(ports, ray_ports, ray_cpus, ray_object_store_mb, mlflow_workers, ray_temp, object_storage)
    s3_vars: dict[str, str] = {}
    s3_secret = None
    if object_storage:
        urls[OBJECT_STORAGE] = f"http://{HOST}:{ports[OBJECT_STORAGE]}"
        s3_secret = write_token(root / S3_SECRET_FILE)
        argvs[OBJECT_STORAGE] = weed_command(ports[OBJECT_STORAGE], weed_ports, read_secret(s3_secret))
        s3_vars = s3_client_env(urls[OBJECT_STORAGE], read_secret(s3_secret))
        # state.json keeps no secret: the key id and endpoint here, the secret's file path beside them
        client_env.update({k: v for k, v in s3_vars.items() if k != "AWS_SECRET_ACCESS_KEY"})

    t0 = time.monotonic()
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "home": str(home()),
        "started_at": time.time(),
        "services": {},
        "env": client_env,
        "prefect_auth_file": str(prefect_auth),
        "ray_temp_link": str(ray_temp) if ray_temp != ray_dir else None,
        "s3_secret_file": str(s3_secret) if s3_secret else None,
    }
    try:
        for name in names:
            log_path = logs / f"{name}.log"
            env = service_env(name, dict(os.environ), ray_vars, prefect_vars, s3_vars)
            proc = supervisor.launch(argvs[name], env, log_path, fate_share)
            state["services"][name] = supervisor.record(proc, log_path, port=ports[name], url=urls[name],
                                                        argv=argvs[name], healthy=False)
            if name == "ray":
                state["services"][name]["extra_ports"] = ray_ports
            if name == OBJECT_STORAGE:
                state["services"][name]["extra_ports"] = weed_ports
            # Written after each launch: if `up` itself dies now, `down` still finds them.
            supervisor.write_json(state_path(), state)
        _wait_healthy(state, timeout_s, t0, say)
    except BaseException:
        down(quiet=True)
        raise
    state["ready_s"] = round(time.monotonic() - t0, 1)
    for svc in state["services"].values():
        svc["healthy"] = True
        # Informational: the process tree as started (down re-reads it at stop time).
        try:
            svc["children"] = [c.pid for c in psutil.Process(svc["pid"]).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    supervisor.write_json(state_path(), state)
    say(format_urls(state))
    say(f"all healthy in {state['ready_s']:.1f} s; logs in {logs}")
    return state


def _pick_ports(pick_free: bool, asked: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """The servers' ports (``asked``, or free ones) and Ray's secondary ports (always free ones)."""
    if pick_free:
        picked = pick_free_ports(len(asked) + len(RAY_EXTRA_PORTS))
        ports = dict(zip(asked, picked[:len(asked)], strict=True))
        extra = picked[len(asked):]
    else:
        ports = dict(asked)
        for name, port in ports.items():
            if not port_free(port):
                raise StackError(
                    f"{name}: port {port} on {HOST} is already in use; pick another with "
                    f"--{name}-port or use --free-ports"
                )
        extra = pick_free_ports(len(RAY_EXTRA_PORTS))
    return ports, dict(zip(RAY_EXTRA_PORTS, extra, strict=True))


def _wait_healthy(state: dict[str, Any], timeout_s: float, t0: float, say) -> None:
    services = state["services"]
    ray_probe = start_ray_probe(services["ray"]["url"], ray_client_env(state["env"]), timeout_s)
    pending = set(services)
    failures: dict[str, str] = {}

    def check() -> bool:
        """One look at every pending service; True when the wait is over (all healthy, or one failed)."""
        for name in sorted(pending):
            svc = services[name]
            code = supervisor.exit_code(svc["pid"])
            if code is not None:
                failures[name] = f"exited with code {code} before it was healthy"
            elif name == "ray":
                rc = ray_probe.poll()
                if rc is None:
                    continue
                if rc != 0:
                    failures[name] = f"no client could connect: {ray_probe.stdout.read().strip()}"
            elif name == OBJECT_STORAGE:
                if not s3_ready(svc["url"], read_secret(state["s3_secret_file"])):
                    continue
            elif not http_ok(health_url(name, svc), timeout=1.0):
                continue
            if name not in failures:
                say(f"  {name:<8} healthy after {time.monotonic() - t0:.1f} s")
            pending.discard(name)
        return bool(failures) or not pending

    try:
        supervisor.wait_until(check, timeout_s=max(0.0, timeout_s - (time.monotonic() - t0)), interval_s=0.5)
        if not failures:
            for name in pending:
                failures[name] = f"not healthy after {timeout_s:.0f} s"
    finally:
        if ray_probe.poll() is None:
            ray_probe.kill()
        ray_probe.wait()
        if ray_probe.stdout:
            ray_probe.stdout.close()
    if failures:
        parts = [
            f"{name}: {why}\n  log {services[name]['log']}:\n{supervisor.log_tail(services[name]['log'])}"
            for name, why in failures.items()
        ]
        raise StackError("the local stack did not come up:\n" + "\n".join(parts))


def format_urls(state: dict[str, Any]) -> str:
    svc = state["services"]
    return "\n".join([
        f"prefect  {svc['prefect']['url']}   (API {state['env']['PREFECT_API_URL']}; the UI asks for the "
        f"auth string in {state['prefect_auth_file']}: omnidiff stack secret)",
        f"mlflow   {svc['mlflow']['url']}",
        f"ray      {svc['ray']['url']}   (RAY_ADDRESS; token in {state['env']['RAY_AUTH_TOKEN_PATH']})",
        *([f"s3       {svc[OBJECT_STORAGE]['url']}   (bucket s3://omnidiff; AWS_ENDPOINT_URL, key id "
           f"{state['env']['AWS_ACCESS_KEY_ID']}, secret in {state['s3_secret_file']})"] if OBJECT_STORAGE in svc else []),
    ])


# ----------------------------------------------------------------------------- down / status


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
    # SIGTERM to each server's own process first: `ray start --block` then drains and stops its
    # children in order (~2 s). Signalling Ray's whole group at once instead leaves gcs_server and
    # the `ray start` process hanging.
    try:
        result = supervisor.stop_all(list(state.get("services", {}).values()), grace_s=grace_s)
    except RuntimeError as exc:
        raise StackError(str(exc)) from None
    link = state.get("ray_temp_link")
    if link and Path(link).is_symlink():
        Path(link).unlink()
    state_path().replace(stack_dir() / "state.last.json")
    left = result.pop("left")
    killed = f": {'; '.join(result['killed_names'])}" if result["killed_names"] else ""
    say(f"stopped {len(result['stopped'])} processes ({left} after the servers themselves, "
        f"{len(result['killed'])} by SIGKILL{killed})")
    return result


def _stop_flows_server(grace_s: float) -> None:
    """Stop the Prefect deployment-serving process (``omnidiff flows deploy``) before its server.

    NOTES.md: a serving process still running when the Prefect server stops hangs on shutdown.
    Its record is in ``stack/flows.json`` (written by flows/cli.py); it leads its own process group.
    """
    path = stack_dir() / FLOWS_STATE
    record = supervisor.read_json(path)
    if record and record.get("pid"):
        try:
            supervisor.stop_all([record], grace_s=grace_s, leaders_first=False)
        except RuntimeError as exc:
            raise StackError(f"the deployment-serving process: {exc}") from None
    path.unlink(missing_ok=True)


def start_flows_server(config: str | Path, timeout_s: float = 240.0) -> int:
    """Run ``omnidiff flows deploy --config CONFIG`` against this stack (a child process; no import of flows)."""
    state = read_state()
    env = {**os.environ, **(client_env(state) if state else {})}
    cmd = [sys.executable, "-m", "flows.cli", "deploy", "--config", str(config)]
    return subprocess.run(cmd, env=env, timeout=timeout_s).returncode


def status(timeout_s: float = 15.0) -> dict[str, Any]:
    """``{service: {"pid", "alive", "healthy", "url", "log"}}`` for the recorded stack ({} if none)."""
    state = read_state()
    if state is None:
        return {}
    out: dict[str, Any] = {}
    probe = None
    for name, svc in state["services"].items():
        alive = supervisor.is_alive(svc["pid"], svc.get("create_time"))
        out[name] = {"pid": svc["pid"], "alive": alive, "healthy": False, "url": svc["url"], "log": svc["log"]}
        if not alive:
            continue
        if name == "ray":
            probe = start_ray_probe(svc["url"], ray_client_env(state["env"]), timeout_s)
        elif name == OBJECT_STORAGE:
            out[name]["healthy"] = s3_ready(svc["url"], read_secret(state["s3_secret_file"]))
        else:
            out[name]["healthy"] = http_ok(health_url(name, svc), timeout=timeout_s)
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


def client_env(state: dict[str, Any]) -> dict[str, str]:
    """The environment a client of the stack needs: ``state["env"]`` plus the Prefect API's auth
    string (``PREFECT_API_AUTH_STRING``), read from its 0600 file (state.json holds only its path), and
    with object storage the S3 secret (``AWS_SECRET_ACCESS_KEY``), likewise."""
    env = dict(state["env"])
    if state.get("prefect_auth_file"):
        env["PREFECT_API_AUTH_STRING"] = read_secret(state["prefect_auth_file"])
    if state.get("s3_secret_file"):
        env["AWS_SECRET_ACCESS_KEY"] = read_secret(state["s3_secret_file"])
    return env


def apply_env(state: dict[str, Any] | None = None, override: bool = False) -> dict[str, str]:
    """Point this process at the running stack: MLFLOW_TRACKING_URI, PREFECT_API_URL, RAY_ADDRESS.

    Only variables that are unset are filled (``override=True`` replaces them);
    the Prefect API's auth string goes with PREFECT_API_URL and Ray's token
    variables with RAY_ADDRESS. Does nothing when no stack is recorded or its
    servers are not running. Returns what it set.
    """
    if state is None:
        state = read_state()
        if state is None or sorted(running_services(state)) != recorded_services(state):
            return {}
    env = client_env(state)
    groups = [
        ("MLFLOW_TRACKING_URI",),
        ("PREFECT_API_URL", *(key for key in env if key == "PREFECT_API_AUTH_STRING")),
        ("RAY_ADDRESS", *(key for key in env if key.startswith("RAY_") and key != "RAY_ADDRESS")),
    ]
    if "AWS_ENDPOINT_URL" in env:  # object storage: endpoint, key id, secret, region go together
        groups.append(("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                       "MLFLOW_S3_ENDPOINT_URL"))
    applied: dict[str, str] = {}
    for group in groups:
        current = os.environ.get(group[0])
        if override or not current:
            keys = group
        elif current == env[group[0]]:  # already pointed at this stack (an older `stack env`?): fill in its secrets
            keys = tuple(key for key in group[1:] if not os.environ.get(key))
        else:
            continue
        for key in keys:
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
    for key, value in RAY_LOG_SKIP.items():
        os.environ.setdefault(key, value)  # read when ray is imported; too late if it already is
    address = os.environ.get("RAY_ADDRESS")
    ray_dir = None if address else subdir("ray")
    if ray_dir is not None and not os.environ.get("RAY_AUTH_MODE"):
        for key, value in ray_env(write_token(ray_dir / "auth_token")).items():
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
        _temp_dir=str(short_path(ray_dir)),
        log_to_driver=True,
        runtime_env={"worker_process_setup_hook": SETUP_HOOK},
    )
    return ray
