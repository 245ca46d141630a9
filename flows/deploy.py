"""Prefect flow ``deploy``: promote a model version to ``production`` and roll the running server to it.

    python -m flows.deploy omnidiff-tiny                 # promote the current @candidate
    python -m flows.deploy omnidiff-tiny --version 3     # promote version 3

1. promote: move the registry alias (default ``production``) to the version (default: the one
   ``candidate`` points at), tagging the version with who promoted it and when.
2. roll: if the Serve app (default ``omnidiff``) is running, redeploy it with the same serve
   config, now resolving ``name@production`` to the new version (skipped when the app already serves
   that version through that ref: a rerun of an unchanged pipeline restarts nothing). Ray Serve rolls it: new replicas
   load the new model first (``rollout_surge_percent``), stopping replicas finish what they hold,
   requests queue at the handle rather than fail, so no request is dropped
   (tests/test_serve_deploy.py keeps traffic running through a roll and counts the failures).
3. verify: /v1/models answers with the promoted version.
Every run is recorded in MLflow (stage ``deploy``) with the version before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task


def _flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None


@task(name="promote")
def promote(model: str, version: str | None, from_alias: str, alias: str) -> dict[str, Any]:
    """Point ``alias`` at ``version`` (default: the version ``from_alias`` points at)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if version is None:
        try:
            version = str(client.get_model_version_by_alias(model, from_alias).version)
        except MlflowException as exc:
            raise ValueError(f"model={model!r}: no version given and no @{from_alias} to promote ({exc.message})") from None
    else:
        try:
            client.get_model_version(model, version)
        except MlflowException as exc:
            raise ValueError(f"model={model!r} version={version!r}: no such registered version ({exc.message})") from None
    try:
        previous = str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException:
        previous = None
    client.set_registered_model_alias(model, alias, version)
    client.set_model_version_tag(model, version, f"promoted_to_{alias}_at", datetime.now(UTC).isoformat())
    flow_run = _flow_run_id()
    if flow_run:
        client.set_model_version_tag(model, version, f"promoted_to_{alias}_by_flow_run", flow_run)
    get_run_logger().info("%s: @%s %s -> %s", model, alias, previous, version)
    return {"model": model, "alias": alias, "version": version, "previous": previous}


@task(name="roll")
def roll(app_name: str, model: str, alias: str, version: str, wait_ready_s: float) -> dict[str, Any]:
    """Redeploy the running app ``app_name`` so it serves ``model@alias``; no-op when it is not running."""
    import requests
    from ray import serve

    from omnidiff.config import from_dict, replace
    from omnidiff.stack import ensure_ray
    from omnidiff.supervisor import wait_until
    from serve import app as serve_app
    from serve import auth
    from serve.config import ServeConfig

    logger = get_run_logger()
    state = serve_app.running(app_name)
    ensure_ray()
    if state is None or app_name not in serve.status().applications:
        logger.info("app %r is not running: promoted only, nothing to roll", app_name)
        return {"rolled": False, "why": f"app {app_name!r} is not running"}
    config = {k: v for k, v in state["config"].items() if k != "kind"}
    cfg = replace(from_dict(ServeConfig, config), model=f"{model}@{alias}")
    token = auth.load_token(cfg.auth.token_env, cfg.auth.token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    served = None

    def serves_version(url: str) -> bool:
        nonlocal served
        try:
            answer = requests.get(f"{url}/v1/models", headers=headers, timeout=10)
        except requests.RequestException:
            return False
        if answer.status_code == 200:
            served = answer.json()["data"][0].get("version")
        return served == version

    # Already serving this version through the same ref, with the same config, every replica up:
    # rolling would only restart identical replicas (a warm rerun of the pipeline), so skip it.
    app_status = serve.status().applications[app_name].status
    if (state["config"].get("model") == cfg.model and str(state.get("model", {}).get("version")) == str(version)
            and app_status == "RUNNING" and serves_version(state["url"])):
        logger.info("app %r already serves %s/%s: nothing to roll", app_name, model, version)
        return {"rolled": False, "why": f"app {app_name!r} already serves version {version}", "url": state["url"],
                "version": served}
    t0 = time.perf_counter()
    result = serve_app.run(cfg, wait_ready_s=wait_ready_s)
    # The app is RUNNING on new replicas once serve.run returns; the card can lag while old replicas drain.

    if not wait_until(lambda: serves_version(result["url"]), timeout_s=60, interval_s=0.5):
        raise RuntimeError(f"rolled app {app_name!r} serves version {served!r}, expected {version!r}")
    seconds = time.perf_counter() - t0
    logger.info("app %r now serves %s/%s (roll took %.1fs)", app_name, model, version, seconds)
    return {"rolled": True, "url": result["url"], "version": served, "roll_seconds": round(seconds, 2)}


@flow(name="deploy")
def deploy(
    model: str = "omnidiff-tiny",
    version: str | None = None,
    from_alias: str = "candidate",
    alias: str = "production",
    app_name: str = "omnidiff",
    wait_ready_s: float = 600.0,
) -> dict[str, Any]:
    """Promote ``model`` ``version`` (default: @``from_alias``) to @``alias``, then roll app ``app_name`` to it."""
    from omnidiff.stack import apply_env

    apply_env()
    promoted = promote(model, version, from_alias, alias)
    rolled = roll(app_name, model, alias, promoted["version"], wait_ready_s)
    summary = {**promoted, **rolled}
    _record(summary)
    return summary


def _record(summary: dict[str, Any]) -> None:
    """One MLflow run per deploy (stage ``deploy``), so the registry's history has its who and when."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return
    from omnidiff import tracking

    with tracking.start_run("deploy", run_name=f"deploy-{summary['model']}-{summary['version']}",
                            tags={"model": summary["model"], "model_version": summary["version"]}):
        import mlflow

        mlflow.log_params({k: v for k, v in summary.items() if k in ("model", "alias", "version", "previous", "rolled")})
        if "roll_seconds" in summary:
            mlflow.log_metric("roll_seconds", summary["roll_seconds"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="omnidiff-tiny")
    parser.add_argument("--version", default=None, help="version to promote (default: the @candidate one)")
    parser.add_argument("--from-alias", default="candidate")
    parser.add_argument("--alias", default="production")
    parser.add_argument("--app", default="omnidiff", help="the running Serve app to roll")
    args = parser.parse_args(argv)
    summary = deploy(model=args.model, version=args.version, from_alias=args.from_alias, alias=args.alias,
                     app_name=args.app)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
