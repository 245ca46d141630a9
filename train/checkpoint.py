"""DeepSpeed checkpoints of a training stage: save, find the newest complete one, resume, prune, lock.

A checkpoint folder holds ``step<N>/`` tags (DeepSpeed's files plus our ``omnidiff_meta.json``),
``latest`` (moved only after every rank finished writing), ``workers.json`` (which processes
train it now) and ``.train.lock`` (one training per folder). A resume on another worker count or
ZeRO stage goes through DeepSpeed's universal checkpoint (``ds_to_universal``).

On object storage (``checkpoint.dir: s3://bucket/prefix``, issue 17) there is no rename, so a
checkpoint is published with a manifest written last. DeepSpeed still writes into a local work
folder (:func:`work_dir`: ``$OMNIDIFF_HOME/checkpoint_cache/<sha16 of the URL>/``, one per machine,
a cache that may be deleted between runs); after DeepSpeed's closing barrier the lowest rank of each
machine uploads the files its machine wrote (one PUT, or a multipart upload that appears only when
complete, per file), the ranks gather the lists, and rank 0 PUTs ``<tag>/manifest.json`` (the commit
point: every file with its size) and then ``latest``. A reader trusts a tag only when its manifest
exists, so a rank killed mid-upload leaves objects nobody reads (the next save of that tag overwrites
them; pruned tags are deleted). A resume downloads the tag the remote ``latest`` names into the work
folder (once per machine, each file's size checked against the manifest) and loads it from there.
The lock stays a local file lock: one training per checkpoint URL and machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch

from omnidiff.contracts.io import atomic_write
from omnidiff.contracts.storage import Folder, is_remote

LATEST = "latest"
META_NAME = "omnidiff_meta.json"
UNIVERSAL_SUFFIX = "_universal"
LOCK_NAME = ".train.lock"
WORKERS_NAME = "workers.json"
MANIFEST_NAME = "manifest.json"  # object storage: <tag>/manifest.json, written last, commits the tag


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def work_dir(url: str) -> Path:
    """The local folder DeepSpeed writes into and loads from for the checkpoint prefix ``url`` (a cache)."""
    from omnidiff.env import subdir

    return subdir("checkpoint_cache") / hashlib.sha256(str(url).encode()).hexdigest()[:16]


def local_dir(location: str | Path) -> Path:
    """Where ranks read and write checkpoint files for ``location``: itself, or the work folder of a URL."""
    return work_dir(str(location)) if is_remote(location) else Path(location)


def latest_tag(ckpt_dir: Path, remote: Folder | None = None) -> str | None:
    """The newest *complete* checkpoint tag (we write ``latest`` only after every rank has saved).

    ``remote``: the checkpoint prefix on object storage; a tag counts only once its manifest exists.
    """
    if remote is not None:
        try:
            tag = remote.read_bytes(LATEST).decode().strip()
        except FileNotFoundError:
            return None
        return tag if tag and remote.exists(f"{tag}/{MANIFEST_NAME}") else None
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag / META_NAME).is_file() else None


def read_meta(ckpt_dir: Path, tag: str, remote: Folder | None = None) -> dict:
    if remote is not None:
        return json.loads(remote.read_bytes(f"{tag}/{META_NAME}"))
    return json.loads((Path(ckpt_dir) / tag / META_NAME).read_text())


def _machine_leader(rank: int, world: int) -> bool:
    """Whether this rank is the lowest of its machine (the one that uploads and downloads for it)."""
    if world == 1:
        return True
    hosts: list = [None] * world
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    return hosts.index(hosts[rank]) == rank


def _local_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def publish_dir(local: Path, remote: Folder, prefix: str, rank: int = 0, world: int = 1,
                extra: dict | None = None) -> dict:
    """Upload ``local`` to ``<remote>/<prefix>/`` and commit it with ``<prefix>/manifest.json`` (written last).

    With several ranks, each machine's lowest rank uploads what its machine holds, and rank 0 writes the
    manifest of everything the ranks uploaded. Returns the manifest (on rank 0; ``{}`` elsewhere).
    """
    leader = _machine_leader(rank, world)
    mine = []
    if leader:
        for rel in _local_files(local):
            remote.upload(local / rel, f"{prefix}/{rel}")
            mine.append({"path": rel, "bytes": (local / rel).stat().st_size})
    everyone = [mine]
    if world > 1:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, mine)
    manifest: dict = {}
    if rank == 0:
        files = {f["path"]: f for part in everyone for f in part}
        manifest = {"files": [files[k] for k in sorted(files)], "written": time.time(), **(extra or {})}
        remote.write_bytes(f"{prefix}/{MANIFEST_NAME}", json.dumps(manifest, indent=1).encode())
    return manifest


def fetch_dir(remote: Folder, prefix: str, local: Path, rank: int = 0, world: int = 1) -> Path:
    """The committed ``<remote>/<prefix>/`` in the local folder ``local`` (downloaded once per machine).

    Only what ``<prefix>/manifest.json`` lists is read; a local copy whose files all have the listed
    sizes is kept, anything else there is replaced. Every rank returns after its machine has the copy.
    """
    leader = _machine_leader(rank, world)
    if leader:
        manifest = json.loads(remote.read_bytes(f"{prefix}/{MANIFEST_NAME}"))
        listed = {f["path"]: f["bytes"] for f in manifest["files"]}
        have = {rel: (local / rel).stat().st_size for rel in _local_files(local)} if local.is_dir() else {}
        if have != listed:
            shutil.rmtree(local, ignore_errors=True)
            for rel, size in listed.items():
                remote.download(f"{prefix}/{rel}", local / rel)
                if (local / rel).stat().st_size != size:
                    raise RuntimeError(f"{remote.url_of(prefix + '/' + rel)}: {(local / rel).stat().st_size} bytes, "
                                       f"its manifest says {size}")
    barrier(world)
    return local


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def save_checkpoint(engine, ckpt_dir: Path, step: int, rank: int, world: int, cfg, client_state: dict,
                    remote: Folder | None = None) -> str:
    """DeepSpeed checkpoint of ``step``; ``latest`` moves only after all ranks finished writing.

    ``remote``: also publish it to object storage (module docstring), then move the remote ``latest``.

    DeepSpeed itself writes ``latest`` from rank 0 before the closing barrier, i.e. possibly before
    another rank's ZeRO shard is on disk; a kill in that window would leave ``latest`` naming an
    incomplete checkpoint. So we save with ``save_latest=False`` (its closing barrier then means
    every shard is written) and move ``latest`` ourselves, atomically, with a metadata file beside it.
    """
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    tag = step_tag(step)
    # The marker ds_to_universal looks for: this checkpoint may be converted for another worker count.
    client_state = {**client_state,
                    UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    if remote is not None:  # the work folder may hold a killed run's files of this tag: they must not be published
        if _machine_leader(rank, world):
            shutil.rmtree(Path(ckpt_dir) / tag, ignore_errors=True)
        barrier(world)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if rank == 0:
        meta = {"step": step, "world_size": world, "zero_stage": cfg.dist.zero_stage, "tag": tag,
                "precision": cfg.dist.precision, "saved_at": time.time()}
        atomic_write(Path(ckpt_dir) / tag / META_NAME, json.dumps(meta, indent=1))
        atomic_write(Path(ckpt_dir) / LATEST, tag)
        _prune(Path(ckpt_dir), keep=cfg.checkpoint.keep)
    barrier(world)
    if remote is not None:
        publish_dir(Path(ckpt_dir) / tag, remote, tag, rank, world)
        if rank == 0:
            remote.write_bytes(LATEST, tag.encode())
            _prune_remote(remote, keep=cfg.checkpoint.keep)
        barrier(world)
    return tag


def _prune_remote(remote: Folder, keep: int) -> None:
    """Delete the objects of all but the newest ``keep`` committed tags (and of uncommitted older ones)."""
    tags = sorted({o.rel.split("/", 1)[0] for o in remote.list() if o.rel.startswith("step")})
    plain = [t for t in tags if not t.endswith(UNIVERSAL_SUFFIX)]
    for old in plain[:-keep]:
        for obj in remote.list(old) + remote.list(old + UNIVERSAL_SUFFIX):
            remote.delete(obj.rel)


def _prune(ckpt_dir: Path, keep: int) -> None:
    tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir() and not p.name.endswith(UNIVERSAL_SUFFIX))
    for old in tags[:-keep]:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        shutil.rmtree(ckpt_dir / (old + UNIVERSAL_SUFFIX), ignore_errors=True)


def prepare_resume(ckpt_dir: Path, cfg, rank: int, world: int, remote: Folder | None = None) -> tuple[str | None, bool]:
    """``(tag to load, load_universal)``: the latest checkpoint, as a universal one when the layout changed.

    A ZeRO-1/2/3 checkpoint partitions the optimizer state by data-parallel rank, so DeepSpeed refuses
    it on another worker count. ``ds_to_universal`` rewrites it per parameter; DeepSpeed then
    re-partitions it for the new layout (``checkpoint.load_universal``). Rank 0 converts once, the
    other ranks wait at a barrier. ``remote``: the tag comes from object storage, downloaded into
    ``ckpt_dir`` first (a universal conversion is published back, so every machine can fetch it).
    """
    tag = latest_tag(ckpt_dir, remote)
    if tag is None:
        return None, False
    if remote is not None:
        fetch_dir(remote, tag, Path(ckpt_dir) / tag, rank, world)
    meta = read_meta(ckpt_dir, tag)
    same_layout = meta["world_size"] == world and meta["zero_stage"] == cfg.dist.zero_stage
    if same_layout or (meta["zero_stage"] == 0 and cfg.dist.zero_stage == 0):
        return tag, False  # ZeRO-0 keeps the whole optimizer state in the model file: any worker count loads it
    if meta["zero_stage"] == 0:
        raise RuntimeError(
            f"checkpoint {ckpt_dir / tag} was saved with ZeRO stage 0 and cannot be converted to ZeRO "
            f"stage {cfg.dist.zero_stage}; resume with dist.zero_stage=0 (any worker count works)"
        )
    universal = tag + UNIVERSAL_SUFFIX
    if rank == 0 and not (Path(ckpt_dir) / universal / META_NAME).is_file():
        print(f"[train] checkpoint {tag} was saved by {meta['world_size']} worker(s) with ZeRO-{meta['zero_stage']}; "
              f"converting it to a universal checkpoint for {world} worker(s) with ZeRO-{cfg.dist.zero_stage}", flush=True)
        try:
            to_universal(Path(ckpt_dir) / tag, Path(ckpt_dir) / universal)
        except Exception as exc:  # DeepSpeed's converter raises bare asserts; say what to do instead
            raise RuntimeError(
                f"cannot resume {ckpt_dir / tag} (saved by {meta['world_size']} workers, ZeRO-{meta['zero_stage']}) "
                f"on {world} workers with ZeRO-{cfg.dist.zero_stage}: universal conversion failed ({exc}). "
                f"Resume with dist.num_workers={meta['world_size']} dist.zero_stage={meta['zero_stage']}"
            ) from exc
        atomic_write(Path(ckpt_dir) / universal / META_NAME, json.dumps({**meta, "tag": universal}, indent=1))
    barrier(world)
    if remote is not None:
        if rank == 0 and not remote.exists(f"{universal}/{MANIFEST_NAME}"):
            publish_dir(Path(ckpt_dir) / universal, remote, universal)  # rank 0 alone converted it
        barrier(world)
        fetch_dir(remote, universal, Path(ckpt_dir) / universal, rank, world)
    return universal, True


def to_universal(src: Path, dst: Path) -> None:
    """``ds_to_universal`` in-process, single-threaded (2 cores, no process pools needed for small models)."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(dst, ignore_errors=True)
    args = Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=False)
    ds_to_universal.main(args)


def hold_checkpoint_lock(ckpt_dir: Path, cfg, wait_s: float = 120.0):
    """Rank 0 holds an exclusive file lock (``filelock``) on the checkpoint folder for the whole run.

    One training per folder: after a driver is killed, Ray needs a moment to kill its workers; a
    resumed run waits here until the old rank 0 is gone instead of writing beside it. The lock is
    the kernel's (flock), so it drops when its holder dies and a crash never leaves the folder
    locked. Release with ``.release()``. ``workers.json`` names the holder when the wait times out.
    """
    from filelock import FileLock, Timeout

    # preserve_lock_file: unlinking on release would let a waiter and a newcomer lock two different files.
    lock = FileLock(Path(ckpt_dir) / LOCK_NAME, preserve_lock_file=True, fallback_to_soft=False)
    try:
        lock.acquire(timeout=wait_s, poll_interval=1.0)
    except Timeout:
        workers = Path(ckpt_dir) / WORKERS_NAME
        holder = workers.read_text().strip() if workers.is_file() else "unknown"
        raise RuntimeError(f"checkpoint folder {ckpt_dir} is in use by another training run ({holder}) "
                           f"for more than {wait_s:.0f}s; stop it or use another checkpoint.dir") from None
    return lock


def record_workers(ckpt_dir: Path, rank: int, world: int, name: str = "") -> None:
    """``workers.json``: which processes train this folder now (operators' ``kill``/``py-spy`` target)."""
    me = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname()}
    everyone = [me]
    if world > 1:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, me)
    if rank == 0:
        atomic_write(Path(ckpt_dir) / WORKERS_NAME, json.dumps({"run": name, "world_size": world, "workers": everyone,
                                                                "started": time.time()}, indent=1))
    barrier(world)
