"""The collect stage: url lists -> img2dataset -> a clean, versioned pair snapshot.

    .venv/bin/omnidiff collect --config configs/collect.yaml
    python -c "from data_prep.collect import run; from data_prep.config import CollectConfig; \\
               run(CollectConfig(url_lists=('urls.parquet',), track=False))"

Order of work (each step is a plain function; reasons are machine-readable):

1. read every url list (readers.py) -> one table, one ``row_id`` per input row;
2. caption and url checks before any request (normalise.py): ``empty_caption``,
   ``whitespace_caption``, ``no_letters``, ``caption_too_long``, ``missing_url``,
   ``malformed_url``; then exact (url, caption) repeats -> ``duplicate``;
3. language detection on what is left (langid.py): ``lang``, ``lang_detected``,
   ``lang_mismatch`` (a flag, the row is kept);
4. img2dataset downloads the rest in a subprocess (download.py), resumable by
   shard; its per-row failures become reasons (``http_404``,
   ``connection_refused``, ``not_an_image``, ``truncated_image``, ``too_large``, ...);
5. per finished shard, in row order: image digest, row key
   ``pair_key(image_digest, caption)``, repeats of a key -> ``duplicate`` (the
   first row in input order is kept), aesthetic score, train/val split by key hash;
6. parallel-text files go through steps 1-3 and the key dedup (no images);
7. the snapshot is written (snapshot.py) with counts; the invariant
   ``input rows = kept + quarantined`` (by row id: no row lost, none twice) is
   checked for pairs and parallel before the snapshot is published;
8. the run is logged to MLflow: the snapshot and its source lists as dataset
   inputs, counts as metrics, the manifest and a chart of counts as artifacts.

A second run over the same lists downloads nothing (every img2dataset shard is
done) and writes the same content, so it lands in the same ``<digest16>`` folder.
img2dataset's shards stay under ``$OMNIDIFF_HOME/data/collect/<name>/downloads/<key16>/``
(key = the download input and the settings that change its output) for that; a
folder there can be deleted once its snapshot is written (the next run would
download again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.aesthetic import build_scorer, decode_rgb
from data_prep.config import CollectConfig
from data_prep.download import expected_shards, read_shard, reason_for, run_img2dataset
from data_prep.langid import LanguageDetector, assign_languages
from data_prep.normalise import check_parallel_rows, check_rows
from data_prep.readers import CollectError, SourceInfo, read_parallel_lists, read_url_lists
from omnidiff import config as config_lib
from omnidiff.contracts.keys import digest_bytes, pair_key, text_key
from omnidiff.contracts.snapshot import Snapshot, SnapshotWriter
from omnidiff.env import subdir
from omnidiff.progress import Progress
from omnidiff.text import NORMALISER_VERSION

log = logging.getLogger("omnidiff.collect")

# Columns the readers produce that are consumed here rather than passed through.
_CONSUMED = {"caption_raw", "lang_declared", "caption_en_raw", "row_id", "text_raw", "text_en_raw"}

PAIR_COLUMNS = [
    ("key", pa.string()), ("caption", pa.string()), ("caption_en", pa.string()), ("lang", pa.string()),
    ("lang_detected", pa.string()), ("lang_score", pa.float32()), ("lang_mismatch", pa.bool_()),
    ("image", pa.binary()), ("image_digest", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("source_sha256", pa.string()),
    ("aesthetic", pa.float32()), ("split", pa.string()),
]  # fmt: skip
PARALLEL_COLUMNS = [
    ("key", pa.string()), ("text", pa.string()), ("text_en", pa.string()), ("lang", pa.string()),
    ("lang_detected", pa.string()), ("lang_score", pa.float32()), ("lang_mismatch", pa.bool_()),
    ("split", pa.string()),
]  # fmt: skip
QUARANTINE_SCHEMA = pa.schema([
    ("table", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("source", pa.string()),
    ("row_index", pa.int64()), ("row_id", pa.int64()), ("url", pa.string()), ("caption", pa.string()),
    ("caption_en", pa.string()), ("lang", pa.string()), ("extra", pa.string()),
])  # fmt: skip


class InvariantError(RuntimeError):
    """Rows were lost or counted twice between input and snapshot (a bug, never bad input)."""


def split_of(key: str, val_fraction: float) -> str:
    """``val`` for the first ``val_fraction`` of the key-hash space, else ``train`` (stable across runs)."""
    return "val" if int(key[:8], 16) < val_fraction * 2**32 else "train"


def parallel_key(text: str, text_en: str) -> str:
    return text_key(f"{text}\x1f{text_en}")


@dataclass
class Quarantine:
    """Rejected rows, column-wise (QUARANTINE_SCHEMA)."""

    columns: dict[str, list] = field(default_factory=lambda: {n: [] for n in QUARANTINE_SCHEMA.names})

    def add(self, table: str, reason: str, detail: str | None, source: str, row_index: int, row_id: int,
            url: str | None, caption: str | None, caption_en: str | None, lang: str | None,
            extra: dict | None) -> None:
        row = {"table": table, "reason": reason, "detail": detail, "source": source, "row_index": row_index,
               "row_id": row_id, "url": url, "caption": caption, "caption_en": caption_en, "lang": lang,
               "extra": json.dumps(extra, ensure_ascii=False, default=str, sort_keys=True) if extra else None}
        for name in QUARANTINE_SCHEMA.names:
            self.columns[name].append(row[name])

    def table(self) -> pa.Table:
        t = pa.Table.from_pydict(self.columns, schema=QUARANTINE_SCHEMA)
        return t.sort_by([("table", "ascending"), ("row_id", "ascending")])

    def reasons(self, table: str) -> Counter:
        return Counter(r for t, r in zip(self.columns["table"], self.columns["reason"], strict=True) if t == table)

    def row_ids(self, table: str) -> list[int]:
        return [i for t, i in zip(self.columns["table"], self.columns["row_id"], strict=True) if t == table]


def _extras(table: pa.Table) -> list[str]:
    return [n for n in table.column_names if n not in _CONSUMED and n not in ("url", "source", "row_index")]


def _extra_dict(extras: dict[str, list], i: int) -> dict:
    return {name: values[i] for name, values in extras.items() if values[i] is not None}


def _quarantine_input_rows(quarantine: Quarantine, table_name: str, inputs: pa.Table, rows: list[int],
                           reasons: list[str], details: list[str | None]) -> None:
    """Quarantine input rows (indices into ``inputs``) with the raw values as evidence."""
    if not rows:
        return
    sub = inputs.take(pa.array(rows, pa.int64())).to_pydict()
    extras = {n: sub[n] for n in _extras(inputs)}
    raw_caption = "caption_raw" if table_name == "pairs" else "text_raw"
    raw_en = "caption_en_raw" if table_name == "pairs" else "text_en_raw"
    for j, (reason, detail) in enumerate(zip(reasons, details, strict=True)):
        quarantine.add(table_name, reason, detail, sub["source"][j], sub["row_index"][j], sub["row_id"][j],
                       sub.get("url", [None] * len(rows))[j], sub[raw_caption][j], sub[raw_en][j],
                       sub["lang_declared"][j], _extra_dict(extras, j))


# ---------------------------------------------------------------------------------------------- pairs


@dataclass
class PreparedPairs:
    """Url-list rows after the checks that need no download."""

    caption: list  # per input row: normalised caption or None
    caption_en: list
    lang: dict[int, tuple]  # row_id -> (lang, lang_detected, lang_score, lang_mismatch), rows to download
    download_rows: list[int]  # row ids to download, in input order
    download_urls: list[str]  # their urls (stripped)


def prepare_pairs(urls: pa.Table, cfg: CollectConfig, detector: LanguageDetector,
                  quarantine: Quarantine) -> PreparedPairs:
    col = urls.to_pydict() if urls.num_rows else {n: [] for n in urls.column_names}
    checks = check_rows(col["url"], col["caption_raw"], col["caption_en_raw"], cfg.max_caption_chars,
                        cfg.long_caption)
    rejected, reasons, details = [], [], []
    candidates: list[int] = []
    seen: dict[tuple[str, str], int] = {}
    for i, reason in enumerate(checks["reason"]):
        if reason is None:
            ident = (col["url"][i].strip(), checks["caption"][i])
            if ident in seen:
                first = seen[ident]
                reason, detail = "duplicate", (f"same url and caption as {col['source'][first]} row "
                                               f"{col['row_index'][first]}")
                rejected.append(i), reasons.append(reason), details.append(detail)
                continue
            seen[ident] = i
            candidates.append(i)
        else:
            rejected.append(i), reasons.append(reason), details.append(checks["detail"][i])
    _quarantine_input_rows(quarantine, "pairs", urls, rejected, reasons, details)
    langs = assign_languages([checks["caption"][i] for i in candidates],
                             [col["lang_declared"][i] for i in candidates], detector, cfg.lang_min_score)
    lang = {i: (langs["lang"][j], langs["lang_detected"][j], langs["lang_score"][j], langs["lang_mismatch"][j])
            for j, i in enumerate(candidates)}
    return PreparedPairs(checks["caption"], checks["caption_en"], lang, candidates,
                         [col["url"][i].strip() for i in candidates])


def download_work_dir(cfg: CollectConfig, urls: list[str], row_ids: list[int]) -> Path:
    """img2dataset's folder for this exact download input and the settings that change its output."""
    d = cfg.download
    h = hashlib.sha256()
    settings = [d.image_size, d.resize_mode, d.encode_format, d.encode_quality, d.shard_rows, d.max_image_bytes,
                d.max_image_pixels, d.min_image_size, d.verify_images]
    h.update(json.dumps(settings).encode())
    for url, row_id in zip(urls, row_ids, strict=True):
        h.update(f"\n{row_id}\t{url}".encode("utf-8", "surrogatepass"))
    return subdir("data", "collect", cfg.name, "downloads", h.hexdigest()[:16])


def write_download_input(work_dir: Path, urls: list[str], row_ids: list[int]) -> Path:
    path = work_dir / "input.parquet"
    if not path.is_file():
        tmp = work_dir / ".input.parquet.tmp"
        pq.write_table(pa.table({"url": pa.array(urls, pa.string()), "row_id": pa.array(row_ids, pa.int64())}), tmp)
        tmp.replace(path)
    return path


class PairAssembler:
    """Turns finished img2dataset shards into snapshot pair shards, in input order."""

    def __init__(self, urls: pa.Table, prepared: PreparedPairs, cfg: CollectConfig, writer: SnapshotWriter,
                 quarantine: Quarantine):
        self.urls, self.prepared, self.cfg = urls, prepared, cfg
        self.writer, self.quarantine = writer, quarantine
        self.scorer = build_scorer(cfg.aesthetic_scorer, cfg.aesthetic_options)
        self.extras = _extras(urls)
        self.passthrough = ["url", "source", "row_index"] + self.extras
        self.schema = pa.schema(PAIR_COLUMNS + [urls.schema.field(n) for n in self.passthrough])
        self.seen: dict[str, int] = {}  # key -> row_id of the kept row
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.kept_row_ids: list[int] = []
        self.counts = {"by_language": Counter(), "by_split": Counter(), "lang_mismatch": 0}
        self.aesthetic: list[float] = []

    def add_shard(self, results: pa.Table) -> None:
        """One img2dataset shard (row_id, status, error_message, image, ...), any row order."""
        results = results.sort_by("row_id")
        r = results.to_pydict()
        failed_rows, failed_reasons, failed_details = [], [], []
        keep: list[int] = []  # positions in r
        keys: list[str] = []
        digests: list[str] = []
        for j, row_id in enumerate(r["row_id"]):
            reason = reason_for(r["status"][j], r["error_message"][j])
            if reason is None and r["image"][j] is None:
                reason = "download_error"
            if reason is not None:
                failed_rows.append(row_id), failed_reasons.append(reason), failed_details.append(r["error_message"][j])
                continue
            digest = digest_bytes(r["image"][j])
            key = pair_key(digest, self.prepared.caption[row_id])
            if key in self.seen:
                first = self.seen[key]
                failed_rows.append(row_id), failed_reasons.append("duplicate")
                failed_details.append(f"same image and caption as {self.urls['source'][first].as_py()} row "
                                      f"{self.urls['row_index'][first].as_py()} (key {key})")
                continue
            self.seen[key] = row_id
            keep.append(j), keys.append(key), digests.append(digest)
        _quarantine_input_rows(self.quarantine, "pairs", self.urls, failed_rows, failed_reasons, failed_details)
        if keep:
            self._add_kept(r, keep, keys, digests)

    def _add_kept(self, r: dict, keep: list[int], keys: list[str], digests: list[str]) -> None:
        row_ids = [r["row_id"][j] for j in keep]
        images = [r["image"][j] for j in keep]
        scores = []
        step = self.cfg.aesthetic_batch_size
        for start in range(0, len(images), step):
            batch = [decode_rgb(b) for b in images[start : start + step]]  # list of uint8 (H, W, 3)
            scores.extend(np.asarray(self.scorer(batch), np.float32).reshape(-1).tolist())
        if len(scores) != len(images):
            raise RuntimeError(f"aesthetic scorer {self.cfg.aesthetic_scorer!r} returned {len(scores)} scores "
                               f"for {len(images)} images")
        lang = [self.prepared.lang[i] for i in row_ids]
        split = [split_of(k, self.cfg.val_fraction) for k in keys]
        computed = {
            "key": keys,
            "caption": [self.prepared.caption[i] for i in row_ids],
            "caption_en": [self.prepared.caption_en[i] for i in row_ids],
            "lang": [x[0] for x in lang], "lang_detected": [x[1] for x in lang],
            "lang_score": [x[2] for x in lang], "lang_mismatch": [x[3] for x in lang],
            "image": images, "image_digest": digests,
            "width": [r["width"][j] for j in keep], "height": [r["height"][j] for j in keep],
            "original_width": [r["original_width"][j] for j in keep],
            "original_height": [r["original_height"][j] for j in keep],
            "source_sha256": [r["sha256"][j] for j in keep],
            "aesthetic": scores, "split": split,
        }  # fmt: skip
        inputs = self.urls.select(self.passthrough).take(pa.array(row_ids, pa.int64()))
        arrays = [pa.array(computed[name], typ) for name, typ in PAIR_COLUMNS]
        arrays += [inputs.column(n).combine_chunks() for n in self.passthrough]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.kept_row_ids.extend(row_ids)
        self.counts["by_language"].update(computed["lang"])
        self.counts["by_split"].update(split)
        self.counts["lang_mismatch"] += sum(computed["lang_mismatch"])
        self.aesthetic.extend(scores)
        while self.pending_rows >= self.cfg.output_shard_rows:
            self._flush(self.cfg.output_shard_rows)

    def _flush(self, n_rows: int | None = None) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        n = table.num_rows if n_rows is None else min(n_rows, table.num_rows)
        self.writer.write_shard("pairs", table.slice(0, n))
        rest = table.slice(n)
        self.pending = [rest] if rest.num_rows else []
        self.pending_rows = rest.num_rows

    def finish(self) -> None:
        self._flush()
        while self.pending:
            self._flush(self.cfg.output_shard_rows)
        if not self.writer.shards["pairs"]:
            self.writer.write_shard("pairs", self.schema.empty_table())


# ---------------------------------------------------------------------------------------------- parallel


def collect_parallel(parallel: pa.Table, cfg: CollectConfig, detector: LanguageDetector, writer: SnapshotWriter,
                     quarantine: Quarantine) -> dict:
    """Checks, language, key dedup and split of the text-only pairs; writes the parallel shards."""
    col = parallel.to_pydict() if parallel.num_rows else {n: [] for n in parallel.column_names}
    checks = check_parallel_rows(col["text_raw"], col["text_en_raw"], cfg.max_caption_chars, cfg.long_caption)
    rejected, reasons, details, kept, keys = [], [], [], [], []
    seen: dict[str, int] = {}
    for i, reason in enumerate(checks["reason"]):
        detail = checks["detail"][i]
        if reason is None:
            key = parallel_key(checks["text"][i], checks["text_en"][i])
            if key in seen:
                first = seen[key]
                reason, detail = "duplicate", (f"same text and English as {col['source'][first]} row "
                                               f"{col['row_index'][first]}")
            else:
                seen[key] = i
                kept.append(i), keys.append(key)
                continue
        rejected.append(i), reasons.append(reason), details.append(detail)
    _quarantine_input_rows(quarantine, "parallel", parallel, rejected, reasons, details)
    langs = assign_languages([checks["text"][i] for i in kept], [col["lang_declared"][i] for i in kept], detector,
                             cfg.lang_min_score)
    extras = _extras(parallel)
    passthrough = ["source", "row_index"] + extras
    schema = pa.schema(PARALLEL_COLUMNS + [parallel.schema.field(n) for n in passthrough])
    split = [split_of(k, cfg.val_fraction) for k in keys]
    computed = {"key": keys, "text": [checks["text"][i] for i in kept],
                "text_en": [checks["text_en"][i] for i in kept], **langs, "split": split}
    inputs = parallel.select(passthrough).take(pa.array(kept, pa.int64()))
    arrays = [pa.array(computed[name], typ) for name, typ in PARALLEL_COLUMNS]
    arrays += [inputs.column(n).combine_chunks() for n in passthrough]
    table = pa.Table.from_arrays(arrays, schema=schema)
    for start in range(0, max(table.num_rows, 1), cfg.output_shard_rows):
        writer.write_shard("parallel", table.slice(start, cfg.output_shard_rows))
    return {"kept_row_ids": kept, "by_language": Counter(langs["lang"]), "by_split": Counter(split),
            "lang_mismatch": sum(langs["lang_mismatch"])}


# ---------------------------------------------------------------------------------------------- counts


def check_invariant(table_name: str, input_rows: int, kept_row_ids: list[int], quarantine: Quarantine) -> None:
    """Every input row id is kept or quarantined, exactly once."""
    quarantined = quarantine.row_ids(table_name)
    seen = Counter(kept_row_ids) + Counter(quarantined)
    twice = sorted(i for i, n in seen.items() if n > 1)
    missing = sorted(set(range(input_rows)) - set(seen))
    extra = sorted(set(seen) - set(range(input_rows)))
    if twice or missing or extra or len(kept_row_ids) + len(quarantined) != input_rows:
        raise InvariantError(
            f"{table_name}: input rows {input_rows} != kept {len(kept_row_ids)} + quarantined {len(quarantined)}; "
            f"row ids counted twice {twice[:10]}, missing {missing[:10]}, unknown {extra[:10]}"
        )


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


# ---------------------------------------------------------------------------------------------- the stage


@dataclass
class CollectResult:
    """What one collect run produced; ``stats`` is run-specific (timings), not part of the snapshot."""

    path: Path
    manifest: dict
    url_sources: list[SourceInfo]
    parallel_sources: list[SourceInfo]
    stats: dict


def build_snapshot(cfg: CollectConfig) -> CollectResult:
    """Everything but the MLflow logging: returns the snapshot folder and run stats."""
    t_start = time.perf_counter()
    urls, url_sources = read_url_lists(cfg.url_lists, cfg.columns)
    parallel, parallel_sources = read_parallel_lists(cfg.parallel_lists, cfg.parallel_columns)
    if urls.num_rows == 0:
        raise CollectError(f"no rows in any url list: {[s.path for s in url_sources]} (all empty)")
    for s in url_sources + parallel_sources:
        if s.rows == 0:
            log.warning("%s has no rows", s.path)
            print(f"[collect] warning: {s.path} has no rows", file=sys.stderr)

    detector = LanguageDetector()
    quarantine = Quarantine()
    prepared = prepare_pairs(urls, cfg, detector, quarantine)

    dl_urls = prepared.download_urls
    work_dir = download_work_dir(cfg, dl_urls, prepared.download_rows)
    stats = {"download_rows": len(dl_urls), "download_dir": str(work_dir), "shards": 0, "shards_new": 0,
             "download_seconds": 0.0}
    if dl_urls:
        input_path = write_download_input(work_dir, dl_urls, prepared.download_rows)
        dl = run_img2dataset(cfg.download, input_path, work_dir, len(dl_urls))
        stats.update(shards=dl["shards"], shards_new=dl["shards_new"], download_seconds=dl["seconds"])

    writer = SnapshotWriter(cfg.name)
    try:
        assembler = PairAssembler(urls, prepared, cfg, writer, quarantine)
        n_shards = expected_shards(len(dl_urls), cfg.download.shard_rows)
        downloaded_ids: list[int] = []
        with Progress("collect", total=len(dl_urls), unit="row") as progress:
            for shard_id in range(n_shards):
                results = read_shard(work_dir / "shards", shard_id, n_shards, cfg.download.encode_format)
                downloaded_ids.extend(results.column("row_id").to_pylist())
                assembler.add_shard(results)
                progress.update(results.num_rows)
        if sorted(downloaded_ids) != prepared.download_rows:
            raise InvariantError(
                f"img2dataset returned {len(downloaded_ids)} rows for {len(prepared.download_rows)} sent "
                f"({len(set(downloaded_ids))} distinct) in {work_dir}"
            )
        assembler.finish()
        par = collect_parallel(parallel, cfg, detector, writer, quarantine)

        check_invariant("pairs", urls.num_rows, assembler.kept_row_ids, quarantine)
        check_invariant("parallel", parallel.num_rows, par["kept_row_ids"], quarantine)
        q_table = quarantine.table()
        for start in range(0, max(q_table.num_rows, 1), cfg.output_shard_rows):
            writer.write_shard("quarantine", q_table.slice(start, cfg.output_shard_rows))

        url_source_of = urls.column("source").to_pylist()
        par_source_of = parallel.column("source").to_pylist()
        aesthetic = np.asarray(assembler.aesthetic, np.float64)
        manifest = {
            "created_by": "omnidiff collect",
            "normaliser_version": NORMALISER_VERSION,
            "sources": {"url_lists": [s.to_dict() for s in url_sources],
                        "parallel_lists": [s.to_dict() for s in parallel_sources]},
            "counts": {
                "pairs": table_counts(urls.num_rows, len(assembler.kept_row_ids), quarantine.reasons("pairs"),
                                      assembler.counts["by_language"], assembler.counts["by_split"],
                                      assembler.counts["lang_mismatch"], url_sources,
                                      Counter(url_source_of[i] for i in assembler.kept_row_ids)),
                "parallel": table_counts(parallel.num_rows, len(par["kept_row_ids"]), quarantine.reasons("parallel"),
                                         par["by_language"], par["by_split"], par["lang_mismatch"], parallel_sources,
                                         Counter(par_source_of[i] for i in par["kept_row_ids"])),
            },
            "aesthetic": {"scorer": cfg.aesthetic_scorer,
                          **({"min": float(aesthetic.min()), "median": float(np.median(aesthetic)),
                              "max": float(aesthetic.max())} if aesthetic.size else {})},
            "image": {"format": cfg.download.encode_format, "size": cfg.download.image_size,
                      "resize_mode": cfg.download.resize_mode},
            "split": {"val_fraction": cfg.val_fraction, "by": "key hash"},
            "columns": {"pairs": assembler.schema.names,
                        "parallel": pq.read_schema(writer.staging / writer.shards["parallel"][0]["path"]).names,
                        "quarantine": QUARANTINE_SCHEMA.names},
            "config": config_lib.to_dict(cfg),
        }
        path = writer.finish(manifest)
    except BaseException:
        writer.abort()
        raise
    snapshot = Snapshot.open(path)
    stats["seconds"] = time.perf_counter() - t_start
    counts = snapshot.counts["pairs"]
    print(f"[collect] {snapshot.name}/{path.name}: {counts['input_rows']} rows -> {counts['kept']} kept, "
          f"{counts['quarantined']} quarantined {counts['quarantined_by_reason']}; "
          f"parallel {snapshot.counts['parallel']['kept']}/{snapshot.counts['parallel']['input_rows']}; "
          f"{stats['shards_new']}/{stats['shards']} shards downloaded in {stats['seconds']:.1f}s", file=sys.stderr)
    return CollectResult(path, snapshot.manifest, url_sources, parallel_sources, stats)


def run(cfg: CollectConfig) -> Path:
    """Collect ``cfg.url_lists`` into a pair snapshot; returns its folder. Logs to MLflow when ``cfg.track``."""
    if not cfg.track:
        return build_snapshot(cfg).path
    from omnidiff import tracking

    with tracking.start_run("collect", config=cfg, run_name=f"collect-{cfg.name}"):
        result = build_snapshot(cfg)
        log_to_mlflow(result)
    return result.path


# ---------------------------------------------------------------------------------------------- MLflow


def flat_metrics(counts: dict) -> dict[str, float]:
    """Manifest counts -> MLflow metrics (``pairs.kept``, ``pairs.quarantined.http_404``, ``pairs.lang.zh``...)."""
    out: dict[str, float] = {}
    for table, c in counts.items():
        out[f"{table}.input_rows"] = c["input_rows"]
        out[f"{table}.kept"] = c["kept"]
        out[f"{table}.quarantined"] = c["quarantined"]
        out[f"{table}.lang_mismatch"] = c["lang_mismatch"]
        for reason, n in c["quarantined_by_reason"].items():
            out[f"{table}.quarantined.{reason}"] = n
        for lang, n in c["by_language"].items():
            out[f"{table}.lang.{lang}"] = n
        for split, n in c["by_split"].items():
            out[f"{table}.split.{split}"] = n
    return out


def counts_figure(counts: dict):
    """Bar charts: kept pairs by language, parallel by language, quarantined rows by reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pairs kept, by language", counts["pairs"]["by_language"]),
              ("parallel kept, by language", counts["parallel"]["by_language"]),
              ("quarantined, by reason",
               Counter(counts["pairs"]["quarantined_by_reason"]) + Counter(counts["parallel"]["quarantined_by_reason"]))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, data) in zip(axes, panels, strict=True):
        labels = list(data)
        ax.bar(range(len(labels)), [data[k] for k in labels], color="#4c72b0")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_title(title)
        ax.set_ylabel("rows")
    fig.tight_layout()
    return fig


def log_to_mlflow(result: CollectResult) -> None:
    """The snapshot and its source lists as dataset inputs, counts as metrics, manifest + chart as artifacts."""
    import matplotlib.pyplot as plt
    import mlflow

    from omnidiff import tracking

    snapshot = Snapshot.open(result.path, verify=False)
    digest16 = snapshot.digest[:16]
    pairs = snapshot.pairs(columns=["key", "caption", "lang", "split", "aesthetic", "url", "source"]).to_pandas()
    dataset = mlflow.data.from_pandas(pairs, source=str(result.path), name=f"pairs:{snapshot.name}", digest=digest16)
    mlflow.log_input(dataset, context="pair_snapshot",
                     tags={"snapshot_digest": snapshot.digest, "snapshot_path": str(result.path)})
    for kind, sources in (("url_list", result.url_sources), ("parallel_list", result.parallel_sources)):
        for s in sources:
            frame = _source_frame(Path(s.path))
            ds = mlflow.data.from_pandas(frame, source=s.path, name=s.name, digest=s.sha256[:16])
            mlflow.log_input(ds, context=kind, tags={"sha256": s.sha256, "rows": str(s.rows)})
    mlflow.set_tags({"snapshot_name": snapshot.name, "snapshot_digest": snapshot.digest,
                     "snapshot_path": str(result.path), "sources": sources_tag(result)})
    mlflow.log_metrics(flat_metrics(snapshot.counts))
    mlflow.log_metrics({"download.shards": result.stats["shards"], "download.shards_new": result.stats["shards_new"],
                        "download.seconds": result.stats["download_seconds"], "seconds": result.stats["seconds"]})
    tracking.log_json(snapshot.manifest, "snapshot/manifest.json")
    fig = counts_figure(snapshot.counts)
    tracking.log_figure(fig, "snapshot/counts.png")
    plt.close(fig)


def sources_tag(result: CollectResult, max_chars: int = 5000) -> str:
    """The source lists as a JSON tag (what flows/lineage.py reads), cut to fit MLflow's tag size."""
    entries = [{"kind": kind, "name": s.name, "path": s.path, "sha256": s.sha256, "rows": s.rows}
               for kind, sources in (("url_list", result.url_sources), ("parallel_list", result.parallel_sources))
               for s in sources]
    shown = list(entries)
    while shown and len(json.dumps(shown + [{"more": len(entries) - len(shown)}])) > max_chars:
        shown.pop()
    if len(shown) < len(entries):
        shown.append({"more": len(entries) - len(shown)})
    return json.dumps(shown, ensure_ascii=False)


def _source_frame(path: Path):
    """A source list as a DataFrame for mlflow.data (schema + row count; its digest is the file's sha256)."""
    from data_prep.readers import read_file

    table = read_file(path)
    # Binary/nested extras do not profile well; the dataset records the list, not the images.
    keep = [f.name for f in table.schema if not (pa.types.is_binary(f.type) or pa.types.is_nested(f.type))]
    return table.select(keep).to_pandas()

