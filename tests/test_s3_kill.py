"""Killed mid-run with all storage on S3 (issue 17 "Reliability"), on a real SeaweedFS server.

* embed: the driver is SIGKILLed after three shards are listed in the cache's manifest on ``s3://``; a rerun
  holds every key exactly once, never reads what the killed run left unlisted, and ``clean_cache`` removes it;
* training: rank 1 of a two-worker Ray Train run with its checkpoints on ``s3://`` is SIGKILLed after the
  step-6 checkpoint was committed there, and its machine's local copy is deleted: the restarted group
  downloads the checkpoint from S3, resumes at step 6 and ends with the same weights, bit for bit, as an
  uninterrupted run on a local disk.

The kills on local storage, with their MLflow runs closed by the reruns: tests/test_lineage.py.

    flock /tmp/omnidiff-heavy.lock .venv/bin/pytest tests/test_s3_kill.py -x -q
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from embed_cache.config import EmbedConfig
from omnidiff.config import load_config, replace
from omnidiff.contracts.storage import open_folder
from tests.fixtures_embed import EMBED_TEST_CONFIG, write_snapshot
from tests.fixtures_train import TWO_WORKERS
from tests.test_embed_job import captions

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


def _weights(export_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(Path(export_dir).rglob("*.safetensors"))
            for k, v in load_file(p).items()}


def test_sigkill_embed_with_its_cache_on_s3_then_rerun_holds_every_key_once(stack, s3_prefix, tiny_llm):
    from embed_cache.job import run
    from embed_cache.plan import plan_kind
    from embed_cache.writer import clean_cache
    from omnidiff.contracts.cache import CacheStore, cache_dir, read_manifest
    from omnidiff.contracts.keys import text_key
    from omnidiff.text import normalise_caption

    texts = captions(400, seed=17, lo=5, hi=60)
    snapshot = write_snapshot("s3kill", [{"caption": t} for t in texts], root=f"{s3_prefix}/snapshots")
    overrides = [f"snapshots=[{snapshot}]", f"llm.path={tiny_llm}", "kinds=[llm]", "track=false",
                 f"cache_root={s3_prefix}/cache", "shard_rows=16", "shard_tokens=2048", "num_actors=2"]
    cfg = load_config(EmbedConfig, EMBED_TEST_CONFIG, overrides)
    directory = cache_dir("llm", plan_kind("llm", cfg).fingerprint, cfg.cache_root)
    cache = open_folder(directory)
    driver = subprocess.Popen([sys.executable, "-m", "embed_cache.cli", "--config", str(EMBED_TEST_CONFIG),
                               *overrides], cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)

    def listed() -> int:  # the manifest and its journal: the writer folds only every JOURNAL_FOLD shards
        manifest = read_manifest(cache)
        return len(manifest["shards"]) if manifest else 0

    until_three_listed = Retrying(stop=stop_after_delay(180), wait=wait_fixed(0.05),
                                  retry=retry_if_result(lambda n: n < 3 and driver.poll() is None),
                                  retry_error_callback=lambda state: state.outcome.result())
    try:
        until_three_listed(listed)
        assert driver.poll() is None, f"driver ended before it could be killed: {driver.stderr.read().decode()[-2000:]}"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        driver.stderr.close()
    partial = CacheStore(directory)
    assert 0 < len(partial) < len(texts) + 1, "the kill did not land mid-run"

    out = run(replace(cfg, num_actors=1))  # the rerun: a fresh driver, same cache on S3
    store = CacheStore(directory)
    report = store.verify()
    assert report.ok and report.duplicate_keys == 0 and not report.corrupt, report.as_dict()
    wanted = {text_key(normalise_caption(t)) for t in texts} | {text_key("")}
    assert set(store.keys()) == wanted and report.rows == len(wanted)  # every key, exactly once
    stats = out["kinds"]["llm"]
    assert stats["computed"] + stats["skipped"] == len(wanted) and stats["skipped"] >= len(partial)
    # What the killed run left unlisted was never read (its keys were computed again) and can be cleaned.
    removed = clean_cache(str(directory), grace_s=0)
    assert sorted(f"shards/{n}" for n in report.unlisted) == sorted(r for r in removed if r.startswith("shards/"))
    after = CacheStore(directory).verify()
    assert after.ok and after.unlisted == [] and after.rows == len(wanted)


@pytest.fixture(scope="module")
def local_reference(two_worker_reference):
    """An uninterrupted two-worker stage-1 run, checkpoints and export on the local disk (tests/fixtures_train.py,
    shared with the local kill test of tests/test_train_e2e.py)."""
    return two_worker_reference


def test_sigkill_a_rank_with_checkpoints_on_s3_resumes_to_the_same_weights(local_reference, train_overrides, s3_prefix):
    from train import run
    from train.checkpoint import work_dir
    from train.config import TrainConfig

    url = f"{s3_prefix}/checkpoints/killed"
    cfg = load_config(TrainConfig, REPO / "configs" / "train_test_stage1.yaml", train_overrides(
        "s3-killed", **TWO_WORKERS, **{"dist.max_failures": 1, "checkpoint.dir": url,
                                       "registry.export_dir": f"{s3_prefix}/exports/killed"}))
    remote, local = open_folder(url), work_dir(url)
    killed: dict = {}

    def kill_rank1_after_the_step6_checkpoint_is_on_s3():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            try:
                latest = remote.read_bytes("latest").decode().strip()
            except FileNotFoundError:
                latest = ""
            if latest == "step00000006":
                workers = json.loads((local / "workers.json").read_text())["workers"]
                pid = next(w["pid"] for w in workers if w["rank"] == 1)
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                # This machine forgets its copy: the restarted ranks must fetch the checkpoint from S3.
                shutil.rmtree(local / "step00000006", ignore_errors=True)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank1_after_the_step6_checkpoint_is_on_s3, daemon=True)
    killer.start()
    result = run(cfg)
    killer.join(timeout=5)
    assert killed, "the run finished before the step-6 checkpoint was seen on S3"
    assert result["resumed_from"] == "step00000006" and result["start_step"] == 6, result
    assert (local / "step00000006" / "omnidiff_meta.json").is_file()  # downloaded again from S3
    ours, theirs = _weights(Path(result["export_dir"])), _weights(Path(local_reference["export_dir"]))
    assert ours.keys() == theirs.keys()
    different = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    assert remote.read_bytes("latest").decode() == "step00000012" and remote.exists("step00000012/manifest.json")
