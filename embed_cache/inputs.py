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

Nor does it hold every distinct caption (issue 17): :func:`gather_inputs` spills each row's (key, text or image ref)
to :class:`KeyPartitions`, files on the driver's disk split by a hash of the key, holding at most
:data:`SPILL_ROWS` rows in memory; the job then takes one partition at a time (:meth:`EmbedInputs.partitions`),
deduplicated there. A key is in exactly one partition, so each is planned once; the partitions are sized from the
snapshots' row counts to hold about ``dedup_partition_rows`` rows each, so what the driver holds at once is
bounded by the config, not by the corpus.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embed_cache.config import EmbedConfig
from omnidiff.contracts.keys import KEY_HASH_SPACE, cache_key, english_side, key_hash
from omnidiff.contracts.storage import S3Settings, is_remote, open_folder

READ_BATCH_ROWS = 4096  # snapshot rows per record batch the driver holds (small columns only)
IMAGE_BATCH_ROWS = 256  # rows per record batch an actor decodes while picking its images out of a row group
SPILL_ROWS = 65536  # (key, value) rows the driver buffers before appending them to their partitions' files


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


class KeyPartitions:
    """``(key, value bytes)`` rows split into ``parts`` Arrow IPC files under ``folder`` by a hash of the key
    (:func:`~omnidiff.contracts.keys.key_hash`, stable across runs), appended in arrival order. Partition ``p`` holds
    the keys whose hash lies in the ``p``-th of ``parts`` equal, contiguous ranges of the hash space, so the cache
    writer reads only the shards whose ``key_range`` overlaps it (embed_cache/writer.py ``CacheWriter.cached``). At most ``buffer_rows`` rows wait in memory; :meth:`__iter__`
    reads one partition at a time and yields it deduplicated, ``{key: decode(value)}``, the first value of a key
    kept (as ``dict.setdefault`` did). Every key lands in exactly one partition. The folder is deleted with the
    object (or by :meth:`cleanup`)."""

    def __init__(self, folder: Path | str, parts: int, decode: Callable[[bytes], Any],
                 buffer_rows: int = SPILL_ROWS):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parts, self.decode, self.buffer_rows = max(1, int(parts)), decode, max(1, int(buffer_rows))
        self._keys: list[list[str]] = [[] for _ in range(self.parts)]
        self._values: list[list[bytes]] = [[] for _ in range(self.parts)]
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self._buffered = 0
        self.rows = 0  # rows added (references, duplicates included)
        self.peak_keys = 0  # the most distinct keys one partition held when read
        self._schema = pa.schema([pa.field("key", pa.string()), pa.field("value", pa.binary())])

    def part_of(self, key: str) -> int:
        return (key_hash(key) * self.parts) // KEY_HASH_SPACE

    def add(self, key: str, value: bytes) -> None:
        part = self.part_of(key)
        self._keys[part].append(key)
        self._values[part].append(value)
        self._buffered += 1
        self.rows += 1
        if self._buffered >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        """Append every buffered row to its partition's file."""
        for part in range(self.parts):
            if not self._keys[part]:
                continue
            if part not in self._writers:
                self._writers[part] = pa.ipc.new_stream(str(self.folder / f"part-{part:06d}.arrow"), self._schema)
            batch = pa.record_batch([pa.array(self._keys[part], pa.string()), pa.array(self._values[part], pa.binary())],
                                    schema=self._schema)
            self._writers[part].write_batch(batch)
            self._keys[part], self._values[part] = [], []
        self._buffered = 0

    def close(self) -> None:
        """Flush and close the partitions' files (reading them closes them first)."""
        self.flush()
        while self._writers:
            self._writers.popitem()[1].close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        for part in range(self.parts):
            path = self.folder / f"part-{part:06d}.arrow"
            if not path.exists():
                continue
            with pa.ipc.open_stream(str(path)) as reader:
                table = reader.read_all()
            out: dict[str, Any] = {}
            for key, value in zip(table.column("key").to_pylist(), table.column("value").to_pylist(), strict=True):
                if key not in out:
                    out[key] = self.decode(value)
            del table
            self.peak_keys = max(self.peak_keys, len(out))
            yield out

    def cleanup(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _decode_text(value: bytes) -> str:
    return value.decode("utf-8")


def _decode_image(value: bytes) -> bytes | ImageRef:
    return ImageRef.decode(value) if is_image_ref(value) else value


@dataclass
class EmbedInputs:
    """Distinct work per cache kind, gathered from snapshots (or built in memory by tests/benchmarks).

    Built in memory (tests, benchmarks): texts: llm key -> normalised text; english: clip key -> normalised English
    text; images: image digest -> its encoded bytes or where it is (:class:`ImageRef`). Gathered from snapshots
    (:func:`gather_inputs`): the same per kind in ``spilled`` (:class:`KeyPartitions` on the driver's disk), the
    dicts left empty. references: rows that pointed at each kind (so "a caption in ten snapshots is embedded
    once" shows as references >> distinct). The job reads :meth:`partitions`; :meth:`work` puts them together.
    """

    texts: dict[str, str] = field(default_factory=dict)
    english: dict[str, str] = field(default_factory=dict)
    images: dict[str, bytes | ImageRef] = field(default_factory=dict)
    references: dict[str, int] = field(default_factory=lambda: {"llm": 0, "clip": 0, "pixels": 0})
    snapshots: list[dict[str, str]] = field(default_factory=list)
    spilled: dict[str, KeyPartitions] = field(default_factory=dict)

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
        if kind in self.spilled:
            self.spilled[kind].add(key, normalised.encode("utf-8"))
        else:
            texts.setdefault(key, normalised)
        self.references[kind] += 1

    def add_image(self, digest: str, data: bytes | ImageRef) -> None:
        if "pixels" in self.spilled:
            self.spilled["pixels"].add(digest, data.encode() if isinstance(data, ImageRef) else bytes(data))
        else:
            self.images.setdefault(digest, data)
        self.references["pixels"] += 1

    def partitions(self, kind: str) -> Iterator[dict[str, Any]]:
        """The distinct work of ``kind`` in disjoint parts, ``{key: text | image}`` each: what the job holds at once
        (one part, for gathered inputs; the whole dict for inputs built in memory)."""
        if kind in self.spilled:
            yield from self.spilled[kind]
        else:
            yield {"llm": self.texts, "clip": self.english, "pixels": self.images}[kind]

    def peak_keys(self, kind: str) -> int:
        """The most distinct keys of ``kind`` one part held (after :meth:`partitions` went through them)."""
        if kind in self.spilled:
            return self.spilled[kind].peak_keys
        return len({"llm": self.texts, "clip": self.english, "pixels": self.images}[kind])

    def work(self, kind: str) -> dict[str, Any]:
        """Every distinct key of ``kind`` with its text or image, in one dict (tests, small inputs; the job itself
        goes part by part)."""
        merged: dict[str, Any] = {}
        for part in self.partitions(kind):
            merged.update(part)
        return merged

    def close(self) -> None:
        """Delete the spilled partitions."""
        for spill in self.spilled.values():
            spill.cleanup()

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

    snaps = [(path, Snapshot.open(path, storage=storage)) for path in snapshot_dirs]
    rows = sum(int(s.get("rows", 0)) for _, snap in snaps for table in ("pairs", "parallel")
               for s in snap.manifest.get("shards", {}).get(table, []))
    parts = max(1, math.ceil(rows / cfg.dedup_partition_rows))
    folder = Path(tempfile.mkdtemp(prefix="omnidiff-embed-keys-"))
    decoders = {"llm": _decode_text, "clip": _decode_text, "pixels": _decode_image}
    spilled = {kind: KeyPartitions(folder / kind, parts, decoders[kind]) for kind in dict.fromkeys(("llm", *cfg.kinds))}
    inputs = EmbedInputs(spilled=spilled)
    weakref.finalize(inputs, shutil.rmtree, folder, True)
    inputs.add_text("")  # the unconditional embedding (PAPER.md "Release hyper-parameters")
    if "clip" in cfg.kinds:
        inputs.add_english("")
    splits = set(cfg.splits)
    for path, snap in snaps:
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
