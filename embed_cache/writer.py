"""The single writer of an embedding cache directory (the format and reader: omnidiff/contracts/cache.py).

Crash safety. A shard is written to ``shards/.tmp-*`` , fsynced and renamed: a reader never sees a
half-written shard. Then it is listed by a journal entry (``journal/<seq>.json``, written the same way): the
commit point. Every :data:`~omnidiff.contracts.cache.JOURNAL_FOLD` entries, and when the writer closes, the
journal is folded into ``manifest.json`` (one atomic rewrite, then the folded entries are deleted), so listing a
shard costs one small write however many shards the cache holds; readers merge the two
(:func:`~omnidiff.contracts.cache.read_manifest`). A run killed between
a shard's rename and its journal entry leaves an *unlisted* shard; the next writer adopts it
(after checking it parses), so no finished work is lost and nothing is computed twice. Exactly one
writer per cache directory (a file lock), and actors of a dead run cannot publish into a newer run
(the run token check in :func:`write_shard_file`). Should a key still appear in two shards, every
reader resolves it the same way: the shard whose name sorts first (the oldest) wins, and the next
writer drops the duplicate rows.

On object storage (an ``s3://`` cache directory, omnidiff/contracts/storage.py) there is no rename and no
file lock. A shard is one PUT (absent or complete, never half), and its journal entry, one PUT after it, is
the commit point: readers open only listed shards. Unlisted shards a killed run
left are *not* adopted there (their keys are computed again); :func:`clean_cache` deletes them once
they are older than a grace period. The run token still keeps a dead run's actors from writing into a
newer run; one writer per cache is the caller's duty (the embed job is the only writer).

What is cached, in bounded memory (issue 17). The writer holds no set of the cache's keys. Each listed shard's manifest
entry records ``key_range``, the ``[min, max]`` of its keys' :func:`~omnidiff.contracts.keys.key_hash`: the index kept
beside the shards. :meth:`CacheWriter.cached` answers "which of these keys are cached" by reading the ``key`` column of
only the shards whose range overlaps the query's, one shard at a time, keeping only the hits; the embed driver asks
one partition of its keys at a time, partitions being contiguous hash ranges (embed_cache/inputs.py
``KeyPartitions``), so what it holds is bounded by the partition plus one shard, not by the cache
(:attr:`CacheWriter.peak_keys` counts it). A shard the job planned from :meth:`CacheWriter.missing` is listed
without reading the cache again (``publish(..., fresh=True)``: each planned unit at most once); any other shard
(adopted, written by the driver, published by hand) is checked against the cache first. Shards listed by a writer
before key ranges have none: they are read for every query (memory still bounded; more reads), so such caches open
unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import filelock
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from omnidiff.contracts.cache import (
    CORRUPT_SUFFIX,
    JOURNAL_DIR,
    JOURNAL_FOLD,
    MANIFEST_NAME,
    SHARD_PREFIX,
    SHARD_ROW_GROUP_ROWS,
    SHARDS_DIR,
    CacheError,
    encode_shard,
    expected_schema,
    journal_rel,
    journal_seqs,
    new_run_stamp,
    read_manifest,
    read_shard_table,
    schema_matches,
    shard_name,
)
from omnidiff.contracts.encoders import STORAGE_FORMAT, fingerprint
from omnidiff.contracts.io import TMP_PREFIX, atomic_write, file_lock, fsync_dir, sha256_bytes
from omnidiff.contracts.keys import key_hash, key_range
from omnidiff.contracts.storage import (
    DEFAULT_GRACE_S,
    Folder,
    S3Settings,
    StorageError,
    clean,
    is_remote,
    location_name,
    open_folder,
)

LOCK_NAME = ".writer.lock"
TOKEN_NAME = ".writer"


def _shard_entry(name: str, table: pa.Table, data: bytes) -> dict:
    entry = {"name": name, "rows": table.num_rows, "sha256": sha256_bytes(data), "bytes": len(data)}
    if "length" in table.column_names:
        entry["tokens"] = int(pc.sum(table.column("length")).as_py() or 0)
    return entry


def _write_shard_object(folder: Folder, name: str, table: pa.Table, run_token: str | None,
                        row_group_rows: int = SHARD_ROW_GROUP_ROWS) -> dict:
    """:func:`write_shard_file` on object storage: one PUT of the finished bytes (no temp object)."""
    data = encode_shard(table, row_group_rows)
    entry = _shard_entry(name, table, data)
    if run_token is not None and _read_token(folder) != run_token:
        return {**entry, "stale": True}
    if folder.exists(f"{SHARDS_DIR}/{name}"):  # a retried task: keep both, as on a local disk
        entry["name"] = name.replace(".parquet", f"-{uuid.uuid4().hex[:8]}.parquet")
    folder.write_bytes(f"{SHARDS_DIR}/{entry['name']}", data)
    return entry


def write_shard_file(directory: str | Path, name: str, table: pa.Table, run_token: str | None = None,
                     storage: S3Settings | None = None, row_group_rows: int = SHARD_ROW_GROUP_ROWS) -> dict:
    """Publish ``table`` as ``shards/<name>`` atomically; return its manifest entry.

    Called by the actors (they write where the data lives; the driver only publishes manifest
    entries). ``run_token`` guards against actors of a killed run: the shard is only renamed into
    place while the cache's ``.writer`` token is still theirs, else it is discarded and the entry
    has ``stale: True``. An ``s3://`` directory gets one PUT (``storage`` or the AWS env vars). The shard is
    cut into Parquet row groups of ``row_group_rows`` rows, so a training rank decodes only the groups a
    batch needs (omnidiff/contracts/cache.py ``SHARD_ROW_GROUP_ROWS``).
    """
    if is_remote(directory):
        return _write_shard_object(open_folder(directory, storage), name, table, run_token, row_group_rows)
    directory = Path(directory)
    shards = directory / SHARDS_DIR
    data = encode_shard(table, row_group_rows)
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
    fsync_dir(shards)
    return entry


def _read_token(directory: Path | Folder) -> str | None:
    try:
        if isinstance(directory, Folder):
            return directory.read_bytes(TOKEN_NAME).decode().strip()
        return (directory / TOKEN_NAME).read_text().strip()
    except FileNotFoundError:
        return None


class CacheWriter:
    """The single writer of a cache directory (the embed job's driver).

    ``open()`` takes the directory's lock, claims it with a fresh run token, checks the fingerprint,
    deletes stale temp files and adopts unlisted shards left by a killed run. ``publish(entry)``
    adds a shard written by :func:`write_shard_file` to the listing (one journal entry); ``close()`` folds the
    journal into the manifest. ``journal_fold``: entries between folds (:data:`JOURNAL_FOLD`).
    """

    def __init__(self, path: str | Path, inputs: dict[str, Any], storage: S3Settings | None = None,
                 lock_wait_s: float = 0.0):
        self.storage = storage
        self.lock_wait_s = float(lock_wait_s)  # how long open() waits for another run's lock (local caches)
        self.folder: Folder | None = open_folder(path, storage) if is_remote(path) else None
        self.path: Path | str = self.folder.url if self.folder is not None else Path(path)
        self._listing: Folder = self.folder if self.folder is not None else open_folder(self.path)
        self.journal_fold = JOURNAL_FOLD
        self._seq = 0  # the last journal entry written or read
        self._pending = 0  # journal entries written since the last fold
        self.manifest_writes = 0  # full manifest rewrites (folds) in this run
        self.inputs = dict(inputs)
        self.kind = inputs["kind"]
        self.fingerprint = fingerprint(inputs)
        if location_name(self.path) != self.fingerprint:
            raise CacheError(f"{self.path}: directory name is not the fingerprint {self.fingerprint} of its inputs")
        self.run_stamp = new_run_stamp()
        self.run_token = f"{self.run_stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.manifest: dict = {}
        # Bounded key memory (module docstring): no set of the cache's keys, only these counters.
        self.peak_keys = 0  # the most cached keys held at once (hits so far + the shard being read)
        self.shard_reads = 0  # shard key columns read (opening reads none)
        self._read_ok: set[str] = set()  # shards read once already in this run (names: one per shard, not per key)
        self._published_units: set[str] = set()  # this run's planned units listed so far (publish(fresh=True))
        self.recovered: dict[str, Any] = {
            "temp_removed": 0,
            "adopted": [],
            "dropped": [],
            "missing": [],
            "quarantined": [],
        }
        self._lock: filelock.FileLock | None = None

    # -- lifecycle
    def __enter__(self) -> CacheWriter:
        return self.open()

    def __exit__(self, exc_type, *exc) -> None:
        self.close(fold=exc_type is None)

    def open(self) -> CacheWriter:
        if self.folder is not None:
            return self._open_remote()
        (self.path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        lock = file_lock(self.path / LOCK_NAME, timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            holder = _read_token(self.path) or "unknown"
            if self.lock_wait_s <= 0:
                raise CacheError(f"{self.path} is being written by another embed run (run {holder}); wait for it to "
                                 "finish or stop it") from None
            # Another run (the nightly re-embed, a pipeline triggered meanwhile) writes this cache: wait for it; what
            # it lists is then skipped here.
            print(f"{self.path} is being written by another embed run (run {holder}); waiting up to "
                  f"{self.lock_wait_s:.0f} s for it", flush=True)
            try:
                lock.acquire(timeout=self.lock_wait_s)
            except filelock.Timeout:
                raise CacheError(f"{self.path} is still being written by another embed run (run "
                                 f"{_read_token(self.path) or holder}) after {self.lock_wait_s:.0f} s; wait for it "
                                 "to finish or stop it") from None
        self._lock = lock
        # Claim the directory before looking at it: actors of a killed run see a foreign token from
        # here on and discard their shards instead of publishing them.
        try:
            atomic_write(self.path / TOKEN_NAME, self.run_token + "\n")
            self._load_manifest()
            self._recover()
        except BaseException:
            self.close(fold=False)
            raise
        return self

    def _open_remote(self) -> CacheWriter:
        """Object storage: claim with the run token (no lock there), load the manifest, drop what vanished."""
        self.folder.ensure()
        self.folder.write_bytes(TOKEN_NAME, (self.run_token + "\n").encode())
        self.recovered["ignored"] = []
        self._load_manifest()
        self._recover_remote()
        return self

    def _recover_remote(self) -> None:
        present = {o.rel.split("/", 1)[1] for o in self.folder.list(SHARDS_DIR)}
        self._recover_listed(lambda name: name in present)
        listed = {s["name"] for s in self.manifest["shards"]}
        # Never read: a killed run's unlisted shards wait for clean_cache; their keys are computed again.
        self.recovered["ignored"] = sorted(n for n in present if n.startswith(SHARD_PREFIX) and n not in listed
                                           and not n.endswith(CORRUPT_SUFFIX))

    def _recover_listed(self, exists: Callable[[str], bool]) -> None:
        """Unlists listed shards that vanished (``exists`` is false), so their keys are computed again. Keys are not
        loaded here (bounded memory): a listed shard whose keys cannot be read is quarantined by :meth:`cached`
        when first read."""
        kept = []
        for entry in self.manifest["shards"]:
            if exists(entry["name"]):
                kept.append(entry)
            else:
                self.recovered["missing"].append(entry["name"])
        if len(kept) != len(self.manifest["shards"]):
            self.manifest["shards"] = kept
            self._write_manifest()

    def _shard_keys(self, name: str) -> list[str]:
        self.shard_reads += 1  # every read of a shard's keys goes through here (counted: tests, benchmarks)
        if self.folder is not None:
            table = self.folder.read_parquet(f"{SHARDS_DIR}/{name}", ["key"])
        else:
            table = read_shard_table(self.path / SHARDS_DIR / name, ["key"])
        return table.column("key").to_pylist()

    # -- what is cached (bounded memory: module docstring)
    def cached(self, keys: Iterable[str]) -> set[str]:
        """The keys of ``keys`` that the cache lists.

        Reads the ``key`` column of each listed shard whose ``key_range`` overlaps the hash range of ``keys`` (all
        shards listed without a range), oldest first, one at a time, keeping only the hits: memory is the answer
        plus one shard's keys (:attr:`peak_keys`). A shard whose keys cannot be read the first time is quarantined
        (its keys are then missing and computed again); one read before in this run and unreadable now is an error.
        """
        query = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
        if not query:
            return set()
        hashes = [key_hash(k) for k in query]
        lo, hi = min(hashes), max(hashes)
        del hashes
        found: set[str] = set()
        for entry in sorted(self.manifest["shards"], key=lambda s: s["name"]):
            bounds = entry.get("key_range")
            if bounds is not None and (bounds[1] < lo or bounds[0] > hi):
                continue
            try:
                shard_keys = self._shard_keys(entry["name"])
            except (OSError, pa.ArrowException, StorageError) as exc:
                self._unreadable(entry["name"], exc)
                continue
            self._read_ok.add(entry["name"])
            self.peak_keys = max(self.peak_keys, len(found) + len(shard_keys))
            found.update(k for k in shard_keys if k in query)
            del shard_keys
        return found

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys of ``keys`` the cache lacks, in their order (:meth:`cached`)."""
        keys = keys if isinstance(keys, (list, tuple, dict)) else list(keys)
        have = self.cached(keys)
        return [k for k in keys if k not in have]

    def _unreadable(self, name: str, exc: BaseException) -> None:
        if name in self._read_ok:
            raise CacheError(f"{self.path}: shard {name} was read in this run and cannot be read now ({exc}); "
                             "rerun once the storage answers again") from exc
        self.recovered["quarantined"] += self.quarantine([name])

    @property
    def recovered_anything(self) -> bool:
        """Whether :meth:`open` found leftovers of an interrupted run (temp files, unlisted or lost shards)."""
        return any(self.recovered.values())

    def close(self, fold: bool = True) -> None:
        """Fold the journal into the manifest (``fold``; skipped when closing on an error: the journal is already
        the committed listing, and the next writer folds it), then release the lock."""
        try:
            if fold and self._pending:
                self._write_manifest()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _load_manifest(self) -> None:
        path = f"{self.path}/{MANIFEST_NAME}"
        manifest = read_manifest(self._listing)
        if manifest is not None:
            if manifest.get("fingerprint") != self.fingerprint or manifest.get("fingerprint_inputs") != json.loads(
                json.dumps(self.inputs)
            ):
                raise CacheError(f"{path}: manifest fingerprint inputs do not match this run's; refusing to mix caches")
            self.manifest = manifest
            self._seq = int(manifest.get("journal_seq", 0))
            if journal_seqs(self._listing):  # a killed run's journal (or a fold's leftovers): fold it now
                self._write_manifest()
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
        temps = [*shards_dir.glob(f"{TMP_PREFIX}*"), *self.path.glob(f"{TMP_PREFIX}*"),
                 *(self.path / JOURNAL_DIR).glob(f"{TMP_PREFIX}*")]
        for tmp in temps:
            tmp.unlink(missing_ok=True)
            self.recovered["temp_removed"] += 1
        self._recover_listed(lambda name: (shards_dir / name).is_file())
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
                if not schema_matches(self.kind, self.manifest["value_shape"], table.schema):
                    raise ValueError(f"schema {table.schema} != {expected}")
        except (OSError, pa.ArrowException, ValueError) as exc:
            os.replace(path, path.with_name(path.name + CORRUPT_SUFFIX))
            self.recovered["dropped"].append(f"{path.name}: unreadable ({exc})")
            return
        keys = table.column("key").to_pylist()
        cached = self.cached(keys)
        fresh = [k not in cached for k in keys]
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
        self._list(entry, table.column("key").to_pylist())  # checked against the cache above
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

    def write(self, table: pa.Table, unit: int, row_group_rows: int = SHARD_ROW_GROUP_ROWS) -> dict:
        """Write and publish a shard from the driver (small jobs, adoption, tests)."""
        entry = write_shard_file(self.path, self.shard_name(unit), table, self.run_token, self.storage, row_group_rows)
        self.publish(entry, table.column("key").to_pylist())
        return entry

    def publish(self, entry: dict, keys: Iterable[str] | None = None, *, fresh: bool = False) -> None:
        """List a written shard in the manifest (atomic rewrite) with the hash range of its keys.

        ``keys``: the shard's keys (read from the shard when None). A shard repeating a cached key is refused.
        ``fresh=True`` (the embed job): the keys are one planned unit of this run, taken from :meth:`missing` in
        disjoint partitions, so the cache is not read again; only a unit listed twice is refused. A shard not named
        by this run (:meth:`shard_name`) is checked against the cache all the same.
        """
        if entry.get("stale"):
            raise CacheError(f"{self.path}: shard {entry['name']} was written under another run's token")
        if keys is None:
            keys = self._shard_keys(entry["name"])
        keys = list(keys)
        unit = _unit_of(entry["name"])
        if len(set(keys)) != len(keys):
            raise CacheError(f"{self.path}: shard {entry['name']} repeats a key within itself")
        if fresh and unit.startswith(f"{SHARD_PREFIX}{self.run_stamp}-"):
            if unit in self._published_units:
                raise CacheError(f"{self.path}: shard {entry['name']} repeats unit {unit}, listed already in this run")
        else:
            dup = self.cached(keys)
            if dup:
                raise CacheError(
                    f"{self.path}: shard {entry['name']} repeats {len(dup)} cached key(s), e.g. {sorted(dup)[0]}"
                )
        self._published_units.add(unit)
        self._list(entry, keys)

    def _list(self, entry: dict, keys: list[str]) -> None:
        entry = {k: v for k, v in entry.items() if k != "stale"}
        entry.setdefault("created", _now())
        entry["key_range"] = key_range(keys)
        self.manifest["shards"].append(entry)
        self.manifest["rows"] = self.manifest.get("rows", 0) + int(entry["rows"])
        self._seq += 1
        record = {"seq": self._seq, "shards": [entry], "created": entry["created"]}
        # One small write (a PUT on object storage, temp + rename locally): the shard's commit point.
        self._listing.write_bytes(journal_rel(self._seq), json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
        self._pending += 1
        if self._pending >= self.journal_fold:
            self._write_manifest()

    def _write_manifest(self) -> None:
        """Rewrite the whole manifest (folding the journal into it: ``journal_seq``), then delete the folded entries.

        A crash between the two leaves entries at or below ``journal_seq``: readers skip them, the next writer
        deletes them."""
        if self.folder is not None and _read_token(self.folder) not in (None, self.run_token):
            raise CacheError(f"{self.path}: another embed run has claimed this cache (run {_read_token(self.folder)}); "
                             "this run stops writing its manifest")
        self.manifest["journal_seq"] = self._seq
        self.manifest["updated"] = _now()
        self.manifest["rows"] = sum(s["rows"] for s in self.manifest["shards"])
        data = json.dumps(self.manifest, indent=1, sort_keys=True, ensure_ascii=False).encode()
        self._listing.write_bytes(MANIFEST_NAME, data)  # one PUT; locally temp + rename
        self.manifest_writes += 1
        self._pending = 0
        for seq in journal_seqs(self._listing):
            if seq <= self._seq:
                self._listing.delete(journal_rel(seq))

    def quarantine(self, names: Iterable[str]) -> list[str]:
        """Unlist shards (e.g. those :meth:`CacheStore.verify` named) and rename them ``*.corrupt``.

        Their keys are then missing, so the next run computes them again.
        """
        names = set(names)
        moved = []
        keep = []
        for entry in self.manifest["shards"]:
            if entry["name"] in names and self.folder is not None:
                rel = f"{SHARDS_DIR}/{entry['name']}"
                if self.folder.exists(rel):  # no rename on S3: copy, then delete
                    self.folder.copy(rel, rel + CORRUPT_SUFFIX)
                    self.folder.delete(rel)
                moved.append(entry["name"])
            elif entry["name"] in names:
                path = self.path / SHARDS_DIR / entry["name"]
                if path.exists():
                    os.replace(path, path.with_name(path.name + CORRUPT_SUFFIX))
                moved.append(entry["name"])
            else:
                keep.append(entry)
        self.manifest["shards"] = keep
        self._write_manifest()
        return moved


def _unit_of(name: str) -> str:
    """``part-<stamp>-<unit>`` of a shard name, without the suffix a retried task's copy gets (``-<8 hex>``)."""
    return "-".join(name.removesuffix(".parquet").split("-")[:3])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def clean_cache(path: str, grace_s: float = DEFAULT_GRACE_S, storage: S3Settings | None = None) -> list[str]:
    """Delete the objects of an ``s3://`` cache directory that its manifest does not list; returns their paths.

    Kept: the manifest and its journal, the run token, the run record, listed shards and quarantined ``*.corrupt``
    shards (for a person to look at). Everything else (shards a killed run never listed) goes once older than ``grace_s``: a
    running writer's next shard is unlisted until it is published. Local caches adopt such shards instead.
    """
    if not is_remote(path):
        raise StorageError(f"clean_cache is for s3:// caches; {str(path)!r} is local (the next writer adopts "
                           "unlisted shards there)")
    folder = open_folder(path, storage)
    manifest = read_manifest(folder)
    if manifest is None:
        raise CacheError(f"{folder.url}: not an embedding cache (no {MANIFEST_NAME}); nothing to clean")
    from omnidiff.tracking import RUN_RECORD  # which MLflow run wrote the cache: kept as well

    listed = {MANIFEST_NAME, TOKEN_NAME, RUN_RECORD, *(f"{SHARDS_DIR}/{s['name']}" for s in manifest["shards"])}
    listed.update(o.rel for o in folder.list(JOURNAL_DIR))  # the writer folds and deletes its own entries
    listed.update(o.rel for o in folder.list(SHARDS_DIR) if o.rel.endswith(CORRUPT_SUFFIX))
    return clean(folder, listed, grace_s)


@contextlib.contextmanager
def open_writer(path: str | Path, inputs: dict[str, Any], storage: S3Settings | None = None):
    """``with open_writer(dir, inputs) as writer:`` (lock held inside; no lock on object storage)."""
    writer = CacheWriter(path, inputs, storage).open()
    try:
        yield writer
    except BaseException:
        writer.close(fold=False)
        raise
    writer.close()
