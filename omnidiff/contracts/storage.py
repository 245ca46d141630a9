"""Where artifacts live: a local folder or a prefix on S3-compatible object storage (issue 17).

    folder = open_folder("s3://bucket/omnidiff/data/snapshots")      # or a local path, unchanged
    folder.write_bytes("tiny/LATEST", b"...")                          # one PUT: all or nothing
    folder.read_bytes("tiny/LATEST"); folder.list("tiny"); folder.delete("tiny/x")

A location is a local path or an ``s3://bucket/prefix`` URL; :func:`open_folder` turns it into a
:class:`Folder` (a ``pyarrow.fs`` filesystem + the path inside it). The endpoint and the credentials come
from :class:`S3Settings` (a config section) where set, else from the standard AWS environment
variables: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.

S3 has no rename, so publishing is done with a manifest written last (docs/architecture.md, "Storage"):
every data object is written first, each by one PUT (an object is either absent or complete), then the
manifest object that lists them. The manifest is the commit point: readers open only what a manifest
lists, so a crashed writer's objects are never read; :func:`clean` deletes such unlisted objects once
they are older than a grace period (a live writer's objects are unlisted too until its manifest lands).
Local folders keep their own protocol (temp file + rename) and are not changed by this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field, PlainSerializer, PlainValidator, SecretStr

from omnidiff.config import ConfigModel
from omnidiff.contracts.io import atomic_write

S3_SCHEME = "s3://"
DEFAULT_REGION = "us-east-1"
DEFAULT_GRACE_S = 24 * 3600.0  # longer than any writer takes between its first object and its manifest
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
READ_ATTEMPTS = 20  # reads of an object that keeps changing under them before read_bytes gives up


class StorageError(RuntimeError):
    """A location cannot be used (bad URL, endpoint unreachable, access refused); the message names it."""


class S3Settings(ConfigModel):
    """Endpoint and credentials of an S3-compatible store; a field left ``None`` comes from the AWS env vars.

    Prefer the environment (or the provider's own credential chain) for the secret: a config is logged.
    """

    endpoint_url: str | None = Field(None, pattern=r"^https?://[^/\s]+/?$")  # e.g. http://127.0.0.1:8333
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=20)

    def resolved(self, environ: Mapping[str, str] | None = None) -> ResolvedS3:
        """These settings with the unset ones filled from the AWS environment variables."""
        env = os.environ if environ is None else environ

        def secret(value: SecretStr | None, var: str) -> str | None:
            return value.get_secret_value() if value is not None else (env.get(var) or None)

        endpoint = self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        source = "config" if self.endpoint_url else ("environment" if endpoint else "default")
        return ResolvedS3(
            endpoint_url=endpoint,
            endpoint_source=source,
            region=self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
            access_key_id=self.access_key_id or env.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=secret(self.secret_access_key, "AWS_SECRET_ACCESS_KEY"),
            session_token=secret(self.session_token, "AWS_SESSION_TOKEN"),
            connect_timeout_s=self.connect_timeout_s,
            request_timeout_s=self.request_timeout_s,
            max_attempts=self.max_attempts,
        )


    def pinned(self, environ: Mapping[str, str] | None = None) -> S3Settings:
        """These settings with every unset field filled from the environment *now*.

        What the driver hands its Ray actors and training ranks (inside their pickled job, never in a
        runtime env or a log line): a worker then reaches the same store with the same credentials
        whatever environment its node's Ray was started with.
        """
        r = self.resolved(environ)
        return S3Settings(
            endpoint_url=r.endpoint_url, region=r.region, access_key_id=r.access_key_id,
            secret_access_key=SecretStr(r.secret_access_key) if r.secret_access_key else None,
            session_token=SecretStr(r.session_token) if r.session_token else None,
            connect_timeout_s=self.connect_timeout_s, request_timeout_s=self.request_timeout_s,
            max_attempts=self.max_attempts,
        )


def _location(value: object) -> str | Path:
    """A config value that names where an artifact lives: an ``s3://bucket/prefix`` URL (kept as a string,
    checked) or a local path (a :class:`Path`); any other URL scheme is refused with the reason."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a local path or an s3://bucket/prefix URL")
    if is_remote(value):
        try:
            split_s3_url(value)
        except StorageError as exc:
            raise ValueError(str(exc)) from None
        return value.rstrip("/")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
        raise ValueError(f"{value!r}: only local paths and s3:// URLs are supported")
    return Path(value)


# A config field that may name a local path or an s3:// prefix (an s3:// URL would not survive as a Path:
# Path("s3://b/x") is "s3:/b/x").
Location = Annotated[
    Path | str,
    PlainValidator(_location, json_schema_input_type=str),
    PlainSerializer(str, return_type=str),
]


class StorageSection(ConfigModel):
    """``storage:`` of a stage config: where its artifacts live by default, and how to reach object storage.

    root: ``s3://bucket/prefix`` (or a local folder): the stage's snapshots, caches, checkpoints and exports
      go under it, in ``$OMNIDIFF_HOME``'s layout (``data/snapshots/``, ``cache/``, ``checkpoints/<name>/``,
      ``exports/<name>/``) unless a field of their own names another place; ``null`` = ``$OMNIDIFF_HOME``.
    s3: endpoint and credentials (:class:`S3Settings`); unset fields come from the AWS environment
      variables. A secret written here is never printed or logged (it is dropped from the logged config:
      give it through the environment when a config travels, e.g. as a Prefect parameter).
    """

    root: Location | None = None
    s3: S3Settings = Field(default_factory=S3Settings)

    def under(self, explicit: str | Path | None, *parts: str) -> str | Path | None:
        """``explicit`` when set, else ``<root>/<parts>`` when a root is set, else None (the caller's default)."""
        if explicit is not None:
            return explicit
        return join_location(self.root, *parts) if self.root is not None else None

    @property
    def remote(self) -> bool:
        return self.root is not None and is_remote(self.root)


@dataclass(frozen=True)
class ResolvedS3:
    """:class:`S3Settings` after the environment filled the gaps (hashable: one filesystem per value)."""

    endpoint_url: str | None
    endpoint_source: str
    region: str
    access_key_id: str | None
    secret_access_key: str | None
    session_token: str | None
    connect_timeout_s: float
    request_timeout_s: float
    max_attempts: int

    def describe(self) -> str:
        """For error messages: where requests go and with which key id (never the secret)."""
        where = self.endpoint_url or "the AWS default endpoint"
        key = self.access_key_id or "no key id (the default credential chain)"
        return f"endpoint {where} (from {self.endpoint_source}), region {self.region}, key id {key}"


_FILESYSTEMS: dict[ResolvedS3, pafs.S3FileSystem] = {}
_FILESYSTEMS_LOCK = threading.Lock()


def s3_filesystem(settings: ResolvedS3) -> pafs.S3FileSystem:
    """One ``pyarrow.fs.S3FileSystem`` per resolved settings (made once: it holds a connection pool)."""
    with _FILESYSTEMS_LOCK:
        fs = _FILESYSTEMS.get(settings)
        if fs is None:
            kwargs: dict = {}
            if settings.access_key_id and settings.secret_access_key:
                kwargs.update(access_key=settings.access_key_id, secret_key=settings.secret_access_key,
                              session_token=settings.session_token)
            fs = pafs.S3FileSystem(
                endpoint_override=settings.endpoint_url,
                region=settings.region,
                connect_timeout=settings.connect_timeout_s,
                request_timeout=settings.request_timeout_s,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
                **kwargs,
            )
            _FILESYSTEMS[settings] = fs
        return fs


def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` is an ``s3://`` URL (anything else is a local path)."""
    return isinstance(location, str) and location.startswith(S3_SCHEME)


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``); a clear error for a malformed URL."""
    if not is_remote(url):
        raise StorageError(f"{url!r} is not an s3:// URL")
    bucket, _, key = url[len(S3_SCHEME):].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise StorageError(f"{url!r}: bucket name {bucket!r} is not valid (3-63 characters: a-z, 0-9, '.', '-')")
    key = key.strip("/")
    if any(part in ("", ".", "..") for part in key.split("/")) and key:
        raise StorageError(f"{url!r}: the key has an empty, '.' or '..' part")
    return bucket, key


def join_location(location: str | os.PathLike, *parts: str) -> str | Path:
    """``location`` / parts: a URL stays a string URL, a local path a :class:`Path`."""
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts if p)])
    return Path(location).joinpath(*parts)


def location_name(location: str | os.PathLike) -> str:
    """The last part of a path or URL (``s3://b/cache/llm/abc`` -> ``abc``)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_remote(location) else Path(location).name


@dataclass(frozen=True)
class ObjectInfo:
    rel: str  # relative to the folder, '/'-separated
    size: int
    mtime: dt.datetime | None


class Folder:
    """A folder of objects on a ``pyarrow.fs`` filesystem: a local directory or an S3 prefix.

    Paths given to the methods are relative, ``/``-separated. Every filesystem error becomes a
    :class:`StorageError` naming the URL and, for S3, the endpoint and key id in use.
    """

    def __init__(self, location: str | os.PathLike, settings: S3Settings | None = None):
        if is_remote(location):
            bucket, key = split_s3_url(str(location))
            self.s3 = (settings or S3Settings()).resolved()
            self.fs: pafs.FileSystem = s3_filesystem(self.s3)
            self.root = f"{bucket}/{key}" if key else bucket
            self.url = f"{S3_SCHEME}{self.root}"
            self.local: Path | None = None
        else:
            self.s3 = None
            self.local = Path(location)
            self.fs = pafs.LocalFileSystem()
            self.root = str(self.local.absolute())
            self.url = str(location)
        self._settings = settings

    @property
    def remote(self) -> bool:
        return self.local is None

    @property
    def name(self) -> str:
        return location_name(self.url)

    def child(self, *parts: str) -> Folder:
        return Folder(join_location(self.url if self.remote else self.local, *parts), self._settings)

    def path(self, rel: str = "") -> str:
        """The path inside the filesystem (what pyarrow calls take)."""
        return "/".join([self.root, rel.strip("/")]) if rel else self.root

    def url_of(self, rel: str = "") -> str:
        return "/".join([self.url.rstrip("/"), rel.strip("/")]) if rel else self.url

    def _error(self, what: str, rel: str, exc: Exception) -> StorageError:
        where = f" ({self.s3.describe()})" if self.s3 is not None else ""
        return StorageError(f"cannot {what} {self.url_of(rel)!r}{where}: {exc}")

    def _call(self, what: str, rel: str, fn: Callable):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as exc:
            raise self._error(what, rel, exc) from None

    # -- reading
    def info(self, rel: str) -> ObjectInfo | None:
        """Size and time of one object, or None when it does not exist."""
        info = self._call("look up", rel, lambda: self.fs.get_file_info(self.path(rel)))
        if info.type != pafs.FileType.File:
            return None
        return ObjectInfo(rel, info.size or 0, info.mtime)

    def exists(self, rel: str) -> bool:
        return self.info(rel) is not None

    def read_bytes(self, rel: str) -> bytes:
        """The object's bytes, whole from one version; FileNotFoundError (naming the URL) when it does not exist.

        On S3 a read is a HEAD (the size) then ranged GETs: an object replaced between them (a manifest is
        rewritten at every journal fold) reads as the first bytes of the new version, a torn object. So a read
        whose length, or the object's size or time before and after it, disagree is read again.
        """
        for _ in range(READ_ATTEMPTS):
            before = self.info(rel)
            if before is None:
                raise FileNotFoundError(f"{self.url_of(rel)} does not exist")
            data = self._call("read", rel, lambda: self._read_all(rel))
            after = self.info(rel)
            if after is not None and len(data) == before.size == after.size and after.mtime == before.mtime:
                return data
        raise self._error("read", rel, OSError(f"the object changed while being read, {READ_ATTEMPTS} times in a row"))

    def _read_all(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return fh.read()

    def sha256(self, rel: str) -> str:
        """SHA-256 of the object, streamed in 8 MiB reads."""

        def digest() -> str:
            h = hashlib.sha256()
            with self.fs.open_input_stream(self.path(rel)) as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
            return h.hexdigest()

        return self._call("read", rel, digest)

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """A Parquet object as an Arrow table (only ``columns`` when given)."""
        return self._call("read", rel, lambda: pq.read_table(self.path(rel), columns=columns, filesystem=self.fs))

    def list(self, rel: str = "") -> list[ObjectInfo]:
        """Every object under ``rel`` (recursive), sorted by relative path; [] when there is none."""
        base = self.path(rel)
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = self._call("list", rel, lambda: self.fs.get_file_info(selector))
        out = []
        for info in infos:
            if info.type == pafs.FileType.File:
                out.append(ObjectInfo(info.path[len(self.root):].lstrip("/"), info.size or 0, info.mtime))
        return sorted(out, key=lambda o: o.rel)

    # -- writing
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Publish one object: one PUT on S3 (readers see all of it or none), temp + rename locally."""
        if not self.remote:
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data)
            return

        def put() -> None:
            with self.fs.open_output_stream(self.path(rel)) as fh:
                fh.write(data)

        self._call("write", rel, put)

    def download(self, rel: str, target: Path, chunk: int = 8 << 20) -> None:
        """Stream the object to the local file ``target`` (written under a temp name, then renamed)."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part-{os.getpid()}")

        def get() -> None:
            with self.fs.open_input_stream(self.path(rel)) as src, tmp.open("wb") as dst:
                while data := src.read(chunk):
                    dst.write(data)

        try:
            if self.info(rel) is None:
                raise FileNotFoundError(f"{self.url_of(rel)} does not exist")
            self._call("download", rel, get)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def upload(self, source: Path, rel: str, chunk: int = 8 << 20) -> None:
        """Publish the local file ``source`` as one object (a single PUT, or a multipart upload that the
        store shows only once complete; locally temp + rename)."""
        if not self.remote:
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
            return

        def put() -> None:
            with Path(source).open("rb") as src, self.fs.open_output_stream(self.path(rel)) as dst:
                while data := src.read(chunk):
                    dst.write(data)

        self._call("write", rel, put)

    def copy(self, src_rel: str, dst_rel: str) -> None:
        """Copy one object (a server-side copy on S3)."""
        self._call("copy to", dst_rel, lambda: self.fs.copy_file(self.path(src_rel), self.path(dst_rel)))

    def delete(self, rel: str) -> None:
        """Delete one object; a missing one is no error."""
        try:
            self._call("delete", rel, lambda: self.fs.delete_file(self.path(rel)))
        except FileNotFoundError:
            pass

    def ensure(self) -> None:
        """Make sure the location can be used: the bucket answers (S3) or the folder exists (local)."""
        if not self.remote:
            self.local.mkdir(parents=True, exist_ok=True)
            return
        bucket = self.root.split("/", 1)[0]
        info = self._call("reach the bucket of", "", lambda: self.fs.get_file_info(bucket))
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"bucket {bucket!r} of {self.url!r} does not exist ({self.s3.describe()})")

    def __repr__(self) -> str:
        return f"Folder({self.url!r})"


def open_folder(location: str | os.PathLike, settings: S3Settings | None = None) -> Folder:
    """A :class:`Folder` for a local path or an ``s3://bucket/prefix`` URL."""
    return Folder(location, settings)


def encode_parquet(table: pa.Table, **write_options) -> bytes:
    """``table`` as Parquet bytes (the same bytes ``pq.write_table`` puts in a file with those options)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, **write_options)
    return buf.getvalue()


def clean(folder: Folder, listed: Iterable[str], grace_s: float = DEFAULT_GRACE_S,
          now: dt.datetime | None = None, under: str = "") -> list[str]:
    """Delete objects under ``under`` that no manifest lists (``listed``) and that are older than ``grace_s``.

    These are what crashed writers left: readers never open them. A writer still running has
    unlisted objects too, so only those older than the grace period go. Returns the deleted paths.
    """
    keep = set(listed)
    now = now or dt.datetime.now(dt.UTC)
    deleted = []
    for obj in folder.list(under):
        if obj.rel in keep:
            continue
        mtime = obj.mtime if obj.mtime is None or obj.mtime.tzinfo else obj.mtime.replace(tzinfo=dt.UTC)
        if mtime is not None and (now - mtime).total_seconds() < grace_s:
            continue
        folder.delete(obj.rel)
        deleted.append(obj.rel)
    return deleted


FOLDER_MANIFEST = "folder_manifest.json"  # a published folder's commit point (exports on object storage)


def publish_folder(local: Path, folder: Folder, manifest_name: str = FOLDER_MANIFEST) -> dict:
    """Upload every file of the local folder ``local`` to ``folder``, then its manifest, last.

    The manifest lists each file's relative path, size and sha256, and a ``digest`` over that list (the
    folder's identity: :func:`fetch_folder` caches by it). Objects of an older publish that the new
    manifest does not list are deleted after the manifest is written. Returns the manifest.
    """
    from omnidiff.contracts.io import sha256_file

    local = Path(local)
    files = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        if rel == manifest_name:
            continue
        folder.upload(path, rel)
        files.append({"path": rel, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    listing = "\n".join(f"{f['path']}\t{f['bytes']}\t{f['sha256']}" for f in files)
    manifest = {"files": files, "digest": hashlib.sha256(listing.encode()).hexdigest(),
                "published": dt.datetime.now(dt.UTC).isoformat()}
    folder.write_bytes(manifest_name, json.dumps(manifest, indent=1).encode())  # the commit point
    listed = {f["path"] for f in files} | {manifest_name}
    for obj in folder.list():
        if obj.rel not in listed:
            folder.delete(obj.rel)
    return manifest


def fetch_folder(folder: Folder, cache_root: Path, manifest_name: str = FOLDER_MANIFEST) -> Path:
    """A local copy of a folder :func:`publish_folder` wrote: ``<cache_root>/<digest16>/``, downloaded once.

    Only listed files are read, each checked against its sha256; the copy is assembled under a temp name
    and renamed, so a half-downloaded folder is never used. A folder without a manifest is refused.
    """
    from omnidiff.contracts.io import sha256_file

    try:
        manifest = json.loads(folder.read_bytes(manifest_name))
    except FileNotFoundError:
        raise StorageError(f"{folder.url!r}: no {manifest_name} (not a published folder, or its writer did not "
                           "finish)") from None
    target = Path(cache_root) / manifest["digest"][:16]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for entry in manifest["files"]:
            folder.download(entry["path"], staging / entry["path"])
            if sha256_file(staging / entry["path"]) != entry["sha256"]:
                raise StorageError(f"{folder.url_of(entry['path'])!r}: sha256 differs from {manifest_name}")
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():  # lost a race with another process: its copy is as good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
