"""Collect stage in bounded memory (issue 17): batched reading, the partitioned dedup, the worker pool.

    .venv/bin/pytest tests/test_collect_stream.py -x -q -m "not e2e"     # no download
    .venv/bin/pytest tests/test_collect_stream.py -x -q -m e2e           # img2dataset on 127.0.0.1

The outputs must not depend on the batch size, the partition size or the worker count: the same
url lists give the same quarantine, the same download input and the same snapshot digest.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.config import CollectConfig, ColumnsConfig
from data_prep.readers import CollectError, read_url_lists, scan_url_lists


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _lists(folder: Path) -> list[Path]:
    """Three lists (Parquet, CSV, JSONL) whose repeats fall in other batches and other files."""
    a = [{"url": f"http://127.0.0.1:9/{i}.png", "caption": f"a red circle number {i}", "lang": "en"} for i in range(10)]
    a[7] = {"url": "http://127.0.0.1:9/1.png", "caption": "a red circle number 1", "lang": "en"}  # repeats row 1
    a[8] = {"url": " http://127.0.0.1:9/2.png ", "caption": "a  red circle number 2", "lang": "en"}  # same once cleaned
    a[9] = {"url": "notaurl", "caption": "a red circle", "lang": "en"}
    pq.write_table(pa.Table.from_pylist(a), folder / "a.parquet")
    b = [{"url": f"http://127.0.0.1:9/b{i}.png", "caption": f"ein blaues Quadrat {i}", "lang": "de"} for i in range(7)]
    b[3] = {"url": "http://127.0.0.1:9/3.png", "caption": "a red circle number 3", "lang": "en"}  # repeats a.parquet 3
    b[5] = {"url": "http://127.0.0.1:9/b5.png", "caption": "", "lang": "de"}
    import pyarrow.csv as pa_csv

    pa_csv.write_csv(pa.Table.from_pylist(b), folder / "b.csv")
    c = [{"url": "http://127.0.0.1:9/b0.png", "caption": "ein blaues Quadrat 0", "extra": 1},  # repeats b.csv 0
         {"url": "http://127.0.0.1:9/c1.png", "caption": "un carré vert", "extra": 2},
         {"url": "http://127.0.0.1:9/c1.png", "caption": "un carré vert", "extra": 3}]  # repeats its neighbour
    _write_jsonl(folder / "c.jsonl", c)
    return [folder / "a.parquet", folder / "b.csv", folder / "c.jsonl"]


# ------------------------------------------------------------------------------------------------ reading


def test_scan_yields_bounded_batches_equal_to_the_whole_read(tmp_path):
    lists = _lists(tmp_path)
    scan = scan_url_lists(lists, ColumnsConfig())
    batches = list(scan.batches(3))
    assert [b.num_rows for b in batches] == [3, 3, 3, 1, 3, 3, 1, 3]  # per file: 10, 7, 3 rows
    assert scan.batches_read == len(batches)
    whole, sources = read_url_lists(lists, ColumnsConfig())
    assert pa.concat_tables(batches).equals(whole)
    assert whole.column("row_id").to_pylist() == list(range(20))
    assert [s.rows for s in scan.sources] == [10, 7, 3] == [s.rows for s in sources]
    assert whole.column("row_index").to_pylist() == list(range(10)) + list(range(7)) + list(range(3))
    assert whole.column("src_extra").to_pylist() == [None] * 17 + [1, 2, 3]


def test_scan_holds_one_batch_not_the_list(tmp_path):
    """Arrow memory while scanning a 200k-row list in 2k-row batches stays a small fraction of the list."""
    n = 200_000
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.png" for i in range(n)],
                             "caption": [f"a red circle on a blue background, picture {i}" for i in range(n)]}),
                   path, row_group_size=10_000)  # fmt: skip
    whole = read_url_lists([path], ColumnsConfig())[0]
    whole_bytes = whole.nbytes
    del whole
    base = pa.total_allocated_bytes()
    peak, rows = 0, 0
    scan = scan_url_lists([path], ColumnsConfig())
    for batch in scan.batches(2_000):
        assert batch.num_rows <= 2_000
        rows += batch.num_rows
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert rows == n and scan.batches_read == 100
    assert peak < whole_bytes / 10, (peak, whole_bytes)


def test_corrupt_rows_found_while_scanning_name_the_file(tmp_path):
    path = tmp_path / "late.jsonl"
    rows = [{"url": f"http://h/{i}.png", "caption": "ok"} for i in range(5000)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"url": "http://h/x.png", "caption": \n')
    with pytest.raises(CollectError, match=r"late.jsonl.*corrupt"):
        list(scan_url_lists([path], ColumnsConfig()).batches(100))


# ------------------------------------------------------------------------------------------------ dedup


def test_repeat_finder_matches_a_dict_across_batches_and_partitions(tmp_path):
    from data_prep.spill import RepeatFinder

    rng = random.Random(0)
    keys = [f"k{rng.randrange(300)}" for _ in range(1000)]
    finder = RepeatFinder(tmp_path / "f", ["key"], ["source"], partition_rows=64)  # 16 partitions
    for start in range(0, 1000, 37):  # batches that cut through repeats
        ids = list(range(start, min(start + 37, 1000)))
        finder.add(pa.table({"row_id": pa.array(ids, pa.int64()), "key": [keys[i] for i in ids],
                             "source": [f"s{i}" for i in ids]}))
    repeats = finder.find()
    seen: dict[str, int] = {}
    expected = {}
    for i, k in enumerate(keys):
        if k in seen:
            expected[i] = (seen[k], f"s{seen[k]}")
        else:
            seen[k] = i
    assert repeats.count == len(expected) > 600
    found = {}
    for start in range(0, 1000, 100):
        found |= repeats.lookup(list(range(start, start + 100)))
    assert found == expected


@pytest.mark.parametrize("partition_rows", [10_000, 7])  # one partition (the rows as added), several
def test_repeat_finder_compares_each_key_column_exactly(tmp_path, partition_rows):
    """Two key columns: rows repeat only when both match; values that a joined string would confuse
    ("a\x1fb" + "c" against "a" + "b\x1fc") stay apart, and the first row in input order wins."""
    from data_prep.spill import RepeatFinder

    rows = [("a", "b"), ("a", "c"), ("a\x1fb", "c"), ("a", "b\x1fc"), ("a", "b"), ("", "b"), ("a", "c"),
            ("", "b"), ("b", "a"), ("a", "b")] * 3
    finder = RepeatFinder(tmp_path / "f", ["url", "caption"], ["source", "row_index"], partition_rows=partition_rows)
    for start in range(0, len(rows), 4):
        ids = list(range(start, min(start + 4, len(rows))))
        finder.add(pa.table({"row_id": pa.array(ids, pa.int64()), "url": [rows[i][0] for i in ids],
                             "caption": [rows[i][1] for i in ids], "source": [f"s{i % 2}" for i in ids],
                             "row_index": pa.array([100 + i for i in ids], pa.int64())}))
    seen: dict[tuple[str, str], int] = {}
    expected = {}
    for i, key in enumerate(rows):
        if key in seen:
            expected[i] = (seen[key], f"s{seen[key] % 2}", 100 + seen[key])
        else:
            seen[key] = i
    repeats = finder.find()
    assert repeats.count == len(expected) == len(rows) - 6  # 6 distinct (url, caption) keys
    assert repeats.lookup(list(range(len(rows)))) == expected


def _prepare(lists, tmp_path, name, **overrides):
    from data_prep.pairs import prepare_pairs
    from data_prep.quarantine import Quarantine
    from data_prep.workers import WorkerPool

    cfg = CollectConfig(name="stream", url_lists=tuple(lists), track=False, download={"shard_rows": 4}, **overrides)
    spill = tmp_path / name
    quarantine = Quarantine(spill / "quarantine", cfg.dedup_partition_rows)
    with WorkerPool(cfg.workers) as pool:
        prepared = prepare_pairs(scan_url_lists(cfg.url_lists, cfg.columns), cfg, pool, quarantine, spill)
    rows = [prepared.rows.read_part(p) for p in prepared.rows.parts()]
    return {
        "quarantine": pa.concat_tables(list(quarantine.tables())).to_pylist(),
        "reasons": quarantine.reasons("pairs"),
        "shards": [t.select(["row_id", "caption", "download_url", "lang", "lang_detected", "lang_mismatch"]).to_pylist()
                   for t in rows],
        "input": pq.read_table(prepared.input_path).to_pylist(),
        "work_dir": prepared.work_dir,
        "input_rows": prepared.input_rows,
    }


def test_prepare_pairs_same_output_whatever_batch_partition_and_workers(tmp_path):
    lists = _lists(tmp_path)
    one = _prepare(lists, tmp_path, "one", read_batch_rows=1000, dedup_partition_rows=1000)
    small = _prepare(lists, tmp_path, "small", read_batch_rows=2, dedup_partition_rows=3)
    pooled = _prepare(lists, tmp_path, "pooled", read_batch_rows=3, dedup_partition_rows=2, workers=2)
    assert one == small == pooled

    assert one["input_rows"] == 20
    assert one["reasons"] == {"duplicate": 5, "malformed_url": 1, "empty_caption": 1}
    dup = {(r["source"], r["row_index"]): r["detail"] for r in one["quarantine"] if r["reason"] == "duplicate"}
    assert dup == {("a.parquet", 7): "same url and caption as a.parquet row 1",
                   ("a.parquet", 8): "same url and caption as a.parquet row 2",
                   ("b.csv", 3): "same url and caption as a.parquet row 3",
                   ("c.jsonl", 0): "same url and caption as b.csv row 0",
                   ("c.jsonl", 2): "same url and caption as c.jsonl row 1"}  # fmt: skip
    assert [r["row_id"] for r in one["quarantine"]] == sorted(r["row_id"] for r in one["quarantine"])
    assert json.loads([r for r in one["quarantine"] if r["row_id"] == 19][0]["extra"]) == {"src_extra": 3}
    kept_ids = [r["row_id"] for r in one["input"]]
    assert kept_ids == [0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 14, 16, 18]
    # cut as img2dataset's shards (download.shard_rows=4), in input order
    assert [len(s) for s in one["shards"]] == [4, 4, 4, 1]
    assert [r["row_id"] for s in one["shards"] for r in s] == kept_ids
    assert one["shards"][0][2]["download_url"] == "http://127.0.0.1:9/2.png"
    assert {r["lang"] for s in one["shards"] for r in s} >= {"en", "de"}  # declared where given


def test_invariant_is_checked_by_range(tmp_path):
    from data_prep.quarantine import InvariantError, KeptRows, Quarantine, check_invariant, quarantine_input_rows

    inputs = pa.table({"url": ["u"] * 3, "caption_raw": ["c"] * 3, "caption_en_raw": [None] * 3,
                       "lang_declared": [None] * 3, "source": ["s"] * 3, "row_index": [0, 1, 2],
                       "row_id": pa.array([7, 8, 9], pa.int64())})  # fmt: skip
    quarantine = Quarantine(tmp_path / "q", range_rows=4)
    quarantine_input_rows(quarantine, "pairs", inputs, [0, 1, 2], ["x", "x", "y"], [None] * 3)
    kept = KeptRows(tmp_path / "k", range_rows=4)
    kept.add([0, 1, 2, 3, 4, 5, 6])
    check_invariant("pairs", 10, kept, quarantine)
    kept.add([5])
    with pytest.raises(InvariantError, match=r"counted twice \[5\], missing \[\], unknown \[\]"):
        check_invariant("pairs", 10, kept, quarantine)
    kept2 = KeptRows(tmp_path / "k2", range_rows=4)
    kept2.add([0, 1, 2, 4, 5, 6, 12])
    with pytest.raises(InvariantError, match=r"missing \[3\], unknown \[12\]"):
        check_invariant("pairs", 10, kept2, quarantine)


def test_parallel_texts_dedup_across_files_and_batches(tmp_path):
    from data_prep.parallel import collect_parallel
    from data_prep.quarantine import KeptRows, Quarantine, check_invariant
    from data_prep.readers import scan_parallel_lists
    from data_prep.workers import WorkerPool
    from omnidiff.contracts.snapshot import Snapshot, SnapshotWriter

    p1 = _write_jsonl(tmp_path / "p1.jsonl", [{"text": f"ein roter Kreis {i}", "text_en": f"a red circle {i}",
                                                "lang": "de"} for i in range(5)])
    p2 = _write_jsonl(tmp_path / "p2.jsonl", [{"text": "ein roter Kreis 3", "text_en": "a red circle 3", "lang": "de"},
                                              {"text": "", "text_en": "x", "lang": "de"},
                                              {"text": "ein roter  Kreis 1", "text_en": "a red circle 1", "lang": "de"}])

    def run(name, batch_rows, partition_rows, workers):
        cfg = CollectConfig(url_lists=("x.csv",), parallel_lists=(p1, p2), track=False, read_batch_rows=batch_rows,
                            dedup_partition_rows=partition_rows, workers=workers, output_shard_rows=2)
        writer = SnapshotWriter(name, root=tmp_path / "snaps")
        quarantine = Quarantine(tmp_path / name / "q", partition_rows)
        kept = KeptRows(tmp_path / name / "k", partition_rows)
        with WorkerPool(workers) as pool:
            counts = collect_parallel(scan_parallel_lists(cfg.parallel_lists, cfg.parallel_columns), cfg, pool, writer,
                                      quarantine, tmp_path / name, kept)
        check_invariant("parallel", counts["input_rows"], kept, quarantine)
        writer.write_shard("quarantine", pa.concat_tables(list(quarantine.tables())))
        snap = Snapshot.open(writer.finish({}))
        return snap.parallel(), snap.quarantine().to_pylist(), counts

    whole, quarantined, counts = run("whole", 100, 100, 1)
    small, quarantined_small, _ = run("small", 2, 2, 2)
    assert whole.equals(small) and quarantined == quarantined_small
    assert whole.column("text").to_pylist() == [f"ein roter Kreis {i}" for i in range(5)]
    assert [(r["source"], r["row_index"], r["reason"], r["detail"]) for r in quarantined] == [
        ("p2.jsonl", 0, "duplicate", "same text and English as p1.jsonl row 3"),
        ("p2.jsonl", 1, "empty_caption", "caption is null or empty"),
        ("p2.jsonl", 2, "duplicate", "same text and English as p1.jsonl row 1")]
    assert counts["input_rows"] == 8 and counts["by_language"] == {"de": 5}
    assert np.array_equal(whole.column("row_index").to_numpy(), np.arange(5))


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.e2e
def test_snapshot_is_the_same_whatever_batch_partition_and_workers(tmp_path):
    """The bad-input lists of test_collect_e2e through the whole stage twice: one batch and one partition, then
    2-row batches, 2-row partitions, 2 workers and 3-row img2dataset shards: the same snapshot folder."""
    from data_prep.collect import run
    from omnidiff.contracts.snapshot import Snapshot
    from tests.fixtures_collect import collect_test_config
    from tests.test_collect_e2e import RecordingServer, _bad_lists, _bad_routes

    common = ["name=stream", "download.timeout_s=5", "download.max_image_bytes=1000000", "output_shard_rows=4"]
    with RecordingServer(_bad_routes()) as server:
        lists, expected = _bad_lists(server.base, tmp_path)
        whole = Snapshot.open(run(collect_test_config(lists, overrides=common + ["download.shard_rows=100"])))
        small = Snapshot.open(run(collect_test_config(lists, overrides=common + [
            "download.shard_rows=3", "read_batch_rows=2", "dedup_partition_rows=2", "workers=2"])))
    assert small.path == whole.path and small.digest == whole.digest
    assert small.counts == whole.counts
    assert whole.counts["pairs"]["kept"] == sum(v == "kept" for v in expected.values())
    assert len(whole.manifest["shards"]["pairs"]) == -(-whole.counts["pairs"]["kept"] // 4)
