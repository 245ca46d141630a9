"""Shipped base artifacts: the demo's pretrained tiny base model and evaluator, in the repository (issue 18 item 5).

Pretraining the tiny base (1000 steps) and its evaluator takes 10-12 minutes on 2 CPU cores, half of a first
``make demo``. Both are named by their config (and, for the base, the world's content digest), so a folder of
packed copies lets ``omnidiff base pretrain`` / ``evaluator`` install a copy instead of training when one matches.
The repository ships the demo's (``omnidiff/base/shipped/``, 4.9 MB: weights packed as float16, every file under
5 MB); ``$OMNIDIFF_SHIPPED_DIR`` points the lookup at another tree (a team's shared folder; the tests use it):

    omnidiff/base/shipped/<kind>/<hash>/        kind = base | evaluator; hash = the cache folder's name
        SHIPPED.json                            {kind, hash, record, files: {relative path: sha256}, rebuild,
                                                 stored_dtype, widened: [files stored as float16], ...}
        <the cached folder's files; with ``--half`` its float32 safetensors tensors stored as float16>

* The lookup is by the cache folder's name, which hashes everything that decides the weights (the model and
  pretraining config, the world's content digest, the code's version): a changed config or world finds no
  shipped copy and trains as before. ``force=true`` always trains.
* Before a copy is used, every file is checked against its sha256 in SHIPPED.json; a missing, changed or
  unlisted file is an error naming it (a shipped folder that does not verify is never loaded).
* ``--half`` packs float32 safetensors tensors as float16 (half the bytes); install widens them back to
  float32, so the cache holds what the code trains and loads. The shipped copy is then the float16 rounding of
  the trained weights (relative error <= 2^-11 per weight); SHIPPED.json lists which files were narrowed.
* ``SHIPPED.json`` says how to rebuild the folder (``rebuild``) and records what built it (commit, torch);
  the install is tracked as a ``base-pretrain`` / ``base-evaluator`` run tagged ``shipped=true`` with the
  same ``base_hash`` tag a trained base gets, so lineage still reaches the base.

    python -m omnidiff.base.shipped pack base ~/.omnidiff/models/base/<hash> --half --rebuild "omnidiff base pretrain ..."
    python -m omnidiff.base.shipped verify              # every shipped folder against its SHIPPED.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

MANIFEST = "SHIPPED.json"
KINDS = ("base", "evaluator")


class ShippedArtifactError(RuntimeError):
    """A shipped folder that does not match its SHIPPED.json."""


PACKAGED = Path(__file__).resolve().parent / "shipped"


def shipped_root() -> Path:
    return Path(os.environ.get("OMNIDIFF_SHIPPED_DIR") or PACKAGED)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def find(kind: str, name: str, root: Path | None = None) -> Path | None:
    """The shipped folder of ``kind`` whose cache name is ``name``, or None."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: one of {KINDS}")
    folder = (root or shipped_root()) / kind / name
    return folder if (folder / MANIFEST).is_file() else None


def verify(folder: Path) -> dict:
    """SHIPPED.json of ``folder`` after checking every file's sha256; ShippedArtifactError naming what differs."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    listed: dict[str, str] = manifest["files"]
    present = {p.relative_to(folder).as_posix() for p in _files(folder)}
    missing, unlisted = sorted(set(listed) - present), sorted(present - set(listed))
    if missing or unlisted:
        raise ShippedArtifactError(f"shipped {folder}: missing {missing} / not in {MANIFEST}: {unlisted}")
    changed = [rel for rel, digest in sorted(listed.items()) if _sha256(folder / rel) != digest]
    if changed:
        raise ShippedArtifactError(f"shipped {folder}: sha256 differs from {MANIFEST} for {changed}")
    if manifest.get("hash") != folder.name:
        raise ShippedArtifactError(f"shipped {folder}: {MANIFEST} names hash {manifest.get('hash')!r}")
    return manifest


def install(kind: str, name: str, dest: Path, root: Path | None = None) -> dict | None:
    """Copy the verified shipped folder ``kind/name`` to ``dest`` (atomically); its manifest, or None if none."""
    source = find(kind, name, root)
    if source is None:
        return None
    manifest = verify(source)
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".shipped-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    for rel in manifest.get("widened", []):
        _convert_floats(tmp / rel, "float16", "float32")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)  # a reader never sees a half-copied folder
    return manifest


def others(kind: str, root: Path | None = None) -> list[dict]:
    """The manifests of every shipped folder of ``kind`` (to say why none matched)."""
    base = (root or shipped_root()) / kind
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(base.glob(f"*/{MANIFEST}"))]


def _convert_floats(path: Path, source: str, target: str) -> bool:
    """Rewrite a safetensors file with its ``source``-dtype tensors cast to ``target`` (metadata kept); changed?"""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = getattr(torch, source), getattr(torch, target)
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    if not any(t.dtype == src for t in tensors.values()):
        return False
    save_file({k: (t.to(dst) if t.dtype == src else t).contiguous() for k, t in tensors.items()}, str(path), metadata)
    return True


def pack(kind: str, folder: Path, rebuild: str, record: dict | None = None, root: Path | None = None,
         half: bool = False) -> Path:
    """Copy a cache folder into the shipped tree with its SHIPPED.json (sha256 of every file); ``half``: store
    float32 safetensors tensors as float16 (install widens them back)."""
    import torch

    from omnidiff.tracking import git_commit

    folder = Path(folder)
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: one of {KINDS}")
    if not any(folder.iterdir()):
        raise ValueError(f"{folder} is empty")
    if record is None:
        meta = folder / ("base.json" if kind == "base" else "config.json")
        record = json.loads(meta.read_text(encoding="utf-8")).get("record") if meta.is_file() else None
    target = (root or shipped_root()) / kind / folder.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns(MANIFEST))
    widened = sorted(p.relative_to(target).as_posix() for p in target.rglob("*.safetensors")
                     if half and _convert_floats(p, "float32", "float16"))
    manifest = {
        "kind": kind, "hash": folder.name, "record": record, "rebuild": rebuild,
        "built_at_commit": git_commit(), "torch": torch.__version__,
        "stored_dtype": "float16" if widened else "as trained", "widened": widened,
        "files": {p.relative_to(target).as_posix(): _sha256(p) for p in _files(target)},
    }  # fmt: skip
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omnidiff.base.shipped", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="copy a cached base / evaluator folder into the shipped tree")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("folder", type=Path)
    p.add_argument("--rebuild", required=True, help="the command that rebuilds this folder from scratch")
    p.add_argument("--half", action="store_true", help="store float32 weights as float16 (installed as float32)")
    sub.add_parser("verify", help="check every shipped folder against its SHIPPED.json")
    args = parser.parse_args(argv)
    if args.command == "pack":
        print(pack(args.kind, args.folder, args.rebuild, half=args.half))
        return 0
    bad = 0
    for kind in KINDS:
        for folder in sorted((shipped_root() / kind).glob(f"*/{MANIFEST}")):
            try:
                verify(folder.parent)
                print(f"ok   {kind}/{folder.parent.name}")
            except ShippedArtifactError as exc:
                bad += 1
                print(f"BAD  {exc}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
