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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from omnidiff.contracts.io import atomic_write, pid_alive, sha256_file
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

    def __init__(self, name: str, root: Path | None = None):
        self.name = name
        self.name_dir = (root or snapshots_root()) / name
        self.name_dir.mkdir(parents=True, exist_ok=True)
        _remove_dead_staging(self.name_dir)
        self.staging = self.name_dir / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for table in TABLES:
            (self.staging / table).mkdir(parents=True)
        self.shards: dict[str, list[dict]] = {table: [] for table in TABLES}

    def write_shard(self, table_name: str, table: pa.Table) -> dict:
        """Write ``table`` as the next shard of ``table_name`` (temp name, then rename)."""
        index = len(self.shards[table_name])
        rel = f"{table_name}/part-{index:05d}.parquet"
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

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


class Snapshot:
    """A finished pair snapshot folder; :meth:`open` checks the manifest and every shard's checksum."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Snapshot:
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise SnapshotError(f"{str(path)!r} is not a pair snapshot (no manifest.json)")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"{str(manifest_path)!r} is corrupt: {exc}") from None
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise SnapshotError(f"{str(manifest_path)!r}: schema_version={manifest.get('schema_version')!r}, "
                                f"this code reads {SCHEMA_VERSION}")
        if content_digest(manifest["shards"]) != manifest["digest"]:
            raise SnapshotError(f"{str(manifest_path)!r}: the digest does not match its shard list (edited?)")
        snap = cls(path, manifest)
        if verify:
            snap.verify()
        return snap

    def verify(self) -> None:
        """Every shard exists with its recorded sha256; a SnapshotError names the first bad one."""
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

    def shard_paths(self, table: str = "pairs") -> list[Path]:
        if table not in TABLES:
            raise ValueError(f"table={table!r}: one of {TABLES}")
        return [self.path / s["path"] for s in self.manifest["shards"].get(table, [])]

    def _read(self, table: str, columns: list[str] | None) -> pa.Table:
        paths = self.shard_paths(table)
        if not paths:
            raise SnapshotError(f"snapshot {str(self.path)!r} has no {table} shards")
        return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths])

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


def latest_snapshot(name: str, root: Path | None = None) -> Path:
    """Folder of the newest snapshot called ``name`` (from ``<name>/LATEST``)."""
    name_dir = (root or snapshots_root()) / name
    latest = name_dir / "LATEST"
    if not latest.is_file():
        raise SnapshotError(f"no snapshot named {name!r} yet ({str(latest)!r} is missing); run `omnidiff collect`")
    path = name_dir / latest.read_text().strip()
    if not path.is_dir():
        raise SnapshotError(f"{str(latest)!r} points at {path.name}, which does not exist")
    return path
