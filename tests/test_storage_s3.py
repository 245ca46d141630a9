"""Artifacts on S3-compatible object storage (issue 17), against a real SeaweedFS server (tests/fixtures_s3.py).

The pair snapshot and the embedding cache written to ``s3://`` read back equal to a local write of the
same data (same digests, same shard bytes); a writer killed before its manifest leaves nothing a reader
sees, and ``clean_*`` removes the leftovers; a bad endpoint or bad credentials give an error naming the URL.

.venv/bin/pytest tests/test_storage_s3.py -x -q        (starts `weed server`, ~15 s)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from embed_cache.writer import CacheWriter, clean_cache, write_shard_file
from omnidiff.config import ConfigError
from omnidiff.contracts.cache import CacheStore, cache_dir, pixels_table, states_table
from omnidiff.contracts.encoders import fingerprint, llm_inputs, pixels_inputs
from omnidiff.contracts.snapshot import (
    Snapshot,
    SnapshotError,
    SnapshotWriter,
    clean_snapshots,
    content_digest,
    latest_snapshot,
)
from omnidiff.contracts.storage import S3Settings, StorageError, open_folder, split_s3_url
from tests.fixtures_s3 import free_ports

ENCODER = {"model_id": "m", "weights_digest": "abc", "layer": 2, "max_length": 512, "dtype": "float32",
           "template": "raw", "normaliser_version": "1"}
D = 8


def _pairs(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "key": [f"k{seed}-{i}" for i in range(n)],
        "caption": [f"a red square {i}" for i in range(n)],
        "lang": ["en"] * n,
        "image": [rng.bytes(64) for _ in range(n)],
        "split": ["train" if i % 4 else "val" for i in range(n)],
    })


def _write_snapshot(root, tables: dict[str, list[pa.Table]]):
    writer = SnapshotWriter("tiny", root=root)
    for name, shards in tables.items():
        for table in shards:
            writer.write_shard(name, table)
    return writer.finish({"counts": {"pairs": {"kept": sum(t.num_rows for t in tables["pairs"])}}})


SNAPSHOT_TABLES = {
    "pairs": [_pairs(5, 1), _pairs(3, 2)],
    "parallel": [pa.table({"key": ["p0"], "text": ["un carré"], "lang": ["fr"], "text_en": ["a square"],
                           "split": ["train"]})],
    "quarantine": [pa.table({"table": ["pairs"], "reason": ["http_404"], "url": ["http://x/1.png"]})],
}


# ------------------------------------------------------------------------------- no server needed


def test_settings_come_from_config_first_then_the_aws_environment():
    env = {"AWS_ENDPOINT_URL": "http://generic:1", "AWS_ENDPOINT_URL_S3": "http://s3-specific:2",
           "AWS_ACCESS_KEY_ID": "id-env", "AWS_SECRET_ACCESS_KEY": "secret-env", "AWS_REGION": "eu-west-3"}
    resolved = S3Settings().resolved(env)
    assert (resolved.endpoint_url, resolved.endpoint_source) == ("http://s3-specific:2", "environment")
    assert (resolved.access_key_id, resolved.secret_access_key, resolved.region) == ("id-env", "secret-env",
                                                                                     "eu-west-3")
    del env["AWS_ENDPOINT_URL_S3"]
    assert S3Settings().resolved(env).endpoint_url == "http://generic:1"
    own = S3Settings(endpoint_url="http://cfg:3", access_key_id="id-cfg", secret_access_key="s-cfg",
                     region="ap-south-1").resolved(env)
    assert (own.endpoint_url, own.endpoint_source, own.access_key_id, own.secret_access_key, own.region) == (
        "http://cfg:3", "config", "id-cfg", "s-cfg", "ap-south-1")
    assert "s-cfg" not in repr(S3Settings(secret_access_key="s-cfg"))  # a config is logged: no secret in it
    assert S3Settings().resolved({}).region == "us-east-1"
    with pytest.raises(ConfigError, match="endpoint_url"):
        S3Settings(endpoint_url="127.0.0.1:8333")  # no scheme: refused, not guessed


def test_bad_s3_urls_are_refused_by_name():
    assert split_s3_url("s3://omnidiff-data/a/b/") == ("omnidiff-data", "a/b")
    with pytest.raises(StorageError, match=r"'s3://t/x'.*bucket name 't'"):
        split_s3_url("s3://t/x")
    with pytest.raises(StorageError, match="'..'"):
        split_s3_url("s3://bucket/a/../b")


def test_local_paths_are_unchanged(tmp_path):
    """The s3-aware entry points still give Paths, the same layout and the same digest for a local root."""
    final = _write_snapshot(tmp_path, SNAPSHOT_TABLES)
    assert final == tmp_path / "tiny" / final.name and (final / "manifest.json").is_file()
    assert latest_snapshot("tiny", root=tmp_path) == final
    inputs = llm_inputs(ENCODER)
    assert cache_dir("llm", fingerprint(inputs), tmp_path) == tmp_path / "llm" / fingerprint(inputs)


# ------------------------------------------------------------------------------- snapshot


def test_snapshot_on_s3_reads_back_equal_to_a_local_write(tmp_path, s3_prefix):
    local = Snapshot.open(_write_snapshot(tmp_path, SNAPSHOT_TABLES))
    url = _write_snapshot(s3_prefix, SNAPSHOT_TABLES)
    assert url == f"{s3_prefix}/tiny/{local.digest[:16]}"
    assert latest_snapshot("tiny", root=s3_prefix) == url
    remote = Snapshot.open(url)  # verifies every shard's sha256 on the server
    assert remote.digest == local.digest and remote.manifest["shards"] == local.manifest["shards"]
    for table in ("pairs", "parallel", "quarantine"):
        assert getattr(remote, table)().equals(getattr(local, table)())
    assert remote.pairs(columns=["key", "lang"]).equals(local.pairs(columns=["key", "lang"]))
    assert remote.shard_paths("pairs") == [f"{url}/pairs/part-00000.parquet", f"{url}/pairs/part-00001.parquet"]
    # the staging prefix is gone once published; a rerun of the same content lands in the same place
    folder = open_folder(f"{s3_prefix}/tiny")
    assert not [o.rel for o in folder.list() if o.rel.startswith(".staging-")]
    assert _write_snapshot(s3_prefix, SNAPSHOT_TABLES) == url
    assert Snapshot.open(url).digest == local.digest


def test_snapshot_writer_killed_before_its_manifest_leaves_nothing_a_reader_sees(s3_prefix):
    committed = _write_snapshot(s3_prefix, SNAPSHOT_TABLES)
    # A writer killed mid-way: shards staged, never finished.
    other = {"pairs": [_pairs(4, 7)], "parallel": [], "quarantine": []}
    crashed = SnapshotWriter("tiny", root=s3_prefix)
    crashed.write_shard("pairs", other["pairs"][0])
    # A writer killed during finish(): shards copied into their digest folder, manifest never written.
    digest16 = content_digest(crashed.shards)[:16]
    folder = open_folder(f"{s3_prefix}/tiny")
    folder.copy(f"{crashed.staging}/pairs/part-00000.parquet", f"{digest16}/pairs/part-00000.parquet")

    assert latest_snapshot("tiny", root=s3_prefix) == committed  # LATEST still names the committed one
    with pytest.raises(SnapshotError, match=rf"'{s3_prefix}/tiny/{digest16}' is not a pair snapshot"):
        Snapshot.open(f"{s3_prefix}/tiny/{digest16}")
    assert Snapshot.open(committed).pairs().num_rows == 8

    leftovers = {f"{crashed.staging}/pairs/part-00000.parquet", f"{digest16}/pairs/part-00000.parquet"}
    assert clean_snapshots("tiny", s3_prefix, grace_s=3600) == []  # too young: could be a live writer's
    assert set(clean_snapshots("tiny", s3_prefix, grace_s=0)) == leftovers
    remaining = {o.rel for o in folder.list()}
    assert not remaining & leftovers and f"{committed.rsplit('/', 1)[1]}/manifest.json" in remaining
    assert Snapshot.open(committed).digest == Snapshot.open(latest_snapshot("tiny", root=s3_prefix)).digest


# ------------------------------------------------------------------------------- embedding cache


def _fill_cache(directory, rng_seed: int = 0):
    rng = np.random.default_rng(rng_seed)
    inputs = llm_inputs(ENCODER)
    keys = [[f"a{i}" for i in range(4)], [f"b{i}" for i in range(3)]]
    states = [[rng.standard_normal((n, D)).astype(np.float32) for n in (3, 1, 5, 2)],
              [rng.standard_normal((n, D)).astype(np.float32) for n in (4, 2, 2)]]
    with CacheWriter(directory, inputs) as writer:
        writer.set_value_shape((D,))
        for unit, (k, s) in enumerate(zip(keys, states, strict=True)):
            writer.write(states_table(k, s), unit)
    return [k for ks in keys for k in ks]


def test_cache_on_s3_reads_back_equal_to_a_local_write(tmp_path, s3_prefix):
    inputs = llm_inputs(ENCODER)
    local_dir = cache_dir("llm", fingerprint(inputs), tmp_path)
    remote_dir = cache_dir("llm", fingerprint(inputs), f"{s3_prefix}/cache")
    assert remote_dir == f"{s3_prefix}/cache/llm/{fingerprint(inputs)}"
    keys = _fill_cache(local_dir)
    assert _fill_cache(remote_dir) == keys
    local, remote = CacheStore(local_dir), CacheStore(remote_dir)
    assert remote.fingerprint == local.fingerprint and remote.hidden_size == D and len(remote) == len(keys)
    strip = [{k: v for k, v in s.items() if k not in ("name", "created")} for s in local.manifest["shards"]]
    assert [{k: v for k, v in s.items() if k not in ("name", "created")} for s in remote.manifest["shards"]] == strip
    got, want = remote.read(keys), local.read(keys)
    assert all(np.array_equal(got[k], want[k]) for k in keys) and got["a2"].shape == (5, D)
    assert remote.lengths() == local.lengths()

    # pixels too: a second kind, a (C, H, W) value
    p_inputs = pixels_inputs(4)
    values = np.random.default_rng(3).uniform(-1, 1, (3, 3, 4, 4)).astype(np.float32)
    for root in (tmp_path, f"{s3_prefix}/cache"):
        with CacheWriter(cache_dir("pixels", fingerprint(p_inputs), root), p_inputs) as writer:
            writer.set_value_shape((3, 4, 4))
            writer.write(pixels_table(["x", "y", "z"], values), 0)
    a = CacheStore(cache_dir("pixels", fingerprint(p_inputs), tmp_path)).read(["x", "y", "z"])
    b = CacheStore(cache_dir("pixels", fingerprint(p_inputs), f"{s3_prefix}/cache")).read(["x", "y", "z"])
    assert all(np.array_equal(a[k], b[k]) for k in "xyz")


def test_cache_writer_killed_before_publishing_leaves_nothing_a_reader_sees(s3_prefix):
    inputs = llm_inputs(ENCODER)
    directory = cache_dir("llm", fingerprint(inputs), f"{s3_prefix}/cache")
    keys = _fill_cache(directory)
    rng = np.random.default_rng(9)
    # A run killed between an actor's PUT and the driver's manifest update: the shard is there, unlisted.
    writer = CacheWriter(directory, inputs).open()
    orphan = write_shard_file(directory, writer.shard_name(0), states_table(["c0", "c1"], [
        rng.standard_normal((2, D)).astype(np.float32), rng.standard_normal((3, D)).astype(np.float32)]),
        writer.run_token)
    del writer  # killed: never published
    store = CacheStore(directory)
    assert "c0" not in store and len(store) == len(keys)
    with pytest.raises(KeyError, match="c0"):
        store.read(["c0"])

    # The next run does not read it (its keys are computed again) and a dead run's actor cannot write.
    with CacheWriter(directory, inputs) as rerun:
        assert rerun.recovered["ignored"] == [orphan["name"]] and rerun.cached(["c0", "c1", *keys]) == set(keys)
        stale = write_shard_file(directory, "part-dead-000000.parquet", states_table(
            ["d0"], [rng.standard_normal((1, D)).astype(np.float32)]), "token-of-a-dead-run")
        assert stale["stale"] is True
    folder = open_folder(directory)
    assert not folder.exists("shards/part-dead-000000.parquet")

    assert clean_cache(directory, grace_s=3600) == []
    assert clean_cache(directory, grace_s=0) == [f"shards/{orphan['name']}"]
    store = CacheStore(directory)
    assert sorted(store.keys()) == sorted(keys)
    assert {o.rel for o in folder.list("shards")} == {f"shards/{n}" for n in store.shard_names}


# ------------------------------------------------------------------------------- errors


def test_an_unreachable_endpoint_names_the_url_and_the_endpoint(tmp_path):
    (port,) = free_ports(1)
    settings = S3Settings(endpoint_url=f"http://127.0.0.1:{port}", access_key_id="k", secret_access_key="s",
                          connect_timeout_s=1, request_timeout_s=2, max_attempts=1)
    with pytest.raises(StorageError, match=rf"s3://omnidiff-data/snaps/tiny/LATEST.*127\.0\.0\.1:{port}"):
        latest_snapshot("tiny", root="s3://omnidiff-data/snaps", storage=settings)
    with pytest.raises(StorageError, match=rf"s3://omnidiff-data/c/llm/abc/manifest\.json.*127\.0\.0\.1:{port}"):
        CacheStore("s3://omnidiff-data/c/llm/abc", storage=settings)


def test_bad_credentials_name_the_url_and_the_key_id(s3_server):
    wrong = S3Settings(endpoint_url=s3_server.endpoint, access_key_id=s3_server.access_key,
                       secret_access_key="not-the-secret", max_attempts=1)
    url = f"s3://{s3_server.bucket}/bad-credentials"
    with pytest.raises(StorageError, match=rf"{url}/tiny/LATEST.*key id {s3_server.access_key}.*ACCESS_DENIED"):
        latest_snapshot("tiny", root=url, storage=wrong)
    with pytest.raises(StorageError, match=rf"{url}/tiny"):
        _write_snapshot_with(url, wrong)
    missing_bucket = S3Settings(endpoint_url=s3_server.endpoint, access_key_id=s3_server.access_key,
                                secret_access_key=s3_server.secret_key)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' of 's3://no-such-bucket/x/tiny' does not exist"):
        SnapshotWriter("tiny", root="s3://no-such-bucket/x", storage=missing_bucket)


def _write_snapshot_with(root: str, settings: S3Settings):
    writer = SnapshotWriter("tiny", root=root, storage=settings)
    writer.write_shard("pairs", _pairs(2, 0))
    return writer.finish({})


KILLED_WRITER = """
import sys, time
import numpy as np
from embed_cache.writer import CacheWriter, write_shard_file
from omnidiff.contracts.cache import states_table
from omnidiff.contracts.encoders import llm_inputs
directory, encoder = sys.argv[1], eval(sys.argv[2])
rng = np.random.default_rng(5)
writer = CacheWriter(directory, llm_inputs(encoder)).open()
writer.set_value_shape((8,))
writer.write(states_table(["e0", "e1"], [rng.standard_normal((2, 8)).astype(np.float32)] * 2), 0)
write_shard_file(directory, writer.shard_name(1), states_table(["f0"], [rng.standard_normal((3, 8)).astype(np.float32)]),
                 writer.run_token)
print("shard written, manifest not", flush=True)
time.sleep(600)
"""


def test_cache_writer_sigkilled_mid_run_leaves_only_what_its_manifest_lists(s3_prefix, tmp_path):
    """A real kill: a writer process publishes one shard, PUTs a second, and is SIGKILLed before listing it."""
    inputs = llm_inputs(ENCODER)
    directory = cache_dir("llm", fingerprint(inputs), f"{s3_prefix}/cache")
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), directory, repr(ENCODER)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "shard written, manifest not"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = CacheStore(directory)
    assert store.keys() == ["e0", "e1"] and "f0" not in store
    assert len(open_folder(directory).list("shards")) == 2  # the unlisted shard is there, and not read
    with CacheWriter(directory, inputs) as rerun:
        assert len(rerun.recovered["ignored"]) == 1 and rerun.cached(["e0", "e1", "f0"]) == {"e0", "e1"}
    assert len(clean_cache(directory, grace_s=0)) == 1
    assert [o.rel for o in open_folder(directory).list("shards")] == [f"shards/{store.shard_names[0]}"]


def test_a_read_racing_a_rewrite_never_returns_a_torn_object(s3_prefix):
    """A manifest is rewritten (larger) after every shard while readers poll it. On S3 a read is a HEAD then
    ranged GETs, so a version replaced between them read as the new version's first bytes (a torn JSON, seen in
    CI in tests/test_s3_kill.py); ``read_bytes`` returns one whole version or reads again."""
    import json
    import threading

    folder = open_folder(f"{s3_prefix}/race")
    folder.write_bytes("manifest.json", json.dumps({"n": 0, "shards": []}).encode())
    stop = threading.Event()
    written = [0]

    def rewrite() -> None:
        while not stop.is_set():
            written[0] += 1
            n = written[0]
            folder.write_bytes("manifest.json", json.dumps({"n": n, "shards": [f"shard-{i:06d}" for i in range(n)]},
                                                           indent=1).encode())

    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    seen = []
    try:
        while written[0] < 300:
            manifest = json.loads(folder.read_bytes("manifest.json"))  # a torn read raises JSONDecodeError
            assert len(manifest["shards"]) == manifest["n"]
            seen.append(manifest["n"])
    finally:
        stop.set()
        writer.join(timeout=30)
    assert len(seen) > 20 and len(set(seen)) > 5  # the reads did overlap many rewrites


def test_a_reader_never_misses_a_listed_shard_while_the_writer_folds_on_s3(s3_prefix):
    """The journal on object storage: a fold rewrites manifest.json (one PUT) and then deletes the folded entries,
    while a reader polls the listing: every read is a prefix of the publishes (tests/test_embed_store.py)."""
    from tests.test_embed_store import publish_while_reading

    seen = publish_while_reading(f"{s3_prefix}/cache", shards=40, fold=3)
    assert len(set(seen)) > 5
