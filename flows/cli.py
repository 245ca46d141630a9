"""``omnidiff flows`` and ``omnidiff pipeline``.

    omnidiff flows deploy [--config configs/pipeline.yaml]   # create every deployment; serve their runs (background)
    omnidiff flows status                                    # the serving process and the deployments
    omnidiff flows run omnidiff-pipeline [--no-wait]         # trigger a deployment like the UI's Run button
    omnidiff flows stop                                      # stop the serving process
    omnidiff pipeline --config configs/pipeline.yaml [k=v]   # run the pipeline flow in this process
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from omnidiff import supervisor
from omnidiff.env import subdir

SERVE_STATE = "flows.json"  # omnidiff/stack.py's FLOWS_STATE: `omnidiff stack down` stops the process too


def _state_path() -> Path:
    return subdir("stack") / SERVE_STATE


def _read_state() -> dict[str, Any] | None:
    return supervisor.read_json(_state_path())


def _running(state: dict[str, Any] | None) -> bool:
    return bool(state) and supervisor.is_alive(state.get("pid"), state.get("create_time"))


async def _deployment_ids(names: tuple[str, ...], since: datetime | None = None,
                          expected: dict[str, dict] | None = None) -> dict[str, str | None]:
    """Deployment ids by name; None for one that does not exist, was last written before ``since``,
    or (given ``expected``) does not carry the expected parameters.

    The Prefect database keeps a deployment (and its default parameters) after its serving process
    stops, so "it exists" is not "the process just started has registered it with today's config";
    and a stopping process may still write its deployments after ``since`` on a busy server, so the
    parameters themselves are compared too.
    """
    from prefect.client.orchestration import get_client

    out: dict[str, str | None] = {}
    async with get_client() as client:
        for name in names:
            try:
                deployment = await client.read_deployment_by_name(name)
            except Exception:
                out[name] = None
                continue
            updated = getattr(deployment, "updated", None)
            fresh = since is None or (updated is not None and updated >= since)
            if expected is not None and name in expected:
                fresh = fresh and json.loads(json.dumps(deployment.parameters, default=str)) == expected[name]
            out[name] = str(deployment.id) if fresh else None
    return out


def code_digest() -> str:
    """sha256 over this checkout's Python packages and shipped configs: what the serving process imported."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in ("flows", "train", "embed_cache", "data_prep", "serve", "omnidiff", "configs"):
        for path in sorted((root / package).rglob("*")):
            if path.suffix in (".py", ".yaml") and path.is_file():
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def deploy(config: str, timeout_s: float = 180.0, quiet: bool = False) -> dict[str, Any]:
    """Start ``python -m flows.deployments`` in its own process group; wait until it has (re)registered
    every deployment, so a run triggered next uses this config's parameters, not a previous one's.
    A serving process already running with the same parameters and code is kept (``"reused": True``)."""
    from flows.deployments import DEPLOYMENT_NAMES, build_deployments
    from omnidiff.stack import RAY_LOG_SKIP, apply_env

    apply_env()
    if not os.environ.get("PREFECT_API_URL"):
        raise RuntimeError("no Prefect server: run `omnidiff stack up` first (PREFECT_API_URL is unset)")
    expected = {f"{d.flow_name}/{d.name}": json.loads(json.dumps(d.parameters, default=str))
                for d in build_deployments(config)}
    code = code_digest()
    previous = _read_state()
    if _running(previous):
        # The same config's parameters and the same code, every deployment still registered with them:
        # the serving process already serves what a restart would (a warm `make demo` skips ~20 s).
        if previous.get("expected") == expected and previous.get("code") == code and previous.get("deployments"):
            ids = asyncio.run(_deployment_ids(DEPLOYMENT_NAMES, None, expected))
            if ids == previous["deployments"]:
                if not quiet:
                    print(f"flows: {len(ids)} deployments already served by pid {previous['pid']} "
                          f"(config and code unchanged; log {_flows_log()})")
                return {**previous, "reused": True}
        stop()
    log_path = _flows_log()
    # The server's clock is this machine's; a second of slack for the timestamp's rounding.
    since = datetime.now(UTC) - timedelta(seconds=1)
    env = {**RAY_LOG_SKIP, **os.environ}  # what the user set wins
    proc = supervisor.launch([sys.executable, "-m", "flows.deployments", config], env, log_path)
    state = supervisor.record(proc, log_path, config=config, started=time.time(), expected=expected, code=code)
    supervisor.write_json(_state_path(), state)

    def registered() -> dict[str, str | None] | None:
        code = supervisor.exit_code(proc.pid)
        if code is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the deployment-serving process exited with {code}; log {log_path}:\n{tail}")
        ids = asyncio.run(_deployment_ids(DEPLOYMENT_NAMES, since, expected))
        return ids if all(ids.values()) else None

    ids = supervisor.wait_until(registered, timeout_s, interval_s=2.0)
    if not ids:
        stop()
        raise TimeoutError(f"deployments did not all appear within {timeout_s:.0f}s; log {log_path}")
    state["deployments"] = ids
    supervisor.write_json(_state_path(), state)
    if not quiet:
        print(f"flows: {len(ids)} deployments served by pid {proc.pid} (log {log_path})")
        for name in ids:
            print(f"  {name}")
    return state


def stop(grace_s: float = 10.0) -> bool:
    """Stop the serving process (its whole process group); True if one was running."""
    state = _read_state()
    if not state:
        return False
    was_alive = _running(state)
    if was_alive:
        supervisor.stop_all([state], grace_s=grace_s, leaders_first=False)
    _state_path().unlink(missing_ok=True)
    return was_alive


def run_deployment(name: str, parameters: dict[str, Any] | None = None, wait: bool = True,
                   timeout_s: float = 3600.0) -> dict[str, Any]:
    """Trigger ``name`` through the Prefect API (as the UI's Run button does); wait for its final state."""
    from prefect.deployments import run_deployment as prefect_run_deployment

    from omnidiff.stack import apply_env

    apply_env()
    flow_run = prefect_run_deployment(name=name, parameters=parameters or {}, timeout=timeout_s if wait else 0)
    return _summary(flow_run)


def _summary(flow_run) -> dict[str, Any]:
    out = {"flow_run_id": str(flow_run.id), "name": flow_run.name, "state": flow_run.state.type.value
           if flow_run.state else None}
    api = os.environ.get("PREFECT_API_URL", "").removesuffix("/api")
    if api:
        out["url"] = f"{api}/runs/flow-run/{flow_run.id}"
    return out


def watch_flow_run(flow_run_id: str, reporter, events_file: Path, offset: int, timeout_s: float = 3600.0,
                   interval_s: float = 2.0) -> dict[str, Any]:
    """Wait for a flow run's final state (as ``run_deployment(wait=True)`` does) while handing
    ``reporter`` (an omnidiff.progress.ConsoleReporter) every progress event the stages append to
    ``events_file`` after byte ``offset``; returns the run's summary, its state then."""
    from prefect.client.orchestration import get_client

    from omnidiff.progress import read_events

    position = offset

    def show_events() -> None:
        nonlocal position
        events, position = read_events(events_file, position)
        for event in events:
            reporter.handle(event)
        reporter.tick()

    with get_client(sync_client=True) as client:

        def final_run():
            show_events()
            run = client.read_flow_run(UUID(flow_run_id))
            return run if run.state is not None and run.state.is_final() else None

        run = supervisor.wait_until(final_run, timeout_s, interval_s) or client.read_flow_run(UUID(flow_run_id))
    show_events()
    return _summary(run)


def _parse_params(items: list[str]) -> dict[str, Any]:
    from omnidiff.config import parse_overrides

    return parse_overrides(items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnidiff flows", description="Prefect deployments of the omnidiff flows")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_deploy = sub.add_parser("deploy", help="create every deployment and serve its runs (background process)")
    p_deploy.add_argument("--config", default="configs/pipeline.yaml")
    p_deploy.add_argument("--foreground", action="store_true", help="serve in this process until Ctrl-C")
    sub.add_parser("status", help="the serving process and the deployments")
    sub.add_parser("stop", help="stop the serving process")
    p_run = sub.add_parser("run", help="trigger a deployment (name or flow/deployment) and wait for it")
    p_run.add_argument("name")
    p_run.add_argument("params", nargs="*", help="dotted.key=value flow parameters")
    p_run.add_argument("--no-wait", action="store_true")
    args = parser.parse_args(argv)
    from omnidiff.stack import apply_env

    apply_env()
    if args.cmd == "deploy":
        if args.foreground:
            from flows.deployments import serve_deployments

            serve_deployments(args.config)
            return 0
        deploy(args.config)
        return 0
    if args.cmd == "stop":
        print("flows: stopped" if stop() else "flows: not running")
        return 0
    if args.cmd == "status":
        from flows.deployments import DEPLOYMENT_NAMES

        state = _read_state()
        running = _running(state)
        print(f"serving process: {'running, pid ' + str(state['pid']) if running else 'not running'}")
        for name, dep_id in asyncio.run(_deployment_ids(DEPLOYMENT_NAMES)).items():
            print(f"  {name:<40} {dep_id or 'missing'}")
        return 0 if running else 1
    name = args.name if "/" in args.name else f"{args.name}/{args.name}"
    result = run_deployment(name, _parse_params(args.params), wait=not args.no_wait)
    print(json.dumps(result, indent=2))
    return 0 if (args.no_wait or result["state"] == "COMPLETED") else 1


def pipeline_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnidiff pipeline", description="run the omnidiff-pipeline flow in-process")
    parser.add_argument("--config", default="configs/pipeline.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = parser.parse_args(argv)
    from flows.config import load_pipeline_config
    from flows.pipeline import omnidiff_pipeline
    from omnidiff.config import ConfigError
    from omnidiff.stack import apply_env

    try:
        cfg = load_pipeline_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"omnidiff pipeline: {exc}", file=sys.stderr)
        return 2
    apply_env()
    omnidiff_pipeline(cfg)
    return 0


def pipeline_outputs(flow_run_id: str) -> dict[str, Any]:
    """The outputs the pipeline run logged to its MLflow parent run (found by its Prefect flow-run id)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = mlflow.get_experiment_by_name("omnidiff")
    runs = client.search_runs([exp.experiment_id],
                              f"tags.stage = 'pipeline' and tags.`prefect.flow_run_id` = '{flow_run_id}'")
    if not runs:
        raise RuntimeError(f"no MLflow pipeline run for Prefect flow run {flow_run_id}")
    run = runs[0]
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="pipeline_outputs.json")
    out = json.loads(Path(path).read_text())
    out["mlflow_url"] = f"{mlflow.get_tracking_uri()}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    return out


def format_demo_report(result: dict[str, Any], out: dict[str, Any], wall_s: float) -> str:
    import pandas as pd

    lines = ["", "=== omnidiff demo: the pipeline on the tiny world ===", f"Prefect flow run: {result.get('url')}",
             f"MLflow parent run: {out.get('mlflow_url')}", "", "stage times:"]
    for stage, seconds in out.get("timings_s", {}).items():
        lines.append(f"  {stage:<14} {seconds:8.1f} s")
    lines.append(f"  {'total':<14} {wall_s:8.1f} s (trigger to completion)")
    report = out.get("evaluate", {})
    if report.get("scores"):
        scores = pd.DataFrame(report["scores"])
        table = scores.pivot_table(index=["lang", "length"], columns="model", values="score")
        table = table[[m for m in dict.fromkeys(scores["model"])]]
        lines += ["", "prompt faithfulness (mean of shape, colour, position):", table.to_string(float_format=lambda v: f"{v:.2f}")]
    for claim in report.get("claims", []):
        if claim.get("model_label") != "stage3":
            continue
        lines.append(f"  [{claim['verdict'].upper():>12}] {claim['claim']}: {claim['kind']} {claim['estimate']:.2f} "
                     f"[{claim['low']:.2f}, {claim['high']:.2f}] ({claim['model']:.2f} against {claim['base']:.2f})")
    if report.get("report_html"):
        lines += ["", f"report (tables, charts, image grids): {report['report_html']}"]
    if out.get("deploy", {}).get("endpoint"):
        lines.append(f"endpoint: {out['deploy']['endpoint']}  (playground at /, OpenAI-compatible /v1/images/generations)")
    lines.append(f"lineage: omnidiff lineage {out.get('stage3', {}).get('model_name') or 'omnidiff-tiny'}@production")
    return "\n".join(lines)


def _flows_log() -> Path:
    return subdir("stack", "logs") / "flows.log"


SEEDED_KEYS = ("stage1.seed", "stage2.seed", "stage3.seed", "evaluate.seed", "evaluate.bootstrap_seed")


def demo_overrides(seed: int | None, overrides: list[str]) -> list[str]:
    """The demo's dotted overrides: ``seed`` set on every seeded key first, so an explicit override wins."""
    return ([f"{key}={seed}" for key in SEEDED_KEYS] if seed is not None else []) + list(overrides)


def demo_parameters(config: str, overrides: list[str]) -> dict[str, Any] | None:
    """The pipeline run's parameters: None (the deployment's own, i.e. the config file) without overrides, else the
    whole overridden config, validated here (a ``ConfigError`` names a bad key or value)."""
    if not overrides:
        return None
    from flows.config import load_pipeline_config
    from flows.deployments import pipeline_parameters

    return pipeline_parameters(load_pipeline_config(config, overrides))


def demo_main(argv: list[str] | None = None) -> int:
    """``omnidiff demo``: stack up (with the deployment-serving process), trigger the pipeline deployment, report."""
    parser = argparse.ArgumentParser(prog="omnidiff demo", description=demo_main.__doc__)
    parser.add_argument("--config", default="configs/pipeline.yaml")
    parser.add_argument("--seed", type=int, help="one seed for every training stage and the evaluation "
                        "(stage1/2/3.seed, evaluate.seed, evaluate.bootstrap_seed): a replicate of the demo")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value into the pipeline config, e.g. stage2.max_steps=400")
    args = parser.parse_args(argv)
    from omnidiff.config import ConfigError

    overrides = demo_overrides(args.seed, args.overrides)
    try:  # a bad override fails here, before the stack starts
        parameters = demo_parameters(args.config, overrides)
    except ConfigError as exc:
        print(f"omnidiff demo: {exc}", file=sys.stderr)
        return 2
    from omnidiff import stack

    stack.up()  # returns the running stack when there is one
    stack.apply_env(override=True)
    deploy(args.config)
    from omnidiff.progress import ConsoleReporter, end_offset, events_path

    events = events_path()
    offset = end_offset(events)  # what the file holds now is an earlier run's
    t0 = time.perf_counter()
    started = run_deployment("omnidiff-pipeline/omnidiff-pipeline", parameters, wait=False)
    if overrides:
        print(f"pipeline config {args.config} with {' '.join(overrides)}", flush=True)
    print(f"pipeline run {started['name']} triggered: {started.get('url')}\n"
          f"each stage as it starts and ends, its progress at least every 30 s (full log: {_flows_log()})",
          flush=True)
    reporter = ConsoleReporter(write=lambda line: print(line, flush=True), run=started["flow_run_id"])
    result = watch_flow_run(started["flow_run_id"], reporter, events, offset)
    wall = time.perf_counter() - t0
    if result["state"] != "COMPLETED":
        print(json.dumps(result, indent=2))
        print(f"the pipeline run ended {result['state']}; its log: {_flows_log()}", file=sys.stderr)
        return 1
    print(format_demo_report(result, pipeline_outputs(result["flow_run_id"]), wall))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
