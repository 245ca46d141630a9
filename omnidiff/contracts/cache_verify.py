"""Checking an embedding cache shard by shard: what ``CacheStore.verify`` and ``omnidiff embed verify`` report.

    report = CacheStore(path).verify()     # -> VerifyReport
    report.raise_if_corrupt()              # CorruptShardError naming every bad shard and why
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from omnidiff.contracts.cache import (
    SHARD_PREFIX,
    SHARDS_DIR,
    VALUE_COLUMN,
    CacheStore,
    CorruptShardError,
    decode_fixed,
    decode_states,
    find_non_finite,
    schema_matches,
)
from omnidiff.contracts.io import sha256_bytes, sha256_file
from omnidiff.contracts.storage import Folder, StorageError


@dataclasses.dataclass
class VerifyReport:
    """Result of :meth:`CacheStore.verify`: ``corrupt`` names every bad shard and why."""

    cache: Path | str  # a folder, or the s3:// URL of a cache on object storage
    shards: int = 0
    rows: int = 0
    corrupt: dict[str, str] = dataclasses.field(default_factory=dict)
    duplicate_keys: int = 0
    unlisted: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupt and self.duplicate_keys == 0

    def raise_if_corrupt(self) -> VerifyReport:
        if self.corrupt:
            raise CorruptShardError(self.cache, self.corrupt)
        return self

    def as_dict(self) -> dict:
        return {
            "cache": str(self.cache),
            "ok": self.ok,
            "shards": self.shards,
            "rows": self.rows,
            "corrupt": dict(self.corrupt),
            "duplicate_keys": self.duplicate_keys,
            "unlisted": list(self.unlisted),
        }


def verify_store(store: CacheStore, check_values: bool = True) -> VerifyReport:
    """Check every listed shard: present, sha256, parses, schema, row count, lengths, finite values.

    Also counts keys present in more than one shard and lists unlisted shard files (left by a
    killed run; the next writer adopts them).
    """
    report = VerifyReport(store.path)
    seen: set[str] = set()
    shape = store.value_shape
    folder = store.folder  # None for a local cache
    for entry in sorted(store.manifest["shards"], key=lambda s: s["name"]):
        name = entry["name"]
        report.shards += 1
        if folder is not None:
            problem = check_shard_object(folder, f"{SHARDS_DIR}/{name}", entry, store.kind, shape, check_values)
        else:
            problem = check_shard(store.path / SHARDS_DIR / name, entry, store.kind, shape, check_values)
        if isinstance(problem, str):
            report.corrupt[name] = problem
            continue
        keys = problem
        report.rows += len(keys)
        dup = seen.intersection(keys)
        report.duplicate_keys += len(dup)
        seen.update(keys)
    listed = {s["name"] for s in store.manifest["shards"]}
    if folder is not None:  # what killed writers left: never read, deleted by embed_cache.writer.clean_cache
        names = (o.rel.split("/", 1)[1] for o in folder.list(SHARDS_DIR))
        report.unlisted = sorted(n for n in names if n.startswith(SHARD_PREFIX) and n.endswith(".parquet")
                                 and n not in listed)
        return report
    shards_dir = store.path / SHARDS_DIR
    if shards_dir.is_dir():
        report.unlisted = sorted(
            p.name for p in shards_dir.glob(f"{SHARD_PREFIX}*.parquet") if p.name not in listed
        )
    return report


def check_shard(
    path: Path, entry: dict, kind: str, shape: tuple[int, ...] | None, check_values: bool
) -> str | list[str]:
    """A reason string when the shard is bad, else its keys."""
    if not path.is_file():
        return "file missing"
    if "bytes" in entry and path.stat().st_size != entry["bytes"]:
        return f"size {path.stat().st_size} != manifest {entry['bytes']}"
    if "sha256" in entry and sha256_file(path) != entry["sha256"]:
        return "sha256 mismatch"
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        return f"does not parse: {exc}"
    return check_table(table, entry, kind, shape, check_values)


def check_shard_object(folder: Folder, rel: str, entry: dict, kind: str, shape: tuple[int, ...] | None,
                       check_values: bool) -> str | list[str]:
    """:func:`check_shard` of an object on S3: one GET, then size, sha256 and parse on those bytes."""
    try:
        data = folder.read_bytes(rel)
    except FileNotFoundError:
        return "file missing"
    except StorageError as exc:
        return f"cannot read: {exc}"
    if "bytes" in entry and len(data) != entry["bytes"]:
        return f"size {len(data)} != manifest {entry['bytes']}"
    if "sha256" in entry and sha256_bytes(data) != entry["sha256"]:
        return "sha256 mismatch"
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (OSError, pa.ArrowException) as exc:
        return f"does not parse: {exc}"
    return check_table(table, entry, kind, shape, check_values)


def check_table(table: pa.Table, entry: dict, kind: str, shape: tuple[int, ...] | None,
                check_values: bool) -> str | list[str]:
    """The checks after parsing: row count, schema, unique keys, lengths, finite values."""
    if entry.get("rows") is not None and table.num_rows != entry["rows"]:
        return f"{table.num_rows} rows, manifest says {entry['rows']}"
    if shape is not None and not schema_matches(kind, shape, table.schema):
        return f"schema {table.schema} differs from the {kind} format with shape {shape}"
    keys = table.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        return "duplicate keys inside the shard"
    if check_values and shape is not None:
        column = table.column(VALUE_COLUMN[kind])
        if kind == "pixels":
            values = list(decode_fixed(column, shape))
        else:
            values = decode_states(column, shape[0])
            lengths = table.column("length").to_numpy()
            if any(v.shape[0] != n for v, n in zip(values, lengths, strict=True)):
                return "length column disagrees with the stored states"
        bad = find_non_finite(keys, values)
        if bad:
            return f"non-finite values for key(s) {sorted(bad)[:5]}"
    return keys
