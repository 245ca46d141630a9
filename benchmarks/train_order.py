"""Does a training batch cost the same at N and 10N examples? The order in which train.data.CachedBatches visits
the examples against the Parquet row groups it must decode for them (issue 17, "throughput per row at 10N within
10% of N").

    nice .venv/bin/python benchmarks/train_order.py                        # N = 1000 and 10N, ~40 s CPU
    nice .venv/bin/python benchmarks/train_order.py --micro-batches 200    # a longer run (steady state)

A synthetic stage-1 ("align") world shaped like benchmarks/scale.py's: N examples, one caption and one English
target each; an LLM cache (width --llm-dim, 8-40 tokens, a fifth long at 90-160) and a CLIP cache (width
--clip-dim + pooled, length correlated with the caption's: x0.6-1.4), each written by the embed stage's writer
length-sorted (ties by key) in shards of at most 32768 tokens / 2048 rows cut into 32-row groups, as the embed
stage plans them. The LLM cache's shards are the cache's order; the CLIP cache's order is its own.

Per size and per order (``permutation``: data.order_window_rows above N, the whole-epoch permutation;
``window``: the configured block/window order) it runs --micro-batches micro-batches of --micro rows and prints
the row groups decoded per sample in each cache, the ms per micro-batch (after one warm-up batch), and the ratio of
samples per second at 10N against N in the same run. With ``--compute-ms`` a model step is emulated by a sleep after
each batch and subtracted: the ms left are the data time the step does not hide (``--prefetch`` decodes the next
batch's groups meanwhile, as train.loop does).

Measured (2 shared CPU cores, other jobs running: the ms move a lot; the groups per sample do not), N = 1000:
the default sizes, 400 micro-batches: groups per sample llm / clip 0.008 / 0.007 at N, at 10N 0.097 / 0.097 with
the whole-epoch permutation and 0.083 / 0.096 with the block order: the whole 10N cache fits the resident budget
(8 x 2048 rows), so either order decodes each group once in a run this long. With a budget below the cache
(``--resident 2 --window 4096``): llm 0.597 per sample with the permutation, 0.042 with the block order; the CLIP
cache's own order (uncorrelated here beyond the lengths) stays at 0.59.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_world(root: Path, n: int, llm_dim: int, clip_dim: int, seed: int = 0, row_group_rows: int | None = None):
    """An LLM and a CLIP cache of ``n`` keys each (length-sorted shards) and the align example table."""
    import numpy as np
    import pandas as pd

    from embed_cache.batching import length_order, plan_shards
    from embed_cache.writer import open_writer
    from omnidiff.contracts.cache import SHARD_ROW_GROUP_ROWS, cache_dir, states_table
    from omnidiff.contracts.encoders import clip_inputs, fingerprint, llm_inputs
    from omnidiff.contracts.keys import text_key

    rng = np.random.default_rng(seed)
    long = rng.random(n) < 0.2
    llm_len = np.where(long, rng.integers(90, 161, n), rng.integers(8, 41, n))
    clip_len = np.clip(np.round(llm_len * rng.uniform(0.6, 1.4, n)), 2, 231).astype(np.int64)
    llm_keys = [text_key(f"caption {seed} {i}") for i in range(n)]
    clip_keys = [text_key(f"english {seed} {i}") for i in range(n)]
    dirs = {}
    for kind, inputs, keys, lengths, dim in (("llm", llm_inputs({"model": "order-bench"}), llm_keys, llm_len, llm_dim),
                                             ("clip", clip_inputs({"model": "order-bench"}), clip_keys, clip_len,
                                              clip_dim)):
        dirs[kind] = cache_dir(kind, fingerprint(inputs), root)
        order = length_order(lengths, keys)
        with open_writer(dirs[kind], inputs) as writer:
            writer.set_value_shape((dim,))
            for unit, sl in enumerate(plan_shards(lengths[order], 32768, 2048)):
                chosen = order[sl]
                states = [rng.normal(size=(int(lengths[i]), dim)).astype(np.float16) for i in chosen]
                pooled = rng.normal(size=(len(chosen), dim)).astype(np.float16) if kind == "clip" else None
                writer.write(states_table([keys[i] for i in chosen], states, pooled), unit,
                             row_group_rows or SHARD_ROW_GROUP_ROWS)
    examples = pd.DataFrame({"llm_key": llm_keys, "target_key": clip_keys, "lang": "en", "source": "pair"})
    return dirs, examples


def measure(dirs: dict, examples, micro: int, batches: int, compute_s: float = 0.0, prefetch: int = 0,
            **order) -> dict:
    from omnidiff.contracts.cache import CacheStore
    from train.data import CachedBatches

    stores = {kind: CacheStore(path) for kind, path in dirs.items()}
    stream = CachedBatches(examples, "align", stores, seed=0, **order)
    stream.batch(CachedBatches.positions(0, micro, 0, 1, micro, 0))  # warm-up: first file opens
    before = {k: s.group_reads for k, s in stream.shards.items()}
    t0 = time.perf_counter()
    for step in range(1, 1 + min(prefetch, batches)):  # as train.loop does: `prefetch` micro-batches ahead
        stream.prefetch(CachedBatches.positions(step, micro, 0, 1, micro, 0))
    for step in range(1, batches + 1):
        stream.batch(CachedBatches.positions(step, micro, 0, 1, micro, 0))
        if prefetch and step + prefetch <= batches:  # its groups decode while the model computes
            stream.prefetch(CachedBatches.positions(step + prefetch, micro, 0, 1, micro, 0))
        if compute_s:
            time.sleep(compute_s)  # the model's step, on a core of its own
    stream.close()
    wall = time.perf_counter() - t0
    seconds = wall - batches * compute_s  # the data's own share of the wall time
    samples = batches * micro
    return {"ms": 1000 * seconds / batches, "rate": samples / seconds, "step_rate": samples / wall,
            **{f"{k}/sample": (s.group_reads - before[k]) / samples for k, s in stream.shards.items()},
            "budget": {k: s.budget_rows for k, s in stream.shards.items()},
            "shards": {k: len(s.names) for k, s in stream.shards.items()}, "order": stream.order}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000, help="N: examples at the small size")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--micro", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=40, help="timed micro-batches per size and order")
    parser.add_argument("--llm-dim", type=int, default=64)
    parser.add_argument("--clip-dim", type=int, default=32)
    parser.add_argument("--orders", nargs="+", default=["permutation", "window", "lanes"],
                        choices=["permutation", "window", "lanes"],
                        help="window: each window permuted whole (data.order_lanes 0, the order before the lanes); "
                             "lanes: in --lanes lanes (default: the config's)")
    parser.add_argument("--window", type=int, default=None, help="data.order_window_rows of the window order "
                        "(default: the config's)")
    parser.add_argument("--block", type=int, default=None, help="data.order_block_rows (default: the config's)")
    parser.add_argument("--lanes", type=int, default=None, help="data.order_lanes of the lanes order (default: the "
                        "config's)")
    parser.add_argument("--resident", type=int, default=8, help="data.max_resident_shards")
    parser.add_argument("--compute-ms", type=float, default=0.0, help="a model step per micro-batch, emulated by a "
                        "sleep (so on a core of its own); ms/batch is then the data time it does not hide")
    parser.add_argument("--row-group-rows", type=int, default=None, help="rows per Parquet row group of both caches "
                        "(default: the embed writer's, omnidiff.contracts.cache.SHARD_ROW_GROUP_ROWS)")
    parser.add_argument("--prefetch", action="store_true", help="prefetch the next batch (--prefetch-batches 1)")
    parser.add_argument("--prefetch-batches", type=int, default=0, metavar="K",
                        help="read K micro-batches ahead, as train.loop does with data.prefetch_batches")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from train.data import DEFAULT_ORDER_LANES as LANES

    root = Path(tempfile.mkdtemp(prefix="order-bench-"))
    try:
        sizes = [args.rows, args.rows * args.factor]
        worlds = {n: build_world(root / f"n{n}", n, args.llm_dim, args.clip_dim, row_group_rows=args.row_group_rows)
                  for n in sizes}
        results: dict = {}
        print(f"{'order':<12} {'examples':>8} {'llm grp/s':>9} {'clip grp/s':>10} {'ms/batch':>8} {'samples/s':>9} "
              f"{'with step':>9}   (grp/s: row groups decoded per sample; ms/batch, samples/s: the data's own time; "
              "with step: samples/s of the wall time, the emulated step included)")
        for name in args.orders:
            order = {"order_window_rows": 1 << 30} if name == "permutation" else {
                k: v for k, v in (("order_window_rows", args.window), ("order_block_rows", args.block)) if v}
            if name != "permutation":
                order["order_lanes"] = 0 if name == "window" else args.lanes if args.lanes is not None else LANES
            order["max_resident_shards"] = args.resident
            for n in sizes:
                r = results[name, n] = measure(*worlds[n], args.micro, args.micro_batches, args.compute_ms / 1000,
                                               args.prefetch_batches or int(args.prefetch), **order)
                print(f"{name:<12} {n:>8} {r['llm/sample']:>9.3f} {r['clip/sample']:>10.3f} {r['ms']:>8.1f} "
                      f"{r['rate']:>9.0f} {r['step_rate']:>9.1f}   shards {r['shards']} budget rows {r['budget']} "
                      f"{r['order']}", flush=True)
        for name in args.orders:
            a, b = results[name, sizes[0]], results[name, sizes[1]]
            print(f"{name}: samples/s 10N/N {b['rate'] / a['rate']:.2f}x (data alone), "
                  f"{b['step_rate'] / a['step_rate']:.2f}x (with the emulated step)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
