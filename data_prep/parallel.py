"""Parallel texts (a caption and its English, no image): checks, language, key dedup and split.

They go through the same caption checks and language detection as the url
lists (batch by batch, in the workers), and repeats of a (text, English) key are
quarantined as ``duplicate`` (the first in input order is kept; spill.RepeatFinder).
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from data_prep.config import CollectConfig
from data_prep.quarantine import KeptRows, Quarantine
from data_prep.readers import ListScan
from data_prep.spill import RepeatFinder, SpillFolder
from data_prep.tables import ShardBuffer, extra_columns, snapshot_table, split_of
from omnidiff.contracts.keys import text_key
from omnidiff.contracts.snapshot import SnapshotWriter

if TYPE_CHECKING:
    from data_prep.workers import WorkerPool

PARALLEL_COLUMNS = [
    ("key", pa.string()), ("text", pa.string()), ("text_en", pa.string()), ("lang", pa.string()),
    ("lang_detected", pa.string()), ("lang_score", pa.float32()), ("lang_mismatch", pa.bool_()),
    ("split", pa.string()),
]  # fmt: skip


def parallel_key(text: str, text_en: str) -> str:
    return text_key(f"{text}\x1f{text_en}")


def collect_parallel(scan: ListScan, cfg: CollectConfig, pool: WorkerPool, writer: SnapshotWriter,
                     quarantine: Quarantine, spill_root: Path, kept: KeptRows) -> dict:
    """Checks, language, key dedup and split of the text-only pairs, batch by batch; writes the parallel shards."""
    from data_prep.pairs import check_rows_and_find_repeats, drop_repeats
    from data_prep.workers import check_parallel_batch

    extras = extra_columns(scan.schema.empty_table())
    finder = RepeatFinder(spill_root / "parallel_repeats", ["key"], ["source", "row_index"], cfg.dedup_partition_rows)
    candidates = SpillFolder(spill_root / "parallel_candidates")
    input_rows = check_rows_and_find_repeats(pool, check_parallel_batch, scan, cfg, quarantine, "parallel", extras,
                                             finder, candidates)
    repeats = finder.find()

    passthrough = ["source", "row_index"] + extras
    schema = pa.schema(PARALLEL_COLUMNS + [scan.input_schema.field(n) for n in passthrough])
    shards = ShardBuffer(functools.partial(writer.write_shard, "parallel"), cfg.output_shard_rows, schema)
    counts = {"input_rows": input_rows, "by_language": Counter(), "by_split": Counter(), "lang_mismatch": 0,
              "by_source": Counter()}
    for table in candidates.iter_part(0):
        table = drop_repeats(quarantine, "parallel", table, repeats, "text and English", extras)
        if table.num_rows == 0:
            continue
        computed = {name: table.column(name).to_pylist() for name, _ in PARALLEL_COLUMNS if name != "split"}
        computed["split"] = [split_of(k, cfg.val_fraction) for k in computed["key"]]
        shards.add(snapshot_table(PARALLEL_COLUMNS, computed, table, list(range(table.num_rows)), passthrough, schema))
        kept.add(table.column("row_id").to_pylist())
        counts["by_language"].update(computed["lang"])
        counts["by_split"].update(computed["split"])
        counts["lang_mismatch"] += sum(computed["lang_mismatch"])
        counts["by_source"].update(table.column("source").to_pylist())
    shards.finish()
    return counts
