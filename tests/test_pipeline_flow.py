"""Issue 8: the omnidiff-pipeline deployment triggered through the Prefect API, completed, traced in MLflow.

    .venv/bin/pytest tests/test_pipeline_flow.py -x -q

The deployments are served by the project's own serving process (`omnidiff flows deploy`), the
pipeline runs on the 150-image test world with the tiny random LLM and tiny training budgets,
and a second run with unchanged inputs skips every stage it can.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from omnidiff.config import to_dict

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pipeline_test.yaml"
pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipeline_overrides(llm, serve_port: int, name: str, route: str, *extra: str) -> list[str]:
    """Dotted overrides that shrink configs/pipeline_test.yaml's run to a test's size: the tiny test LLM in every
    stage, a small evaluation, a Serve app ``name`` at ``route`` on ``serve_port``, every stage registering
    ``name`` (tests/test_pipeline_s3.py uses them too)."""
    overrides = [f"world_port={_free_port()}", f"embed.llm.path={llm}", "evaluate.max_per_group=2",
                 "evaluate.steps=4", "evaluate.real_images=32", "evaluate.require_fit_evaluator=false",
                 f"serve.app_name={name}", f"serve.route_prefix={route}", f"serve.port={serve_port}", *extra]
    overrides += [f"stage{i}.llm.path={llm}" for i in (1, 2, 3)]
    overrides += [f"stage{i}.registry.register=true" for i in (1, 2, 3)]
    overrides += [f"stage{i}.registry.model_name={name}" for i in (1, 2, 3)]
    return overrides


@pytest.fixture(scope="module")
def pipeline_cfg(stack, tiny_llm, serve_port):
    from flows.config import load_pipeline_config
    from serve import app as serve_app

    overrides = pipeline_overrides(tiny_llm, serve_port, "omnidiff-pipeline-test", "/pipeline-test",
                                   "evaluate.track=true", "collect.track=true")
    cfg = load_pipeline_config(CONFIG, overrides)
    yield cfg
    if serve_app.running(cfg.serve.app_name):
        serve_app.shutdown(cfg.serve)  # its replicas would hold CPUs the later tests need


@pytest.fixture(scope="module")
def deployments(stack):
    from flows import cli as flows_cli

    state = flows_cli.deploy(str(CONFIG), timeout_s=240, quiet=True)
    yield state
    flows_cli.stop()


def test_deployments_exist_with_the_nightly_schedule(deployments):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.deployments import DEPLOYMENT_NAMES

    assert set(deployments["deployments"]) == set(DEPLOYMENT_NAMES)

    async def schedules():
        async with get_client() as client:
            dep = await client.read_deployment_by_name("nightly-reembed/nightly-reembed")
            return [s.schedule.cron for s in dep.schedules], dep.parameter_openapi_schema

    crons, schema = asyncio.run(schedules())
    assert crons == ["0 2 * * *"]
    assert "cfg" in schema["properties"]  # a typed form in the UI


def test_a_redeploy_serves_the_changed_config_before_it_returns(deployments, tmp_path):
    """The Prefect database keeps a deployment's parameters after its serving process stops; a
    redeploy must not return (and the demo must not trigger a run) until the new process has
    registered the changed config. It once ran a demo's stage 1 with the previous config's budget."""
    import asyncio

    from prefect.client.orchestration import get_client

    from flows import cli as flows_cli

    async def world_port() -> int:
        async with get_client() as client:
            dep = await client.read_deployment_by_name("omnidiff-pipeline/omnidiff-pipeline")
            return int(dep.parameters["config"]["world_port"])

    changed = tmp_path / "pipeline_changed.yaml"
    changed.write_text(CONFIG.read_text().replace("world_port: 18765", "world_port: 18799"))
    try:
        moved = flows_cli.deploy(str(changed), timeout_s=240, quiet=True)
        assert asyncio.run(world_port()) == 18799
        assert moved["pid"] != deployments["pid"] and not moved.get("reused")  # changed parameters: restarted
    finally:
        back = flows_cli.deploy(str(CONFIG), timeout_s=240, quiet=True)
    assert asyncio.run(world_port()) == 18765
    assert back["pid"] != moved["pid"] and not back.get("reused")

    # Unchanged config and code: the running process is kept (no restart), its deployments as they were.
    again = flows_cli.deploy(str(CONFIG), timeout_s=240, quiet=True)
    assert again["reused"] is True and again["pid"] == back["pid"] and again["deployments"] == back["deployments"]
    assert asyncio.run(world_port()) == 18765


def test_pipeline_deployment_runs_end_to_end_and_is_traceable(deployments, pipeline_cfg):
    import mlflow
    from mlflow import MlflowClient

    from flows.cli import run_deployment
    from flows.lineage import model_lineage

    params = {"config": {k: v for k, v in to_dict(pipeline_cfg).items() if k != "kind"}}
    result = run_deployment("omnidiff-pipeline/omnidiff-pipeline", params, timeout_s=1500)
    assert result["state"] == "COMPLETED", result

    client = MlflowClient()
    exp = mlflow.get_experiment_by_name("omnidiff")
    parents = client.search_runs([exp.experiment_id], f"tags.stage = 'pipeline' and tags.`prefect.flow_run_id` = '{result['flow_run_id']}'")
    assert len(parents) == 1, "one MLflow parent run per pipeline run"
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    stages = {r.data.tags.get("stage") for r in children}
    assert {"collect", "embed", "evaluate"} <= stages, stages
    assert any(s and s.startswith("train") or s in ("stage1", "stage2", "stage3") for s in stages), stages
    for run in children:
        assert run.data.tags.get("git.commit"), run.info.run_name
        assert run.data.tags.get("prefect.flow_run_id"), run.info.run_name

    version = client.get_model_version_by_alias("omnidiff-pipeline-test", "production")
    lineage = model_lineage("omnidiff-pipeline-test@production")
    assert lineage["chain"][0]["model"] == f"omnidiff-pipeline-test/{version.version}"
    assert len(lineage["chain"]) >= 3, "stage 3 -> stage 2 -> stage 1"
    assert lineage["snapshot_digest"], lineage
    assert lineage["sources"], "the source url lists of the snapshot"

    out = subprocess.run([sys.executable, "-m", "flows.lineage", "omnidiff-pipeline-test@production", "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["snapshot_digest"] == lineage["snapshot_digest"]
    by_snapshot = subprocess.run([sys.executable, "-m", "flows.lineage", "--snapshot", lineage["snapshot_digest"]],
                                 capture_output=True, text=True, check=True)
    assert f"omnidiff-pipeline-test/{version.version}" in by_snapshot.stdout

    # The stages' events for `omnidiff demo`'s console: each stage started and ended, under this run's id.
    from omnidiff.progress import ConsoleReporter, end_offset, events_path, read_events

    events, _ = read_events(events_path(), 0)
    ours = [e for e in events if e.get("run") == result["flow_run_id"]]
    stages = ("prepare-base", "collect", "embed", "stage1", "stage2", "stage3", "evaluate", "deploy")
    assert [e["stage"] for e in ours if e["kind"] == "stage_start"] == list(stages)
    assert [e["stage"] for e in ours if e["kind"] == "stage_end"] == list(stages)
    assert any(e["kind"] == "progress" and e["name"].startswith("train stage") for e in events), \
        "the training loop's progress reaches the events file"

    # a rerun with unchanged inputs skips every stage up to deploy; watched as `omnidiff demo` does
    from flows.cli import watch_flow_run

    offset = end_offset(events_path())
    started = run_deployment("omnidiff-pipeline/omnidiff-pipeline", params, wait=False)
    lines: list[str] = []
    again = watch_flow_run(started["flow_run_id"], ConsoleReporter(write=lines.append, run=started["flow_run_id"]),
                           events_path(), offset, timeout_s=900)
    assert again["state"] == "COMPLETED", again
    console = "\n".join(lines)
    for stage in stages:
        assert f"{stage:<13} started" in console, console
    assert "collect       done in " in console and "skipped: inputs unchanged" in console, console
    rerun = client.search_runs([exp.experiment_id], f"tags.stage = 'pipeline' and tags.`prefect.flow_run_id` = '{again['flow_run_id']}'")[0]
    for stage in ("collect", "embed", "stage1", "stage2", "stage3", "evaluate"):
        assert rerun.data.tags.get(f"stage.{stage}.skipped") == "True", stage
