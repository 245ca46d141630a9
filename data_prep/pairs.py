"""Image-caption pairs: the checks before any request, then img2dataset's shards -> snapshot pair shards.

:func:`prepare_pairs` scans the url lists batch by batch (readers.ListScan), runs the caption and
url checks (normalise.py) and detects the language in worker processes (workers.py), then drops
exact (url, caption) repeats with a partitioned pass (spill.RepeatFinder), all before a single
request. What it keeps goes to disk in input order, cut as img2dataset's shards, with the
download input beside it. :class:`PairAssembler` turns each finished img2dataset shard into
snapshot rows in input order: image digest, row key ``pair_key(image_digest, caption)``, repeats of
a key -> ``duplicate`` (the first row in input order is kept; a first pass over the shards finds
them, a second writes), aesthetic score (in the workers), train/val split by key hash. Nothing
held in memory grows with the corpus but the aesthetic scores (4 bytes a kept row, for the
manifest's median).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.config import CollectConfig
from data_prep.download import (
    add_download_rows,
    download_hasher,
    download_work_dir_of,
    place_download_input,
    reason_for,
)
from data_prep.quarantine import InvariantError, KeptRows, Quarantine, quarantine_input_rows
from data_prep.readers import ListScan
from data_prep.spill import RepeatFinder, Repeats, SpillFolder
from data_prep.tables import ShardBuffer, extra_columns, snapshot_table, split_of
from data_prep.workers import WorkerPool, check_pairs_batch, score_images
from omnidiff.contracts.keys import digest_bytes, pair_key
from omnidiff.contracts.snapshot import SnapshotWriter

PAIR_COLUMNS = [
    ("key", pa.string()), ("caption", pa.string()), ("caption_en", pa.string()), ("lang", pa.string()),
    ("lang_detected", pa.string()), ("lang_score", pa.float32()), ("lang_mismatch", pa.bool_()),
    ("image", pa.binary()), ("image_digest", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("source_sha256", pa.string()),
    ("aesthetic", pa.float32()), ("split", pa.string()),
]  # fmt: skip


DOWNLOAD_INPUT_SCHEMA = pa.schema([("url", pa.string()), ("row_id", pa.int64())])


@dataclass
class PreparedPairs:
    """Url-list rows after the checks that need no download, on disk in input order.

    ``rows`` part k holds the rows of img2dataset shard k (``download.shard_rows`` of them): the
    scanned columns (raw values, source, row_index, extras, row_id) and the computed ones (caption,
    caption_en, download_url, lang, lang_detected, lang_score, lang_mismatch).
    """

    input_rows: int
    download_rows: int
    work_dir: Path  # img2dataset's folder, named by the download input and settings
    input_path: Path | None  # the download input (url, row_id) in work_dir; None when nothing is to download
    rows: SpillFolder
    input_schema: pa.Schema  # the scan's columns


def _split_checked(batch: pa.Table, checked: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """(batch + computed columns, positions of the rows the checks rejected)."""
    ok = pc.is_null(checked.column("reason"))
    rejected = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
    table = batch
    for name in checked.column_names:
        if name not in ("reason", "detail"):
            table = table.append_column(name, checked.column(name))
    return table.filter(ok), rejected


def quarantine_rejected(quarantine: Quarantine, table_name: str, batch: pa.Table, checked: pa.Table,
                        rejected: np.ndarray, extras: list[str]) -> None:
    if len(rejected):
        positions = pa.array(rejected, pa.int64())
        quarantine_input_rows(quarantine, table_name, batch, rejected.tolist(),
                              checked.column("reason").take(positions).to_pylist(),
                              checked.column("detail").take(positions).to_pylist(), extras)


def check_rows_and_find_repeats(pool: WorkerPool, check: Callable[..., pa.Table], scan: ListScan, cfg: CollectConfig,
                                quarantine: Quarantine, table_name: str, extras: list[str], finder: RepeatFinder,
                                candidates: SpillFolder) -> int:
    """First pass: ``check`` (a workers.py batch check) on every scanned batch in the pool; rejected rows to the
    quarantine, the rest to ``candidates`` and ``finder``. Returns the number of input rows."""
    input_rows = 0
    for batch, checked in pool.map(check, scan.batches(cfg.read_batch_rows), cfg.max_caption_chars,
                                   cfg.long_caption, cfg.lang_min_score):
        input_rows += batch.num_rows
        passing, rejected = _split_checked(batch, checked)
        quarantine_rejected(quarantine, table_name, batch, checked, rejected, extras)
        candidates.write(passing)
        finder.add(passing)
    return input_rows


def drop_repeats(quarantine: Quarantine, table_name: str, table: pa.Table, repeats: Repeats, what: str,
                 extras: list[str]) -> pa.Table:
    """``table`` less the rows ``repeats`` knows as repeats, which go to the quarantine as ``duplicate``
    ("same {what} as <source> row <row_index>" of the kept first row)."""
    row_ids = table.column("row_id").to_pylist()
    found = repeats.lookup(row_ids)
    if not found:
        return table
    positions = [i for i, r in enumerate(row_ids) if r in found]
    details = [f"same {what} as {found[row_ids[i]][1]} row {found[row_ids[i]][2]}" for i in positions]
    quarantine_input_rows(quarantine, table_name, table, positions, ["duplicate"] * len(positions), details, extras)
    return table.filter(pa.array([r not in found for r in row_ids]))


def prepare_pairs(scan: ListScan, cfg: CollectConfig, pool: WorkerPool, quarantine: Quarantine,
                  spill_root: Path) -> PreparedPairs:
    """Checks, language and (url, caption) dedup of every url-list row; writes the download input."""
    extras = extra_columns(scan.schema.empty_table())
    finder = RepeatFinder(spill_root / "pair_repeats", ["download_url", "caption"], ["source", "row_index"],
                          cfg.dedup_partition_rows)
    candidates = SpillFolder(spill_root / "pair_candidates")
    input_rows = check_rows_and_find_repeats(pool, check_pairs_batch, scan, cfg, quarantine, "pairs", extras, finder,
                                             candidates)
    repeats = finder.find()

    # Second pass, in input order: repeats to the quarantine, the rest to the download input.
    h = download_hasher(cfg)
    input_tmp = spill_root / "download_input.parquet"
    rows = SpillFolder(spill_root / "pair_rows")
    cutter = ShardBuffer(lambda t: rows.write(t, cutter.written), cfg.download.shard_rows)
    n_download = 0
    with pq.ParquetWriter(input_tmp, DOWNLOAD_INPUT_SCHEMA) as input_writer:
        for table in candidates.iter_part(0):
            table = drop_repeats(quarantine, "pairs", table, repeats, "url and caption", extras)
            if table.num_rows == 0:
                continue
            urls, ids = table.column("download_url").to_pylist(), table.column("row_id").to_pylist()
            add_download_rows(h, urls, ids)
            input_writer.write_table(pa.table({"url": pa.array(urls, pa.string()), "row_id": pa.array(ids, pa.int64())}))
            cutter.add(table)
            n_download += table.num_rows
    cutter.finish()
    work_dir = download_work_dir_of(cfg, h)
    input_path = place_download_input(work_dir, input_tmp) if n_download else None
    return PreparedPairs(input_rows, n_download, work_dir, input_path, rows, scan.input_schema)


class PairAssembler:
    """Turns finished img2dataset shards into snapshot pair shards, in input order.

    Two passes over the shards: :meth:`key_shard` (image digest and row key of every download, for the
    repeat search), then :meth:`add_shard` (quarantine, aesthetic score, split, snapshot rows).
    """

    def __init__(self, prepared: PreparedPairs, cfg: CollectConfig, writer: SnapshotWriter, quarantine: Quarantine,
                 pool: WorkerPool, spill_root: Path, kept: KeptRows):
        self.prepared, self.cfg, self.quarantine, self.pool, self.kept = prepared, cfg, quarantine, pool, kept
        self.extras = extra_columns(prepared.input_schema.empty_table())
        self.passthrough = ["url", "source", "row_index"] + self.extras
        self.schema = pa.schema(PAIR_COLUMNS + [prepared.input_schema.field(n) for n in self.passthrough])
        self.shards = ShardBuffer(functools.partial(writer.write_shard, "pairs"), cfg.output_shard_rows, self.schema)
        self.finder = RepeatFinder(spill_root / "key_repeats", ["key"], ["source", "row_index"],
                                   cfg.dedup_partition_rows)
        self.keyed = SpillFolder(spill_root / "keyed")
        self.repeats = None
        self.counts = {"by_language": Counter(), "by_split": Counter(), "lang_mismatch": 0, "by_source": Counter()}
        self.aesthetic: list[np.ndarray] = []  # float32 (n,) per shard

    def _rows(self, shard_id: int, results: pa.Table) -> pa.Table:
        rows = self.prepared.rows.read_part(shard_id)
        sent = [] if rows is None else rows.column("row_id").to_pylist()
        got = results.column("row_id").to_pylist()
        if got != sent:
            raise InvariantError(
                f"img2dataset shard {shard_id} returned {len(got)} rows for {len(sent)} sent "
                f"({len(set(got))} distinct) in {self.prepared.work_dir}"
            )
        return rows

    def key_shard(self, shard_id: int, results: pa.Table) -> None:
        """First pass: reason, image digest and row key of each row of one img2dataset shard (sorted by row_id)."""
        rows = self._rows(shard_id, results)
        captions = rows.column("caption").to_pylist()
        status, errors, images = (results.column(n).to_pylist() for n in ("status", "error_message", "image"))
        reasons, keys, digests = [], [], []
        for j in range(results.num_rows):
            reason = reason_for(status[j], errors[j])
            if reason is None and images[j] is None:
                reason = "download_error"
            digest = digest_bytes(images[j]) if reason is None else None
            reasons.append(reason), digests.append(digest)
            keys.append(pair_key(digest, captions[j]) if reason is None else None)
        keyed = pa.table({"row_id": results.column("row_id"), "reason": pa.array(reasons, pa.string()),
                          "key": pa.array(keys, pa.string()), "image_digest": pa.array(digests, pa.string())})
        self.keyed.write(keyed, shard_id)
        ok = pc.is_valid(keyed.column("key"))
        self.finder.add(pa.table({"row_id": keyed.column("row_id"), "key": keyed.column("key"),
                                  "source": rows.column("source"), "row_index": rows.column("row_index")}).filter(ok))

    def find_repeats(self) -> None:
        self.repeats = self.finder.find()

    def add_shard(self, shard_id: int, results: pa.Table) -> None:
        """Second pass: one img2dataset shard (row_id, status, error_message, image, ...) sorted by row_id."""
        rows = self._rows(shard_id, results)
        keyed = self.keyed.read_part(shard_id)
        row_ids = rows.column("row_id").to_pylist()
        reasons, keys = keyed.column("reason").to_pylist(), keyed.column("key").to_pylist()
        errors = results.column("error_message").to_pylist()
        found = self.repeats.lookup([r for r, k in zip(row_ids, keys, strict=True) if k is not None])
        failed, failed_reasons, failed_details, keep = [], [], [], []
        for j, row_id in enumerate(row_ids):
            if reasons[j] is not None:
                failed.append(j), failed_reasons.append(reasons[j]), failed_details.append(errors[j])
            elif row_id in found:
                _, source, row_index = found[row_id]
                failed.append(j), failed_reasons.append("duplicate")
                failed_details.append(f"same image and caption as {source} row {row_index} (key {keys[j]})")
            else:
                keep.append(j)
        quarantine_input_rows(self.quarantine, "pairs", rows, failed, failed_reasons, failed_details, self.extras)
        if keep:
            self._add_kept(rows, results, keyed, keep)

    def _add_kept(self, rows: pa.Table, results: pa.Table, keyed: pa.Table, keep: list[int]) -> None:
        take = pa.array(keep, pa.int64())
        kept_rows, kept_results, kept_keyed = rows.take(take), results.take(take), keyed.take(take)
        images = kept_results.column("image").to_pylist()
        step = self.cfg.aesthetic_batch_size
        chunks = (images[start : start + step] for start in range(0, len(images), step))
        scores = [s for _, chunk_scores in self.pool.map(score_images, chunks, self.cfg.aesthetic_scorer,
                                                         self.cfg.aesthetic_options) for s in chunk_scores]
        keys = kept_keyed.column("key").to_pylist()
        split = [split_of(k, self.cfg.val_fraction) for k in keys]
        computed = {name: kept_rows.column(name).to_pylist()
                    for name in ("caption", "caption_en", "lang", "lang_detected", "lang_score", "lang_mismatch")}
        computed |= {
            "key": keys, "image": images, "image_digest": kept_keyed.column("image_digest").to_pylist(),
            "width": kept_results.column("width").to_pylist(), "height": kept_results.column("height").to_pylist(),
            "original_width": kept_results.column("original_width").to_pylist(),
            "original_height": kept_results.column("original_height").to_pylist(),
            "source_sha256": kept_results.column("sha256").to_pylist(),
            "aesthetic": scores, "split": split,
        }  # fmt: skip
        table = snapshot_table(PAIR_COLUMNS, computed, kept_rows, list(range(len(keep))), self.passthrough,
                               self.schema)
        self.shards.add(table)
        self.kept.add(kept_rows.column("row_id").to_pylist())
        self.counts["by_language"].update(computed["lang"])
        self.counts["by_split"].update(split)
        self.counts["lang_mismatch"] += sum(computed["lang_mismatch"])
        self.counts["by_source"].update(kept_rows.column("source").to_pylist())
        self.aesthetic.append(np.asarray(scores, np.float32))

    def aesthetic_scores(self) -> np.ndarray:
        return np.concatenate(self.aesthetic) if self.aesthetic else np.zeros(0, np.float32)

    def finish(self) -> None:
        self.shards.finish()
