"""Training on the real local stack: two DeepSpeed workers under Ray Train (CPU, gloo), MLflow, registry, and
a resume on one worker from their checkpoint. A rank SIGKILLed mid-run that resumes to bit-identical weights:
tests/test_s3_kill.py (checkpoints on S3, the machine's local copy deleted); a killed training driver whose
rerun resumes from its local checkpoint: tests/test_lineage.py.

    .venv/bin/pytest tests/test_train_e2e.py -x -q
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from omnidiff.config import load_config
from tests.fixtures_train import TWO_WORKER_MODEL as MODEL
from train.config import TrainConfig

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


def _cfg(overrides) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "train_test_stage1.yaml", overrides)


def _weights(export_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(Path(export_dir).rglob("*.safetensors"))
            for k, v in load_file(p).items()}


@pytest.fixture(scope="module")
def reference(two_worker_reference):
    """An uninterrupted two-worker stage-1 run, tracked, registered, with a sample grid (tests/fixtures_train.py)."""
    return two_worker_reference


def test_two_workers_train_and_are_tracked_and_registered(reference, tiny_llm):
    from mlflow import MlflowClient

    from omnidiff.models.llm import LLMTextEncoder
    from omnidiff.pipeline import OmniDiffusionPipeline
    from omnidiff.tracking import resolve_model

    assert reference["world_size"] == 2 and reference["final_step"] == 12
    val = {int(k): v for k, v in reference["val_loss"].items()}
    assert val[12] < 0.9 * val[0]

    client = MlflowClient()
    run = client.get_run(reference["run_id"])
    assert run.data.params["dist.num_workers"] == "2" and run.data.tags["stage"] == "train-stage1"
    assert run.data.tags["snapshot_digest"] and run.data.tags["cache_fingerprint.llm"]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2  # steps 6 and 12
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_loss")} == {0, 6, 12}
    assert client.get_metric_history(run.info.run_id, "samples_per_s")[-1].value > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "lineage.json", "samples", "curves"} <= artifacts
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "samples")) == [
        "samples/step_000012.json", "samples/step_000012.png"]
    prompts = json.loads(Path(client.download_artifacts(run.info.run_id, "samples/step_000012.json")).read_text())
    assert {p["group"] for p in prompts} == {"short", "long"} and len({p["lang"] for p in prompts}) >= 4
    assert [d.dataset.name for d in run.inputs.dataset_inputs][0].startswith("train-test@")

    version = client.get_model_version_by_alias(MODEL, "candidate")
    assert version.version == reference["model_version"]
    assert client.get_model_version_by_alias(MODEL, "stage1").version == version.version
    assert version.tags["stage"] == "1" and version.tags["run_id"] == reference["run_id"]
    assert version.tags["snapshot_digest"] == run.data.tags["snapshot_digest"]
    assert version.tags["cache_fingerprint"] == run.data.tags["cache_fingerprint.llm"]

    folder = resolve_model(f"{MODEL}@candidate")
    pipe = OmniDiffusionPipeline.from_pretrained(folder, llm=LLMTextEncoder(tiny_llm, max_length=512))
    images = pipe(["ein roter Kreis oben links"], num_inference_steps=3, output_type="np")
    assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8


def test_resume_on_one_worker_from_a_two_worker_checkpoint(reference, train_overrides, tmp_path):
    """ZeRO-2 shards of two ranks -> ds_to_universal -> one rank, and training finishes close to the reference."""
    from train import run

    src = Path(reference["checkpoint_dir"])
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt, ignore=shutil.ignore_patterns(".train.lock"))
    assert json.loads((ckpt / "step00000006" / "omnidiff_meta.json").read_text())["world_size"] == 2
    (ckpt / "latest").write_text("step00000006")
    result = run(_cfg(train_overrides("ray-reference", **{"checkpoint.dir": str(ckpt),
                                                          "registry.export_dir": str(tmp_path / "export")})))
    assert result["resumed_from"] == "step00000006_universal" and result["start_step"] == 6
    assert result["world_size"] == 1
    ours, theirs = _weights(tmp_path / "export"), _weights(Path(reference["export_dir"]))
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-3, atol=1e-4) for k in theirs)


def test_ray_workers_drop_the_train_state_api_warning(stack, capfd):
    """Ray Train's PlacementGroupCleaner (a detached actor started by the train controller) logs this
    warning every second when the state API is unreachable (no dashboard); the worker setup hook
    ensure_ray installs drops it, and only it, in every worker process."""
    import logging

    import ray

    from omnidiff.ray_logging import CLEANER_LOGGER, FLOOD
    from omnidiff.stack import ensure_ray

    ensure_ray()

    @ray.remote(num_cpus=0)
    class Cleaner:
        def shout(self, marker: str) -> None:
            logging.getLogger(CLEANER_LOGGER).warning(f"{FLOOD}. State API may be temporarily unavailable.")
            logging.getLogger(CLEANER_LOGGER).warning(marker)

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"OMNIDIFF_PROBE": "1"}})  # as Ray Train starts its controller
    class Controller:
        def run(self, marker: str) -> None:
            cleaner = Cleaner.options(lifetime="detached").remote()
            ray.get(cleaner.shout.remote(marker))
            ray.kill(cleaner)

    marker = f"probe-{os.getpid()}-{time.time_ns()}"
    ray.get(Controller.remote().run.remote(marker))
    seen = ""
    deadline = time.monotonic() + 30
    while marker not in seen and time.monotonic() < deadline:  # worker logs reach the driver asynchronously
        time.sleep(0.5)
        out, err = capfd.readouterr()
        seen += out + err
    assert marker in seen
    assert FLOOD not in seen
