"""The embedding cache on disk: Parquet shards + a manifest, readable by plain pyarrow.

Layout (docs/architecture.md "Embedding cache")::

    cache/<kind>/<fingerprint>/
        manifest.json            fingerprint inputs, value shape, shards (name, rows, sha256, bytes),
                                 ``journal_seq``: the last journal entry folded into it
        journal/<seq>.json       shards listed since (one entry per publish, seq = 12 digits, contiguous)
        shards/part-<utc stamp>-<unit>.parquet

The folder's name is the fingerprint of its encoder (omnidiff/contracts/encoders.py). Columns:
``key`` (string), ``length`` (int32, tokens) and ``states`` (``list<fixed_size_list<float16, D>>``,
unpadded) for ``llm``/``clip``; ``clip`` adds ``pooled`` (``fixed_size_list<float16, D>``); ``pixels``
has ``key`` + ``pixels`` (``fixed_size_list<float16, C*H*W>``, shape in the manifest). No Ray extension
types: any pyarrow/Arrow reader can open a shard (NOTES.md "Ray").

This module is the format and the reader; the embed stage's single writer (temp name + rename per
shard, one journal entry per listed shard, adoption of shards a killed run left unlisted) is
embed_cache/writer.py, and :mod:`omnidiff.contracts.cache_verify` checks a cache shard by shard.
Should a key appear in two shards, every reader resolves it the same way: the shard whose name sorts
first (the oldest) wins.

Read side (the train stage)::

    store = CacheStore(cache_dir("llm", fingerprint))
    states = store.read(keys)            # {key: float16 (L, D)}
    pooled = CacheStore(clip_dir).read_pooled(keys)   # {key: float16 (D,)}
    store.verify().raise_if_corrupt()    # names any corrupt shard

A cache may live on object storage (``CacheStore("s3://bucket/cache/llm/<fingerprint>")``, endpoint and
credentials from :class:`~omnidiff.contracts.storage.S3Settings` or the AWS environment variables).
There each shard is one PUT and its journal entry, one PUT after it, is the commit point: the
reader opens only listed shards, so objects a killed writer left unlisted are never read
(``embed_cache.writer.clean_cache`` deletes them after a grace period).

The listing is ``manifest.json`` plus the journal entries after its ``journal_seq``
(:func:`read_manifest`). A shard costs one small journal write, not a rewrite of a manifest that lists
every shard (issue 17: at 65,536 shards that was ~O(shards^2) bytes, hundreds of GB). The writer folds
the journal into ``manifest.json`` every :data:`JOURNAL_FOLD` entries and when it closes (a finished
cache has an empty journal), then deletes the folded entries; a reader that meets a fold half-way
(an entry gone, or a gap in the sequence) reads again.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from omnidiff.contracts.encoders import KINDS
from omnidiff.contracts.storage import Folder, S3Settings, is_remote, join_location, open_folder

if TYPE_CHECKING:
    from omnidiff.contracts.cache_verify import VerifyReport

MANIFEST_NAME = "manifest.json"
JOURNAL_DIR = "journal"
# Journal entries the writer lets accumulate before it folds them into manifest.json: a reader reads at most this
# many small objects beside the manifest, and the manifest is rewritten once per this many shards.
JOURNAL_FOLD = 64
SHARDS_DIR = "shards"
SHARD_PREFIX = "part-"
CORRUPT_SUFFIX = ".corrupt"
VALUE_COLUMN = {"llm": "states", "clip": "states", "pixels": "pixels"}
SIZE_COLUMNS = ("original_size", "crop_top_left")  # int32 pairs (height, width), (top, left) per image


class CacheError(RuntimeError):
    """A cache directory is unusable (wrong fingerprint, locked, missing key...); the message says which."""


class CorruptShardError(CacheError):
    """One or more shards failed a check; ``.shards`` maps shard name -> reason."""

    def __init__(self, cache: Path | str, shards: dict[str, str]):
        self.cache, self.shards = (cache if is_remote(cache) else Path(cache)), dict(shards)
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


def cache_root(root: str | Path | None = None) -> Path | str:
    """``root`` or ``$OMNIDIFF_HOME/cache`` (an ``s3://`` root stays a URL string)."""
    if root is not None:
        return root if is_remote(root) else Path(root)
    from omnidiff.env import subdir

    return subdir("cache")


def cache_dir(kind: str, fingerprint: str, root: str | Path | None = None) -> Path | str:
    """``<root>/<kind>/<fingerprint>`` (not created; a URL string under an ``s3://`` root)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if not fingerprint or "/" in fingerprint or fingerprint.startswith("."):
        raise ValueError(f"fingerprint={fingerprint!r}: not a valid directory name")
    return join_location(cache_root(root), kind, fingerprint)


# ---------------------------------------------------------------------------------------- format


def expected_schema(kind: str, value_shape: Sequence[int], sizes: bool = False) -> pa.Schema:
    """The Arrow schema of a shard of ``kind`` (``value_shape`` = (D,) per token, or (C, H, W)).

    ``sizes`` (pixels of a latent cache): each image's ``original_size`` (height, width) and the
    ``crop_top_left`` (top, left) of its square crop in the resized image, as SDXL's time ids need.
    """
    if kind in ("llm", "clip"):
        # clip: (D,), or (D, P) when the pooled vector has its own width P (SDXL's projected text_embeds)
        if len(value_shape) not in ((1,) if kind == "llm" else (1, 2)):
            raise ValueError(f"value_shape={tuple(value_shape)}: expected (D,) for llm, (D,) or (D, P) for clip")
        token = pa.list_(pa.float16(), int(value_shape[0]))
        fields = [
            pa.field("key", pa.string(), False),
            pa.field("length", pa.int32(), False),
            pa.field("states", pa.list_(token), False),
        ]
        if kind == "clip":
            fields.append(pa.field("pooled", pa.list_(pa.float16(), int(value_shape[-1])), False))
        return pa.schema(fields)
    if kind == "pixels":
        size = int(np.prod(value_shape))
        fields = [pa.field("key", pa.string(), False), pa.field("pixels", pa.list_(pa.float16(), size), False)]
        if sizes:
            fields += [pa.field(name, pa.list_(pa.int32(), 2), False) for name in SIZE_COLUMNS]
        return pa.schema(fields)
    raise ValueError(f"kind={kind!r}: expected one of {KINDS}")


def schema_matches(kind: str, value_shape: Sequence[int], schema: pa.Schema) -> bool:
    """Whether ``schema`` is a shard of ``kind``: an image cache may carry the per-image sizes or not."""
    if kind == "pixels" and SIZE_COLUMNS[0] in schema.names:
        return schema.equals(expected_schema(kind, value_shape, sizes=True))
    return schema.equals(expected_schema(kind, value_shape))


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
    """Shard table from per-key unpadded states ``(L_i, D)``; optional ``pooled (N, P)`` (clip; P = D except SDXL).

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
        if pooled16.ndim != 2 or pooled16.shape[0] != len(keys):
            raise ValueError(f"pooled shape {pooled16.shape}, expected ({len(keys)}, P)")
        pooled_dim = int(pooled16.shape[1])
        rejected.update({k: f"pooled: {v}" for k, v in find_non_finite(keys, list(pooled16)).items()})
        columns["pooled"] = pa.FixedSizeListArray.from_arrays(pa.array(pooled16.reshape(-1), pa.float16()), pooled_dim)
        kind = "clip"
    if rejected:
        raise NonFiniteStatesError(rejected)
    shape = (dim,) if kind == "llm" or pooled_dim == dim else (dim, pooled_dim)
    return pa.Table.from_arrays(list(columns.values()), schema=expected_schema(kind, shape))


def pixels_table(
    keys: Sequence[str],
    values: np.ndarray,
    original_sizes: np.ndarray | None = None,
    crops: np.ndarray | None = None,
) -> pa.Table:
    """Shard table from ``values (N, C, H, W)`` (pixels in [-1, 1] or latents), stored float16.

    ``original_sizes (N, 2)`` (height, width of the image as collected) and ``crops (N, 2)`` (top,
    left of the square crop): both or neither; a latent cache stores them (SDXL's time ids).
    """
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
    columns = [
        pa.array(list(keys), pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(values16.reshape(-1), pa.float16()), size),
    ]
    if (original_sizes is None) != (crops is None):
        raise ValueError("original_sizes and crops go together (both or neither)")
    if original_sizes is not None:
        for name, pairs in zip(SIZE_COLUMNS, (original_sizes, crops), strict=True):
            pairs = np.asarray(pairs, dtype=np.int32)
            if pairs.shape != (len(keys), 2):
                raise ValueError(f"{name} shape {pairs.shape}, expected ({len(keys)}, 2)")
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(pairs.reshape(-1), pa.int32()), 2))
    return pa.Table.from_arrays(columns, schema=expected_schema("pixels", values16.shape[1:], original_sizes is not None))


# Rows per Parquet row group in a shard. A training rank decodes only the row groups holding a batch's rows
# (train.data.ResidentShards reads them with ParquetFile.read_row_groups), so a small group keeps the bytes
# decoded per sampled row small; 32 rows cost ~1-3% in file size and ~0.3 KB of footer per group. A storage
# layout, not a format: readers take any row-group layout (shards written before hold one group each); embed's
# ``row_group_rows`` sets it (issue 17: 8-row groups decode ~1.5x, not ~4x, the rows per sample of N in a cold
# 10N run, but trained slower in benchmarks/scale.py: 10N/N 0.64x against 0.78x at 32, same box).
SHARD_ROW_GROUP_ROWS = 32


def encode_shard(table: pa.Table, row_group_rows: int = SHARD_ROW_GROUP_ROWS) -> bytes:
    """Parquet bytes in row groups of ``row_group_rows`` rows. Byte-stream-split + zstd on the float16
    columns: ~0.85-0.95 of raw fp16 size."""
    if int(row_group_rows) < 1:
        raise ValueError(f"row_group_rows={row_group_rows}: must be >= 1")
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
        row_group_size=int(row_group_rows),
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


def shard_name(run_stamp: str, unit: int) -> str:
    """``part-<utc stamp>-<unit>.parquet``; names sort oldest first, which decides duplicate keys."""
    return f"{SHARD_PREFIX}{run_stamp}-{unit:06d}.parquet"


def new_run_stamp() -> str:
    """UTC time to the microsecond, e.g. ``20261201T020000123456``: later runs sort after earlier ones."""
    now_ns = time.time_ns()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now_ns // 1_000_000_000)) + f"{now_ns // 1000 % 1_000_000:06d}"


def read_shard_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A shard file as an Arrow table (memory-mapped; ``columns`` to read only some)."""
    return pq.read_table(path, columns=columns, memory_map=True)


# ---------------------------------------------------------------------------------------- manifest + journal

_JOURNAL_ENTRY = re.compile(r"^(\d{12})\.json$")
MANIFEST_READ_ATTEMPTS = 8


def journal_rel(seq: int) -> str:
    """``journal/<seq, 12 digits>.json``: the entry that lists the shards of publish number ``seq``."""
    return f"{JOURNAL_DIR}/{int(seq):012d}.json"


def journal_seqs(folder: Folder) -> list[int]:
    """The sequence numbers of the journal entries present, ascending (temp files and strays ignored)."""
    out = []
    for obj in folder.list(JOURNAL_DIR):
        match = _JOURNAL_ENTRY.match(obj.rel.rsplit("/", 1)[-1])
        if match:
            out.append(int(match.group(1)))
    return sorted(out)


def read_manifest(location: str | Path | Folder, storage: S3Settings | None = None) -> dict | None:
    """A cache's listing: ``manifest.json`` with the journal entries after its ``journal_seq`` folded in, or None.

    The result's ``shards`` hold every listed shard in publish order, ``rows`` their sum and ``journal_seq`` the last
    entry read. A writer may fold the journal while this reads (it rewrites the manifest, then deletes the folded
    entries): an entry that vanished, or a sequence that does not continue the manifest's, means the manifest changed
    underneath, so it is read again (:data:`MANIFEST_READ_ATTEMPTS` times at most).
    """
    folder = location if isinstance(location, Folder) else open_folder(location, storage)
    for _ in range(MANIFEST_READ_ATTEMPTS):
        try:
            manifest = json.loads(folder.read_bytes(MANIFEST_NAME))
        except FileNotFoundError:
            return None
        last = int(manifest.get("journal_seq", 0))
        try:
            for seq in journal_seqs(folder):
                if seq <= last:
                    continue  # folded already (a fold's deletions not done yet)
                if seq != last + 1:
                    raise FileNotFoundError(f"journal entry {last + 1} is gone")  # folded while we listed
                manifest["shards"].extend(json.loads(folder.read_bytes(journal_rel(seq)))["shards"])
                last = seq
        except FileNotFoundError:
            continue
        manifest["journal_seq"] = last
        manifest["rows"] = sum(int(s["rows"]) for s in manifest["shards"])
        return manifest
    raise CacheError(f"{folder.url}: the manifest changed while being read, {MANIFEST_READ_ATTEMPTS} times in a row")


# ---------------------------------------------------------------------------------------- reader


class CacheStore:
    """Read-only view of one cache directory (``cache/<kind>/<fingerprint>/``)."""

    def __init__(self, path: str | Path, max_cached_shards: int = 4, storage: S3Settings | None = None):
        self.folder: Folder | None = None
        if is_remote(path):  # object storage: self.path is the s3:// URL
            self.folder = open_folder(path, storage)
            self.path: Path | str = self.folder.url
            manifest = read_manifest(self.folder)
        else:
            self.path = Path(path)
            manifest = read_manifest(self.path) if self.path.is_dir() else None
        if manifest is None:
            raise CacheError(f"{self.path}: not an embedding cache (no {MANIFEST_NAME}); run 'omnidiff embed' first")
        self.manifest: dict = manifest
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
    def pooled_dim(self) -> int | None:
        """Width of the clip cache's pooled vectors (D, or P of a (D, P) value shape)."""
        return self.value_shape[-1] if self.kind == "clip" and self.value_shape else None

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
                keys = self._read_shard(name, ["key"]).column("key").to_pylist()
                for row, key in enumerate(keys):
                    index.setdefault(key, (name, row))
            self._index = index
        return self._index

    def _table(self, name: str) -> pa.Table:
        if name in self._tables:
            self._tables.move_to_end(name)
            return self._tables[name]
        try:
            table = self._read_shard(name)
        except (OSError, pa.ArrowException) as exc:
            raise CorruptShardError(self.path, {name: f"cannot read: {exc}"}) from None
        self._tables[name] = table
        while len(self._tables) > self._max_cached:
            self._tables.popitem(last=False)
        return table

    def _read_shard(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """A listed shard (memory-mapped locally, one GET on object storage)."""
        if self.folder is not None:
            return self.folder.read_parquet(f"{SHARDS_DIR}/{name}", columns)
        return read_shard_table(self.path / SHARDS_DIR / name, columns)

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

    def read_sizes(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """``{key: int32 (4,)}`` = original (height, width) + crop (top, left) of each image (latent caches)."""
        if self.kind != "pixels":
            raise CacheError(f"{self.path}: a {self.kind} cache has no image sizes (only pixels caches do)")
        out: dict[str, np.ndarray] = {}
        for name, rows in self._rows_by_shard(keys).items():
            table = self._table(name)
            if SIZE_COLUMNS[0] not in table.column_names:
                raise CacheError(f"{self.path}: shard {name} holds no image sizes (a cache embedded without a VAE)")
            table = table.take(pa.array([r for _, r in rows], pa.int64()))
            pairs = [decode_fixed(table.column(c), (2,)) for c in SIZE_COLUMNS]  # 2 x (n, 2)
            sizes = np.concatenate(pairs, axis=1).astype(np.int32)  # (n, 4)
            out.update({key: value for (key, _), value in zip(rows, sizes, strict=True)})
        return out

    def read_pooled(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """``{key: float16 (P,)}`` CLIP pooled embeddings (clip caches only)."""
        if self.kind != "clip":
            raise CacheError(f"{self.path}: a {self.kind} cache has no pooled column (only clip caches do)")
        out: dict[str, np.ndarray] = {}
        for name, rows in self._rows_by_shard(keys).items():
            table = self._table(name).take(pa.array([r for _, r in rows], pa.int64()))
            pooled = decode_fixed(table.column("pooled"), (self.pooled_dim,))
            out.update({key: value for (key, _), value in zip(rows, pooled, strict=True)})
        return out

    def lengths(self, keys: Iterable[str] | None = None) -> dict[str, int]:
        """``{key: token count}`` without decoding states (llm/clip)."""
        wanted = None if keys is None else set(keys)
        out: dict[str, int] = {}
        for name in reversed(self.shard_names):  # reversed so the oldest shard's value wins
            table = self._read_shard(name, ["key", "length"])
            for key, length in zip(table.column("key").to_pylist(), table.column("length").to_pylist(), strict=True):
                if wanted is None or key in wanted:
                    out[key] = length
        return out

    def verify(self, check_values: bool = True) -> VerifyReport:
        """Check every listed shard: present, sha256, parses, schema, row count, lengths, finite values.

        Also counts keys present in more than one shard and lists unlisted shard files (left by a
        killed run; locally the next writer adopts them, on S3 ``clean_cache`` deletes them). On object
        storage each listed shard is read with one GET and checked from those bytes.
        See :func:`omnidiff.contracts.cache_verify.verify_store`.
        """
        from omnidiff.contracts.cache_verify import verify_store

        return verify_store(self, check_values)
