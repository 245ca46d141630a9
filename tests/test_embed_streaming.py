"""embed's driver plans, its actors read the images (issue 17 item 1: "images and captions never gather on the
driver"): on a real snapshot the driver reads only the small columns, its plan holds where each image is
(shard + row), never the image, and the actor's reader returns exactly the snapshot's bytes.

    .venv/bin/pytest tests/test_embed_streaming.py -x -q -m "not e2e"      # local snapshot, no server
    .venv/bin/pytest tests/test_embed_streaming.py -x -q                   # + the same on SeaweedFS
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embed_cache import inputs as embed_inputs
from embed_cache.config import EmbedConfig
from embed_cache.inputs import IMAGE_REF_PREFIX, ImageRef, gather_inputs, read_images


def _cfg(snapshot) -> EmbedConfig:
    return EmbedConfig(snapshots=(str(snapshot),), kinds=("llm", "clip", "pixels"), track=False)


def _snapshot_images(snapshot, storage=None) -> dict[str, bytes]:
    """digest -> bytes of the pairs the embed config's splits select, read by the test (not by the driver)."""
    from omnidiff.contracts.snapshot import Snapshot

    pairs = Snapshot.open(snapshot, storage=storage).pairs(columns=["image_digest", "image", "split"]).to_pylist()
    return {row["image_digest"]: row["image"] for row in pairs if row["split"] in ("train", "val")}


@pytest.fixture
def read_columns(monkeypatch) -> list:
    """Every column list the code under test asks pyarrow's Parquet readers for (None = all columns)."""
    asked: list = []
    iter_batches, read_table = pq.ParquetFile.iter_batches, pq.read_table
    read_row_groups, read = pq.ParquetFile.read_row_groups, pq.ParquetFile.read

    def spy_iter_batches(self, *args, columns=None, **kwargs):
        asked.append(columns)
        return iter_batches(self, *args, columns=columns, **kwargs)

    def spy_read_table(source, *args, columns=None, **kwargs):
        asked.append(columns)
        return read_table(source, *args, columns=columns, **kwargs)

    def spy_read_row_groups(self, row_groups, columns=None, **kwargs):
        asked.append(columns)
        return read_row_groups(self, row_groups, columns=columns, **kwargs)

    def spy_read(self, columns=None, **kwargs):
        asked.append(columns)
        return read(self, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy_iter_batches)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy_read_row_groups)
    monkeypatch.setattr(pq.ParquetFile, "read", spy_read)
    monkeypatch.setattr(pq, "read_table", spy_read_table)
    return asked


def _plan_pixels(inputs, cfg, tmp_path):
    from embed_cache.plan import plan_kind, plan_units
    from embed_cache.writer import CacheWriter
    from omnidiff.contracts.cache import cache_dir

    plan = plan_kind("pixels", cfg)
    todo = sorted(inputs.work("pixels"))
    payloads = [inputs.work("pixels")[k] for k in todo]
    with CacheWriter(cache_dir("pixels", plan.fingerprint, tmp_path / "cache"), plan.inputs) as writer:
        writer.set_value_shape(plan.value_shape)
        lengths = np.asarray(plan.lengths(todo, payloads), dtype=np.int64)
        return plan_units("pixels", writer, todo, payloads, lengths, cfg)


def _check_plan(snapshot, inputs, units, images: dict[str, bytes]) -> None:
    """The driver's inputs and plan hold a ref per distinct image and no image bytes; refs resolve to the
    snapshot's bytes."""
    refs = inputs.work("pixels")
    assert set(refs) == set(images) and len(images) > 100
    assert all(isinstance(ref, ImageRef) for ref in refs.values())
    assert all(ref.path.startswith(str(snapshot)) for ref in refs.values())
    payloads = [bytes(p) for unit in units for p in unit["payload"]]
    assert len(payloads) == len(images)
    assert all(p.startswith(IMAGE_REF_PREFIX) for p in payloads)
    blobs = list(images.values())
    assert not any(blob in payload for payload in payloads for blob in blobs), "an image travelled in the plan"
    refs = [ImageRef.decode(p) for p in payloads]
    assert refs == sorted(refs, key=lambda r: (r.path, r.row)), "pixel shards go in snapshot order"


def test_the_driver_reads_no_image_and_plans_refs_the_actor_resolves(train_snapshot, read_columns, tmp_path):
    cfg = _cfg(train_snapshot)
    inputs = gather_inputs([train_snapshot], cfg)
    units = _plan_pixels(inputs, cfg, tmp_path)
    asked = list(read_columns)
    assert asked, "the driver reads the snapshot through pyarrow's Parquet readers"
    assert all(cols is not None and "image" not in cols for cols in asked), asked
    read_columns.clear()

    images = _snapshot_images(train_snapshot)
    _check_plan(train_snapshot, inputs, units, images)
    # the actor's side: each unit's refs read back as the snapshot's bytes, from the image column
    from embed_cache.actor import decode_payload, resolve_images

    for unit in units:
        got = resolve_images([decode_payload("pixels", p) for p in unit["payload"]], None)
        assert got == [images[k] for k in unit["key"]]
    assert any(cols is not None and "image" in cols for cols in read_columns)
    # the same inputs materialised for an in-process encoder (tests/fixtures_train.py)
    keys = sorted(inputs.work("pixels"))[:5]
    assert inputs.payloads("pixels", keys) == [images[k] for k in keys]


def test_read_images_spans_row_groups_and_checks_digests(tmp_path, monkeypatch):
    rows = 23
    blobs = [bytes([i]) * (50 + i) for i in range(rows)]
    digests = [f"d{i:02d}" for i in range(rows)]
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"image_digest": digests, "image": blobs, "caption": ["c"] * rows}), path,
                   row_group_size=7)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    monkeypatch.setattr(embed_inputs, "IMAGE_BATCH_ROWS", 3)  # batches inside a row group too
    wanted = [22, 0, 7, 6, 13, 14, 6]  # across every row group, out of order, one row twice
    refs = [ImageRef(str(path), r, digests[r]) for r in wanted]
    assert read_images(refs) == [blobs[r] for r in wanted]

    with pytest.raises(ValueError, match=r"part-00000.parquet row 3: image_digest 'd03', expected 'd04'"):
        read_images([ImageRef(str(path), 3, "d04")])
    with pytest.raises(ValueError, match="not found in their snapshot shard"):
        read_images([ImageRef(str(path), 99, "d99")])


def test_an_image_ref_payload_round_trips_and_is_not_an_image():
    from embed_cache.actor import decode_payload, encode_payload

    ref = ImageRef("s3://bucket/snap/pairs/part-00000.parquet", 12, "abc")
    payload = encode_payload("pixels", ref)
    assert decode_payload("pixels", payload) == ref and json.loads(payload[len(IMAGE_REF_PREFIX):])[1] == 12
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20
    assert decode_payload("pixels", encode_payload("pixels", png)) == png  # inputs built in memory keep bytes


@pytest.mark.e2e
def test_on_object_storage_the_driver_reads_no_image_either(tiny_world, s3_prefix, read_columns, tmp_path):
    from omnidiff.contracts.storage import S3Settings
    from tests.fixtures_train import write_world_snapshot

    snapshot = str(write_world_snapshot(tiny_world, f"{s3_prefix}/snapshots"))
    assert snapshot.startswith("s3://")
    read_columns.clear()
    cfg = _cfg(snapshot)
    inputs = gather_inputs([snapshot], cfg, S3Settings())
    units = _plan_pixels(inputs, cfg, tmp_path)
    assert read_columns and all(cols is not None and "image" not in cols for cols in read_columns), read_columns
    images = _snapshot_images(snapshot)
    _check_plan(snapshot, inputs, units, images)
    refs = [ImageRef.decode(bytes(p)) for p in units[0]["payload"]]
    assert read_images(refs, S3Settings()) == [images[r.digest] for r in refs]
