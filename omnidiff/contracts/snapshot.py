"""The pair snapshot: the collect stage's output and the embed and train stages' input (architecture.md).

    $OMNIDIFF_HOME/data/snapshots/<name>/<digest16>/
        pairs/part-00000.parquet       key, caption, caption_en, lang, ..., image, aesthetic, split, extras
        parallel/part-00000.parquet    key, text, text_en, lang, split, ...   (text-only pairs, stage 1)
        quarantine/part-00000.parquet  table, reason, detail, source, row_index, ... (every rejected row)
        manifest.json                  schema_version, digest, sources (sha256), counts, shards (rows, sha256)
    $OMNIDIFF_HOME/data/snapshots/<name>/LATEST   the newest digest16

Reading:

    snap = Snapshot.open(latest_snapshot("tiny"))      # verifies every shard's sha256
    snap.digest, snap.manifest["counts"]["pairs"]["by_language"]
    table = snap.pairs(columns=["key", "caption", "lang"])

Writing is atomic at two levels: each shard is written to a temporary name and
renamed, and the whole snapshot is staged in a hidden folder and renamed to its
digest when complete. A reader never sees half a shard or half a snapshot, and
writing the same content twice lands in the same folder (the digest is over the
content only: shard names, row counts and sha256s, and the schema version).

On object storage (``root="s3://bucket/prefix"``, omnidiff/contracts/storage.py) there is no rename:
shards are PUT under ``<name>/.staging-<id>/``, copied (server-side) into ``<name>/<digest16>/`` at
:meth:`SnapshotWriter.finish`, and ``manifest.json`` is written last: it is the commit point. A
reader opens a snapshot only through its manifest and reads only the shards it lists, so a killed
writer's objects are never read; :func:`clean_snapshots` deletes them after a grace period. The
same content gives the same digest and the same bytes locally and on S3.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from omnidiff.contracts.io import atomic_write, pid_alive, sha256_file
from omnidiff.contracts.storage import (
    DEFAULT_GRACE_S,
    Folder,
    S3Settings,
    StorageError,
    clean,
    encode_parquet,
    is_remote,
    join_location,
    open_folder,
)
from omnidiff.env import subdir

SCHEMA_VERSION = 1
TABLES = ("pairs", "parallel", "quarantine")


class SnapshotError(RuntimeError):
    """A snapshot is missing, incomplete or corrupt; the message names the file."""


def snapshots_root() -> Path:
    return subdir("data", "snapshots")


def content_digest(shards: dict[str, list[dict]]) -> str:
    """sha256 over (schema version, every shard's relative path, rows and sha256) in sorted order."""
    lines = [f"schema_version\t{SCHEMA_VERSION}"]
    for table in sorted(shards):
        for shard in sorted(shards[table], key=lambda s: s["path"]):
            lines.append(f"{shard['path']}\t{shard['rows']}\t{shard['sha256']}")
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _remove_dead_staging(name_dir: Path) -> None:
    """Staging folders left by killed writers (``.staging-<pid>-<id>`` whose pid is gone)."""
    for d in name_dir.glob(".staging-*"):
        try:
            pid = int(d.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


class SnapshotWriter:
    """Stage shards in a hidden folder next to the final one; :meth:`finish` renames it to its digest."""

    def __init__(self, name: str, root: str | Path | None = None, storage: S3Settings | None = None):
        self.name = name
        self.shards: dict[str, list[dict]] = {table: [] for table in TABLES}
        if root is not None and is_remote(root):
            # Object storage: shards go under a staging prefix; finish() copies them and writes the manifest last.
            self.folder: Folder | None = open_folder(join_location(root, name), storage)
            self.folder.ensure()
            self.name_dir = self.folder.url
            self.staging = f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            return
        self.folder = None
        self.name_dir = Path(root or snapshots_root()) / name
        self.name_dir.mkdir(parents=True, exist_ok=True)
        _remove_dead_staging(self.name_dir)
        self.staging = self.name_dir / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for table in TABLES:
            (self.staging / table).mkdir(parents=True)

    def write_shard(self, table_name: str, table: pa.Table) -> dict:
        """Write ``table`` as the next shard of ``table_name`` (temp name, then rename; one PUT on S3)."""
        index = len(self.shards[table_name])
        rel = f"{table_name}/part-{index:05d}.parquet"
        if self.folder is not None:
            data = encode_parquet(table, compression="zstd")
            self.folder.write_bytes(f"{self.staging}/{rel}", data)
            shard = {"path": rel, "rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest()}
            self.shards[table_name].append(shard)
            return shard
        final = self.staging / rel
        tmp = final.with_name(f".{final.name}.tmp")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)
        shard = {"path": rel, "rows": table.num_rows, "sha256": sha256_file(final)}
        self.shards[table_name].append(shard)
        return shard

    def finish(self, manifest: dict) -> Path:
        """Write manifest.json (``manifest`` + schema_version, digest, shards), move into place, update LATEST."""
        digest = content_digest(self.shards)
        full = {"schema_version": SCHEMA_VERSION, "name": self.name, "digest": digest, **manifest,
                "shards": self.shards}
        if self.folder is not None:
            return self._finish_remote(digest, full)
        atomic_write(self.staging / "manifest.json", json.dumps(full, indent=2, ensure_ascii=False) + "\n")
        final = self.name_dir / digest[:16]
        if final.exists():
            # The same content was written before (a rerun): keep the existing folder if it is intact.
            try:
                Snapshot.open(final)
                shutil.rmtree(self.staging)
            except SnapshotError:
                broken = self.name_dir / f".broken-{digest[:16]}-{uuid.uuid4().hex[:8]}"
                os.replace(final, broken)
                os.replace(self.staging, final)
                shutil.rmtree(broken, ignore_errors=True)
        else:
            os.replace(self.staging, final)
        atomic_write(self.name_dir / "LATEST", digest[:16] + "\n")
        return final

    def _finish_remote(self, digest: str, full: dict) -> str:
        """Copy the staged shards into ``<digest16>/``, then the manifest (the commit point), then LATEST."""
        folder, final = self.folder, digest[:16]
        try:
            Snapshot.open(folder.url_of(final), storage=None, folder=folder.child(final))
            intact = True  # the same content was published before (a rerun)
        except SnapshotError:
            intact = False
        if not intact:
            for table in TABLES:
                for shard in self.shards[table]:
                    folder.copy(f"{self.staging}/{shard['path']}", f"{final}/{shard['path']}")
            folder.write_bytes(f"{final}/manifest.json",
                               (json.dumps(full, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        folder.write_bytes("LATEST", (digest[:16] + "\n").encode())
        self.abort()
        return folder.url_of(final)

    def abort(self) -> None:
        if self.folder is not None:
            for obj in self.folder.list(self.staging):
                self.folder.delete(obj.rel)
            return
        shutil.rmtree(self.staging, ignore_errors=True)


class Snapshot:
    """A finished pair snapshot folder; :meth:`open` checks the manifest and every shard's checksum."""

    def __init__(self, path: Path | str, manifest: dict, folder: Folder | None = None):
        self.path = path  # a Path, or an s3:// URL string for a snapshot on object storage
        self.manifest = manifest
        self.folder = folder

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, storage: S3Settings | None = None,
             folder: Folder | None = None) -> Snapshot:
        if folder is not None or is_remote(path):
            return cls._open_remote(folder or open_folder(path, storage), verify)
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise SnapshotError(f"{str(path)!r} is not a pair snapshot (no manifest.json)")
        return cls._from_manifest(path, manifest_path.read_bytes(), str(manifest_path), verify)

    @classmethod
    def _open_remote(cls, folder: Folder, verify: bool) -> Snapshot:
        """The manifest is the commit point: no manifest object, no snapshot, whatever else is there."""
        try:
            data = folder.read_bytes("manifest.json")
        except FileNotFoundError:
            raise SnapshotError(f"{folder.url!r} is not a pair snapshot (no manifest.json)") from None
        return cls._from_manifest(folder.url, data, folder.url_of("manifest.json"), verify, folder)

    @classmethod
    def _from_manifest(cls, path: Path | str, data: bytes, where: str, verify: bool,
                       folder: Folder | None = None) -> Snapshot:
        """The snapshot whose manifest.json holds ``data`` (read from ``where``, named in errors): a SnapshotError
        when it is not JSON, has another schema_version or a digest that does not match its shard list."""
        try:
            manifest = json.loads(data.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"{where!r} is corrupt: {exc}") from None
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise SnapshotError(f"{where!r}: schema_version={manifest.get('schema_version')!r}, "
                                f"this code reads {SCHEMA_VERSION}")
        if content_digest(manifest["shards"]) != manifest["digest"]:
            raise SnapshotError(f"{where!r}: the digest does not match its shard list (edited?)")
        snap = cls(path, manifest, folder)
        if verify:
            snap.verify()
        return snap

    def verify(self) -> None:
        """Every shard exists with its recorded sha256; a SnapshotError names the first bad one."""
        if self.folder is not None:
            for table in TABLES:
                for shard in self.manifest["shards"].get(table, []):
                    if not self.folder.exists(shard["path"]):
                        raise SnapshotError(f"snapshot {self.path!r}: shard {shard['path']} is missing")
                    actual = self.folder.sha256(shard["path"])
                    if actual != shard["sha256"]:
                        raise SnapshotError(f"snapshot {self.path!r}: shard {shard['path']} is corrupt "
                                            f"(sha256 {actual[:12]}..., manifest says {shard['sha256'][:12]}...)")
            return
        for table in TABLES:
            for shard in self.manifest["shards"].get(table, []):
                file = self.path / shard["path"]
                if not file.is_file():
                    raise SnapshotError(f"snapshot {str(self.path)!r}: shard {shard['path']} is missing")
                actual = sha256_file(file)
                if actual != shard["sha256"]:
                    raise SnapshotError(f"snapshot {str(self.path)!r}: shard {shard['path']} is corrupt "
                                        f"(sha256 {actual[:12]}..., manifest says {shard['sha256'][:12]}...)")

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def counts(self) -> dict:
        return self.manifest["counts"]

    def shard_paths(self, table: str = "pairs") -> list[Path] | list[str]:
        """The listed shards of ``table``: paths, or ``s3://`` URLs on object storage."""
        if table not in TABLES:
            raise ValueError(f"table={table!r}: one of {TABLES}")
        if self.folder is not None:
            return [self.folder.url_of(s["path"]) for s in self.manifest["shards"].get(table, [])]
        return [self.path / s["path"] for s in self.manifest["shards"].get(table, [])]

    def iter_shards(self, table: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Each listed shard of ``table`` (``columns`` only), in manifest order, one read at a time."""
        paths = self.shard_paths(table)
        if not paths:
            raise SnapshotError(f"snapshot {str(self.path)!r} has no {table} shards")
        if self.folder is not None:
            for shard in self.manifest["shards"][table]:
                yield self.folder.read_parquet(shard["path"], columns)
        else:
            for path in paths:
                yield pq.read_table(path, columns=columns)

    def _read(self, table: str, columns: list[str] | None) -> pa.Table:
        return pa.concat_tables(list(self.iter_shards(table, columns)))

    def pairs(self, columns: list[str] | None = None) -> pa.Table:
        """The kept image-caption pairs (``columns`` to skip the image bytes)."""
        return self._read("pairs", columns)

    def parallel(self, columns: list[str] | None = None) -> pa.Table:
        """The text-only parallel pairs (text in language X + English)."""
        return self._read("parallel", columns)

    def quarantine(self, columns: list[str] | None = None) -> pa.Table:
        """Every rejected input row with its reason."""
        return self._read("quarantine", columns)

    def __repr__(self) -> str:
        return f"Snapshot({str(self.path)!r}, digest={self.digest[:16]})"


def latest_snapshot(name: str, root: str | Path | None = None, storage: S3Settings | None = None) -> Path | str:
    """Folder of the newest snapshot called ``name`` (from ``<name>/LATEST``); a URL on object storage."""
    if root is not None and is_remote(root):
        folder = open_folder(join_location(root, name), storage)
        try:
            digest16 = folder.read_bytes("LATEST").decode().strip()
        except FileNotFoundError:
            raise SnapshotError(f"no snapshot named {name!r} yet ({folder.url_of('LATEST')!r} is missing); "
                                "run `omnidiff collect`") from None
        if not folder.exists(f"{digest16}/manifest.json"):
            raise SnapshotError(f"{folder.url_of('LATEST')!r} points at {digest16}, which has no manifest.json")
        return folder.url_of(digest16)
    name_dir = (root or snapshots_root()) / name
    latest = name_dir / "LATEST"
    if not latest.is_file():
        raise SnapshotError(f"no snapshot named {name!r} yet ({str(latest)!r} is missing); run `omnidiff collect`")
    path = name_dir / latest.read_text().strip()
    if not path.is_dir():
        raise SnapshotError(f"{str(latest)!r} points at {path.name}, which does not exist")
    return path


def clean_snapshots(name: str, root: str | Path, grace_s: float = DEFAULT_GRACE_S,
                    storage: S3Settings | None = None) -> list[str]:
    """Delete what killed writers left under ``<root>/<name>/`` on object storage; returns the deleted paths.

    Kept: ``LATEST``, every ``<digest16>/manifest.json`` and the shards it lists. Everything else
    (staging prefixes, shards copied before a crash, before the manifest) goes once older than
    ``grace_s``: a writer still running has such objects too. Local folders clean themselves (dead
    staging folders go when the next writer starts), so this is for ``s3://`` roots.
    """
    if not is_remote(root):
        raise StorageError(f"clean_snapshots is for s3:// roots; {str(root)!r} is local (writers clean it)")
    folder = open_folder(join_location(root, name), storage)
    listed = {"LATEST"}
    for obj in folder.list():
        parts = obj.rel.split("/")
        if len(parts) == 2 and parts[1] == "manifest.json" and not parts[0].startswith("."):
            try:
                manifest = json.loads(folder.read_bytes(obj.rel).decode("utf-8"))
                shards = [s["path"] for table in manifest["shards"].values() for s in table]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                continue  # not a manifest this code wrote: its folder is not committed
            listed.add(obj.rel)
            listed.update(f"{parts[0]}/{p}" for p in shards)
    return clean(folder, listed, grace_s)
