"""Lineage that names exactly the runs that built a model, and killed runs closed by their reruns (issue 15).

    .venv/bin/pytest tests/test_lineage.py -x -q

All on the session stack (real MLflow server, Ray cluster): a base model pretrained with its run
tracked, the real embed job over the model's snapshot and over decoy snapshots into the same caches,
a real stage-1 training registered in the model registry, ``omnidiff lineage`` on it. Then a training
driver and an embed driver are SIGKILLed mid-run and rerun: the killed MLflow runs end KILLED, linked
both ways to the rerun, which says what it adopted, and nothing of the killed Ray job keeps running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from omnidiff.config import load_config
from tests.fixtures_base import tiny_base_config
from tests.fixtures_embed import EMBED_TEST_CONFIG, write_snapshot

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = REPO / "configs" / "train_test_stage1.yaml"


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _poll(check, timeout_s: float, interval_s: float = 0.2):
    """``check()`` until it returns something truthy or ``timeout_s`` passes; its last value."""
    return Retrying(stop=stop_after_delay(timeout_s), wait=wait_fixed(interval_s),
                    retry=retry_if_result(lambda v: not v),
                    retry_error_callback=lambda state: state.outcome.result())(check)


def _embed(snapshot: Path, cache_root: Path, llm: Path, base: Path, kinds: str = "[llm, clip]", **extra) -> dict:
    from embed_cache.config import EmbedConfig
    from embed_cache.job import run

    overrides = [f"snapshots=[{snapshot}]", f"llm.path={llm}", f"clip.base_model={base}", f"kinds={kinds}",
                 f"cache_root={cache_root}", "executor=local", "track=true",
                 *[f"{k}={v}" for k, v in extra.items()]]
    return run(load_config(EmbedConfig, EMBED_TEST_CONFIG, overrides))


def _decoy(i: int) -> Path:
    return write_snapshot(f"decoy-{i}-{uuid.uuid4().hex[:6]}",
                          [{"caption": f"decoy {i} a small purple cross number {j}"} for j in range(3)])


@pytest.fixture(scope="module")
def base_pretrained(stack, tiny_world, tmp_path_factory):
    """The tiny base model pretrained with MLflow on (its own models folder: the session's cached one has no run)."""
    from omnidiff.base.pretrain import pretrain

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNIDIFF_MODELS", str(tmp_path_factory.mktemp("models")))
        folder = pretrain(tiny_base_config(tiny_world, "track=true"))
    return folder, json.loads((folder / "base.json").read_text())["mlflow_run_id"]


@pytest.fixture(scope="module")
def built_model(stack, base_pretrained, train_snapshot, tiny_llm, tmp_path_factory):
    """Embed run over the model's snapshot, two decoys before and two runs after the training, the training."""
    from train.config import TrainConfig
    from train.launch import run as train

    base, _ = base_pretrained
    root = tmp_path_factory.mktemp("lineage")
    cache_root = root / "cache"
    right = _embed(train_snapshot, cache_root, tiny_llm, base)
    decoys_before = [_embed(_decoy(i), cache_root, tiny_llm, base, kinds="[llm]") for i in (1, 2)]
    name = f"omnidiff-lineage-{uuid.uuid4().hex[:8]}"
    trained = train(load_config(TrainConfig, TRAIN_CONFIG, [
        f"name={name}", f"base_model={base}", f"llm.path={tiny_llm}", f"data.snapshot={train_snapshot}",
        f"data.cache_root={cache_root}", f"checkpoint.dir={root / 'ckpt'}", f"registry.export_dir={root / 'export'}",
        "max_steps=4", "checkpoint.every_steps=4", "log_every=2", "track=true", "registry.register=true",
        f"registry.model_name={name}"]))
    # after the training: another snapshot, and a re-embed of the model's own snapshot (it built nothing of it)
    decoys_after = [_embed(_decoy(3), cache_root, tiny_llm, base, kinds="[llm]"),
                    _embed(train_snapshot, cache_root, tiny_llm, base)]
    return {"right": right, "decoys": decoys_before + decoys_after, "trained": trained, "ref": trained["model_ref"],
            "snapshot": train_snapshot}


def test_embed_runs_tag_readable_snapshot_digest_and_caches(built_model):
    from omnidiff.contracts.snapshot import Snapshot

    right = built_model["right"]
    tags = _client().get_run(right["run_id"]).data.tags
    assert tags["snapshot_digest"] == Snapshot.open(built_model["snapshot"]).digest
    assert not [k for k in tags if k.startswith("snapshot_digest.")], "one readable tag, not snapshot_digest.0"
    assert tags["cache_fingerprint.llm"] == right["fingerprints"]["llm"]
    assert tags["cache_dir.llm"] == str(Path(right["dirs"]["llm"]).resolve())


def test_lineage_lists_the_embed_run_of_the_models_snapshot_and_not_the_decoys(built_model):
    from flows.lineage import model_lineage

    right, decoys = built_model["right"]["run_id"], [d["run_id"] for d in built_model["decoys"]]
    fp = built_model["right"]["fingerprints"]["llm"]
    same_cache = _client().search_runs(
        [_client().get_experiment_by_name("omnidiff").experiment_id],
        f"tags.stage = 'embed' and tags.`cache_fingerprint.llm` = '{fp}'", order_by=["attributes.start_time DESC"])
    newest_three = [r.info.run_id for r in same_cache[:3]]
    assert right not in newest_three, "the premise: the newest three runs with this fingerprint are decoys"

    lin = model_lineage(built_model["ref"])
    trained = lin["chain"][0]
    assert trained["run"]["run_id"] == built_model["trained"]["run_id"]
    listed = [r["run_id"] for r in trained["inputs"]["embed_runs"]]
    assert listed == [right]
    assert sorted(trained["inputs"]["embed_runs"][0]["kinds"]) == ["clip", "llm"]
    assert [r["run_id"] for r in lin["embed_runs"]] == [right]
    assert not set(decoys) & set(listed)
    from omnidiff.contracts.snapshot import Snapshot

    assert lin["snapshot_digest"] == trained["inputs"]["snapshot_digest"] == Snapshot.open(built_model["snapshot"]).digest


def test_lineage_links_the_base_models_pretraining_run(built_model, base_pretrained):
    from flows.lineage import model_lineage

    base, pretrain_run = base_pretrained
    assert pretrain_run
    last = model_lineage(built_model["ref"])["chain"][-1]
    assert last["model"] == str(base) and last["stage"] == "base"
    assert last["run"]["run_id"] == pretrain_run and last["run"]["stage"] == "base-pretrain"
    assert _client().get_run(pretrain_run).data.tags["base_hash"] == base.name


def test_omnidiff_lineage_command_prints_the_right_embed_run(built_model):
    out = subprocess.run([sys.executable, "-m", "flows.lineage", built_model["ref"]], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    print(out.stdout)  # the report quotes it (pytest -s)
    assert f"embed run {built_model['right']['run_id']}" in out.stdout
    for decoy in built_model["decoys"]:
        assert decoy["run_id"] not in out.stdout
    assert "pretraining run" in out.stdout


# ----------------------------------------------------------------------------- killed runs


def _kill_when(argv: list[str], ready, timeout_s: float = 300) -> int:
    """Start ``argv``, SIGKILL it once ``ready()`` is true; returns its pid (asserts it was killed mid-run)."""
    driver = subprocess.Popen(argv, cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        _poll(lambda: ready() or driver.poll() is not None, timeout_s)
        assert driver.poll() is None, f"driver ended before the kill: {driver.stderr.read().decode()[-3000:]}"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        driver.stderr.close()
    return driver.pid


def test_a_killed_training_is_closed_by_its_rerun_and_leaves_no_ray_process(
        stack, train_snapshot, train_caches, train_base, tiny_llm, tmp_path):
    import psutil
    from ray._private import state

    from omnidiff import ray_orphans, tracking
    from omnidiff.stack import ensure_ray
    from train.config import TrainConfig
    from train.launch import run as train

    ckpt = tmp_path / "ckpt"
    overrides = [f"name=killed-{uuid.uuid4().hex[:6]}", f"base_model={train_base}", f"llm.path={tiny_llm}",
                 f"data.snapshot={train_snapshot}", f"data.cache_root={train_caches}", f"checkpoint.dir={ckpt}",
                 f"registry.export_dir={tmp_path / 'export'}", "dist.launcher=ray", "dist.num_workers=1",
                 "max_steps=16", "checkpoint.every_steps=4", "track=true"]
    _kill_when([sys.executable, "-m", "train.cli", "--config", str(TRAIN_CONFIG), *overrides],
               lambda: (ckpt / "latest").is_file())
    killed = json.loads((ckpt / tracking.RUN_RECORD).read_text())
    workers = [w["pid"] for w in json.loads((ckpt / "workers.json").read_text())["workers"]]
    assert _client().get_run(killed["run_id"]).info.status == "RUNNING", "MLflow cannot know of a SIGKILL"

    # Nothing of the killed job keeps running: its rank processes die with their job, and the orphan
    # watcher stops Ray Train's detached PlacementGroupCleaner (without it, it runs until the cluster stops).
    # Named detached actors are the cluster's shared services (Ray Data's AutoscalingCoordinator), which
    # the first job to need them happens to create: they are meant to stay.
    ensure_ray()

    def job_actors():
        return [a for a in state.actors(actor_state_name="ALIVE").values()
                if a["JobID"] == killed["ray_job_id"] and not a["Name"]]

    assert _poll(lambda: not job_actors(), 60) is True, job_actors()
    assert not [a for a in state.actors(actor_state_name="ALIVE").values()
                if a["JobID"] == killed["ray_job_id"] and a["ActorClassName"].endswith("PlacementGroupCleaner")]
    shared = [a for a in state.actors().values() if a["JobID"] == killed["ray_job_id"] and a["Name"]]
    assert all(a["NumRestarts"] == 0 for a in shared), "a shared service was killed (and restarted)"
    assert _poll(lambda: not [p for p in workers if psutil.pid_exists(p)], 60) is True
    assert not ray_orphans.orphans([killed["ray_job_id"]])

    result = train(load_config(TrainConfig, TRAIN_CONFIG, overrides))
    step = int(result["resumed_from"].removeprefix("step")) if result.get("resumed_from") else None
    old, new = _client().get_run(killed["run_id"]), _client().get_run(result["run_id"])
    assert old.info.status == "KILLED"
    assert old.data.tags["superseded_by"] == result["run_id"]
    assert new.data.tags["supersedes"] == killed["run_id"] and new.data.tags["resumed_from_run"] == killed["run_id"]
    assert result["supersedes"] == killed["run_id"]
    assert result["adopted"].startswith(f"resumed from step {step} (")
    assert f"of run {killed['run_id']}; run {killed['run_id']} was RUNNING, now KILLED" in result["adopted"]
    assert new.data.tags["adopted"] == result["adopted"].split("; run ")[0]
    assert new.info.status == "FINISHED" and result["final_step"] == 16


def test_stop_orphans_stops_the_detached_actors_of_a_dead_driver(stack):
    """The rerun's sweep (train.launch calls it before each launch): a SIGKILLed driver's detached actor goes."""
    from ray._private import state

    from omnidiff import ray_orphans
    from omnidiff.stack import ensure_ray

    ensure_ray()
    code = (
        "import time, ray\n"
        "from omnidiff.stack import ensure_ray\n"
        "ensure_ray()\n"
        "@ray.remote(num_cpus=0)\n"
        "class PlacementGroupCleaner:\n"
        "    def ping(self): return 1\n"
        "a = PlacementGroupCleaner.options(lifetime='detached').remote()\n"
        "ray.get(a.ping.remote())\n"
        "print(ray.get_runtime_context().get_job_id(), flush=True)\n"
        "time.sleep(600)\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                              text=True)
    try:
        job = driver.stdout.readline().strip()
    finally:
        driver.kill()
        driver.wait(timeout=30)
    assert job, "the driver printed no job id"

    def alive():
        return [a for a in state.actors(actor_state_name="ALIVE").values() if a["JobID"] == job]

    assert len(alive()) == 1 and alive()[0]["IsDetached"], "a detached actor outlives its killed driver"
    assert _poll(lambda: [j for j in state.jobs() if j["JobID"] == job and j["IsDead"]], 30)
    stopped = ray_orphans.stop_orphans()  # by class: a PlacementGroupCleaner of a dead job
    assert [a["job_id"] for a in stopped] == [job]
    assert _poll(lambda: not alive(), 30) is True


def test_a_killed_embed_run_is_closed_by_its_rerun_which_says_what_it_adopted(stack, tiny_llm, tmp_path):
    """The embed driver SIGKILLed after three shards are listed, on a local cache: the rerun holds every key exactly
    once (what the killed run finished is kept, nothing half-written is read) and closes the killed MLflow run.
    The same kill with the cache on S3 and Ray actors: tests/test_s3_kill.py."""
    from embed_cache.config import EmbedConfig
    from embed_cache.job import run
    from embed_cache.plan import plan_kind
    from omnidiff import tracking
    from omnidiff.contracts.cache import SHARDS_DIR, CacheStore, cache_dir, read_manifest
    from omnidiff.contracts.keys import text_key
    from omnidiff.text import normalise_caption
    from tests.test_embed_job import captions

    texts = captions(300, seed=5, lo=5, hi=60)
    snap = write_snapshot("embedkilled", [{"caption": t} for t in texts])
    overrides = [f"snapshots=[{snap}]", f"llm.path={tiny_llm}", "kinds=[llm]",
                 f"cache_root={tmp_path / 'cache'}", "shard_rows=16", "shard_tokens=2048", "executor=local",
                 "track=true"]
    cfg = load_config(EmbedConfig, EMBED_TEST_CONFIG, overrides)
    directory = cache_dir("llm", plan_kind("llm", cfg).fingerprint, cfg.cache_root)

    def listed() -> int:  # the manifest and its journal: the writer folds only every JOURNAL_FOLD shards
        manifest = read_manifest(directory)
        return len(manifest["shards"]) if manifest else 0

    _kill_when([sys.executable, "-m", "embed_cache.cli", "--config", str(EMBED_TEST_CONFIG), *overrides],
               lambda: listed() >= 3)
    killed = json.loads((directory / tracking.RUN_RECORD).read_text())
    kept = read_manifest(directory)["shards"]
    assert _client().get_run(killed["run_id"]).data.tags["snapshot_digest"], "tagged before the work, not after"

    out = run(cfg)
    old, new = _client().get_run(killed["run_id"]), _client().get_run(out["run_id"])
    assert old.info.status == "KILLED" and old.data.tags["superseded_by"] == out["run_id"]
    assert new.data.tags["supersedes"] == killed["run_id"] and new.info.status == "FINISHED"
    listed_by_killed = len([s for s in kept if s["name"].startswith(f"part-{killed['run_stamp']}-")])
    assert listed_by_killed >= 3
    assert out["takeover"]["supersedes"] == [killed["run_id"]]
    adopted = re.match(r"adopted (\d+) cache shards \((\d+) rows\) of run (\w+) \(llm (\d+)\)", new.data.tags["adopted"])
    assert adopted, new.data.tags["adopted"]
    # the shards it listed, and at most one it renamed into place but was killed before listing
    assert listed_by_killed <= int(adopted[1]) <= listed_by_killed + 1 and adopted[3] == killed["run_id"]
    assert out["takeover"]["adopted"].startswith(new.data.tags["adopted"])
    assert out["kinds"]["llm"]["skipped"] >= int(adopted[2])
    # Every key exactly once, nothing unlisted or half-written left behind.
    store = CacheStore(directory)
    report = store.verify()
    assert report.ok and report.duplicate_keys == 0 and not report.corrupt and not report.unlisted, report.as_dict()
    wanted = {text_key(normalise_caption(t)) for t in texts} | {text_key("")}
    assert set(store.keys()) == wanted and report.rows == len(wanted)
    stats = out["kinds"]["llm"]
    assert stats["computed"] + stats["skipped"] == len(wanted) and 0 < stats["computed"] < len(wanted)
    assert not list((directory / SHARDS_DIR).glob(".tmp-*"))
