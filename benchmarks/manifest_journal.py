"""Does listing a cache shard cost the same however many shards the cache holds? (issue 17) Old writer against new.

    .venv/bin/python benchmarks/manifest_journal.py                  # N = 400 shards, 10N = 4000, local disk
    .venv/bin/python benchmarks/manifest_journal.py --s3             # also on a SeaweedFS S3 server started here
    .venv/bin/python benchmarks/manifest_journal.py --shards 100     # a quick check

Per size (N and ``--factor`` x N shards) a cache is filled the way the embed job fills it: each shard is written
(one row: its bytes do not matter here) and then published. Only the publishes are timed, and the bytes of
listing written are counted (the manifest rewrites plus journal entries):

* old: the writer before the journal (``--old-ref``, loaded from ``git show <ref>:embed_cache/writer.py``): every
  publish rewrites ``manifest.json``, which lists every shard, so a publish costs O(shards) and a cache O(shards^2);
* new: this checkout's writer: a publish writes one journal entry, and the manifest is rewritten once per
  ``JOURNAL_FOLD`` (64) publishes and at close, so the rewrites cost O(shards^2 / 64) bytes.

Printed per run: shards, the milliseconds a publish took (mean; the last 10% of them, where the cache is largest),
manifest rewrites and bytes of listing written per shard; then per implementation the 10N/N ratios. The old
writer's bytes per shard grow with the cache (x10 from N to 10N); the new one's grow too, since a fold still
rewrites every entry, but 64 times more slowly. On a local disk a publish's time is mostly the fsync of its
rename, so the bytes are the figure to read there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.embed_keys import ENCODER, D, old_writer_class  # noqa: E402  (the same fixture cache encoder)


def fill(cls, directory: str, shards: int) -> dict:
    """Write and publish ``shards`` one-row shards with writer class ``cls``; time the publishes and count the
    listing's bytes (every manifest and journal object written)."""
    import numpy as np

    from embed_cache.writer import write_shard_file
    from omnidiff.contracts.cache import states_table
    from omnidiff.contracts.encoders import llm_inputs
    from omnidiff.contracts.keys import text_key
    from omnidiff.contracts.storage import Folder

    written = {"bytes": 0, "manifests": 0}
    original = Folder.write_bytes

    def counting(self, rel: str, data: bytes) -> None:  # every listing write goes through a Folder or atomic_write
        written["bytes"] += len(data)
        written["manifests"] += rel.endswith("manifest.json")
        return original(self, rel, data)

    value = np.zeros((1, D), np.float32)
    times = []
    writer = cls(directory, llm_inputs(ENCODER)).open()
    import omnidiff.contracts.io as io_module

    namespace = cls.__init__.__globals__  # the writer module's own name for atomic_write (local manifest rewrites)
    real_atomic = io_module.atomic_write

    def counting_atomic(path, data, *args, **kwargs):
        payload = data.encode() if isinstance(data, str) else data
        written["bytes"] += len(payload)
        written["manifests"] += str(path).endswith("manifest.json")
        return real_atomic(path, data, *args, **kwargs)

    Folder.write_bytes = counting
    namespace["atomic_write"] = counting_atomic
    try:
        writer.set_value_shape((D,))
        written.update(bytes=0, manifests=0)
        for i in range(shards):
            key = text_key(f"caption {i}")
            entry = write_shard_file(directory, writer.shard_name(i), states_table([key], [value]), writer.run_token)
            start = time.perf_counter()
            writer.publish(entry, [key], fresh=True)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        writer.close()
        close_s = time.perf_counter() - start
    finally:
        Folder.write_bytes = original
        namespace["atomic_write"] = real_atomic
    late = times[-max(1, shards // 10):]
    return {"shards": shards, "mean_ms": 1000 * sum(times) / shards, "late_ms": 1000 * sum(late) / len(late),
            "close_ms": 1000 * close_s, "manifests": written["manifests"], "bytes_per_shard": written["bytes"] / shards}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=400, help="N: shards at the small size")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--old-ref", default="370d20f", help="git ref of the writer before the journal")
    parser.add_argument("--s3", action="store_true", help="also with the caches on a SeaweedFS S3 server")
    args = parser.parse_args(argv)
    import omnidiff  # noqa: F401  (offline switches)
    from benchmarks.scale import stores
    from embed_cache.writer import CacheWriter

    root = Path(tempfile.mkdtemp(prefix="manifest-journal-bench-"))
    try:
        old_cls = old_writer_class(args.old_ref, root)
        with stores(root, args.s3, "manifest-journal") as where:
            sizes = [args.shards, args.shards * args.factor]
            print(f"shards N = {sizes[0]}, {args.factor}N = {sizes[1]}; old = {args.old_ref}, new = this checkout")
            print(f"{'store':<6} {'impl':<4} {'shards':>7} {'publish ms':>10} {'late ms':>8} {'close ms':>8} "
                  f"{'manifests':>9} {'listing B/shard':>15}")
            for store, location in where:
                report(store, location, sizes, old_cls, CacheWriter)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def report(store: str, location: str, sizes: list[int], old_cls, new_cls) -> None:
    """Fill a cache of each size with each writer on one store; print the rows and the ratios."""
    from omnidiff.contracts.cache import cache_dir
    from omnidiff.contracts.encoders import fingerprint, llm_inputs

    results: dict[tuple[str, int], dict] = {}
    for n in sizes:
        for impl, cls in (("old", old_cls), ("new", new_cls)):
            directory = cache_dir("llm", fingerprint(llm_inputs(ENCODER)), f"{location}/{impl}{n}")
            r = results[impl, n] = fill(cls, str(directory), n)
            print(f"{store:<6} {impl:<4} {r['shards']:>7} {r['mean_ms']:>10.2f} {r['late_ms']:>8.2f} "
                  f"{r['close_ms']:>8.1f} {r['manifests']:>9} {r['bytes_per_shard']:>15,.0f}", flush=True)
    for impl in ("old", "new"):
        a, b = results[impl, sizes[0]], results[impl, sizes[1]]
        print(f"  {store} {impl}: 10N/N late publish time {b['late_ms'] / a['late_ms']:.2f}x, listing bytes per "
              f"shard {b['bytes_per_shard'] / a['bytes_per_shard']:.2f}x")
    a, b = results["old", sizes[1]], results["new", sizes[1]]
    print(f"  {store} at {sizes[1]} shards: new/old publish time {b['mean_ms'] / a['mean_ms']:.2f}x, "
          f"listing bytes {b['bytes_per_shard'] / a['bytes_per_shard']:.3f}x")


if __name__ == "__main__":
    raise SystemExit(main())
