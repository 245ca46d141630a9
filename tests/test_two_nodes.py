"""Two Ray nodes on this machine (issue 17 item 4): embed with an actor on each node and a two-worker training
across them give the results of a one-node run.

    flock /tmp/omnidiff-heavy.lock timeout 900 .venv/bin/pytest tests/test_two_nodes.py -x -q

The cluster (tests/fixtures_ray_cluster.py): a head ``node_a`` and a node ``node_b`` joined with ``ray start
--address``, each with 1 CPU, its own temp dir, its own OMNIDIFF_HOME and its own custom resource. An embed
actor and a training worker each take 1 CPU, so two actors / two workers must land one per node; each node's
own logs show it. The one-node run is the same code on a head with 2 CPUs. The tiny random LLM of the test
fixtures stands in for Gemma.

``test_nothing_crosses_nodes_through_a_local_path`` is the S3 variant (every artifact at ``storage.root`` on
the SeaweedFS server of tests/fixtures_s3.py); it runs once the stage configs take a ``storage`` section.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_ray_cluster import RayNodeSpec, ray_cluster

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
TWO_NODES = [RayNodeSpec("node_a", cpus=1), RayNodeSpec("node_b", cpus=1)]
ONE_NODE = [RayNodeSpec("node_a", cpus=2)]
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


def _train_cfg(snapshot, base, llm, *overrides: str):
    from omnidiff.config import load_config
    from train.config import TrainConfig

    return load_config(TrainConfig, REPO / "configs" / "train_test_stage1.yaml", [
        "name=two-nodes", f"base_model={base}", f"llm.path={llm}", f"data.snapshot={snapshot}",
        "dist.launcher=ray", "dist.num_workers=2", "dist.cpus_per_worker=1", "dist.zero_stage=2",
        "max_steps=6", "checkpoint.every_steps=3", "track=false", *overrides,
    ])  # fmt: skip


def _weights(export_dir) -> dict:
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(Path(export_dir).rglob("*.safetensors"))
            for k, v in load_file(p).items()}


def _run_stages(cluster, root: Path, snapshot, base, llm) -> dict:
    """embed (llm + clip) then stage-1 training on ``cluster``; what ran where, read before the nodes stop."""
    from embed_cache.job import run as embed
    from train import run as train

    with cluster.connected():
        summary = embed(_embed_cfg(snapshot, base, llm, f"cache_root={root / 'cache'}"))
        result = train(_train_cfg(snapshot, base, llm, f"data.cache_root={root / 'cache'}",
                                  f"checkpoint.dir={root / 'checkpoints'}", f"registry.export_dir={root / 'export'}"))
    return {
        "embed": summary, "train": result, "dirs": summary["dirs"],
        "actors": {name: len(cluster.logs_mention(name, ACTOR)) for name in cluster.nodes},
        "train_workers": {name: len(cluster.logs_mention(name, TRAIN_WORKER)) for name in cluster.nodes},
        "nodes": cluster.alive_nodes(),
    }  # fmt: skip


@pytest.fixture(scope="module")
def runs(train_snapshot, train_base, tiny_llm, tmp_path_factory) -> dict:
    """The same stages on two nodes, then on one (the clusters one after the other: 2 CPUs here)."""
    root = tmp_path_factory.mktemp("two-nodes")
    out = {}
    for label, specs in (("two", TWO_NODES), ("one", ONE_NODE)):
        with ray_cluster(root / label / "ray", specs) as cluster:
            out[label] = _run_stages(cluster, root / label, train_snapshot, train_base, tiny_llm)
    return out


def test_the_cluster_has_two_nodes_with_their_own_resources(runs):
    nodes = runs["two"]["nodes"]
    assert set(nodes) == {"127.0.0.2", "127.0.0.3"}
    assert nodes["127.0.0.2"]["node_a"] == 1 and "node_b" not in nodes["127.0.0.2"]
    assert nodes["127.0.0.3"]["node_b"] == 1 and "node_a" not in nodes["127.0.0.3"]
    assert {n["CPU"] for n in nodes.values()} == {1}


def test_embed_ran_an_actor_on_each_node_and_equals_the_one_node_cache(runs):
    from omnidiff.contracts.cache import CacheStore

    two, one = runs["two"], runs["one"]
    assert two["actors"]["node_a"] >= 1 and two["actors"]["node_b"] >= 1, two["actors"]
    assert one["actors"]["node_a"] >= 1
    for kind in ("llm", "clip"):
        assert Path(two["dirs"][kind]).name == Path(one["dirs"][kind]).name  # the same fingerprint
        a, b = CacheStore(two["dirs"][kind]), CacheStore(one["dirs"][kind])
        assert len(a.shard_names) >= 2  # work was split: both actors had shards
        keys = a.keys()
        assert keys == b.keys() and len(keys) > 10
        got, want = a.read(keys), b.read(keys)
        different = [k for k in keys if not np.array_equal(got[k], want[k])]
        assert not different, f"{kind}: {len(different)} of {len(keys)} keys differ, e.g. {different[0]}"


def test_two_workers_across_the_nodes_train_the_one_node_weights(runs):
    import torch

    two, one = runs["two"], runs["one"]
    assert two["train_workers"]["node_a"] >= 1 and two["train_workers"]["node_b"] >= 1, two["train_workers"]
    assert two["train"]["world_size"] == one["train"]["world_size"] == 2
    assert two["train"]["final_step"] == one["train"]["final_step"] == 6
    ours, theirs = _weights(two["train"]["export_dir"]), _weights(one["train"]["export_dir"])
    assert ours and ours.keys() == theirs.keys()
    different = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ between two nodes and one, e.g. {different[:3]}"


# ----------------------------------------------------------------------------------- all storage on S3


def _takes_storage() -> bool:
    from embed_cache.config import EmbedConfig
    from train.config import TrainConfig

    return "storage" in EmbedConfig.model_fields and "storage" in TrainConfig.model_fields


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


@pytest.mark.skipif(not _takes_storage(), reason="the stage configs take no storage section yet (issue 17, "
                    "s3:// stages); this test runs once they do")
def test_nothing_crosses_nodes_through_a_local_path(runs, s3_prefix, train_snapshot, train_base, tiny_llm,
                                                   tmp_path):
    """Every artifact at ``storage.root`` on the S3 server: the snapshot is read from there, caches, checkpoints
    and the export are written there. Each node has its own OMNIDIFF_HOME as scratch; the driver's home and the
    test's folders receive no file during the run outside the driver's own caches (``DRIVER_LOCAL``), so nothing
    (examples, checkpoints, results) went from a node to another process through a local path. The exported
    weights, fetched back from S3, equal the one-node run's."""
    import pyarrow.fs as pafs
    import torch

    from embed_cache.job import run as embed
    from omnidiff.contracts.storage import open_folder
    from train import run as train

    snapshot = f"{s3_prefix}/data/snapshots/{train_snapshot.parent.name}/{train_snapshot.name}"
    folder = open_folder(snapshot)
    pafs.copy_files(str(train_snapshot), folder.path(), destination_filesystem=folder.fs)
    storage = [f"storage.root={s3_prefix}"]
    since = time.time()
    with ray_cluster(tmp_path / "ray", TWO_NODES) as cluster:
        with cluster.connected():
            summary = embed(_embed_cfg(snapshot, train_base, tiny_llm, *storage))
            result = train(_train_cfg(snapshot, train_base, tiny_llm, *storage))
        actors = {name: len(cluster.logs_mention(name, ACTOR)) for name in cluster.nodes}
        workers = {name: len(cluster.logs_mention(name, TRAIN_WORKER)) for name in cluster.nodes}
    assert all(actors.values()) and all(workers.values()), (actors, workers)
    assert all(str(d).startswith(s3_prefix) for d in summary["dirs"].values()), summary["dirs"]
    export_url = result.get("export_url", result["export_dir"])  # export_dir: the driver's local copy
    assert str(export_url).startswith(s3_prefix) and str(result["checkpoint_dir"]).startswith(s3_prefix), result
    driver_home = Path(os.environ["OMNIDIFF_HOME"])
    leaked = _files_written([driver_home, tmp_path, Path(train_snapshot).parent], since, skip=tmp_path / "ray",
                            driver_home=driver_home)
    assert not leaked, f"{len(leaked)} file(s) written to a local path outside the nodes' scratch: {leaked[:5]}"

    local_export = tmp_path / "export"
    export = open_folder(export_url)
    pafs.copy_files(export.path(), str(local_export), source_filesystem=export.fs)
    ours, theirs = _weights(local_export), _weights(runs["one"]["train"]["export_dir"])
    assert ours and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
