"""Image-caption pairs: the checks before any request, then img2dataset's shards -> snapshot pair shards.

:func:`prepare_pairs` runs the caption and url checks (normalise.py), drops exact
(url, caption) repeats and detects the language, all before a single request;
:class:`PairAssembler` turns each finished img2dataset shard into snapshot rows
in input order: image digest, row key ``pair_key(image_digest, caption)``,
repeats of a key -> ``duplicate`` (the first row in input order is kept),
aesthetic score, train/val split by key hash.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_prep.aesthetic import build_scorer, decode_rgb
from data_prep.config import CollectConfig
from data_prep.download import reason_for
from data_prep.langid import LanguageDetector, assign_languages
from data_prep.normalise import check_rows
from data_prep.quarantine import Quarantine, quarantine_input_rows
from data_prep.tables import column_lists, extra_columns, snapshot_table, split_of
from omnidiff.contracts.keys import digest_bytes, pair_key
from omnidiff.contracts.snapshot import SnapshotWriter

PAIR_COLUMNS = [
    ("key", pa.string()), ("caption", pa.string()), ("caption_en", pa.string()), ("lang", pa.string()),
    ("lang_detected", pa.string()), ("lang_score", pa.float32()), ("lang_mismatch", pa.bool_()),
    ("image", pa.binary()), ("image_digest", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("source_sha256", pa.string()),
    ("aesthetic", pa.float32()), ("split", pa.string()),
]  # fmt: skip


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
    col = column_lists(urls)
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
    quarantine_input_rows(quarantine, "pairs", urls, rejected, reasons, details)
    langs = assign_languages([checks["caption"][i] for i in candidates],
                             [col["lang_declared"][i] for i in candidates], detector, cfg.lang_min_score)
    lang = {i: (langs["lang"][j], langs["lang_detected"][j], langs["lang_score"][j], langs["lang_mismatch"][j])
            for j, i in enumerate(candidates)}
    return PreparedPairs(checks["caption"], checks["caption_en"], lang, candidates,
                         [col["url"][i].strip() for i in candidates])


class PairAssembler:
    """Turns finished img2dataset shards into snapshot pair shards, in input order."""

    def __init__(self, urls: pa.Table, prepared: PreparedPairs, cfg: CollectConfig, writer: SnapshotWriter,
                 quarantine: Quarantine):
        self.urls, self.prepared, self.cfg = urls, prepared, cfg
        self.writer, self.quarantine = writer, quarantine
        self.scorer = build_scorer(cfg.aesthetic_scorer, cfg.aesthetic_options)
        self.extras = extra_columns(urls)
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
        quarantine_input_rows(self.quarantine, "pairs", self.urls, failed_rows, failed_reasons, failed_details)
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
        table = snapshot_table(PAIR_COLUMNS, computed, self.urls, row_ids, self.passthrough, self.schema)
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
