"""The training driver reads the pair snapshot shard by shard (issue 17: its memory must not grow with the corpus).

    .venv/bin/pytest tests/test_train_inputs_stream.py -x -q
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from omnidiff.config import load_config
from train.config import TrainConfig
from train.data import align_examples, diffusion_examples

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded_snapshot(tmp_path_factory):
    """Three pair shards and two parallel shards; a caption repeats across shards with another language (the first
    row in input order must win), and a few rows are in val."""
    from omnidiff.contracts.keys import text_key
    from omnidiff.contracts.snapshot import Snapshot, SnapshotWriter

    writer = SnapshotWriter("stream", root=tmp_path_factory.mktemp("snapshots"))
    for shard in range(3):
        rows = []
        for i in range(8):
            n = shard * 8 + i
            caption = "a shared caption" if i == 0 else f"caption {n}"
            rows.append({"key": f"{n:064x}", "caption": caption, "caption_en": None if n % 3 else f"english {n % 5}",
                         "lang": ["de", "fr", "en"][shard], "image": b"x", "image_digest": f"{n % 20:064x}",
                         "aesthetic": float(n % 7), "split": "val" if n % 6 == 5 else "train"})
        writer.write_shard("pairs", pa.Table.from_pylist(rows))
    for shard in range(2):
        par = [{"key": text_key(f"p{shard}{i}"), "text": "a shared caption" if i == 0 else f"text {shard} {i}",
                "text_en": f"english {i}", "lang": "zh", "split": "val" if i == 3 else "train"} for i in range(5)]
        writer.write_shard("parallel", pa.Table.from_pylist(par))
    return Snapshot.open(writer.finish({"source": "tests/test_train_inputs_stream.py"}))


def _cfg(stage: int, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / f"train_test_stage{stage}.yaml", list(overrides))


@pytest.mark.parametrize("stage, overrides", [(1, ()), (1, ("data.split=val",)), (2, ()),
                                              (3, ("data.aesthetic_min=3",))])
def test_examples_read_shard_by_shard_equal_the_whole_table(sharded_snapshot, monkeypatch, stage, overrides):
    import train.inputs as inputs

    cfg = _cfg(stage, *overrides)
    snap = sharded_snapshot
    pairs = snap.pairs(inputs.PAIR_COLUMNS).to_pandas()
    parallel = snap.parallel(inputs.PARALLEL_COLUMNS).to_pandas()
    if cfg.family == "align":
        expected = align_examples(pairs, parallel, cfg.data.split)
    else:
        expected = diffusion_examples(pairs, cfg.data.split, cfg.data.aesthetic_min)
    frames = []
    read = inputs.snapshot_frames
    monkeypatch.setattr(inputs, "snapshot_frames", lambda *a: (frames.append(f) or f for f in read(*a)))
    examples, val_pairs, val_parallel = inputs.gather_examples(cfg, snap, use_parallel=cfg.family == "align")
    pd.testing.assert_frame_equal(examples, expected)
    assert len(frames) == (5 if cfg.family == "align" else 3)  # one frame per shard, never the whole table
    assert max(len(f) for f in frames) == 8
    pd.testing.assert_frame_equal(val_pairs, pairs[pairs["split"] == "val"].reset_index(drop=True))
    if cfg.family == "align":
        assert val_parallel["text"].tolist() == parallel[parallel["split"] == "val"]["text"].tolist()
    if cfg.family == "align" and cfg.data.split == "train":
        # ("a shared caption" -> "english 0") is in pair shard 0 (de) and in both parallel shards (zh): the first
        # row in input order wins, across shards
        first = align_examples(pairs.head(1), None, "train").iloc[0]
        shared = examples[(examples["llm_key"] == first["llm_key"]) & (examples["target_key"] == first["target_key"])]
        assert shared[["lang", "source"]].values.tolist() == [["de", "pair"]]
        assert (parallel["text"] == "a shared caption").sum() == 2
