"""The collect stage: url lists -> img2dataset -> a clean, versioned pair snapshot.

    .venv/bin/omnidiff collect --config configs/collect.yaml
    python -c "from data_prep.collect import run; from data_prep.config import CollectConfig; \\
               run(CollectConfig(url_lists=('urls.parquet',), track=False))"

Order of work (each step is a plain function in the file named; reasons are machine-readable). Memory
does not grow with the lists (issue 17): the lists are scanned in batches, what later steps need is
spilled to a temporary folder, and per-row work runs in ``workers`` processes (workers.py):

1. scan every url list in batches (readers.py ``ListScan``), one ``row_id`` per input row;
2. caption and url checks before any request (pairs.py, normalise.py): ``empty_caption``,
   ``whitespace_caption``, ``no_letters``, ``caption_too_long``, ``missing_url``,
   ``malformed_url``; language detection (langid.py): ``lang``, ``lang_detected``,
   ``lang_mismatch`` (a flag, the row is kept); then exact (url, caption) repeats -> ``duplicate``
   (the first row in input order is kept; a hash-partitioned pass, spill.py ``RepeatFinder``);
3. parallel-text files go through the same steps and a (text, English) key dedup (no images; parallel.py);
4. img2dataset downloads the rest in a subprocess (download.py), resumable by
   shard; its per-row failures become reasons (``http_404``,
   ``connection_refused``, ``not_an_image``, ``truncated_image``, ``too_large``, ...);
5. per finished shard, in row order (pairs.py): image digest, row key
   ``pair_key(image_digest, caption)``, repeats of a key -> ``duplicate`` (the
   first row in input order is kept), aesthetic score, train/val split by key hash;
6. the invariant ``input rows = kept + quarantined`` (by row id: no row lost, none twice) is
   checked for pairs and parallel (quarantine.py), the quarantine is written in row order, and the
   snapshot is published with counts (snapshot.py);
7. the run is logged to MLflow (report.py): the snapshot and its source lists as dataset inputs, counts as
   metrics, the manifest and a chart of counts as artifacts.

A second run over the same lists downloads nothing (every img2dataset shard is
done) and writes the same content, so it lands in the same ``<digest16>`` folder.
img2dataset's shards stay under ``$OMNIDIFF_HOME/data/collect/<name>/downloads/<key16>/``
(key = the download input and the settings that change its output) for that; a
folder there can be deleted once its snapshot is written (the next run would
download again).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_prep.config import CollectConfig
from data_prep.download import expected_shards, read_shard, run_img2dataset
from data_prep.pairs import PairAssembler, PreparedPairs, prepare_pairs
from data_prep.parallel import collect_parallel
from data_prep.quarantine import QUARANTINE_SCHEMA, KeptRows, Quarantine, check_invariant
from data_prep.readers import CollectError, SourceInfo, file_format, scan_parallel_lists, scan_url_lists
from data_prep.report import log_to_mlflow
from data_prep.tables import ShardBuffer
from data_prep.workers import WorkerPool
from omnidiff import config as config_lib
from omnidiff.contracts.snapshot import Snapshot, SnapshotWriter
from omnidiff.contracts.storage import S3Settings, is_remote, location_name, open_folder
from omnidiff.env import subdir
from omnidiff.progress import Progress
from omnidiff.text import NORMALISER_VERSION

log = logging.getLogger("omnidiff.collect")


@dataclass
class CollectResult:
    """What one collect run produced; ``stats`` is run-specific (timings), not part of the snapshot."""

    path: Path | str  # an s3:// URL for a snapshot on object storage
    manifest: dict
    url_sources: list[SourceInfo]
    parallel_sources: list[SourceInfo]
    stats: dict


def run(cfg: CollectConfig) -> Path:
    """Collect ``cfg.url_lists`` into a pair snapshot; returns its folder. Logs to MLflow when ``cfg.track``."""
    if not cfg.track:
        return build_snapshot(cfg).path
    from omnidiff import tracking

    with tracking.start_run("collect", config=cfg, run_name=f"collect-{cfg.name}"):
        result = build_snapshot(cfg)
        log_to_mlflow(result)
    return result.path


def build_snapshot(cfg: CollectConfig) -> CollectResult:
    """Everything but the MLflow logging: returns the snapshot folder and run stats."""
    t_start = time.perf_counter()
    settings = cfg.storage.s3.pinned()
    spill = Path(tempfile.mkdtemp(prefix=".spill-", dir=subdir("data", "collect", cfg.name)))
    try:
        url_lists, urls = fetch_remote_lists(cfg.url_lists, spill / "lists", settings)
        parallel_lists, parallel_urls = fetch_remote_lists(cfg.parallel_lists, spill / "parallel_lists", settings)
        url_scan = scan_url_lists(url_lists, cfg.columns)
        parallel_scan = scan_parallel_lists(parallel_lists, cfg.parallel_columns)
        writer = SnapshotWriter(cfg.name, cfg.storage.under(cfg.snapshot_root, "data", "snapshots"), settings)
    except BaseException:
        shutil.rmtree(spill, ignore_errors=True)
        raise
    try:
        with WorkerPool(cfg.workers) as pool:
            quarantine = Quarantine(spill / "quarantine", cfg.dedup_partition_rows)
            prepared = prepare_pairs(url_scan, cfg, pool, quarantine, spill)
            if prepared.input_rows == 0:
                raise CollectError(f"no rows in any url list: {[s.path for s in url_scan.sources]} (all empty)")
            kept_parallel = KeptRows(spill / "kept_parallel", cfg.dedup_partition_rows)
            par = collect_parallel(parallel_scan, cfg, pool, writer, quarantine, spill, kept_parallel)
            for s in url_scan.sources + parallel_scan.sources:
                if s.rows == 0:
                    log.warning("%s has no rows", s.path)
                    print(f"[collect] warning: {s.path} has no rows", file=sys.stderr)
            stats = download_pairs(cfg, prepared)
            kept_pairs = KeptRows(spill / "kept_pairs", cfg.dedup_partition_rows)
            assembler = PairAssembler(prepared, cfg, writer, quarantine, pool, spill, kept_pairs)
            assemble_downloads(assembler, prepared, cfg)

        check_invariant("pairs", prepared.input_rows, kept_pairs, quarantine)
        check_invariant("parallel", par["input_rows"], kept_parallel, quarantine)
        quarantine_shards = ShardBuffer(functools.partial(writer.write_shard, "quarantine"), cfg.output_shard_rows,
                                        QUARANTINE_SCHEMA)
        for table in quarantine.tables():
            quarantine_shards.add(table)
        quarantine_shards.finish()

        url_sources = [_named_by_url(s, urls) for s in url_scan.sources]
        parallel_sources = [_named_by_url(s, parallel_urls) for s in parallel_scan.sources]
        counts = {
            "pairs": table_counts(prepared.input_rows, kept_pairs.count, quarantine.reasons("pairs"),
                                  assembler.counts["by_language"], assembler.counts["by_split"],
                                  assembler.counts["lang_mismatch"], url_sources, assembler.counts["by_source"]),
            "parallel": table_counts(par["input_rows"], kept_parallel.count, quarantine.reasons("parallel"),
                                     par["by_language"], par["by_split"], par["lang_mismatch"], parallel_sources,
                                     par["by_source"]),
        }
        columns = {"pairs": assembler.schema.names,
                   "parallel": _staged_schema(writer, writer.shards["parallel"][0]["path"]).names,
                   "quarantine": QUARANTINE_SCHEMA.names}
        path = writer.finish(snapshot_manifest(cfg, url_sources, parallel_sources, counts,
                                               assembler.aesthetic_scores(), columns))
    except BaseException:
        writer.abort()
        raise
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    snapshot = Snapshot.open(path, storage=settings)
    stats["seconds"] = time.perf_counter() - t_start
    counts = snapshot.counts["pairs"]
    print(f"[collect] {snapshot.name}/{location_name(path)}: {counts['input_rows']} rows -> {counts['kept']} kept, "
          f"{counts['quarantined']} quarantined {counts['quarantined_by_reason']}; "
          f"parallel {snapshot.counts['parallel']['kept']}/{snapshot.counts['parallel']['input_rows']}; "
          f"{stats['shards_new']}/{stats['shards']} shards downloaded in {stats['seconds']:.1f}s", file=sys.stderr)
    return CollectResult(path, snapshot.manifest, url_sources, parallel_sources, stats)


def fetch_remote_lists(locations, dest: Path, settings: S3Settings) -> tuple[list[Path], dict[str, str]]:
    """``locations`` with every ``s3://`` one copied into ``dest`` (an object, or every supported object under
    a prefix, sorted), streamed to disk; returns the local paths (others unchanged) and {local copy: URL}."""
    out: list[Path] = []
    urls: dict[str, str] = {}
    for i, location in enumerate(locations):
        if not is_remote(location):
            out.append(Path(location))
            continue
        folder = open_folder(location, settings)
        bucket_only = "/" not in folder.root
        parent = None if bucket_only else open_folder(str(location).rsplit("/", 1)[0], settings)
        if parent is not None and parent.exists(location_name(location)):  # one object
            objects = [(parent, location_name(location))]
        else:  # a prefix: its supported objects, not those of sub-prefixes
            objects = [(folder, o.rel) for o in folder.list() if "/" not in o.rel and file_format(Path(o.rel))]
            if not objects:
                raise CollectError(f"url list {location!r}: no object there and no .parquet/.csv/.tsv/.jsonl "
                                   "object under that prefix")
        for source, rel in objects:
            target = dest / str(i) / Path(rel).name
            target.parent.mkdir(parents=True, exist_ok=True)
            source.download(rel, target)
            out.append(target)
            urls[str(target)] = source.url_of(rel)
    return out, urls


def _named_by_url(source: SourceInfo, urls: dict[str, str]) -> SourceInfo:
    """A source read from a local copy of an ``s3://`` list is recorded under its URL (lineage, manifest)."""
    return dataclasses.replace(source, path=urls[source.path]) if source.path in urls else source


def _staged_schema(writer: SnapshotWriter, rel: str):
    if writer.folder is not None:
        return pq.read_schema(writer.folder.path(f"{writer.staging}/{rel}"), filesystem=writer.folder.fs)
    return pq.read_schema(writer.staging / rel)


def download_pairs(cfg: CollectConfig, prepared: PreparedPairs) -> dict:
    """img2dataset over the rows that passed the checks (nothing to do when every shard is done)."""
    stats = {"download_rows": prepared.download_rows, "download_dir": str(prepared.work_dir), "shards": 0,
             "shards_new": 0, "download_seconds": 0.0}
    if prepared.download_rows:
        dl = run_img2dataset(cfg.download, prepared.input_path, prepared.work_dir, prepared.download_rows)
        stats.update(shards=dl["shards"], shards_new=dl["shards_new"], download_seconds=dl["seconds"])
    return stats


def assemble_downloads(assembler: PairAssembler, prepared: PreparedPairs, cfg: CollectConfig) -> None:
    """Every img2dataset shard through the assembler, in shard order, twice (keys, then rows); img2dataset must
    return each row sent (checked shard by shard)."""
    n_rows = prepared.download_rows
    n_shards = expected_shards(n_rows, cfg.download.shard_rows)
    shards_dir = prepared.work_dir / "shards"
    for shard_id in range(n_shards):
        assembler.key_shard(shard_id, read_shard(shards_dir, shard_id, n_shards, cfg.download.encode_format))
    assembler.find_repeats()
    with Progress("collect", total=n_rows, unit="row") as progress:
        for shard_id in range(n_shards):
            results = read_shard(shards_dir, shard_id, n_shards, cfg.download.encode_format)
            assembler.add_shard(shard_id, results)
            progress.update(results.num_rows)
    assembler.finish()


def table_counts(input_rows: int, kept: int, reasons: Counter, by_language: Counter, by_split: Counter,
                 lang_mismatch: int, sources: list[SourceInfo], kept_by_source: Counter) -> dict:
    return {
        "input_rows": input_rows,
        "kept": kept,
        "quarantined": sum(reasons.values()),
        "quarantined_by_reason": dict(sorted(reasons.items())),
        "by_language": dict(sorted(by_language.items())),
        "by_split": dict(sorted(by_split.items())),
        "lang_mismatch": int(lang_mismatch),
        "by_source": {s.name: {"input_rows": s.rows, "kept": kept_by_source.get(s.name, 0)} for s in sources},
    }


def snapshot_manifest(cfg: CollectConfig, url_sources: list[SourceInfo], parallel_sources: list[SourceInfo],
                      counts: dict, aesthetic_scores: np.ndarray, columns: dict[str, list[str]]) -> dict:
    """The manifest the snapshot writer completes (snapshot.py adds digest, shards and schema version)."""
    aesthetic = np.asarray(aesthetic_scores, np.float64)
    return {
        "created_by": "omnidiff collect",
        "normaliser_version": NORMALISER_VERSION,
        "sources": {"url_lists": [s.to_dict() for s in url_sources],
                    "parallel_lists": [s.to_dict() for s in parallel_sources]},
        "counts": counts,
        "aesthetic": {"scorer": cfg.aesthetic_scorer,
                      **({"min": float(aesthetic.min()), "median": float(np.median(aesthetic)),
                          "max": float(aesthetic.max())} if aesthetic.size else {})},
        "image": {"format": cfg.download.encode_format, "size": cfg.download.image_size,
                  "resize_mode": cfg.download.resize_mode},
        "split": {"val_fraction": cfg.val_fraction, "by": "key hash"},
        "columns": columns,
        "config": config_lib.to_dict(cfg),
    }
