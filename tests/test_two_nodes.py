"""Two Ray nodes on this machine (issue 17 item 4): embed with an actor on each node and a two-worker training
across them give the results of a one-node run.

    flock /tmp/omnidiff-heavy.lock timeout 900 .venv/bin/pytest tests/test_two_nodes.py -x -q

The cluster (tests/fixtures_ray_cluster.py): a head ``node_a`` and a node ``node_b`` joined with ``ray start
--address``, each with 1 CPU, its own temp dir, its own OMNIDIFF_HOME and its own custom resource. An embed
actor and a training worker each take 1 CPU, so two actors / two workers must land one per node; each node's
own logs show it. The one-node references, on local folders, start no second cluster:

* embed: the same job with ``executor=local`` (the same actor class, shard plan and torch threads, in this
  process);
* training: the session's uninterrupted two-worker stage-1 run on the stack's one-node Ray
  (``two_worker_reference`` of tests/fixtures_train.py, the reference of the kill tests too). The two-node
  training runs the same config on the same caches (``train_caches``, copied to the store like the snapshot),
  so its weights must equal the reference's bit for bit; that the two-node embed writes those same values is
  the embed test's.

The tiny random LLM of the test fixtures stands in for Gemma. The two-node run keeps every artifact at
``storage.root`` on the SeaweedFS server of tests/fixtures_s3.py (the snapshot and the training's input caches
are read from there; caches, checkpoints and the export are written there). One two-node run carries every test
(the cluster, each node's work, equal results, and no file passed between nodes through a local path).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_ray_cluster import RayNodeSpec, ray_cluster

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
TWO_NODES = [RayNodeSpec("node_a", cpus=1), RayNodeSpec("node_b", cpus=1)]
ACTOR = "EncodeShardActor"  # in the log of the worker process that hosts an embed actor
TRAIN_WORKER = "RayTrainWorker"  # Ray Train's worker actor class


def _embed_cfg(snapshot, base, llm, *overrides: str):
    from embed_cache.config import EmbedConfig
    from omnidiff.config import load_config

    return load_config(EmbedConfig, REPO / "configs" / "embed_test.yaml", [
        f"snapshots=[{snapshot}]", f"llm.path={llm}", f"clip.base_model={base}", "kinds=[llm, clip]",
        "executor=ray", "num_actors=2", "threads_per_actor=1", "shard_tokens=2048", "shard_rows=32", "track=false",
        *overrides,
    ])  # fmt: skip


def _weights(export_dir) -> dict:
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(Path(export_dir).rglob("*.safetensors"))
            for k, v in load_file(p).items()}


# What the driver keeps in its own OMNIDIFF_HOME while storage lives on S3 (its caches of what it published or
# fetched, tools' state, Ray Train's run folder, progress events): written and read by the driver only.
DRIVER_LOCAL = {"checkpoint_cache", "export_cache", "model_cache", "data", "prefect", "hf", "torch_extensions",
                "matplotlib", "triton", "xdg_cache", "ray_train", "models", "ray", "progress", "stack"}


def _files_written(roots: list[Path], since: float, skip: Path, driver_home: Path) -> list[Path]:
    """Files written under ``roots`` after ``since``, outside ``skip`` (the cluster's own folder: node homes and
    logs) and the driver's own local folders (``DRIVER_LOCAL`` under ``driver_home``)."""
    found = []
    for root in roots:
        for path in Path(root).rglob("*"):
            if not path.is_file() or skip in path.parents or path.stat().st_mtime < since:
                continue
            if driver_home in path.parents and path.relative_to(driver_home).parts[0] in DRIVER_LOCAL:
                continue
            found.append(path)
    return sorted(set(found))


def _observe(cluster) -> dict:
    """What ran where, read from the nodes' own logs and the GCS before the nodes stop."""
    return {
        "actors": {name: len(cluster.logs_mention(name, ACTOR)) for name in cluster.nodes},
        "train_workers": {name: len(cluster.logs_mention(name, TRAIN_WORKER)) for name in cluster.nodes},
        "nodes": cluster.alive_nodes(),
    }


def _two_nodes_on_s3(root: Path, prefix: str, train_snapshot: Path, train_caches: Path, base, llm,
                     train_overrides) -> dict:
    """embed (llm + clip) then stage-1 training on two nodes, every artifact at ``storage.root = prefix``."""
    import pyarrow.fs as pafs

    from embed_cache.job import run as embed
    from omnidiff.config import load_config
    from omnidiff.contracts.storage import open_folder
    from tests.fixtures_train import TWO_WORKERS
    from train import run as train
    from train.config import TrainConfig

    snapshot = f"{prefix}/data/snapshots/{train_snapshot.parent.name}/{train_snapshot.name}"
    folder = open_folder(snapshot)
    pafs.copy_files(str(train_snapshot), folder.path(), destination_filesystem=folder.fs)
    caches = open_folder(f"{prefix}/reference-cache")
    for kind in ("llm", "clip"):  # stage 1's inputs
        pafs.copy_files(str(train_caches / kind), caches.path(kind), destination_filesystem=caches.fs)
    storage = [f"storage.root={prefix}"]
    # The reference's config (configs/train_test_stage1.yaml, two workers, 12 steps); every place on the store.
    train_cfg = load_config(TrainConfig, REPO / "configs" / "train_test_stage1.yaml", [
        o for o in train_overrides("two-nodes", **TWO_WORKERS, **{"dist.cpus_per_worker": 1})
        if not o.startswith(("checkpoint.dir=", "registry.export_dir=", "data.snapshot=", "data.cache_root="))
    ] + [f"data.snapshot={snapshot}", f"data.cache_root={caches.url_of('')}", *storage])
    driver_home = Path(os.environ["OMNIDIFF_HOME"])
    since = time.time()
    with ray_cluster(root / "ray", TWO_NODES) as cluster:
        with cluster.connected():
            summary = embed(_embed_cfg(snapshot, base, llm, *storage))
            result = train(train_cfg)
        out = {"embed": summary, "train": result, "dirs": summary["dirs"], **_observe(cluster)}
    out["leaked"] = _files_written([driver_home, root, Path(train_snapshot).parent], since, skip=root / "ray",
                                   driver_home=driver_home)
    export_url = result.get("export_url", result["export_dir"])  # export_dir: the driver's local copy
    out["export_url"] = export_url
    local_export = root / "export-fetched"
    export = open_folder(export_url)
    pafs.copy_files(export.path(), str(local_export), source_filesystem=export.fs)
    out["weights"] = _weights(local_export)
    return out


def _one_node_embed(root: Path, snapshot, base, llm) -> dict:
    """The embed reference on local folders: the same job in this process (``executor=local``)."""
    import torch

    from embed_cache.job import run as embed

    threads = torch.get_num_threads()
    try:  # the local actor sets this process's torch threads to threads_per_actor
        summary = embed(_embed_cfg(snapshot, base, llm, f"cache_root={root / 'cache'}", "executor=local"))
    finally:
        torch.set_num_threads(threads)
    return {"embed": summary, "dirs": summary["dirs"]}


@pytest.fixture(scope="module")
def runs(stack, s3_server, train_snapshot, train_caches, train_base, tiny_llm, train_overrides,
         two_worker_reference, tmp_path_factory) -> dict:
    """Two nodes with all storage on S3, then the one-node embed on local folders (after the cluster stopped:
    2 CPUs); the one-node training is the session's ``two_worker_reference``."""
    root = tmp_path_factory.mktemp("two-nodes")
    prefix = f"s3://{s3_server.bucket}/two-nodes-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
            mp.delenv(name, raising=False)
        for name, value in s3_server.env().items():
            mp.setenv(name, value)
        two = _two_nodes_on_s3(root / "two", prefix, train_snapshot, train_caches, train_base, tiny_llm,
                               train_overrides)
        # the S3 cache is read back while the environment still points at the server
        two["cache_rows"] = _cache_rows(two["dirs"])
    one = _one_node_embed(root / "one", train_snapshot, train_base, tiny_llm)
    one["cache_rows"] = _cache_rows(one["dirs"])
    one["train"] = two_worker_reference
    one["weights"] = _weights(two_worker_reference["export_dir"])
    return {"two": two, "one": one, "prefix": prefix}


def _cache_rows(dirs: dict) -> dict:
    """kind -> (shard count, {key: value}) of an embed run's caches (local or s3://)."""
    from omnidiff.contracts.cache import CacheStore

    out = {}
    for kind in ("llm", "clip"):
        store = CacheStore(dirs[kind])
        keys = store.keys()
        out[kind] = (len(store.shard_names), store.read(keys))
    return out


def test_the_cluster_has_two_nodes_with_their_own_resources(runs):
    nodes = runs["two"]["nodes"]
    assert set(nodes) == {"127.0.0.2", "127.0.0.3"}
    assert nodes["127.0.0.2"]["node_a"] == 1 and "node_b" not in nodes["127.0.0.2"]
    assert nodes["127.0.0.3"]["node_b"] == 1 and "node_a" not in nodes["127.0.0.3"]
    assert {n["CPU"] for n in nodes.values()} == {1}


def test_embed_ran_an_actor_on_each_node_and_equals_the_one_node_cache(runs):
    two, one = runs["two"], runs["one"]
    assert two["actors"]["node_a"] >= 1 and two["actors"]["node_b"] >= 1, two["actors"]
    assert {k["executor"] for k in two["embed"]["kinds"].values()} == {"ray"}
    assert {k["executor"] for k in one["embed"]["kinds"].values()} == {"local"}
    for kind in ("llm", "clip"):
        assert str(two["dirs"][kind]).startswith(runs["prefix"]), two["dirs"]  # written on S3
        assert Path(two["dirs"][kind]).name == Path(one["dirs"][kind]).name  # the same fingerprint
        (shards, got), (_, want) = two["cache_rows"][kind], one["cache_rows"][kind]
        assert shards >= 2  # work was split: both actors had shards
        assert got.keys() == want.keys() and len(got) > 10
        different = [k for k in want if not np.array_equal(got[k], want[k])]
        assert not different, f"{kind}: {len(different)} of {len(want)} keys differ, e.g. {different[0]}"


def test_two_workers_across_the_nodes_train_the_one_node_weights(runs):
    import torch

    two, one = runs["two"], runs["one"]
    assert two["train_workers"]["node_a"] >= 1 and two["train_workers"]["node_b"] >= 1, two["train_workers"]
    assert two["train"]["world_size"] == one["train"]["world_size"] == 2
    assert two["train"]["final_step"] == one["train"]["final_step"] == 12
    assert str(two["export_url"]).startswith(runs["prefix"]), two["export_url"]
    assert str(two["train"]["checkpoint_dir"]).startswith(runs["prefix"]), two["train"]["checkpoint_dir"]
    ours, theirs = two["weights"], one["weights"]
    assert ours and ours.keys() == theirs.keys()
    different = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ between two nodes and one, e.g. {different[:3]}"


def test_nothing_crosses_nodes_through_a_local_path(runs):
    """Each node has its own OMNIDIFF_HOME as scratch; the driver's home and the test's folders receive no file
    during the two-node run outside the driver's own caches (``DRIVER_LOCAL``), so nothing (examples,
    checkpoints, results) went from a node to another process through a local path."""
    leaked = runs["two"]["leaked"]
    assert not leaked, f"{len(leaked)} file(s) written to a local path outside the nodes' scratch: {leaked[:5]}"
