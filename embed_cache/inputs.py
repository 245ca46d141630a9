"""What the embed job is asked to compute: the distinct texts and images of the chosen snapshots.

    inputs = gather_inputs(resolve_snapshots(cfg.snapshots), cfg)   # then embed_cache.job.embed(inputs, cfg)

A caption that is in ten snapshots is one key here (``references`` counts the rows that pointed at
each kind, so the summary shows references >> distinct). The driver subtracts what the caches hold
already (embed_cache/job.py); tests and benchmarks build :class:`EmbedInputs` in memory.

The driver never reads an image (issue 17: "images and captions never gather on the driver"): it
streams each snapshot shard's small columns (captions, languages, splits, ``image_digest``) in record
batches and keeps, per distinct image, an :class:`ImageRef` (the shard's path or ``s3://`` URL and the
row). The actor that embeds a shard of work reads its own images from those rows
(:func:`read_images`, row group by row group, with the driver's S3 settings), so image bytes travel
from the store to the actor only.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from embed_cache.config import EmbedConfig
from omnidiff.contracts.keys import cache_key, english_side
from omnidiff.contracts.storage import S3Settings, is_remote, open_folder

READ_BATCH_ROWS = 4096  # snapshot rows per record batch the driver holds (small columns only)
IMAGE_BATCH_ROWS = 256  # rows per record batch an actor decodes while picking its images out of a row group


@dataclass(frozen=True, order=True)
class ImageRef:
    """Where an image is: a snapshot shard (local path or ``s3://`` URL), its row, and its digest (checked)."""

    path: str
    row: int
    digest: str

    def encode(self) -> bytes:
        return IMAGE_REF_PREFIX + json.dumps([self.path, self.row, self.digest]).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> ImageRef:
        path, row, digest = json.loads(bytes(data[len(IMAGE_REF_PREFIX):]).decode("utf-8"))
        return cls(path, int(row), digest)


# A payload that starts with this is an ImageRef, not image bytes (no image format starts with a NUL byte).
IMAGE_REF_PREFIX = b"\x00omnidiff-image-ref\x00"


def is_image_ref(payload: bytes) -> bool:
    return bytes(payload[: len(IMAGE_REF_PREFIX)]) == IMAGE_REF_PREFIX


def open_parquet(location: str | Path, storage: S3Settings | None = None) -> pq.ParquetFile:
    """A Parquet file on the local disk or on object storage (read lazily: footer first, then row groups)."""
    if is_remote(location):
        parent, _, name = str(location).rpartition("/")
        folder = open_folder(parent, storage)
        return pq.ParquetFile(folder.fs.open_input_file(folder.path(name)))
    return pq.ParquetFile(location)


def read_images(refs: list[ImageRef], storage: S3Settings | None = None) -> list[bytes]:
    """The image bytes of ``refs`` (in their order), reading only the row groups that hold them, in batches
    of :data:`IMAGE_BATCH_ROWS` rows; a row whose ``image_digest`` is not the ref's is an error."""
    out: list[bytes | None] = [None] * len(refs)
    by_path: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, ref in enumerate(refs):
        by_path[ref.path][ref.row].append(i)
    for path, rows in by_path.items():
        parquet = open_parquet(path, storage)
        try:
            start = 0
            for group in range(parquet.metadata.num_row_groups):
                size = parquet.metadata.row_group(group).num_rows
                if any(start <= r < start + size for r in rows):
                    offset = start
                    for batch in parquet.iter_batches(batch_size=IMAGE_BATCH_ROWS, row_groups=[group],
                                                      columns=["image_digest", "image"], use_threads=False):
                        for r in (r for r in rows if offset <= r < offset + batch.num_rows):
                            digest = batch.column(0)[r - offset].as_py()
                            for i in rows[r]:
                                if digest != refs[i].digest:
                                    raise ValueError(f"{path} row {r}: image_digest {digest!r}, expected "
                                                     f"{refs[i].digest!r} (the snapshot changed under its name?)")
                                out[i] = batch.column(1)[r - offset].as_py()
                        offset += batch.num_rows
                start += size
        finally:
            parquet.close()
    missing = [refs[i] for i, v in enumerate(out) if v is None]
    if missing:
        raise ValueError(f"{len(missing)} image(s) not found in their snapshot shard, e.g. {missing[0]}")
    return out


@dataclass
class EmbedInputs:
    """Distinct work per cache kind, gathered from snapshots (or built in memory by tests/benchmarks).

    texts: llm key -> normalised text; english: clip key -> normalised English text;
    images: image digest -> where the image is (:class:`ImageRef`, from snapshots) or its encoded bytes
    (built in memory); references: rows that pointed at each kind
    (so "a caption in ten snapshots is embedded once" shows as references >> distinct).
    """

    texts: dict[str, str] = field(default_factory=dict)
    english: dict[str, str] = field(default_factory=dict)
    images: dict[str, bytes | ImageRef] = field(default_factory=dict)
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

    def add_image(self, digest: str, data: bytes | ImageRef) -> None:
        self.images.setdefault(digest, data)
        self.references["pixels"] += 1

    def work(self, kind: str) -> dict[str, Any]:
        return {"llm": self.texts, "clip": self.english, "pixels": self.images}[kind]

    def payloads(self, kind: str, keys: list[str], storage: S3Settings | None = None) -> list[Any]:
        """What an encoder computes for ``keys``: texts, or image bytes (read from the snapshot for refs)."""
        work = self.work(kind)
        values = [work[k] for k in keys]
        refs = [i for i, v in enumerate(values) if isinstance(v, ImageRef)]
        for i, data in zip(refs, read_images([values[i] for i in refs], storage), strict=True):
            values[i] = data
        return values


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


def _batches(snapshot: Any, table: str, columns: list[str], splits: set[str],
             storage: S3Settings | None) -> Iterator[tuple[str, int, dict[str, list]]]:
    """``(shard location, first row, {column: values})`` per record batch of ``table``'s listed shards, only
    ``columns`` (never ``image``) and only the rows of ``splits``; the row numbers count every row of the shard."""
    for location in snapshot.shard_paths(table):
        parquet = open_parquet(str(location), storage)
        try:
            have = set(parquet.schema_arrow.names)
            missing = [c for c in columns if c not in have]
            if missing:
                raise ValueError(f"snapshot {table} shard {location} has no column(s) {missing} "
                                 f"(has {sorted(have)})")
            read = columns + (["split"] if "split" in have and "split" not in columns else [])
            offset = 0
            for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=read, use_threads=False):
                data = batch.to_pydict()
                rows = list(range(batch.num_rows))
                if "split" in data:
                    rows = [i for i in rows if data["split"][i] in splits]
                yield str(location), offset, {c: [data[c][i] for i in rows] for c in columns} | {"row": rows}
                offset += batch.num_rows
        finally:
            parquet.close()


def gather_inputs(snapshot_dirs: Iterable[Path | str], cfg: EmbedConfig,
                  storage: S3Settings | None = None) -> EmbedInputs:
    """Distinct texts / English texts / image refs of the snapshots' chosen splits, plus "" (module docstring)."""
    from omnidiff.contracts.snapshot import Snapshot

    inputs = EmbedInputs()
    inputs.add_text("")  # the unconditional embedding (PAPER.md "Release hyper-parameters")
    if "clip" in cfg.kinds:
        inputs.add_english("")
    splits = set(cfg.splits)
    for path in snapshot_dirs:
        snap = Snapshot.open(path, storage=storage)
        inputs.snapshots.append({"path": str(path), "digest": str(getattr(snap, "digest", ""))})
        columns = ["caption", "caption_en", "lang"] + (["image_digest"] if "pixels" in cfg.kinds else [])
        for location, offset, batch in _batches(snap, "pairs", columns, splits, storage):
            for i, caption in enumerate(batch["caption"]):
                inputs.add_text(caption)
                if "clip" in cfg.kinds:
                    inputs.add_english(english_side(caption, batch["lang"][i], batch["caption_en"][i]))
                if "pixels" in cfg.kinds:
                    digest = batch["image_digest"][i]
                    inputs.add_image(digest, ImageRef(location, offset + batch["row"][i], digest))
        if cfg.include_parallel and snap.manifest.get("shards", {}).get("parallel"):
            for _, _, batch in _batches(snap, "parallel", ["text", "lang", "text_en"], splits, storage):
                for text, lang, text_en in zip(batch["text"], batch["lang"], batch["text_en"], strict=True):
                    inputs.add_text(text)
                    if "clip" in cfg.kinds:
                        inputs.add_english(english_side(text, lang, text_en, parallel=True))
    return inputs
