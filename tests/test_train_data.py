"""The training data stream (train.data.CachedBatches, issue 17): bounded resident shards, a rank reads
only its share, the order is a function of (seed, position) only, and batches equal the per-sample
assembly they replace.

Caches here are real cache folders written by the embed stage's writer, with many small shards.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

D_LLM, D_CLIP, IMAGE = 8, 6, (3, 4, 4)


def _write(directory, inputs, tables, shape):
    from embed_cache.writer import open_writer

    with open_writer(directory, inputs) as writer:
        writer.set_value_shape(shape)
        for unit, table in enumerate(tables):
            writer.write(table, unit=unit)


def _chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """40 captions, 40 images, 40 English targets; every cache in shards of 3 rows (14 shards each).

    Captions have 1-9 tokens; 4 images reuse a caption (a key shared by examples); a few keys are
    written twice, in an old and a new shard, where the old shard's value must win.
    """
    from embed_cache.writer import write_shard_file
    from omnidiff.contracts.cache import MANIFEST_NAME, CacheStore, cache_dir, pixels_table, shard_name, states_table
    from omnidiff.contracts.encoders import clip_inputs, fingerprint, llm_inputs, pixels_inputs
    from omnidiff.contracts.keys import text_key

    root = tmp_path_factory.mktemp("stream") / "cache"
    rng = np.random.default_rng(0)
    n = 40
    llm_keys = [text_key(f"caption {i}") for i in range(n)] + [text_key("")]
    llm_values = [rng.normal(size=(1 + i % 9, D_LLM)).astype(np.float16) for i in range(n)] + [
        rng.normal(size=(2, D_LLM)).astype(np.float16)]
    clip_keys = [text_key(f"english {i}") for i in range(n)]
    clip_values = [rng.normal(size=(2 + i % 5, D_CLIP)).astype(np.float16) for i in range(n)]
    pooled = rng.normal(size=(n, D_CLIP)).astype(np.float16)
    digests = [f"{i:064x}" for i in range(n)]
    images = rng.uniform(-1, 1, (n, *IMAGE)).astype(np.float16)

    dirs = {}
    inputs = llm_inputs({"model": "stream-test"})
    dirs["llm"] = cache_dir("llm", fingerprint(inputs), root)
    order = list(range(n + 1))
    tables = [states_table([llm_keys[i] for i in c], [llm_values[i] for i in c]) for c in _chunks(order, 3)]
    _write(dirs["llm"], inputs, tables, (D_LLM,))
    # A newer shard repeating two keys with other values (as two overlapping writers could leave; the
    # writer itself refuses it): every reader takes the oldest shard's value.
    duplicate = states_table([llm_keys[0], llm_keys[5]], [np.ones_like(llm_values[0]), np.ones_like(llm_values[5])])
    entry = write_shard_file(dirs["llm"], shard_name("99991231T000000000000", 0), duplicate)
    manifest = json.loads((dirs["llm"] / MANIFEST_NAME).read_text())
    manifest["shards"].append(entry)
    (dirs["llm"] / MANIFEST_NAME).write_text(json.dumps(manifest))
    inputs = clip_inputs({"model": "stream-test-clip"})
    dirs["clip"] = cache_dir("clip", fingerprint(inputs), root)
    _write(dirs["clip"], inputs, [states_table([clip_keys[i] for i in c], [clip_values[i] for i in c], pooled[c])
                                  for c in _chunks(list(range(n)), 3)], (D_CLIP,))
    inputs = pixels_inputs(IMAGE[-1])
    dirs["pixels"] = cache_dir("pixels", fingerprint(inputs), root)
    _write(dirs["pixels"], inputs, [pixels_table([digests[i] for i in c], images[c])
                                    for c in _chunks(list(range(n)), 3)], IMAGE)
    caption_of = [i if i < 36 else i - 36 for i in range(n)]  # images 36-39 reuse captions 0-3
    diffusion = pd.DataFrame({"llm_key": [llm_keys[c] for c in caption_of], "pixel_key": digests, "lang": "en"})
    align = pd.DataFrame({"llm_key": llm_keys[:n], "target_key": clip_keys, "lang": "en", "source": "pair"})
    stores = {kind: CacheStore(path) for kind, path in dirs.items()}
    assert all(len(s.shard_names) >= 14 for s in stores.values())
    return {"dirs": dirs, "diffusion": diffusion, "align": align, "empty": llm_values[-1]}


def _stores(world):
    from omnidiff.contracts.cache import CacheStore

    return {kind: CacheStore(path) for kind, path in world["dirs"].items()}


def _reference_batch(examples: pd.DataFrame, family: str, stores, seed: int, positions, dropout=0.0, empty=None):
    """The per-sample assembly CachedBatches replaced (the code before issue 17), as the oracle."""
    from train.data import clip_target_mask, pad_states, sample_seed

    n = len(examples)
    rows = np.array([np.random.default_rng([seed, int(p) // n]).permutation(n)[int(p) % n] for p in positions])
    chosen = examples.iloc[rows]
    llm = stores["llm"].read(chosen["llm_key"].tolist())
    arrays = [llm[k] for k in chosen["llm_key"]]
    if family == "align":
        keys = chosen["target_key"].tolist()
        targets, pooled = stores["clip"].read(keys), stores["clip"].read_pooled(keys)
        target, target_mask = pad_states([targets[k] for k in keys])
        states, mask = pad_states(arrays)
        return {"llm_states": states, "llm_mask": mask, "target": target,
                "target_mask": clip_target_mask(target, target_mask),
                "target_pooled": torch.from_numpy(np.stack([pooled[k] for k in keys]).astype(np.float32))}
    keys = chosen["pixel_key"].tolist()
    pixels = stores["pixels"].read(keys)
    images = torch.from_numpy(np.stack([pixels[k] for k in keys]).astype(np.float32))
    noise, timesteps = torch.empty_like(images), torch.empty(len(positions), dtype=torch.long)
    dropped = torch.zeros(len(positions), dtype=torch.bool)
    for i, p in enumerate(positions):
        g = torch.Generator().manual_seed(sample_seed(seed, int(p)))
        noise[i] = torch.randn(images.shape[1:], generator=g)
        timesteps[i] = int(torch.randint(0, 1000, (1,), generator=g))
        dropped[i] = bool(torch.rand((), generator=g) < dropout)
    arrays = [empty if d else a for a, d in zip(arrays, dropped.tolist(), strict=True)]
    states, mask = pad_states(arrays)
    return {"llm_states": states, "llm_mask": mask, "pixels": images, "noise": noise, "timesteps": timesteps,
            "dropped": dropped}


def _assert_same(ours: dict, theirs: dict):
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("resident", [1, 3, 8])
def test_diffusion_batches_equal_the_per_sample_assembly(world, resident):
    from train.data import CachedBatches

    stores = _stores(world)
    batches = CachedBatches(world["diffusion"], "diffusion", stores, seed=7, caption_dropout=0.3,
                            empty_states=world["empty"], max_resident_shards=resident)
    dropped_some = False
    for step in range(12):  # 12 * 8 = 96 positions: crosses two epoch boundaries (40 examples)
        positions = CachedBatches.positions(step, 8, 0, 1, 8, 0)
        ours = batches.batch(positions)
        _assert_same(ours, _reference_batch(world["diffusion"], "diffusion", stores, 7, positions, 0.3,
                                            world["empty"]))
        dropped_some |= bool(ours["dropped"].any()) and not bool(ours["dropped"].all())
    assert dropped_some  # the dropout branch (mixed lengths of "" and captions) was exercised


def test_align_batches_equal_the_per_sample_assembly(world):
    from train.data import CachedBatches

    stores = _stores(world)
    batches = CachedBatches(world["align"], "align", stores, seed=3, max_resident_shards=2)
    for step in range(6):
        positions = CachedBatches.positions(step, 16, 1, 2, 8, 0)
        _assert_same(batches.batch(positions), _reference_batch(world["align"], "align", stores, 3, positions))


def test_the_oldest_shard_wins_a_duplicated_key(world):
    from train.data import CachedBatches

    stores = _stores(world)
    assert stores["llm"].shard_names[-1].startswith("part-9999")  # the newer duplicate shard is listed
    batches = CachedBatches(world["align"], "align", stores, seed=0)
    for row in (0, 5):  # the examples whose caption is duplicated
        key = world["align"]["llm_key"][row]
        position = int(np.flatnonzero(batches.example_index(np.arange(40)) == row)[0])
        batch = batches.batch(np.array([position]))
        oldest = stores["llm"].read([key])[key]
        assert not np.all(oldest == 1)  # the newer duplicate holds ones
        assert torch.equal(batch["llm_states"][0], torch.from_numpy(oldest.astype(np.float32)))


def test_resident_shards_never_exceed_the_bound(world):
    from train.data import CachedBatches

    for resident in (1, 2, 5):
        batches = CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=0,
                                max_resident_shards=resident)
        for step in range(20):
            batches.batch(CachedBatches.positions(step, 8, 0, 1, 8, 0))
            for shards in batches.shards.values():
                assert shards.resident <= resident
        for shards in batches.shards.values():
            assert shards.peak_resident == resident  # 14 shards, random rows: the bound is reached, never passed
            assert shards.shard_reads > len(shards.names)  # evictions happened: shards were read again


def test_a_rank_reads_only_its_share(world):
    """Two ranks of one run: each reads exactly the cache rows of its own positions, never the other's."""
    from train.data import CachedBatches

    examples = world["align"]  # one distinct caption and target per example: rows identify examples
    read = {}
    for rank in (0, 1):
        log: list = []
        batches = CachedBatches(examples, "align", _stores(world), seed=5, max_resident_shards=2, read_log=log)
        mine = []
        for step in range(2):  # 32 positions of one epoch (40 examples): the shares are disjoint
            for micro_step in range(2):
                positions = CachedBatches.positions(step, 16, rank, 2, 4, micro_step)
                batches.batch(positions)
                mine.extend(batches.example_index(positions).tolist())
        assert len(log) == 2 * 4  # the LLM rows and the target rows of each of the 4 micro-batches
        llm_read = {(int(s), int(r)) for shard, row in log[0::2] for s, r in zip(shard, row, strict=True)}
        llm_where = batches.where["llm"]
        assert llm_read == {(int(llm_where[0][i]), int(llm_where[1][i])) for i in mine}
        read[rank] = llm_read
    assert read[0] and read[1] and not (read[0] & read[1])


def test_the_order_does_not_depend_on_the_worker_count_or_a_restart(world):
    """Every position's batch content is the same on 1, 2 or 4 ranks, and in a fresh stream started at
    step N (a resume): the stream holds no state but the step."""
    from train.data import CachedBatches

    def step_rows(world_size: int, step: int, stream) -> list[tuple[int, ...]]:
        rows = []
        for rank in range(world_size):
            for m in range(16 // (4 * world_size)):
                positions = CachedBatches.positions(step, 16, rank, world_size, 4, m)
                batch = stream.batch(positions)
                rows += [tuple(p.tolist()) for p in batch["pixels"].flatten(1)[:, :3]]
        return sorted(rows)

    first = CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=1)
    uninterrupted = [step_rows(1, s, first) for s in range(6)]
    for world_size in (2, 4):
        resumed = CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=1, max_resident_shards=2)
        assert [step_rows(world_size, s, resumed) for s in range(3, 6)] == uninterrupted[3:]
    assert uninterrupted[0] != uninterrupted[3]  # different steps see different examples


def test_check_resume_names_a_changed_example_set(world):
    from train.data import CachedBatches

    batches = CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=1)
    state = batches.position_state(6, 16)
    assert state == {"examples": 40, "seed": 1, "next_position": 96}
    batches.check_resume(state, 6, 16)  # same run: fine
    batches.check_resume(None, 6, 16)  # a checkpoint from before the position was recorded
    with pytest.raises(RuntimeError, match=r"examples: checkpoint 41 vs now 40"):
        batches.check_resume({**state, "examples": 41}, 6, 16)


def test_missing_keys_and_bad_bounds_are_named(world):
    from train.data import CachedBatches, CacheMismatchError

    examples = world["diffusion"].copy()
    examples.loc[3, "pixel_key"] = "f" * 64
    with pytest.raises(CacheMismatchError, match=r"1 of 40 images are not in the pixels cache .*e\.g\. key f{64}"):
        CachedBatches(examples, "diffusion", _stores(world), seed=0)
    with pytest.raises(ValueError, match="max_resident_shards=0"):
        CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=0, max_resident_shards=0)
    with pytest.raises(ValueError, match=r"no column\(s\) \['target_key'\]"):
        CachedBatches(world["diffusion"], "align", _stores(world), seed=0)


def test_examples_from_a_parquet_file_read_only_the_key_columns(world, tmp_path):
    from train.data import CachedBatches

    path = tmp_path / "examples.parquet"
    world["diffusion"].to_parquet(path, index=False)
    stores = _stores(world)
    from_file = CachedBatches(path, "diffusion", stores, seed=2)
    from_frame = CachedBatches(world["diffusion"], "diffusion", stores, seed=2)
    for kind in ("llm", "pixels"):
        for ours, theirs in zip(from_file.where[kind], from_frame.where[kind], strict=True):
            assert ours.dtype == np.int32 and np.array_equal(ours, theirs)
    _assert_same(from_file.batch(np.arange(8)), from_frame.batch(np.arange(8)))


def test_pad_flat_matches_pad_states():
    from train.data import pad_flat, pad_states

    arrays = [np.full((n, 3), n, np.float16) for n in (2, 0, 5, 1)]
    states, mask = pad_states(arrays)
    flat_states, flat_mask = pad_flat(np.concatenate(arrays), np.array([2, 0, 5, 1]))
    assert torch.equal(states, flat_states) and torch.equal(mask, flat_mask)
    assert states.shape == (4, 5, 3) and mask.sum(1).tolist() == [2, 0, 5, 1]
    assert states[2, 4, 0] == 5 and states[0, 2:].abs().sum() == 0


# ------------------------------------------------------------------------------ row groups (issue 17)


def _grouped_caches(root, rows: int, shard_rows: int, row_group_rows: int, seed: int = 0):
    """An LLM cache and a pixels cache of ``rows`` keys in shards of ``shard_rows`` rows cut into row groups of
    ``row_group_rows`` rows (0: one group per shard, the layout before), and their diffusion example table."""
    from embed_cache.writer import open_writer
    from omnidiff.contracts.cache import cache_dir, pixels_table, states_table
    from omnidiff.contracts.encoders import fingerprint, llm_inputs, pixels_inputs
    from omnidiff.contracts.keys import text_key

    rng = np.random.default_rng(seed)
    keys = [text_key(f"grouped {i}") for i in range(rows)]
    digests = [f"{i:064x}" for i in range(rows)]
    dirs = {}
    for kind, inputs, shape in (("llm", llm_inputs({"model": "grouped"}), (D_LLM,)),
                                ("pixels", pixels_inputs(IMAGE[-1]), IMAGE)):
        dirs[kind] = cache_dir(kind, fingerprint(inputs), root)
        with open_writer(dirs[kind], inputs) as writer:
            writer.set_value_shape(shape)
            for unit, chunk in enumerate(_chunks(list(range(rows)), shard_rows)):
                if kind == "llm":
                    table = states_table([keys[i] for i in chunk],
                                         [rng.normal(size=(1 + i % 7, D_LLM)).astype(np.float16) for i in chunk])
                else:
                    table = pixels_table([digests[i] for i in chunk],
                                         rng.uniform(-1, 1, (len(chunk), *IMAGE)).astype(np.float16))
                writer.write(table, unit, row_group_rows=row_group_rows or len(chunk))
    examples = pd.DataFrame({"llm_key": keys, "pixel_key": digests, "lang": "en"})
    return dirs, examples


def test_shards_are_written_in_small_row_groups(tmp_path):
    import pyarrow.parquet as pq

    from omnidiff.contracts.cache import SHARD_ROW_GROUP_ROWS, SHARDS_DIR, CacheStore, encode_shard, states_table

    table = states_table([f"k{i}" for i in range(70)], [np.ones((2, D_LLM), np.float16)] * 70)
    groups = pq.ParquetFile(pa_buffer(encode_shard(table))).metadata
    assert SHARD_ROW_GROUP_ROWS == 32
    assert [groups.row_group(g).num_rows for g in range(groups.num_row_groups)] == [32, 32, 6]
    eight = pq.ParquetFile(pa_buffer(encode_shard(table, row_group_rows=8))).metadata  # embed's row_group_rows=8
    assert [eight.row_group(g).num_rows for g in range(eight.num_row_groups)] == [8] * 8 + [6]
    one = pq.ParquetFile(pa_buffer(encode_shard(table, row_group_rows=100))).metadata
    assert one.num_row_groups == 1
    with pytest.raises(ValueError, match="row_group_rows=0"):
        encode_shard(table, row_group_rows=0)
    dirs, _ = _grouped_caches(tmp_path, rows=20, shard_rows=10, row_group_rows=4)
    store = CacheStore(dirs["llm"])
    for name in store.shard_names:  # the embed writer's shards, as a plain pyarrow reader sees them
        meta = pq.ParquetFile(dirs["llm"] / SHARDS_DIR / name).metadata
        assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [4, 4, 2]


def pa_buffer(data: bytes):
    import pyarrow as pa

    return pa.BufferReader(data)


@pytest.mark.parametrize("resident", [1, 4, 64])
def test_batches_from_row_groups_equal_the_per_sample_assembly(tmp_path, resident):
    """Shards of 12 rows in groups of 5: a batch decodes only the groups holding its rows, never holds more than
    ``resident`` shards' worth of rows, and builds exactly what the per-sample code built."""
    from omnidiff.contracts.cache import CacheStore
    from train.data import CachedBatches

    dirs, examples = _grouped_caches(tmp_path, rows=60, shard_rows=12, row_group_rows=5)
    stores = {kind: CacheStore(path) for kind, path in dirs.items()}
    batches = CachedBatches(examples, "diffusion", stores, seed=4, max_resident_shards=resident)
    assert [len(s) for s in batches.shards["llm"].group_starts] == [4] * 5  # 3 groups per shard: 0, 5, 10, 12
    for step in range(10):  # 80 positions: crosses an epoch boundary
        positions = CachedBatches.positions(step, 8, 0, 1, 8, 0)
        before = {k: s.group_reads for k, s in batches.shards.items()}
        _assert_same(batches.batch(positions), _reference_batch(examples, "diffusion", stores, 4, positions))
        rows = batches.example_index(positions)
        for kind, shards in batches.shards.items():
            shard, row = (w[rows] for w in batches.where[kind])
            needed = {(int(s), int(r) // 5) for s, r in zip(shard, row, strict=True)}
            assert shards.group_reads - before[kind] <= len(needed)  # only the groups of this batch's rows
            assert shards.budget_rows == 12 * resident  # the bound: `resident` shards' worth of rows
            assert shards.resident_rows == sum(t.num_rows for t in shards._tables.values()) <= shards.budget_rows
            assert shards.peak_resident_rows <= shards.budget_rows
            assert all(t.num_rows <= 5 for t in shards._tables.values())  # decoded pieces are groups, not shards
    for shards in batches.shards.values():
        if resident == 1:  # one shard's worth: several groups of different shards, evicted as batches pass
            assert shards.peak_resident > 1 and shards.group_reads > 3 * 5


def test_a_cache_mixing_one_group_shards_and_grouped_shards_reads_the_same(tmp_path):
    """Shards written before row groups (one group each) and after, side by side in one stream."""
    from omnidiff.contracts.cache import CacheStore
    from train.data import CachedBatches

    whole, examples = _grouped_caches(tmp_path / "whole", rows=36, shard_rows=9, row_group_rows=0, seed=1)
    grouped, _ = _grouped_caches(tmp_path / "grouped", rows=36, shard_rows=9, row_group_rows=2, seed=1)
    a = CachedBatches(examples, "diffusion", {k: CacheStore(p) for k, p in whole.items()}, seed=0,
                      max_resident_shards=3)
    b = CachedBatches(examples, "diffusion", {k: CacheStore(p) for k, p in grouped.items()}, seed=0,
                      max_resident_shards=3)
    assert {len(s) for s in a.shards["pixels"].group_starts} == {2} and {len(s) for s in b.shards["pixels"].group_starts} == {6}
    for step in range(5):
        positions = CachedBatches.positions(step, 8, 0, 1, 8, 0)
        _assert_same(a.batch(positions), b.batch(positions))
    assert b.shards["pixels"].group_reads > a.shards["pixels"].group_reads  # smaller pieces, more of them
    assert a.shards["pixels"].group_reads == a.shards["pixels"].shard_reads  # one group = one whole shard


def test_batches_read_row_groups_of_a_cache_on_s3(tmp_path, s3_prefix):
    """The same stream over caches on the S3 server (ranged reads of the groups) equals the local one."""
    from omnidiff.contracts.cache import CacheStore
    from train.data import CachedBatches

    local, examples = _grouped_caches(tmp_path, rows=24, shard_rows=8, row_group_rows=3, seed=2)
    remote, _ = _grouped_caches(f"{s3_prefix}/cache", rows=24, shard_rows=8, row_group_rows=3, seed=2)
    assert str(remote["llm"]).startswith("s3://")
    a = CachedBatches(examples, "diffusion", {k: CacheStore(p) for k, p in local.items()}, seed=9, max_resident_shards=2)
    b = CachedBatches(examples, "diffusion", {k: CacheStore(p) for k, p in remote.items()}, seed=9, max_resident_shards=2)
    for step in range(3):
        positions = CachedBatches.positions(step, 8, 0, 1, 8, 0)
        _assert_same(b.batch(positions), a.batch(positions))
    assert b.shards["llm"].group_reads == a.shards["llm"].group_reads


def test_driver_reads_cached_states_one_shard_at_a_time(world):
    """The driver's samples of a cache (input-norm statistics, the collapse check) decode one shard's row groups
    at a time and give what CacheStore.read gives (issue 17: the driver's peak must not grow with the cache)."""
    from train.inputs import iter_states, llm_state_stats

    store = _stores(world)["llm"]
    keys = store.keys()
    log: list = []
    got = dict(iter_states(store, keys, read_log=log))
    expected = store.read(keys)  # the oldest shard's value wins a duplicated key, in both
    assert sorted(got) == keys
    for key in keys:
        np.testing.assert_array_equal(got[key], expected[key])
    assert len(log) == len({int(s[0]) for s, _ in log}) >= 14  # one read per shard, each of a single shard
    assert all(len(np.unique(s)) == 1 for s, _ in log)
    # the statistics are those of the whole-read computation, bit for bit (same order of additions)
    chosen = sorted(keys)[:30]
    total = np.zeros(store.hidden_size)
    total_sq = np.zeros(store.hidden_size)
    count = 0
    for key in chosen:
        x = np.asarray(expected[key], dtype=np.float64)
        total, total_sq, count = total + x.sum(0), total_sq + np.square(x).sum(0), count + x.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    ours = llm_state_stats(store, keys, max_texts=30)
    np.testing.assert_array_equal(ours[0], mean.astype(np.float32))
    np.testing.assert_array_equal(ours[1], std.astype(np.float32))


# ------------------------------------------------------------------------------ the block order (issue 17)


def test_epoch_order_is_a_permutation_of_each_epoch_and_a_function_of_seed_and_epoch():
    from train.data import epoch_order, order_blocks

    n, window = 1000, 128
    located = np.random.default_rng(5).permutation(n)  # the examples in cache order
    pieces = np.arange(n) // 5  # the row group of each place in cache order: groups of 5 rows
    blocks = order_blocks(pieces, 16)
    assert blocks[:5].tolist() == [0, 20, 35, 50, 65]  # whole groups: the first group start at or past 16k
    assert np.array_equal(order_blocks(np.arange(n), 16), np.arange(0, n, 16))  # one-row groups: plain blocks

    def order(seed, epoch, window=window):
        return epoch_order(n, seed, epoch, window, located, blocks)

    rank = np.empty(n, np.int64)
    rank[located] = np.arange(n)  # example -> its place in cache order
    for epoch in range(3):
        visited = order(7, epoch)
        assert visited.shape == (n,) and np.array_equal(np.sort(visited), np.arange(n))  # each example once
        assert np.array_equal(visited, order(7, epoch))  # deterministic
        for start in range(0, n, window):  # a window holds whole blocks (but the two at its ends): few groups
            assert len(np.unique(pieces[rank[visited[start:start + window]]])) <= window // 5 + 2
    assert not np.array_equal(order(7, 0), order(7, 1)) and not np.array_equal(order(7, 0), order(8, 0))
    # a split that fits the window (or no cache order given): exactly the whole-epoch permutation of before
    before = np.random.default_rng([7, 2]).permutation(n)
    assert np.array_equal(order(7, 2, window=n), before) and np.array_equal(order(7, 2, window=n + 1), before)
    assert np.array_equal(epoch_order(n, 7, 2, window), before)
    assert not np.array_equal(order(7, 2), before)
    with pytest.raises(ValueError, match="block_starts start at 0"):
        epoch_order(n, 7, 2, window, located, blocks[1:])


def test_a_split_within_the_window_keeps_the_whole_epoch_permutation(world):
    from train.data import CachedBatches

    stores = _stores(world)
    positions = np.arange(3 * 40 + 5)  # three epochs and a bit
    old = np.array([np.random.default_rng([3, int(p) // 40]).permutation(40)[int(p) % 40] for p in positions])
    for window in (None, 40, 1 << 20):  # the default (8192), exactly N, far above
        sizes = {} if window is None else {"order_window_rows": window}
        batches = CachedBatches(world["align"], "align", stores, seed=3, **sizes)
        assert not batches.windowed and batches.order == "permutation (whole epoch)"
        assert np.array_equal(batches.example_index(positions), old)
        assert "order" not in batches.position_state(2, 16)  # as checkpoints before the block order
    windowed = CachedBatches(world["align"], "align", stores, seed=3, order_window_rows=39, order_block_rows=4)
    assert windowed.windowed and not np.array_equal(windowed.example_index(positions), old)
    for epoch in range(3):
        assert sorted(windowed.example_index(np.arange(40) + 40 * epoch).tolist()) == list(range(40))


def step_rows(world_size: int, step: int, stream) -> list[tuple[int, ...]]:
    """The examples (first pixels) every rank of ``world_size`` trains on at ``step`` (global batch 16, micro 4)."""
    from train.data import CachedBatches

    rows = []
    for rank in range(world_size):
        for m in range(16 // (4 * world_size)):
            batch = stream.batch(CachedBatches.positions(step, 16, rank, world_size, 4, m))
            rows += [tuple(p.tolist()) for p in batch["pixels"].flatten(1)[:, :3]]
    return sorted(rows)


def test_the_block_order_does_not_depend_on_the_worker_count_or_a_restart(world):
    """The block order too is a function of (seed, position): 1, 2 or 4 ranks and a fresh stream (a resume) started
    at step 3 see the same examples at every step."""
    from train.data import CachedBatches

    sizes = {"order_window_rows": 16, "order_block_rows": 4}

    first = CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=1, **sizes)
    assert first.windowed
    uninterrupted = [step_rows(1, s, first) for s in range(6)]
    for world_size in (2, 4):
        resumed = CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=1, max_resident_shards=2, **sizes)
        assert [step_rows(world_size, s, resumed) for s in range(3, 6)] == uninterrupted[3:]
    plain = CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=1)
    assert [step_rows(1, s, plain) for s in range(6)] != uninterrupted  # the block order is another order


def test_check_resume_refuses_a_checkpoint_of_another_order(world):
    from train.data import CachedBatches

    stores = _stores(world)
    windowed = CachedBatches(world["align"], "align", stores, seed=1, order_window_rows=16, order_block_rows=4)
    state = windowed.position_state(6, 16)
    assert state["order"] == "blocks" and state["order_window_rows"] == 16 and state["order_block_rows"] == 4
    assert len(state["order_layout"]) == 16
    windowed.check_resume(state, 6, 16)  # same run: fine
    plain = CachedBatches(world["align"], "align", stores, seed=1)
    old = plain.position_state(6, 16)  # a checkpoint of the whole-epoch permutation (and of runs before)
    with pytest.raises(RuntimeError, match=r"order: checkpoint permutation vs now blocks.*whole-epoch permutation"):
        windowed.check_resume(old, 6, 16)
    with pytest.raises(RuntimeError, match=r"order: checkpoint blocks vs now permutation.*block_rows=4, "
                                           r"window_rows=16"):
        plain.check_resume(state, 6, 16)
    other = CachedBatches(world["align"], "align", stores, seed=1, order_window_rows=20, order_block_rows=4)
    with pytest.raises(RuntimeError, match=r"order_window_rows: checkpoint 16 vs now 20"):
        other.check_resume(state, 6, 16)
    with pytest.raises(RuntimeError, match=r"order_layout: checkpoint 0{16} vs now"):
        windowed.check_resume({**state, "order_layout": "0" * 16}, 6, 16)


def _reads_per_sample(dirs, examples, samples: int, **sizes) -> float:
    from omnidiff.contracts.cache import CacheStore
    from train.data import CachedBatches

    batches = CachedBatches(examples, "diffusion", {k: CacheStore(p) for k, p in dirs.items()}, seed=0,
                            max_resident_shards=2, **sizes)
    for step in range(samples // 8):
        batches.batch(CachedBatches.positions(step, 8, 0, 1, 8, 0))
    return sum(s.group_reads for s in batches.shards.values()) / samples


def test_a_batch_decodes_as_many_row_groups_per_sample_at_10n_as_at_n(tmp_path):
    """Shards of 32 rows in groups of 4, two shards' worth resident (64 rows) and a 64-row window: at N = 64 examples
    (one window: the whole-epoch permutation) an epoch decodes each group once; at 10N = 640 the block order decodes
    about as many groups per sample over five windows, where the whole-epoch permutation decodes several times more."""
    small, small_examples = _grouped_caches(tmp_path / "n", rows=64, shard_rows=32, row_group_rows=4)
    large, large_examples = _grouped_caches(tmp_path / "10n", rows=640, shard_rows=32, row_group_rows=4)
    sizes = {"order_window_rows": 64, "order_block_rows": 8}
    at_n = _reads_per_sample(small, small_examples, 64, **sizes)  # one epoch
    assert at_n == pytest.approx(2 * 16 / 64)  # 16 groups per cache, each decoded once
    at_10n = _reads_per_sample(large, large_examples, 320, **sizes)  # five windows
    assert at_10n <= 1.1 * at_n
    permuted = _reads_per_sample(large, large_examples, 320, order_window_rows=1 << 20)
    assert permuted > 2 * at_n  # what the block order saves: the test can tell the two orders apart


def test_prefetch_changes_when_groups_are_decoded_never_the_batches(tmp_path):
    """The training loop prefetches the next micro-batch's row groups while the model computes: the batches are those
    of a stream that never prefetches, and a prefetched batch finds every group it needs resident."""
    from omnidiff.contracts.cache import CacheStore
    from train.data import CachedBatches

    dirs, examples = _grouped_caches(tmp_path, rows=200, shard_rows=20, row_group_rows=4)
    sizes = {"order_window_rows": 48, "order_block_rows": 8, "max_resident_shards": 3}
    plain = CachedBatches(examples, "diffusion", {k: CacheStore(p) for k, p in dirs.items()}, seed=2, **sizes)
    ahead = CachedBatches(examples, "diffusion", {k: CacheStore(p) for k, p in dirs.items()}, seed=2, **sizes)
    assert ahead.windowed
    ahead.prefetch(CachedBatches.positions(0, 8, 0, 1, 8, 0))
    for step in range(30):  # 240 positions: crosses an epoch boundary
        positions = CachedBatches.positions(step, 8, 0, 1, 8, 0)
        ahead._wait()  # what batch() waits for first; here so the counts below are the batch's own
        before = {k: s.group_reads for k, s in ahead.shards.items()}
        ours = ahead.batch(positions)
        assert {k: s.group_reads for k, s in ahead.shards.items()} == before  # all decoded by the prefetch
        ahead.prefetch(CachedBatches.positions(step + 1, 8, 0, 1, 8, 0))
        _assert_same(ours, plain.batch(positions))
    ahead.close()
    assert ahead._executor is None and all(not s._files for s in ahead.shards.values())


def test_the_order_sizes_are_checked():
    from omnidiff.config import ConfigError
    from train.config import DataSection
    from train.data import CachedBatches

    assert (DataSection().order_window_rows, DataSection().order_block_rows, DataSection().prefetch) == (8192, 64, True)
    with pytest.raises(ConfigError, match="order_window_rows.*must be >= data.order_block_rows=64"):
        DataSection(order_window_rows=32)
    with pytest.raises(ValueError, match="order_block_rows=0"):
        CachedBatches(pd.DataFrame({"llm_key": ["x"], "pixel_key": ["y"]}), "diffusion", {}, seed=0,
                      order_block_rows=0)


def test_group_index_numbers_the_row_groups_of_the_whole_cache(tmp_path):
    import pyarrow as pa

    from omnidiff.contracts.cache import CacheStore
    from train.data import ResidentShards, fixed_width_keys

    dirs, examples = _grouped_caches(tmp_path, rows=50, shard_rows=12, row_group_rows=5)  # groups 5, 5, 2 per shard
    shards = ResidentShards(CacheStore(dirs["llm"]))

    shard, row = shards.locate(fixed_width_keys(pa.array(examples["llm_key"].tolist())), "captions")
    index = shards.group_index(shard, row)
    group, _ = shards._groups(shard.astype(np.int64), row)  # the per-shard search a batch uses
    assert np.array_equal(index, np.unique(shard.astype(np.int64) << 32 | group, return_inverse=True)[1])
    assert index.max() + 1 == sum(len(s) - 1 for s in shards.group_starts) == 4 * 3 + 1  # 50 rows: 4 x 12 + 2


# ------------------------------------------------------------------------------ lanes and read-ahead (issue 17)


def test_lanes_visit_each_epoch_once_drawing_from_few_blocks_at_a_time():
    """data.order_lanes: each window in K lanes merged at one rate. Still every example once per epoch, a function of
    (seed, epoch); any stretch of positions draws from at most about 2K blocks (K lanes, each in one block or moving on
    to its next), where the window permuted whole draws from nearly all; the first positions read K blocks."""
    from train.data import epoch_order, order_blocks

    n, window, block, lanes = 4000, 1024, 16, 4
    located = np.random.default_rng(5).permutation(n)
    blocks = order_blocks(np.arange(n) // 8, block)  # groups of 8 rows, blocks of 2 groups
    block_of = np.empty(n, np.int64)  # example -> its block
    block_of[located] = np.searchsorted(blocks, np.arange(n), side="right") - 1

    def order(seed, epoch, k=lanes):
        return epoch_order(n, seed, epoch, window, located, blocks, k)

    for epoch in range(2):
        visited = order(3, epoch)
        assert np.array_equal(np.sort(visited), np.arange(n))  # each example exactly once
        assert np.array_equal(visited, order(3, epoch))  # deterministic
        for start in range(0, n - 64, 37):  # any 64 positions inside a window: at most 2 blocks per lane
            if start // window == (start + 63) // window:
                assert len(np.unique(block_of[visited[start:start + 64]])) <= 2 * lanes
        for start in range(0, n, window):  # a window holds the same examples as the window permuted whole
            assert np.array_equal(np.sort(visited[start:start + window]),
                                  np.sort(order(3, epoch, k=0)[start:start + window]))
    assert not np.array_equal(order(3, 0), order(3, 1)) and not np.array_equal(order(3, 0), order(4, 0))
    assert not np.array_equal(order(3, 0), order(3, 0, k=0))
    opened = np.unique(block_of[order(3, 0)[:48]])  # 48 positions: 12 per lane, inside each lane's first block
    assert len(opened) == lanes
    window_blocks = np.unique(block_of[order(3, 0)[:window]])  # the first window's blocks (ids follow cache order)
    slices = np.searchsorted(window_blocks, opened) * lanes // len(window_blocks)
    assert sorted(slices.tolist()) == list(range(lanes))  # one block from each quarter of the window in cache order
    assert len(np.unique(block_of[order(3, 0, k=0)[:48]])) > 5 * lanes  # the whole-window permutation: ~all blocks
    # one lane per block or more lanes than blocks: every block its own lane, still a permutation of the window
    many = epoch_order(n, 3, 0, window, located, blocks, 1000)
    assert np.array_equal(np.sort(many), np.arange(n))


def test_a_run_starts_on_few_row_groups_with_lanes(tmp_path):
    """The cold start the lanes are for: the first 48 samples of a 640-example split (windows of 256 rows = 8 blocks
    of 32 = 64 LLM groups of 4) decode the groups of K = 2 blocks with lanes (24 rows of each lane's first block),
    about twice as many with each window permuted whole (48 random rows of 64 groups)."""
    from omnidiff.contracts.cache import CacheStore
    from train.data import CachedBatches

    dirs, examples = _grouped_caches(tmp_path, rows=640, shard_rows=32, row_group_rows=4)

    def llm_groups(**sizes) -> int:
        batches = CachedBatches(examples, "diffusion", {k: CacheStore(p) for k, p in dirs.items()}, seed=0,
                                order_window_rows=256, order_block_rows=32, **sizes)
        for step in range(6):
            batches.batch(CachedBatches.positions(step, 8, 0, 1, 8, 0))
        return batches.shards["llm"].group_reads

    assert llm_groups(order_lanes=2) == 2 * 8  # two blocks of eight 4-row groups
    assert llm_groups(order_lanes=0) > 1.5 * 2 * 8


def test_lanes_do_not_depend_on_the_worker_count_or_a_restart_and_are_checked_on_resume(world):
    from train.data import CachedBatches

    sizes = {"order_window_rows": 20, "order_block_rows": 4, "order_lanes": 2}

    first = CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=1, **sizes)
    assert first.windowed and first.order == "blocks (block_rows=4, window_rows=20, lanes=2)"
    uninterrupted = [step_rows(1, s, first) for s in range(6)]  # 96 positions: over two epochs of 40
    for world_size in (2, 4):
        resumed = CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=1, max_resident_shards=2, **sizes)
        assert [step_rows(world_size, s, resumed) for s in range(3, 6)] == uninterrupted[3:]
    whole = CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=1, **{**sizes, "order_lanes": 0})
    assert [step_rows(1, s, whole) for s in range(6)] != uninterrupted  # the lanes are another order
    state = first.position_state(6, 16)
    assert state["order_lanes"] == 2 and "order_lanes" not in whole.position_state(6, 16)  # as before the lanes
    first.check_resume(state, 6, 16)
    with pytest.raises(RuntimeError, match=r"order_lanes: checkpoint None vs now 2.*lanes=0.*data\.order_lanes"):
        first.check_resume(whole.position_state(6, 16), 6, 16)  # a checkpoint from before the lanes
    with pytest.raises(RuntimeError, match=r"order_lanes: checkpoint 2 vs now None"):
        whole.check_resume(state, 6, 16)
    with pytest.raises(ValueError, match="order_lanes=-1"):
        CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=1, order_lanes=-1)


@pytest.mark.parametrize("resident", [1, 8])
def test_reading_several_batches_ahead_never_changes_the_batches(tmp_path, resident):
    """train.loop queues data.prefetch_batches micro-batches ahead: a batch waits only for the jobs up to its own while
    later ones decode beside it (under the resident sets' lock). The batches are those of a stream that never
    prefetches, with a tight budget (groups decoded ahead evicted before their batch: decoded again) or a loose one,
    across an epoch boundary; with room, a batch whose job is done decodes nothing itself."""
    from omnidiff.contracts.cache import CacheStore
    from train.data import CachedBatches

    dirs, examples = _grouped_caches(tmp_path, rows=200, shard_rows=20, row_group_rows=4)
    sizes = {"order_window_rows": 48, "order_block_rows": 8, "order_lanes": 3, "max_resident_shards": resident}
    plain = CachedBatches(examples, "diffusion", {k: CacheStore(p) for k, p in dirs.items()}, seed=2, **sizes)
    ahead = CachedBatches(examples, "diffusion", {k: CacheStore(p) for k, p in dirs.items()}, seed=2, **sizes)
    depth, steps = 4, 30  # 240 positions: crosses the epoch boundary at 200
    for step in range(depth):
        ahead.prefetch(CachedBatches.positions(step, 8, 0, 1, 8, 0))
    for step in range(steps):
        positions = CachedBatches.positions(step, 8, 0, 1, 8, 0)
        ours = ahead.batch(positions)
        if resident == 1:  # its own job and those before it were waited for, not the later ones
            assert len(ahead._pending) == min(depth - 1, steps - 1 - step)
        if step + depth < steps:
            ahead.prefetch(CachedBatches.positions(step + depth, 8, 0, 1, 8, 0))
        _assert_same(ours, plain.batch(positions))
        if resident == 8 and step + 1 < steps:  # room for every group: the next batch finds its groups decoded
            ahead._wait()  # every queued job (later ones too, so none decodes while the counts are read)
            before = {k: s.group_reads for k, s in ahead.shards.items()}
            again = ahead.batch(CachedBatches.positions(step + 1, 8, 0, 1, 8, 0))
            assert {k: s.group_reads for k, s in ahead.shards.items()} == before
            _assert_same(again, plain.batch(CachedBatches.positions(step + 1, 8, 0, 1, 8, 0)))
    ahead.close()
    assert ahead._executor is None and not ahead._pending and all(not s._files for s in ahead.shards.values())
    if resident == 1:
        assert sum(s.group_reads for s in ahead.shards.values()) > sum(s.group_reads for s in plain.shards.values())


def test_a_read_ahead_failure_is_raised_by_the_batch_that_waits_for_it(tmp_path):
    from omnidiff.contracts.cache import SHARDS_DIR, CacheStore, CorruptShardError
    from train.data import CachedBatches

    dirs, examples = _grouped_caches(tmp_path, rows=40, shard_rows=20, row_group_rows=4)
    batches = CachedBatches(examples, "diffusion", {k: CacheStore(p) for k, p in dirs.items()}, seed=0)
    batches.close()  # the files located at start are closed: the next reads open them again
    for shard in (dirs["pixels"] / SHARDS_DIR).iterdir():
        shard.write_bytes(b"not parquet")
    batches.prefetch(CachedBatches.positions(0, 8, 0, 1, 8, 0))
    with pytest.raises(CorruptShardError):
        batches.batch(CachedBatches.positions(0, 8, 0, 1, 8, 0))
    assert not batches._pending
    batches.close()


def _micro_batches(stream, step: int, world_size: int, micro: int = 4, global_batch: int = 16) -> list[list[int]]:
    """The positions of every micro-batch of ``step``, in the order ``(micro-step, rank)`` (the same slots on any
    worker count: slot ``m * world + r``)."""
    return [stream.micro_positions(step, global_batch, rank, world_size, micro, m).tolist()
            for m in range(global_batch // (micro * world_size)) for rank in range(world_size)]


@pytest.mark.parametrize("sizes", [{}, {"order_window_rows": 20, "order_block_rows": 4, "order_lanes": 2}])
def test_micro_batches_by_length_deal_each_step_by_token_count_and_pad_less(world, sizes):
    """data.micro_by_length: a step's 16 positions sorted by their captions' token counts and cut into micro-batches
    of 4. Each step trains on the same positions (so the same examples) as the consecutive micro-batches; every
    micro-batch's captions are no longer than the next one's; the padded LLM length summed over the micro-batches
    is never more than with consecutive micro-batches, and less over a run (captions of 1-9 tokens here)."""
    from train.data import CachedBatches

    dealt = CachedBatches(world["align"], "align", _stores(world), seed=3, micro_by_length=True, **sizes)
    plain = CachedBatches(world["align"], "align", _stores(world), seed=3, **sizes)
    assert plain.lengths is None and dealt.lengths.dtype == np.int32 and len(dealt.lengths) == 40
    padded = {"dealt": 0, "plain": 0}
    for step in range(6):  # 96 positions: over two epochs of 40
        consecutive = _micro_batches(plain, step, 1)
        by_length = _micro_batches(dealt, step, 1)
        assert consecutive == [list(range(step * 16 + 4 * m, step * 16 + 4 * m + 4)) for m in range(4)]
        assert sorted(sum(by_length, [])) == sum(consecutive, [])  # the step's positions, each once
        lengths = []
        for positions in by_length:
            batch = dealt.batch(np.asarray(positions))
            assert torch.equal(batch["llm_states"], plain.batch(np.asarray(positions))["llm_states"])  # same examples
            lengths.append(batch["llm_mask"].sum(1))  # (4,) real tokens of each caption
            padded["dealt"] += batch["llm_states"].shape[1]
        for shorter, longer in zip(lengths[:-1], lengths[1:], strict=True):
            assert int(shorter.max()) <= int(longer.min())
        step_padded = sum(plain.batch(np.asarray(p))["llm_states"].shape[1] for p in consecutive)
        assert sum(dealt.batch(np.asarray(p))["llm_states"].shape[1] for p in by_length) <= step_padded
        padded["plain"] += step_padded
    assert padded["dealt"] < 0.85 * padded["plain"], padded


def test_micro_batches_by_length_do_not_depend_on_the_worker_count_or_a_restart_and_are_checked_on_resume(world):
    """The same micro-batches on 1, 2 or 4 ranks (micro 4, global batch 16) and in a fresh stream (a resume); a
    checkpoint records the setting and a resume under the other one is refused naming data.micro_by_length."""
    from train.data import CachedBatches

    first = CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=1, micro_by_length=True)
    uninterrupted = [_micro_batches(first, s, 1) for s in range(6)]
    assert any(u != [list(range(s * 16 + 4 * m, s * 16 + 4 * m + 4)) for m in range(4)]
               for s, u in enumerate(uninterrupted))  # not the consecutive micro-batches
    for world_size in (2, 4):
        resumed = CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=1, micro_by_length=True,
                                max_resident_shards=2)
        assert [_micro_batches(resumed, s, world_size) for s in range(3, 6)] == uninterrupted[3:]
    state = first.position_state(6, 16)
    assert state["micro_batches"] == "by_length"
    first.check_resume(state, 6, 16)
    plain = CachedBatches(world["diffusion"], "diffusion", _stores(world), seed=1)
    assert "micro_batches" not in plain.position_state(6, 16)  # as before the option
    with pytest.raises(RuntimeError, match=r"micro_batches: checkpoint None vs now by_length.*data\.micro_by_length"):
        first.check_resume(plain.position_state(6, 16), 6, 16)
    with pytest.raises(RuntimeError, match=r"micro_batches: checkpoint by_length vs now None"):
        plain.check_resume(state, 6, 16)


def test_a_cache_without_a_length_column_deals_consecutive_micro_batches(world):
    """A pixel cache has no length column: ResidentShards.locate(lengths=True) gives 0 for its keys."""
    import pyarrow as pa

    from train.data import ResidentShards, fixed_width_keys

    store = _stores(world)["pixels"]
    keys = fixed_width_keys(pa.array(world["diffusion"]["pixel_key"].tolist()))
    shard, row, length = ResidentShards(store).locate(keys, "images", lengths=True)
    assert len(shard) == len(row) == len(length) == 40 and not length.any()
    llm = _stores(world)["llm"]
    keys = fixed_width_keys(pa.array(world["align"]["llm_key"].tolist()))
    assert ResidentShards(llm).locate(keys, "captions", lengths=True)[2].tolist() == [1 + i % 9 for i in range(40)]
