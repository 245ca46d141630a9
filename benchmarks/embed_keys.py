"""Does the embed cache writer's key memory stay flat as the cache grows? (issue 17) Old writer against new, N and 10N.

    flock /tmp/omnidiff-heavy.lock timeout 1500 nice .venv/bin/python benchmarks/embed_keys.py   # N = 20000 keys
    .venv/bin/python benchmarks/embed_keys.py --keys 2000 --partition-keys 500                   # a quick check
    .venv/bin/python benchmarks/embed_keys.py --s3      # the caches on a SeaweedFS S3 server started here as well

Per size (N and ``--factor`` x N cached keys) a cache is filled as the embed job fills it: the keys split into hash
ranges of about ``--partition-keys`` keys (embed_cache/inputs.py ``KeyPartitions``, the job's
``dedup_partition_rows``), each cut into shards of ``--shard-rows`` keys (one-token llm states, hidden 8: the values do
not matter here). Then an incremental run's question is asked, partition by partition: which of these keys (the
partition's cached keys plus 1% new ones) are missing?

* old: the writer before issue 17's change (``--old-ref``, loaded from ``git show <ref>:embed_cache/writer.py``):
  ``open()`` loads a set of every cached key, then each partition is checked against that set;
* new: this checkout's writer: ``open()`` loads no key, ``missing(partition)`` reads only the shards whose manifest
  ``key_range`` overlaps the partition's hash range, one at a time, keeping the hits.

Printed per run: cached keys, the most keys the writer held at once (old: the set; new: ``CacheWriter.peak_keys``),
the writer's peak Python heap (tracemalloc, above what the caller holds: the partitions' queries), what ``open()``
kept (the manifest, about 1 KiB a shard in both; old: plus every key), shard key columns read and seconds
(tracemalloc slows both alike); then per implementation the 10N/N ratio of the peaks (issue 17's goal: at most 1.2x).
The manifest lists every shard, so it grows with the cache in both (about 0.5% of the old key set at 2048 keys a
shard); the held keys are the figure this change bounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENCODER = {"model_id": "bench", "weights_digest": "0", "layer": 1, "max_length": 64, "dtype": "float32",
           "template": "raw", "normaliser_version": "1"}
D = 8


def old_writer_class(ref: str, folder: Path):
    """``CacheWriter`` as it was at git ``ref`` (the same contracts package: only the writer changed)."""
    source = subprocess.run(["git", "show", f"{ref}:embed_cache/writer.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = folder / "old_writer.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_embed_writer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CacheWriter


def fill(directory: str, n: int, partition_keys: int, shard_rows: int) -> list[list[str]]:
    """A cache of ``n`` keys filled partition by partition (module docstring); returns the keys per partition."""
    import numpy as np

    from embed_cache.inputs import KeyPartitions
    from embed_cache.writer import CacheWriter, write_shard_file
    from omnidiff.contracts.cache import states_table
    from omnidiff.contracts.encoders import llm_inputs
    from omnidiff.contracts.keys import text_key

    parts = max(1, math.ceil(n / partition_keys))
    splitter = KeyPartitions(Path(tempfile.mkdtemp(prefix="embed-keys-")), parts, bytes)
    by_part: list[list[str]] = [[] for _ in range(parts)]
    for i in range(n):
        key = text_key(f"caption {i}")
        by_part[splitter.part_of(key)].append(key)
    splitter.cleanup()
    value = np.zeros((1, D), np.float32)
    unit = 0
    with CacheWriter(directory, llm_inputs(ENCODER)) as writer:
        writer.set_value_shape((D,))
        for part in by_part:
            for i in range(0, len(part), shard_rows):
                chunk = part[i : i + shard_rows]
                entry = write_shard_file(directory, writer.shard_name(unit), states_table(chunk, [value] * len(chunk)),
                                         writer.run_token)
                writer.publish(entry, chunk, fresh=True)
                unit += 1
    return by_part


def new_keys(part: list[str], splitter_parts: int, p: int, count: int) -> list[str]:
    """``count`` keys that are not cached and fall in partition ``p``'s hash range."""
    from omnidiff.contracts.keys import KEY_HASH_SPACE, key_hash, text_key

    out, i = [], 0
    while len(out) < count:
        key = text_key(f"new {p} {i}")
        if key_hash(key) * splitter_parts // KEY_HASH_SPACE == p:
            out.append(key)
        i += 1
    return out


def measure(impl: str, cls, directory: str, by_part: list[list[str]]) -> dict:
    """Open the writer and ask each partition's missing keys, under tracemalloc (module docstring)."""
    from omnidiff.contracts.encoders import llm_inputs

    # {key: payload} per partition, as the job holds it (embed_cache/inputs.py KeyPartitions yields such dicts)
    queries = [dict.fromkeys(part + new_keys(part, len(by_part), p, max(1, len(part) // 100)), "")
               for p, part in enumerate(by_part)]
    expected = [list(q)[len(part):] for q, part in zip(queries, by_part, strict=True)]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]  # the queries were built before: the caller's, not counted
    tracemalloc.reset_peak()
    start = time.perf_counter()
    writer = cls(directory, llm_inputs(ENCODER)).open()
    peak = tracemalloc.get_traced_memory()[1] - base
    opened = tracemalloc.get_traced_memory()[0] - base  # what open() keeps: the manifest (+ old: every key)
    try:
        for query, want in zip(queries, expected, strict=True):
            tracemalloc.reset_peak()
            missing = [k for k in query if k not in writer.keys] if impl == "old" else writer.missing(query)
            peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
            assert missing == want, (impl, len(missing), len(want))
            del missing
        seconds = time.perf_counter() - start
        held = len(writer.keys) if impl == "old" else writer.peak_keys
        reads = writer.shard_reads if impl == "new" else len(writer.manifest["shards"])
        return {"keys": sum(map(len, by_part)), "held": held, "peak_mib": peak / 2**20, "open_mib": opened / 2**20,
                "reads": reads,
                "shards": len(writer.manifest["shards"]), "seconds": seconds}
    finally:
        writer.close()
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=20000, help="N: cached keys at the small size")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--partition-keys", type=int, default=20000, help="keys per partition (dedup_partition_rows)")
    parser.add_argument("--shard-rows", type=int, default=2048, help="keys per cache shard (embed's shard_rows)")
    parser.add_argument("--old-ref", default="8aa6b1e", help="git ref of the writer before the change")
    parser.add_argument("--s3", action="store_true", help="also with the caches on a SeaweedFS S3 server")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import omnidiff  # noqa: F401  (offline switches)
    from benchmarks.scale import stores
    from omnidiff.contracts.cache import cache_dir
    from omnidiff.contracts.encoders import fingerprint, llm_inputs

    root = Path(tempfile.mkdtemp(prefix="embed-keys-bench-"))
    try:
        old_cls = old_writer_class(args.old_ref, root)
        from embed_cache.writer import CacheWriter

        with stores(root, args.s3, "embed-keys") as where:
            sizes = [args.keys, args.keys * args.factor]
            print(f"cached keys N = {sizes[0]}, {args.factor}N = {sizes[1]}; partitions of about {args.partition_keys} "
                  f"keys, shards of {args.shard_rows}; old = {args.old_ref}")
            print(f"{'store':<6} {'impl':<4} {'keys':>8} {'shards':>6} {'held keys':>10} {'peak MiB':>9} {'open MiB':>9} {'reads':>6} "
                  f"{'seconds':>8}")
            for store, location in where:
                results: dict[tuple[str, int], dict] = {}
                for n in sizes:
                    directory = cache_dir("llm", fingerprint(llm_inputs(ENCODER)), f"{location}/n{n}")
                    by_part = fill(str(directory), n, args.partition_keys, args.shard_rows)
                    for impl, cls in (("old", old_cls), ("new", CacheWriter)):
                        r = results[impl, n] = measure(impl, cls, str(directory), by_part)
                        print(f"{store:<6} {impl:<4} {r['keys']:>8} {r['shards']:>6} {r['held']:>10} "
                              f"{r['peak_mib']:>9.2f} {r['open_mib']:>9.2f} {r['reads']:>6} {r['seconds']:>8.2f}", flush=True)
                for impl in ("old", "new"):
                    a, b = results[impl, sizes[0]], results[impl, sizes[1]]
                    keys, mib = b["held"] / max(1, a["held"]), b["peak_mib"] / a["peak_mib"]
                    print(f"  {store} {impl}: writer key memory 10N/N: held keys {keys:.2f}x, peak heap {mib:.2f}x "
                          f"({'ok' if max(keys, mib) <= 1.2 else 'MISSED'}: <= 1.2x)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
