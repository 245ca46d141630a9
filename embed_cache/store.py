"""The embedding cache on disk: Parquet shards + a manifest, readable by plain pyarrow.

Layout (docs/architecture.md "Embedding cache")::

    cache/<kind>/<fingerprint>/
        manifest.json            fingerprint inputs, value shape, shards (name, rows, sha256, bytes)
        shards/part-<utc stamp>-<unit>.parquet

Columns: ``key`` (string), ``length`` (int32, tokens) and ``states``
(``list<fixed_size_list<float16, D>>``, unpadded) for ``llm``/``clip``; ``clip`` adds ``pooled``
(``fixed_size_list<float16, D>``); ``pixels`` has ``key`` + ``pixels``
(``fixed_size_list<float16, C*H*W>``, shape in the manifest). No Ray extension types: any
pyarrow/Arrow reader can open a shard (NOTES.md "Ray").

Crash safety. A shard is written to ``shards/.tmp-*`` , fsynced and renamed: a reader never sees a
half-written shard. The manifest is rewritten the same way after every shard. A run killed between
a shard's rename and the manifest update leaves an *unlisted* shard; the next writer adopts it
(after checking it parses), so no finished work is lost and nothing is computed twice. Exactly one
writer per cache directory (``flock``), and actors of a dead run cannot publish into a newer run
(the run token check in :func:`write_shard_file`). Should a key still appear in two shards, every
reader resolves it the same way: the shard whose name sorts first (the oldest) wins, and the next
writer drops the duplicate rows.

Read side (the train stage)::

    store = CacheStore(cache_dir("llm", fingerprint))
    states = store.read(keys)            # {key: float16 (L, D)}
    pooled = CacheStore(clip_dir).read_pooled(keys)   # {key: float16 (D,)}
    store.verify().raise_if_corrupt()    # names any corrupt shard
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embed_cache.fingerprint import KINDS, STORAGE_FORMAT, fingerprint

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
LOCK_NAME = ".writer.lock"
TOKEN_NAME = ".writer"
TMP_PREFIX = ".tmp-"
SHARD_PREFIX = "part-"
CORRUPT_SUFFIX = ".corrupt"
VALUE_COLUMN = {"llm": "states", "clip": "states", "pixels": "pixels"}


class CacheError(RuntimeError):
    """A cache directory is unusable (wrong fingerprint, locked, missing key...); the message says which."""


class CorruptShardError(CacheError):
    """One or more shards failed a check; ``.shards`` maps shard name -> reason."""

    def __init__(self, cache: Path, shards: dict[str, str]):
        self.cache, self.shards = Path(cache), dict(shards)
        listed = "; ".join(f"{name}: {why}" for name, why in sorted(shards.items()))
        super().__init__(f"corrupt shard(s) in {cache}: {listed}")


class NonFiniteStatesError(ValueError):
    """Model output with NaN or inf; ``.keys`` lists the offending cache keys."""

    def __init__(self, rejected: dict[str, str]):
        self.rejected = dict(rejected)
        shown = ", ".join(f"{k} ({why})" for k, why in list(rejected.items())[:10])
        more = f" and {len(rejected) - 10} more" if len(rejected) > 10 else ""
        super().__init__(f"non-finite states rejected for key(s): {shown}{more}")


# ---------------------------------------------------------------------------------------- locations


def cache_root(root: str | Path | None = None) -> Path:
    """``root`` or ``$OMNIDIFF_HOME/cache``."""
    if root is not None:
        return Path(root)
    from omnidiff.env import subdir

    return subdir("cache")


def cache_dir(kind: str, fingerprint: str, root: str | Path | None = None) -> Path:
    """``<root>/<kind>/<fingerprint>`` (not created)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if not fingerprint or "/" in fingerprint or fingerprint.startswith("."):
        raise ValueError(f"fingerprint={fingerprint!r}: not a valid directory name")
    return cache_root(root) / kind / fingerprint


# ---------------------------------------------------------------------------------------- format


def expected_schema(kind: str, value_shape: Sequence[int]) -> pa.Schema:
    """The Arrow schema of a shard of ``kind`` (``value_shape`` = (D,) per token, or (C, H, W))."""
    if kind in ("llm", "clip"):
        (dim,) = value_shape
        token = pa.list_(pa.float16(), int(dim))
        fields = [
            pa.field("key", pa.string(), False),
            pa.field("length", pa.int32(), False),
            pa.field("states", pa.list_(token), False),
        ]
        if kind == "clip":
            fields.append(pa.field("pooled", token, False))
        return pa.schema(fields)
    if kind == "pixels":
        size = int(np.prod(value_shape))
        return pa.schema([pa.field("key", pa.string(), False), pa.field("pixels", pa.list_(pa.float16(), size), False)])
    raise ValueError(f"kind={kind!r}: expected one of {KINDS}")


def find_non_finite(keys: Sequence[str], arrays: Iterable[np.ndarray]) -> dict[str, str]:
    """``{key: reason}`` for every array holding NaN or inf (checked on the float16 values that are stored)."""
    bad: dict[str, str] = {}
    for key, arr in zip(keys, arrays, strict=True):
        finite = np.isfinite(arr)
        if not finite.all():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int((~finite).sum()) - n_nan
            bad[key] = f"{n_nan} NaN, {n_inf} inf of {arr.size} values"
    return bad


def states_table(keys: Sequence[str], states: Sequence[np.ndarray], pooled: np.ndarray | None = None) -> pa.Table:
    """Shard table from per-key unpadded states ``(L_i, D)``; optional ``pooled (N, D)`` (clip).

    Values are cast to float16; non-finite values raise :class:`NonFiniteStatesError` naming the keys.
    """
    if len(keys) != len(states):
        raise ValueError(f"{len(keys)} keys but {len(states)} state arrays")
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate keys in one shard")
    if not states:
        raise ValueError("empty shard")
    dim = int(states[0].shape[-1])
    halves = []
    for key, arr in zip(keys, states, strict=True):
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise ValueError(f"key {key}: states shape {arr.shape}, expected (L, {dim})")
        with np.errstate(over="ignore"):  # overflow becomes inf, which is reported below with the key
            halves.append(np.asarray(arr, dtype=np.float16))
    rejected = find_non_finite(keys, halves)
    lengths = np.array([h.shape[0] for h in halves], dtype=np.int32)
    flat = np.concatenate(halves, axis=0).reshape(-1) if lengths.sum() else np.zeros(0, np.float16)  # (sum L * D,)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), dim)
    columns: dict[str, Any] = {
        "key": pa.array(list(keys), pa.string()),
        "length": pa.array(lengths, pa.int32()),
        "states": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), tokens),
    }
    kind = "llm"
    if pooled is not None:
        with np.errstate(over="ignore"):
            pooled16 = np.asarray(pooled, dtype=np.float16)
        if pooled16.shape != (len(keys), dim):
            raise ValueError(f"pooled shape {pooled16.shape}, expected ({len(keys)}, {dim})")
        rejected.update({k: f"pooled: {v}" for k, v in find_non_finite(keys, list(pooled16)).items()})
        columns["pooled"] = pa.FixedSizeListArray.from_arrays(pa.array(pooled16.reshape(-1), pa.float16()), dim)
        kind = "clip"
    if rejected:
        raise NonFiniteStatesError(rejected)
    return pa.Table.from_arrays(list(columns.values()), schema=expected_schema(kind, (dim,)))


def pixels_table(keys: Sequence[str], values: np.ndarray) -> pa.Table:
    """Shard table from ``values (N, C, H, W)`` (pixels in [-1, 1] or latents), stored float16."""
    with np.errstate(over="ignore"):
        values16 = np.asarray(values, dtype=np.float16)
    if values16.ndim != 4 or values16.shape[0] != len(keys):
        raise ValueError(f"values shape {values16.shape}, expected ({len(keys)}, C, H, W)")
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate keys in one shard")
    rejected = find_non_finite(keys, list(values16))
    if rejected:
        raise NonFiniteStatesError(rejected)
    size = int(np.prod(values16.shape[1:]))
    return pa.Table.from_arrays(
        [
            pa.array(list(keys), pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(values16.reshape(-1), pa.float16()), size),
        ],
        schema=expected_schema("pixels", values16.shape[1:]),
    )


def encode_shard(table: pa.Table) -> bytes:
    """Parquet bytes. Byte-stream-split + zstd on the float16 columns: ~0.85-0.95 of raw fp16 size."""
    float_columns = {
        "states": "states.list.element.list.element",
        "pooled": "pooled.list.element",
        "pixels": "pixels.list.element",
    }
    split = [path for name, path in float_columns.items() if name in table.column_names]
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        compression_level=1,
        use_dictionary=["key"],
        use_byte_stream_split=split,
        row_group_size=max(1, table.num_rows),
    )
    return buf.getvalue()


def decode_states(column: pa.ChunkedArray | pa.Array, dim: int) -> list[np.ndarray]:
    """``list<fixed_size_list<float16, D>>`` -> one float16 ``(L, D)`` array per row (views, no copy)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    offsets = offsets - offsets[0]  # a sliced array keeps absolute offsets
    flat = arr.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)  # (sum L, D)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


def decode_fixed(column: pa.ChunkedArray | pa.Array, shape: Sequence[int]) -> np.ndarray:
    """``fixed_size_list<float16, prod(shape)>`` -> float16 ``(N, *shape)``."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), *shape)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temp file + rename (readers see old or new, never half)."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def shard_name(run_stamp: str, unit: int) -> str:
    """``part-<utc stamp>-<unit>.parquet``; names sort oldest first, which decides duplicate keys."""
    return f"{SHARD_PREFIX}{run_stamp}-{unit:06d}.parquet"


def new_run_stamp() -> str:
    """UTC time to the microsecond, e.g. ``20261201T020000123456``: later runs sort after earlier ones."""
    now_ns = time.time_ns()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now_ns // 1_000_000_000)) + f"{now_ns // 1000 % 1_000_000:06d}"


def write_shard_file(directory: str | Path, name: str, table: pa.Table, run_token: str | None = None) -> dict:
    """Publish ``table`` as ``shards/<name>`` atomically; return its manifest entry.

    Called by the actors (they write where the data lives; the driver only publishes manifest
    entries). ``run_token`` guards against actors of a killed run: the shard is only renamed into
    place while the cache's ``.writer`` token is still theirs, else it is discarded and the entry
    has ``stale: True``.
    """
    directory = Path(directory)
    shards = directory / SHARDS_DIR
    data = encode_shard(table)
    tmp = shards / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    entry = {"name": name, "rows": table.num_rows, "sha256": sha256_bytes(data), "bytes": len(data)}
    if "length" in table.column_names:
        entry["tokens"] = int(pc.sum(table.column("length")).as_py() or 0)
    if run_token is not None and _read_token(directory) != run_token:
        tmp.unlink(missing_ok=True)
        return {**entry, "stale": True}
    final = shards / name
    if final.exists():
        # A retried task (its actor died after the rename, before reporting): keep both files; the
        # next writer drops the one whose keys are already listed.
        final = shards / name.replace(".parquet", f"-{uuid.uuid4().hex[:8]}.parquet")
        entry["name"] = final.name
    os.replace(tmp, final)
    _fsync_dir(shards)
    return entry


def _read_token(directory: Path) -> str | None:
    try:
        return (directory / TOKEN_NAME).read_text().strip()
    except FileNotFoundError:
        return None


def _read_shard_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns, memory_map=True)


# ---------------------------------------------------------------------------------------- reader


@dataclasses.dataclass
class VerifyReport:
    """Result of :meth:`CacheStore.verify`: ``corrupt`` names every bad shard and why."""

    cache: Path
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


class CacheStore:
    """Read-only view of one cache directory (``cache/<kind>/<fingerprint>/``)."""

    def __init__(self, path: str | Path, max_cached_shards: int = 4):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise CacheError(f"{self.path}: not an embedding cache (no {MANIFEST_NAME}); run 'omnidiff embed' first")
        self.manifest: dict = json.loads(manifest_path.read_text())
        self.kind: str = self.manifest["kind"]
        self.fingerprint: str = self.manifest["fingerprint"]
        self._index: dict[str, tuple[str, int]] | None = None
        self._tables: OrderedDict[str, pa.Table] = OrderedDict()
        self._max_cached = max(1, max_cached_shards)

    # -- metadata
    @property
    def value_shape(self) -> tuple[int, ...] | None:
        shape = self.manifest.get("value_shape")
        return tuple(shape) if shape else None

    @property
    def hidden_size(self) -> int | None:
        """D of the per-token states (llm/clip)."""
        return self.value_shape[0] if self.kind in ("llm", "clip") and self.value_shape else None

    @property
    def shard_names(self) -> list[str]:
        """Listed shards, oldest first (the order that resolves duplicate keys)."""
        return sorted(s["name"] for s in self.manifest["shards"])

    def __len__(self) -> int:
        return len(self._key_index())

    def __contains__(self, key: str) -> bool:
        return key in self._key_index()

    def keys(self) -> list[str]:
        """Every cached key, sorted."""
        return sorted(self._key_index())

    def _key_index(self) -> dict[str, tuple[str, int]]:
        if self._index is None:
            index: dict[str, tuple[str, int]] = {}
            for name in self.shard_names:  # oldest first: the first occurrence of a key wins
                keys = _read_shard_table(self.path / SHARDS_DIR / name, ["key"]).column("key").to_pylist()
                for row, key in enumerate(keys):
                    index.setdefault(key, (name, row))
            self._index = index
        return self._index

    def _table(self, name: str) -> pa.Table:
        if name in self._tables:
            self._tables.move_to_end(name)
            return self._tables[name]
        path = self.path / SHARDS_DIR / name
        try:
            table = _read_shard_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise CorruptShardError(self.path, {name: f"cannot read: {exc}"}) from None
        self._tables[name] = table
        while len(self._tables) > self._max_cached:
            self._tables.popitem(last=False)
        return table

    def _rows_by_shard(self, keys: Iterable[str]) -> dict[str, list[tuple[str, int]]]:
        index = self._key_index()
        grouped: dict[str, list[tuple[str, int]]] = {}
        for key in keys:
            if key not in index:
                raise KeyError(
                    f"key {key!r} is not in cache {self.path} ({self.kind} {self.fingerprint}); "
                    "run 'omnidiff embed' over the snapshot that holds it"
                )
            name, row = index[key]
            grouped.setdefault(name, []).append((key, row))
        return grouped

    def read(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """``{key: float16 array}``: ``(L, D)`` states for llm/clip, ``(C, H, W)`` for pixels."""
        out: dict[str, np.ndarray] = {}
        column = VALUE_COLUMN[self.kind]
        for name, rows in self._rows_by_shard(keys).items():
            table = self._table(name).take(pa.array([r for _, r in rows], pa.int64()))
            if self.kind == "pixels":
                values = list(decode_fixed(table.column(column), self.value_shape))
            else:
                values = decode_states(table.column(column), self.hidden_size)
            out.update({key: value for (key, _), value in zip(rows, values, strict=True)})
        return out

    def read_pooled(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """``{key: float16 (D,)}`` CLIP pooled embeddings (clip caches only)."""
        if self.kind != "clip":
            raise CacheError(f"{self.path}: a {self.kind} cache has no pooled column (only clip caches do)")
        out: dict[str, np.ndarray] = {}
        for name, rows in self._rows_by_shard(keys).items():
            table = self._table(name).take(pa.array([r for _, r in rows], pa.int64()))
            pooled = decode_fixed(table.column("pooled"), (self.hidden_size,))
            out.update({key: value for (key, _), value in zip(rows, pooled, strict=True)})
        return out

    def lengths(self, keys: Iterable[str] | None = None) -> dict[str, int]:
        """``{key: token count}`` without decoding states (llm/clip)."""
        wanted = None if keys is None else set(keys)
        out: dict[str, int] = {}
        for name in reversed(self.shard_names):  # reversed so the oldest shard's value wins
            table = _read_shard_table(self.path / SHARDS_DIR / name, ["key", "length"])
            for key, length in zip(table.column("key").to_pylist(), table.column("length").to_pylist(), strict=True):
                if wanted is None or key in wanted:
                    out[key] = length
        return out

    def verify(self, check_values: bool = True) -> VerifyReport:
        """Check every listed shard: present, sha256, parses, schema, row count, lengths, finite values.

        Also counts keys present in more than one shard and lists unlisted shard files (left by a
        killed run; the next writer adopts them).
        """
        report = VerifyReport(self.path)
        seen: set[str] = set()
        shape = self.value_shape
        for entry in sorted(self.manifest["shards"], key=lambda s: s["name"]):
            name = entry["name"]
            report.shards += 1
            problem = _check_shard(self.path / SHARDS_DIR / name, entry, self.kind, shape, check_values)
            if isinstance(problem, str):
                report.corrupt[name] = problem
                continue
            keys = problem
            report.rows += len(keys)
            dup = seen.intersection(keys)
            report.duplicate_keys += len(dup)
            seen.update(keys)
        listed = {s["name"] for s in self.manifest["shards"]}
        shards_dir = self.path / SHARDS_DIR
        if shards_dir.is_dir():
            report.unlisted = sorted(
                p.name for p in shards_dir.glob(f"{SHARD_PREFIX}*.parquet") if p.name not in listed
            )
        return report


def _check_shard(
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
    if entry.get("rows") is not None and table.num_rows != entry["rows"]:
        return f"{table.num_rows} rows, manifest says {entry['rows']}"
    if shape is not None and not table.schema.equals(expected_schema(kind, shape)):
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


# ---------------------------------------------------------------------------------------- writer


class CacheWriter:
    """The single writer of a cache directory (the embed job's driver).

    ``open()`` takes the directory's lock, claims it with a fresh run token, checks the fingerprint,
    deletes stale temp files and adopts unlisted shards left by a killed run. ``publish(entry)``
    adds a shard written by :func:`write_shard_file` to the manifest (atomic rewrite).
    """

    def __init__(self, path: str | Path, inputs: dict[str, Any]):
        self.path = Path(path)
        self.inputs = dict(inputs)
        self.kind = inputs["kind"]
        self.fingerprint = fingerprint(inputs)
        if self.path.name != self.fingerprint:
            raise CacheError(f"{self.path}: directory name is not the fingerprint {self.fingerprint} of its inputs")
        self.run_stamp = new_run_stamp()
        self.run_token = f"{self.run_stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.manifest: dict = {}
        self.keys: set[str] = set()
        self.recovered: dict[str, Any] = {
            "temp_removed": 0,
            "adopted": [],
            "dropped": [],
            "missing": [],
            "quarantined": [],
        }
        self._lock_fh = None

    # -- lifecycle
    def __enter__(self) -> CacheWriter:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> CacheWriter:
        (self.path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        self._lock_fh = (self.path / LOCK_NAME).open("a+")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.seek(0)
            holder = self._lock_fh.read().strip() or "unknown"
            self._lock_fh.close()
            self._lock_fh = None
            raise CacheError(
                f"{self.path} is being written by another embed run ({holder}); wait for it to finish or stop it"
            ) from None
        self._lock_fh.seek(0)
        self._lock_fh.truncate()
        self._lock_fh.write(f"pid {os.getpid()} run {self.run_token}\n")
        self._lock_fh.flush()
        # Claim the directory before looking at it: actors of a killed run see a foreign token from
        # here on and discard their shards instead of publishing them.
        _atomic_write(self.path / TOKEN_NAME, (self.run_token + "\n").encode())
        self._load_manifest()
        self._recover()
        return self

    @property
    def recovered_anything(self) -> bool:
        """Whether :meth:`open` found leftovers of an interrupted run (temp files, unlisted or lost shards)."""
        return any(self.recovered.values())

    def close(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def _load_manifest(self) -> None:
        path = self.path / MANIFEST_NAME
        if path.exists():
            manifest = json.loads(path.read_text())
            if manifest.get("fingerprint") != self.fingerprint or manifest.get("fingerprint_inputs") != json.loads(
                json.dumps(self.inputs)
            ):
                raise CacheError(f"{path}: manifest fingerprint inputs do not match this run's; refusing to mix caches")
            self.manifest = manifest
        else:
            self.manifest = {
                "format": STORAGE_FORMAT,
                "kind": self.kind,
                "fingerprint": self.fingerprint,
                "fingerprint_inputs": json.loads(json.dumps(self.inputs)),
                "dtype": "float16",
                "value_shape": None,
                "rows": 0,
                "shards": [],
                "created": _now(),
            }
            self._write_manifest()

    def _recover(self) -> None:
        shards_dir = self.path / SHARDS_DIR
        for tmp in list(shards_dir.glob(f"{TMP_PREFIX}*")) + list(self.path.glob(f"{TMP_PREFIX}*")):
            tmp.unlink(missing_ok=True)
            self.recovered["temp_removed"] += 1
        # Listed shards whose file vanished: drop them so their keys are computed again.
        kept = []
        for entry in self.manifest["shards"]:
            if (shards_dir / entry["name"]).is_file():
                kept.append(entry)
            else:
                self.recovered["missing"].append(entry["name"])
        if len(kept) != len(self.manifest["shards"]):
            self.manifest["shards"] = kept
            self._write_manifest()
        unreadable = []
        for entry in sorted(self.manifest["shards"], key=lambda s: s["name"]):
            try:
                table = _read_shard_table(shards_dir / entry["name"], ["key"])
            except (OSError, pa.ArrowException):
                unreadable.append(entry["name"])
                continue
            self.keys.update(table.column("key").to_pylist())
        if unreadable:  # cannot even list its keys: unlist it so its keys are computed again
            self.recovered["quarantined"] = self.quarantine(unreadable)
        listed = {s["name"] for s in self.manifest["shards"]}
        for path in sorted(shards_dir.glob(f"{SHARD_PREFIX}*.parquet")):
            if path.name not in listed:
                self._adopt(path)

    def _adopt(self, path: Path) -> None:
        """Take over a complete shard a killed run renamed into place but never listed."""
        try:
            table = pq.read_table(path)
            if self.manifest["value_shape"] is not None:
                expected = expected_schema(self.kind, self.manifest["value_shape"])
                if not table.schema.equals(expected):
                    raise ValueError(f"schema {table.schema} != {expected}")
        except (OSError, pa.ArrowException, ValueError) as exc:
            os.replace(path, path.with_name(path.name + CORRUPT_SUFFIX))
            self.recovered["dropped"].append(f"{path.name}: unreadable ({exc})")
            return
        keys = table.column("key").to_pylist()
        fresh = [k not in self.keys for k in keys]
        if not any(fresh):
            path.unlink()
            self.recovered["dropped"].append(f"{path.name}: every key already cached")
            return
        if not all(fresh):  # keep each key once: rewrite the shard without the rows cached elsewhere
            table = table.filter(pa.array(fresh))
            path.unlink()
            entry = write_shard_file(self.path, path.name, table)
        else:
            data = path.read_bytes()
            entry = {"name": path.name, "rows": table.num_rows, "sha256": sha256_bytes(data), "bytes": len(data)}
            if "length" in table.column_names:
                entry["tokens"] = int(pc.sum(table.column("length")).as_py() or 0)
        self._set_shape_from(table)
        self.publish(entry)
        self.recovered["adopted"].append(path.name)

    def _set_shape_from(self, table: pa.Table) -> None:
        if self.manifest["value_shape"] is not None:
            return
        if self.kind in ("llm", "clip"):
            self.manifest["value_shape"] = [table.schema.field("states").type.value_type.list_size]
            self.manifest["hidden_size"] = self.manifest["value_shape"][0]

    # -- writing
    def set_value_shape(self, shape: Sequence[int]) -> None:
        """Record the per-token (D,) or per-image (C, H, W) shape; it must never change."""
        shape = [int(s) for s in shape]
        current = self.manifest.get("value_shape")
        if current is not None and list(current) != shape:
            raise CacheError(f"{self.path}: value shape {shape} differs from the cache's {current}")
        if current is None:
            self.manifest["value_shape"] = shape
            if self.kind in ("llm", "clip"):
                self.manifest["hidden_size"] = shape[0]
            self._write_manifest()

    def shard_name(self, unit: int) -> str:
        return shard_name(self.run_stamp, unit)

    def write(self, table: pa.Table, unit: int) -> dict:
        """Write and publish a shard from the driver (small jobs, adoption, tests)."""
        entry = write_shard_file(self.path, self.shard_name(unit), table, self.run_token)
        self.publish(entry)
        return entry

    def publish(self, entry: dict, keys: Iterable[str] | None = None) -> None:
        """List a written shard in the manifest (atomic rewrite) and remember its keys."""
        if entry.get("stale"):
            raise CacheError(f"{self.path}: shard {entry['name']} was written under another run's token")
        if keys is None:
            keys = _read_shard_table(self.path / SHARDS_DIR / entry["name"], ["key"]).column("key").to_pylist()
        keys = list(keys)
        dup = self.keys.intersection(keys)
        if dup:
            raise CacheError(
                f"{self.path}: shard {entry['name']} repeats {len(dup)} cached key(s), e.g. {sorted(dup)[0]}"
            )
        entry = {k: v for k, v in entry.items() if k != "stale"}
        entry.setdefault("created", _now())
        self.manifest["shards"].append(entry)
        self.manifest["rows"] = sum(s["rows"] for s in self.manifest["shards"])
        self.keys.update(keys)
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.manifest["updated"] = _now()
        self.manifest["rows"] = sum(s["rows"] for s in self.manifest["shards"])
        data = json.dumps(self.manifest, indent=1, sort_keys=True, ensure_ascii=False).encode()
        _atomic_write(self.path / MANIFEST_NAME, data)

    def quarantine(self, names: Iterable[str]) -> list[str]:
        """Unlist shards (e.g. those :meth:`CacheStore.verify` named) and rename them ``*.corrupt``.

        Their keys are then missing, so the next run computes them again.
        """
        names = set(names)
        moved = []
        keep = []
        for entry in self.manifest["shards"]:
            if entry["name"] in names:
                path = self.path / SHARDS_DIR / entry["name"]
                if path.exists():
                    os.replace(path, path.with_name(path.name + CORRUPT_SUFFIX))
                moved.append(entry["name"])
            else:
                keep.append(entry)
        self.manifest["shards"] = keep
        self._write_manifest()
        self.keys = set()
        for entry in keep:
            try:
                table = _read_shard_table(self.path / SHARDS_DIR / entry["name"], ["key"])
            except (OSError, pa.ArrowException):
                continue  # unreadable as well: the caller's _recover quarantines it
            self.keys.update(table.column("key").to_pylist())
        return moved


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextlib.contextmanager
def open_writer(path: str | Path, inputs: dict[str, Any]):
    """``with open_writer(dir, inputs) as writer:`` (lock held inside)."""
    writer = CacheWriter(path, inputs).open()
    try:
        yield writer
    finally:
        writer.close()
