"""Parallel texts (a caption and its English, no image): checks, language, key dedup and split.

They go through the same caption checks and language detection as the url
lists, and repeats of a (text, English) key are quarantined as ``duplicate``.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from data_prep.config import CollectConfig
from data_prep.langid import LanguageDetector, assign_languages
from data_prep.normalise import check_parallel_rows
from data_prep.quarantine import Quarantine, quarantine_input_rows
from data_prep.tables import column_lists, extra_columns, snapshot_table, split_of, write_shards
from omnidiff.contracts.keys import text_key
from omnidiff.contracts.snapshot import SnapshotWriter

PARALLEL_COLUMNS = [
    ("key", pa.string()), ("text", pa.string()), ("text_en", pa.string()), ("lang", pa.string()),
    ("lang_detected", pa.string()), ("lang_score", pa.float32()), ("lang_mismatch", pa.bool_()),
    ("split", pa.string()),
]  # fmt: skip


def parallel_key(text: str, text_en: str) -> str:
    return text_key(f"{text}\x1f{text_en}")


def collect_parallel(parallel: pa.Table, cfg: CollectConfig, detector: LanguageDetector, writer: SnapshotWriter,
                     quarantine: Quarantine) -> dict:
    """Checks, language, key dedup and split of the text-only pairs; writes the parallel shards."""
    col = column_lists(parallel)
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
    quarantine_input_rows(quarantine, "parallel", parallel, rejected, reasons, details)
    langs = assign_languages([checks["text"][i] for i in kept], [col["lang_declared"][i] for i in kept], detector,
                             cfg.lang_min_score)
    passthrough = ["source", "row_index"] + extra_columns(parallel)
    schema = pa.schema(PARALLEL_COLUMNS + [parallel.schema.field(n) for n in passthrough])
    split = [split_of(k, cfg.val_fraction) for k in keys]
    computed = {"key": keys, "text": [checks["text"][i] for i in kept],
                "text_en": [checks["text_en"][i] for i in kept], **langs, "split": split}
    table = snapshot_table(PARALLEL_COLUMNS, computed, parallel, kept, passthrough, schema)
    write_shards(writer, "parallel", table, cfg.output_shard_rows)
    return {"kept_row_ids": kept, "by_language": Counter(langs["lang"]), "by_split": Counter(split),
            "lang_mismatch": sum(langs["lang_mismatch"])}
