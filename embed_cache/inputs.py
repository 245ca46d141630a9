"""What the embed job is asked to compute: the distinct texts and images of the chosen snapshots.

    inputs = gather_inputs(resolve_snapshots(cfg.snapshots), cfg)   # then embed_cache.job.embed(inputs, cfg)

A caption that is in ten snapshots is one key here (``references`` counts the rows that pointed at
each kind, so the summary shows references >> distinct). The driver subtracts what the caches hold
already (embed_cache/job.py); tests and benchmarks build :class:`EmbedInputs` in memory.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embed_cache.config import EmbedConfig
from omnidiff.contracts.keys import cache_key, english_side
from omnidiff.contracts.storage import S3Settings, is_remote


@dataclass
class EmbedInputs:
    """Distinct work per cache kind, gathered from snapshots (or built in memory by tests/benchmarks).

    texts: llm key -> normalised text; english: clip key -> normalised English text;
    images: image digest -> encoded image bytes; references: rows that pointed at each kind
    (so "a caption in ten snapshots is embedded once" shows as references >> distinct).
    """

    texts: dict[str, str] = field(default_factory=dict)
    english: dict[str, str] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)
    references: dict[str, int] = field(default_factory=lambda: {"llm": 0, "clip": 0, "pixels": 0})
    snapshots: list[dict[str, str]] = field(default_factory=list)

    def add_text(self, text: str | None) -> None:
        self._add("llm", self.texts, text)

    def add_english(self, text: str | None) -> None:
        if isinstance(text, float) and np.isnan(text):  # a missing caption_en read from Parquet
            return
        self._add("clip", self.english, text)

    def _add(self, kind: str, texts: dict[str, str], text: str | None) -> None:
        if text is None:
            return
        normalised, key = cache_key(text)
        texts.setdefault(key, normalised)
        self.references[kind] += 1

    def add_image(self, digest: str, data: bytes) -> None:
        self.images.setdefault(digest, data)
        self.references["pixels"] += 1

    def work(self, kind: str) -> dict[str, Any]:
        return {"llm": self.texts, "clip": self.english, "pixels": self.images}[kind]


def resolve_snapshots(names: Iterable[str], root: str | Path | None = None,
                      storage: S3Settings | None = None) -> list[Path | str]:
    """Snapshot names -> their newest snapshot directory (``LATEST`` under ``root``, an ``s3://`` URL on object
    storage); existing paths and ``s3://`` snapshot URLs stay as they are."""
    out: list[Path | str] = []
    for name in names:
        if is_remote(name):
            out.append(name)
            continue
        path = Path(name)
        if path.is_dir() and (path / "manifest.json").exists():
            out.append(path.resolve())
            continue
        from omnidiff.contracts.snapshot import SnapshotError, latest_snapshot

        try:
            found = latest_snapshot(name, root, storage)
            out.append(found if is_remote(found) else Path(found).resolve())
        except (SnapshotError, FileNotFoundError) as exc:
            raise FileNotFoundError(
                f"snapshots: {name!r} is neither a snapshot directory nor a collected snapshot name: {exc}"
            ) from None
    return out


def _frame(obj: Any) -> pd.DataFrame:
    """A snapshot accessor's result (Arrow table, DataFrame, or an iterable of either) as one DataFrame."""
    import pyarrow as pa

    if isinstance(obj, pd.DataFrame):
        return obj
    if isinstance(obj, (pa.Table, pa.RecordBatch)):
        return obj.to_pandas()
    if hasattr(obj, "to_table"):  # a pyarrow dataset
        return obj.to_table().to_pandas()
    parts = [_frame(part) for part in obj]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _read(snapshot: Any, accessor: str, columns: list[str], splits: set[str]) -> pd.DataFrame:
    """``snapshot.<accessor>()``'s ``columns`` as one DataFrame, only the rows of ``splits`` (when it has a split)."""
    method = getattr(snapshot, accessor)
    try:
        wants_columns = "columns" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        wants_columns = False
    frame = _frame(method(columns=columns) if wants_columns else method())
    missing = [c for c in columns if c not in frame.columns]
    if missing and len(frame):
        raise ValueError(f"snapshot {accessor}() has no column(s) {missing} (has {list(frame.columns)})")
    return frame[frame["split"].isin(splits)] if "split" in frame.columns else frame


def gather_inputs(snapshot_dirs: Iterable[Path | str], cfg: EmbedConfig,
                  storage: S3Settings | None = None) -> EmbedInputs:
    """Distinct texts / English texts / images of the snapshots' chosen splits, plus ""."""
    from omnidiff.contracts.snapshot import Snapshot

    inputs = EmbedInputs()
    inputs.add_text("")  # the unconditional embedding (PAPER.md "Release hyper-parameters")
    if "clip" in cfg.kinds:
        inputs.add_english("")
    splits = set(cfg.splits)
    for path in snapshot_dirs:
        snap = Snapshot.open(path, storage=storage)
        inputs.snapshots.append({"path": str(path), "digest": str(getattr(snap, "digest", ""))})
        columns = ["caption", "caption_en", "lang", "split"]
        if "pixels" in cfg.kinds:
            columns += ["image_digest", "image"]
        pairs = _read(snap, "pairs", columns, splits)
        for row in pairs.itertuples(index=False):
            inputs.add_text(row.caption)
            if "clip" in cfg.kinds:
                inputs.add_english(english_side(row.caption, row.lang, row.caption_en))
            if "pixels" in cfg.kinds:
                inputs.add_image(row.image_digest, row.image)
        if cfg.include_parallel and snap.manifest.get("shards", {}).get("parallel"):
            parallel = _read(snap, "parallel", ["text", "lang", "text_en", "split"], splits)
            for row in parallel.itertuples(index=False):
                inputs.add_text(row.text)
                if "clip" in cfg.kinds:
                    inputs.add_english(english_side(row.text, row.lang, row.text_en, parallel=True))
    return inputs
