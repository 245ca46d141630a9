"""The Prefect ``deploy`` flow: promote a version to @production and roll the running app, under traffic.

    .venv/bin/pytest tests/test_serve_deploy.py -x -q

Clients keep calling the app through the whole roll; every request must succeed (none dropped,
none turned away), answers switch from the old version to the new one, and the registry and
MLflow record the promotion.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

pytestmark = pytest.mark.e2e


def test_deploy_promotes_and_rolls_without_dropping_requests(served, serve_registry):
    from mlflow.tracking import MlflowClient

    from flows.deploy import deploy

    client = MlflowClient()
    before = str(client.get_model_version_by_alias("serve-test", "production").version)
    target = serve_registry["candidate"]
    assert before != target

    stop = threading.Event()
    answers: list[tuple[float, int, str | None]] = []

    def traffic(worker: int) -> None:
        session = requests.Session()
        for i in range(10_000):
            if stop.is_set():
                return
            try:
                r = session.post(f"{served.url}/v1/generate", headers=served.headers, timeout=120,
                                 json={"prompt": f"一个红色的圆 {worker}-{i}", "steps": 2, "seed": i})
                answers.append((time.monotonic(), r.status_code, r.headers.get("x-model-version")))
            except requests.RequestException as exc:  # a dropped connection counts as a failure
                answers.append((time.monotonic(), -1, repr(exc)))

    workers = [threading.Thread(target=traffic, args=(w,), daemon=True) for w in range(3)]
    for w in workers:
        w.start()
    try:
        while sum(1 for a in answers if a[1] == 200) < 5:
            time.sleep(0.1)
        summary = deploy(model="serve-test", app_name=served.cfg.app_name, wait_ready_s=300)
        rolled_at = time.monotonic()
        while sum(1 for a in answers if a[0] > rolled_at) < 5:
            time.sleep(0.1)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=120)

    print(f"deploy: {summary}; {len(answers)} requests during the test")
    assert summary["version"] == target and summary["previous"] == before and summary["rolled"] is True
    failures = [a for a in answers if a[1] != 200]
    assert not failures, failures[:5]
    versions = [a[2] for a in answers]
    assert versions[0] == before and versions[-1] == target
    # Once switched, it stays switched: no old replica answers after the new one did (per client order).
    first_new = versions.index(target)
    assert all(v == target for v in versions[first_new:][len(workers):]), versions
    assert len(answers) > 10

    assert str(client.get_model_version_by_alias("serve-test", "production").version) == target
    tags = client.get_model_version("serve-test", target).tags
    assert tags.get("promoted_to_production_by_flow_run")
    card = requests.get(f"{served.url}/v1/models", headers=served.headers, timeout=10).json()["data"][0]
    assert card["version"] == target and card["lineage"]["snapshot_digest"] == f"snap{target}"
    runs = client.search_runs([r.experiment_id for r in client.search_experiments()],
                              filter_string="tags.stage = 'deploy'")
    assert any(r.data.params.get("version") == target for r in runs)

    # Deploying the version it already serves restarts nothing: no new `serve.run`, same answers.
    from serve import app as serve_app

    state_file = serve_app._state_file(served.cfg.app_name)
    written = state_file.stat().st_mtime_ns
    again = deploy(model="serve-test", version=target, app_name=served.cfg.app_name, wait_ready_s=300)
    assert again["rolled"] is False and "already serves" in again["why"], again
    assert again["version"] == target and again["previous"] == target
    assert state_file.stat().st_mtime_ns == written
    card = requests.get(f"{served.url}/v1/models", headers=served.headers, timeout=10).json()["data"][0]
    assert card["version"] == target
