"""Small file helpers the contracts share: SHA-256, one atomic write, a file lock, a pid check.

Every file a reader may look at while it is written goes through :func:`atomic_write`: a reader
sees the old content or the new one, never half of it, and a crash leaves at most a temp file
(named ``.tmp-*``, which writers clean up).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import filelock

TMP_PREFIX = ".tmp-"


def sha256_bytes(data: bytes) -> str:
    """SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes (streamed)."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: str | Path) -> Path:
    """A unique ``.tmp-<name>-<id>`` next to ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write(path: str | Path, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Write ``data`` (bytes, or text in ``encoding``) to ``path`` via a fsynced temp file + rename.

    Readers see the old content or the new, never half; the folder is fsynced so the rename survives
    a crash.
    """
    path = Path(path)
    tmp = temp_path(path)
    payload = data.encode(encoding) if isinstance(data, str) else data
    try:
        with tmp.open("wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def file_lock(path: str | Path, timeout: float = -1) -> filelock.FileLock:
    """An exclusive lock on ``path`` (``flock`` through the filelock library).

    ``timeout=0`` fails at once with :class:`filelock.Timeout` when another process (or another lock
    object in this one) holds it; ``-1`` waits.
    """
    return filelock.FileLock(str(path), timeout=timeout)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (signal 0; another user's process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
