"""Training batches from the cache: the bounded stream (train.data) against the per-sample assembly it
replaced, and a rank's memory as the corpus grows (issue 17).

    flock /tmp/omnidiff-heavy.lock .venv/bin/python benchmarks/train_data.py
    .venv/bin/python benchmarks/train_data.py --rows 2048 --scales 1 4 --batches 10   # quick check

A synthetic stage-2 cache (LLM states: 4-28 tokens of width --dim per caption; "latents" (4, 8, 8) per
image), written by the embed stage's writer in shards of --shard-rows rows, at --rows x each scale.
Every measurement runs in a fresh process (so its peak RSS is its own), all in this run:

* ``old``: the code before issue 17, kept below as the baseline: the whole example table as a pandas
  DataFrame, ``CacheStore.read`` (a dict of every cached key, and every shard it touched kept:
  ``max_cached_shards=1 << 16``), one array per sample padded in a Python loop.
* ``new K=8``: ``train.data.CachedBatches`` as train.loop runs it (data.max_resident_shards = 8): only the Parquet
  row groups of a batch's rows are decoded (``--row-group-rows``; 0 writes one group per shard, as before).
* ``new K=all``: the same with a bound above the shard count, to separate the vectorised assembly
  from the cost of re-reading evicted shards.

Per way and scale it prints: ms per micro-batch (median of --rounds rounds of --batches batches,
after one warm-up batch), the peak RSS of the process and its growth over the RSS after imports,
and the peak number of decoded shards held per cache. Same machine, same run, same batches (the
checksum of the last batch must agree across the three ways, or the run stops).

Measured here (2 shared CPU cores, batch 32, 64-row shards in row groups of 32 rows, default arguments; the
figures move by up to ~1.5x between runs on this shared box): peak RSS growth 57 / 108 / 254 MiB (old) against
62 / 68 / 79 MiB (new K=8) at 4k / 16k / 65k rows; ms per batch old 10.6 / 16.8 / 46.2, new K=8 25.7 / 31.4 /
33.4 (0.41x / 0.53x / 1.38x), new K=all 3.8 / 10.1 / 25.0. Before shards had row groups (one group per shard)
new K=8 was 0.13-0.62x the old time. With ``--shard-rows 2048`` (the embed stage's default) at 65k rows: growth
307 MiB (old) against 124 MiB (new K=8), 1.48x faster. K counts shards' worth of rows (``budget_rows``); the
resident column shows row groups. These figures predate the block order (train.data.epoch_order, session 11):
above data.order_window_rows (8192) examples, ``new`` now visits examples in LLM-cache-location blocks, and
the 16k / 65k rows here are above it (the run warns when a window exceeds what a rank keeps decoded).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = (4, 8, 8)


def build_cache(root: Path, rows: int, dim: int, shard_rows: int, row_group_rows: int) -> dict:
    """LLM + image caches of ``rows`` examples and the example table, like the embed stage writes them."""
    import numpy as np
    import pandas as pd

    from embed_cache.writer import open_writer
    from omnidiff.contracts.cache import cache_dir, pixels_table, states_table
    from omnidiff.contracts.encoders import fingerprint, llm_inputs, pixels_inputs
    from omnidiff.contracts.keys import text_key

    rng = np.random.default_rng(0)
    keys = [text_key(f"caption {i}") for i in range(rows)]
    digests = [f"{i:064x}" for i in range(rows)]
    inputs = llm_inputs({"model": "train-data-bench", "dim": dim})
    llm_dir = cache_dir("llm", fingerprint(inputs), root)
    with open_writer(llm_dir, inputs) as writer:
        writer.set_value_shape((dim,))
        for unit, start in enumerate(range(0, rows, shard_rows)):
            chunk = range(start, min(rows, start + shard_rows))
            values = [rng.normal(size=(4 + i % 25, dim)).astype(np.float16) for i in chunk]
            writer.write(states_table([keys[i] for i in chunk], values), unit, row_group_rows or len(chunk))
    p_inputs = pixels_inputs(IMAGE[-1])
    pix_dir = cache_dir("pixels", fingerprint(p_inputs), root)
    with open_writer(pix_dir, p_inputs) as writer:
        writer.set_value_shape(IMAGE)
        for unit, start in enumerate(range(0, rows, shard_rows)):
            n = min(rows, start + shard_rows) - start
            values = rng.normal(size=(n, *IMAGE)).astype(np.float16)
            writer.write(pixels_table(digests[start : start + n], values), unit, row_group_rows or n)
    examples = root / "examples.parquet"
    pd.DataFrame({"llm_key": keys, "pixel_key": digests, "lang": "en"}).to_parquet(examples, index=False)
    return {"llm": str(llm_dir), "pixels": str(pix_dir), "examples": str(examples)}


# ---------------------------------------------------------------------------------------- the baseline


class OldCachedBatches:
    """train.data.CachedBatches before issue 17 (diffusion family), kept verbatim as the baseline."""

    def __init__(self, examples, stores, seed, num_train_timesteps=1000):
        self.examples = examples.reset_index(drop=True)
        self.stores, self.seed, self.num_train_timesteps = stores, int(seed), num_train_timesteps
        self.caption_dropout = 0.0
        self._perms: dict = {}

    def example_index(self, positions):
        import numpy as np

        n = len(self.examples)
        out = np.empty(len(positions), dtype=np.int64)
        for i, p in enumerate(positions):
            epoch, offset = divmod(int(p), n)
            if epoch not in self._perms:
                if len(self._perms) > 4:
                    self._perms.clear()
                self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
            out[i] = self._perms[epoch][offset]
        return out

    def batch(self, positions):
        rows = self.examples.iloc[self.example_index(positions)]
        llm = self.stores["llm"].read(rows["llm_key"].tolist())
        llm_arrays = [llm[k] for k in rows["llm_key"]]
        pixel_keys = rows["pixel_key"].tolist()
        images, noise, timesteps, dropped = self._noised(pixel_keys, positions)
        llm_states, llm_mask = old_pad_states(llm_arrays)
        return {"llm_states": llm_states, "llm_mask": llm_mask, "pixels": images, "noise": noise,
                "timesteps": timesteps, "dropped": dropped}

    def _noised(self, pixel_keys, positions):
        import numpy as np
        import torch

        from train.data import sample_seed

        pixels = self.stores["pixels"].read(pixel_keys)
        images = torch.from_numpy(np.stack([pixels[k] for k in pixel_keys]).astype(np.float32))
        noise = torch.empty_like(images)
        timesteps = torch.empty(len(positions), dtype=torch.long)
        dropped = torch.zeros(len(positions), dtype=torch.bool)
        for i, p in enumerate(positions):
            g = torch.Generator().manual_seed(sample_seed(self.seed, int(p)))
            noise[i] = torch.randn(images.shape[1:], generator=g)
            timesteps[i] = int(torch.randint(0, self.num_train_timesteps, (1,), generator=g))
            dropped[i] = bool(torch.rand((), generator=g) < self.caption_dropout)
        return images, noise, timesteps, dropped


def old_pad_states(arrays):
    import numpy as np
    import torch

    dim = int(arrays[0].shape[-1])
    t_max = max(int(a.shape[0]) for a in arrays)
    states = torch.zeros(len(arrays), t_max, dim, dtype=torch.float32)
    mask = torch.zeros(len(arrays), t_max, dtype=torch.bool)
    for i, a in enumerate(arrays):
        states[i, : a.shape[0]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
        mask[i, : a.shape[0]] = True
    return states, mask


# ---------------------------------------------------------------------------------------- one measurement


def rss_mb() -> float:
    """Peak resident set of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(way: str, paths: dict, batch: int, batches: int, rounds: int, resident: int) -> dict:
    """One way at one scale, in this (fresh) process."""
    import pandas as pd
    import torch

    from omnidiff.contracts.cache import CacheStore
    from train.data import CachedBatches

    torch.set_num_threads(1)
    base_rss = rss_mb()
    if way == "old":
        stores = {k: CacheStore(paths[k], max_cached_shards=1 << 16) for k in ("llm", "pixels")}
        stream = OldCachedBatches(pd.read_parquet(paths["examples"]), stores, seed=0)
    else:
        stores = {k: CacheStore(paths[k], max_cached_shards=resident) for k in ("llm", "pixels")}
        stream = CachedBatches(paths["examples"], "diffusion", stores, seed=0, max_resident_shards=resident)
    t0 = time.perf_counter()
    stream.batch(CachedBatches.positions(0, batch, 0, 1, batch, 0))  # warm-up (the old way builds its key index)
    first_s = time.perf_counter() - t0
    per_round, step = [], 1
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(batches):
            out = stream.batch(CachedBatches.positions(step, batch, 0, 1, batch, 0))
            step += 1
        per_round.append((time.perf_counter() - t0) / batches * 1000)
    checksum = float(out["llm_states"].sum() + out["pixels"].sum())
    if way == "old":
        resident_peak = {k: len(s._tables) for k, s in stores.items()}
    else:
        resident_peak = {k: s.peak_resident for k, s in stream.shards.items()}
    return {"ms_per_batch": statistics.median(per_round), "first_batch_s": first_s, "peak_rss_mb": rss_mb(),
            "growth_mb": rss_mb() - base_rss, "resident": resident_peak, "checksum": checksum,
            "shards": len(stores["llm"].shard_names)}


def run_child(way: str, paths: dict, args, resident: int) -> dict:
    spec = json.dumps({"way": way, "paths": paths, "batch": args.batch, "batches": args.batches,
                       "rounds": args.rounds, "resident": resident})
    out = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=False,
                         cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"{way} measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096, help="examples at scale 1")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--shard-rows", type=int, default=64, help="rows per cache shard (many small shards)")
    parser.add_argument("--row-group-rows", type=int, default=None,
                        help="rows per Parquet row group in a shard (default: the writer's SHARD_ROW_GROUP_ROWS); "
                             "0 = one group per shard, the layout before")
    parser.add_argument("--dim", type=int, default=64, help="LLM hidden size of the synthetic states")
    parser.add_argument("--batch", type=int, default=32, help="micro-batch size")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resident", type=int, default=8, help="data.max_resident_shards of the new way")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["way"], spec["paths"], spec["batch"], spec["batches"], spec["rounds"],
                                 spec["resident"])))
        return

    if args.row_group_rows is None:
        from omnidiff.contracts.cache import SHARD_ROW_GROUP_ROWS

        args.row_group_rows = SHARD_ROW_GROUP_ROWS
    groups = f"row groups of {args.row_group_rows} rows" if args.row_group_rows else "one row group per shard"
    tmp = Path(tempfile.mkdtemp(prefix="train-data-bench-"))
    try:
        measure_all(args, tmp, groups)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure_all(args, tmp: Path, groups: str) -> None:
    print(f"batch {args.batch}, {args.batches} batches x {args.rounds} rounds (median), LLM dim {args.dim}, "
          f"latents {IMAGE}, {args.shard_rows} rows per shard in {groups}; one fresh process per line; "
          "1 torch thread", flush=True)
    header = (f"{'rows':>7} {'shards':>6}  {'way':<10} {'ms/batch':>9} {'vs old':>7} {'1st batch s':>11} "
              f"{'peak RSS MiB':>12} {'growth MiB':>10}  peak resident llm, pixels (old: shards, new: row groups)")
    print(header)
    for scale in args.scales:
        rows = args.rows * scale
        t0 = time.perf_counter()
        paths = build_cache(tmp / f"x{scale}", rows, args.dim, args.shard_rows, args.row_group_rows)
        build_s = time.perf_counter() - t0
        results = {"old": run_child("old", paths, args, 1 << 16),
                   f"new K={args.resident}": run_child("new", paths, args, args.resident),
                   "new K=all": run_child("new", paths, args, 1 << 16)}
        sums = {round(r["checksum"], 3) for r in results.values()}
        if len(sums) != 1:
            raise RuntimeError(f"the ways built different batches at {rows} rows: checksums {sums}")
        old_ms = results["old"]["ms_per_batch"]
        for way, r in results.items():
            print(f"{rows:>7} {r['shards']:>6}  {way:<10} {r['ms_per_batch']:>9.2f} {old_ms / r['ms_per_batch']:>6.2f}x "
                  f"{r['first_batch_s']:>11.2f} {r['peak_rss_mb']:>12.0f} {r['growth_mb']:>10.0f}  "
                  f"{r['resident']['llm']}, {r['resident']['pixels']}", flush=True)
        print(f"        (cache of {rows} rows built in {build_s:.1f}s)", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
