"""Unit tests of the cache format, store, fingerprints and batching (pure pyarrow/numpy, no model, no Ray).

.venv/bin/pytest tests/test_embed_store.py -x -q
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from embed_cache import batching
from embed_cache.inputs import KeyPartitions
from embed_cache.writer import CacheWriter, write_shard_file
from omnidiff.contracts.cache import (
    JOURNAL_DIR,
    MANIFEST_NAME,
    SHARDS_DIR,
    CacheError,
    CacheStore,
    CorruptShardError,
    NonFiniteStatesError,
    cache_dir,
    journal_seqs,
    pixels_table,
    read_manifest,
    states_table,
)
from omnidiff.contracts.encoders import clip_inputs, fingerprint, llm_fingerprint, llm_inputs, pixels_inputs
from omnidiff.contracts.keys import key_hash, text_key

ENCODER = {
    "model_id": "m",
    "weights_digest": "abc",
    "layer": 2,
    "max_length": 512,
    "dtype": "float32",
    "template": "raw",
    "normaliser_version": "1",
}
D = 8


def _states(rng, lengths, dim=D):
    return [rng.standard_normal((n, dim)).astype(np.float32) for n in lengths]


def _writer(tmp_path, inputs=None):
    inputs = inputs or llm_inputs(ENCODER)
    return CacheWriter(cache_dir(inputs["kind"], fingerprint(inputs), tmp_path), inputs)


# ------------------------------------------------------------------------------- fingerprints


def test_fingerprint_changes_with_every_input_and_ignores_key_order():
    base = llm_fingerprint(ENCODER)
    assert base == llm_fingerprint(dict(reversed(list(ENCODER.items()))))
    assert len(base) == 16
    seen = {base}
    for key, new in [
        ("model_id", "n"),
        ("weights_digest", "abd"),
        ("layer", 1),
        ("max_length", 256),
        ("dtype", "bfloat16"),
        ("template", "chat"),
        ("normaliser_version", "2"),
    ]:
        fp = llm_fingerprint({**ENCODER, key: new})
        assert fp not in seen, key
        seen.add(fp)
    clip = {"model_id": "clip-text", "weights_digest": "d", "template": "clip-windows-77x3"}
    assert fingerprint(clip_inputs(clip)) != fingerprint(clip_inputs({**clip, "template": "clip-windows-77x2"}))
    assert fingerprint(pixels_inputs(16)) != fingerprint(pixels_inputs(32))
    assert fingerprint(pixels_inputs(16)) != fingerprint(pixels_inputs(16, vae_digest="v", vae_scaling_factor=0.18))
    with pytest.raises(ValueError, match="kind"):
        fingerprint({"model_id": "m"})


# ------------------------------------------------------------------------------- batching


def test_pack_batches_respects_budget_and_covers_everything_once():
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(1, 300, size=500))
    batches = batching.pack_batches(lengths, max_tokens=1024, max_batch_size=32)
    covered = [i for b in batches for i in range(b.start, b.stop)]
    assert covered == list(range(500))
    for b in batches:
        n = b.stop - b.start
        assert n <= 32
        assert n == 1 or n * lengths[b.stop - 1] <= 1024
    # Length-grouped batches waste little; padding everything to the longest wastes most.
    assert batching.padding_fraction(lengths, batches) < 0.1
    assert batching.fixed_padding_fraction(lengths, 300) > 0.4


def test_min_cost_batches_cut_where_padding_costs_more_than_a_forward():
    lengths = [1, 1, 2, 2, 3, 30, 31, 60]
    greedy = batching.pack_batches(lengths, max_tokens=256, max_batch_size=16)
    assert greedy == [slice(0, 7), slice(7, 8)]  # as full as the budget allows: 7 rows padded to 31
    cut = batching.pack_batches(lengths, max_tokens=256, max_batch_size=16, batch_overhead=10)
    assert cut == [slice(0, 5), slice(5, 7), slice(7, 8)]  # short rows apart from the 30s
    assert batching.padding_fraction(lengths, cut) < batching.padding_fraction(lengths, greedy)
    # A huge per-batch cost packs as few batches as the budget allows; none at all cuts every length.
    assert len(batching.pack_batches(lengths, 256, 16, batch_overhead=10_000)) == len(greedy)
    assert batching.padding_fraction(lengths, batching.pack_batches(lengths, 256, 16, batch_overhead=0)) == 0.0
    rng = np.random.default_rng(1)
    lengths = np.sort(rng.integers(1, 300, size=400))
    batches = batching.pack_batches(lengths, max_tokens=1024, max_batch_size=32, batch_overhead=32)
    assert [i for b in batches for i in range(b.start, b.stop)] == list(range(400))
    assert all(b.stop - b.start <= 32 and (b.stop - b.start == 1 or (b.stop - b.start) * lengths[b.stop - 1] <= 1024)
               for b in batches)  # fmt: skip


def test_pack_batches_long_item_alone_and_unsorted_rejected():
    assert batching.pack_batches([5, 5, 2000], max_tokens=100, max_batch_size=8) == [slice(0, 2), slice(2, 3)]
    with pytest.raises(ValueError, match="sorted"):
        batching.pack_batches([5, 3], 100, 8)


def test_length_order_is_deterministic_with_key_ties():
    order = batching.length_order([3, 1, 3, 2], keys=["b", "z", "a", "y"])
    assert list(order) == [1, 3, 2, 0]


def _distinct_prefixes(ids) -> int:
    return len({tuple(x[:n]) for x in ids for n in range(1, len(x) + 1)})


def test_prefix_plan_continues_the_leftmost_row_with_the_prefix():
    a, d, b, c, e = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 1], [1, 2, 3, 4, 5, 7, 8], [1, 2, 3, 4, 9], [7, 7]
    ids = [b, e, a, c, d]  # lexicographic order: a, d, b, c, e
    plan = batching.plan_prefix_sharing(ids, min_prefix=4)
    # d, b and c all continue a (not each other), so one wave after a's holds them all.
    assert plan.donor.tolist() == [2, -1, -1, 2, 2]
    assert plan.shared.tolist() == [5, 0, 0, 4, 6]
    assert plan.wave.tolist() == [1, 0, 0, 1, 1]
    assert plan.keep.tolist() == [0, 0, 6, 0, 0]
    # Computed = the distinct prefixes (a trie over the rows): 27 tokens, 12 computed.
    assert sum(map(len, ids)) - plan.shared_tokens == _distinct_prefixes(ids) == 12
    assert batching.plan_prefix_sharing(ids, min_prefix=6).shared.tolist() == [0, 0, 0, 0, 6]
    assert batching.plan_prefix_sharing(ids, min_prefix=0).shared_tokens == 0  # off
    # Rows over max_length neither give nor take: a (6 tokens) can no longer be the donor.
    capped = batching.plan_prefix_sharing(ids, min_prefix=4, max_length=5)
    assert capped.donor.tolist() == [-1] * 5


def test_prefix_plan_invariants_on_random_token_rows():
    rng = np.random.default_rng(0)
    stems = [list(rng.integers(0, 5, size=int(rng.integers(1, 12)))) for _ in range(20)]
    ids = [stems[int(rng.integers(0, 20))] + list(rng.integers(0, 5, size=int(rng.integers(0, 8)))) for _ in range(300)]
    ids = [x if x else [0] for x in ids] + [list(ids[0]), list(ids[0])]  # identical rows too
    plan = batching.plan_prefix_sharing(ids, min_prefix=1)
    assert sum(map(len, ids)) - plan.shared_tokens == _distinct_prefixes(ids)  # every prefix computed once
    for i, d in enumerate(plan.donor):
        if d < 0:
            assert plan.wave[i] == 0 and plan.shared[i] == 0
            continue
        n = plan.shared[i]
        assert n >= 1 and ids[d][:n] == ids[i][:n], "a donor holds the shared tokens"
        assert plan.wave[d] < plan.wave[i] and plan.keep[d] >= n, "computed before, and kept long enough"
        assert plan.shared[d] < n, "a chain's shared lengths grow, so waves <= distinct prefix lengths"
    coarse = batching.plan_prefix_sharing(ids, min_prefix=6)
    assert ((coarse.shared == 0) | (coarse.shared >= 6)).all() and coarse.shared_tokens < plan.shared_tokens
    # A memory bound on kept tokens: runs that share only within themselves, each keeping <= max_kept.
    bounded = batching.plan_prefix_sharing(ids, min_prefix=1, max_kept=40)
    assert bounded.run.max() >= 2 and 0 < bounded.shared_tokens < plan.shared_tokens
    for r in np.unique(bounded.run):
        assert bounded.keep[bounded.run == r].sum() <= 40
    has_donor = bounded.donor >= 0
    assert (bounded.run[bounded.donor[has_donor]] == bounded.run[has_donor]).all()


def test_plan_shards_balances_tokens():
    lengths = [10] * 50 + [100] * 20
    shards = batching.plan_shards(lengths, shard_tokens=500, shard_rows=1000)
    assert [i for s in shards for i in range(s.start, s.stop)] == list(range(70))
    assert all(sum(lengths[s]) <= 500 for s in shards)
    assert batching.plan_shards([10] * 10, shard_tokens=10_000, shard_rows=4) == [
        slice(0, 4),
        slice(4, 8),
        slice(8, 10),
    ]


# ------------------------------------------------------------------------------- format


def test_states_shard_is_plain_pyarrow_unpadded_half(tmp_path):
    rng = np.random.default_rng(1)
    lengths = [3, 1, 7]
    states = _states(rng, lengths)
    with _writer(tmp_path) as writer:
        writer.set_value_shape((D,))
        entry = writer.write(states_table(["a", "b", "c"], states), unit=0)
    path = writer.path / SHARDS_DIR / entry["name"]
    table = pq.read_table(path)  # plain pyarrow, no Ray, no project code
    assert str(table.schema.field("states").type) == "list<element: fixed_size_list<element: halffloat>[8]>"
    assert table.column("length").to_pylist() == lengths
    first = np.array(table.column("states")[2].as_py(), dtype=np.float16)
    np.testing.assert_array_equal(first, states[2].astype(np.float16))
    # No padding bytes: the file is about the size of the fp16 values themselves.
    assert entry["bytes"] < sum(lengths) * D * 2 + 4096
    manifest = json.loads((writer.path / MANIFEST_NAME).read_text())
    assert manifest["shards"][0]["rows"] == 3 and manifest["hidden_size"] == D
    store = CacheStore(writer.path)
    got = store.read(["c", "a"])
    assert got["c"].dtype == np.float16 and got["c"].shape == (7, D)
    np.testing.assert_array_equal(got["a"], states[0].astype(np.float16))
    assert store.keys() == ["a", "b", "c"] and store.fingerprint == writer.fingerprint
    assert store.verify().ok
    with pytest.raises(KeyError, match="zzz"):
        store.read(["zzz"])


def test_clip_pooled_and_pixels_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    inputs = clip_inputs({"model_id": "clip-text", "weights_digest": "d"})
    pooled = rng.standard_normal((2, D)).astype(np.float32)
    with _writer(tmp_path, inputs) as writer:
        writer.set_value_shape((D,))
        writer.write(states_table(["x", "y"], _states(rng, [77, 154]), pooled=pooled), unit=0)
    store = CacheStore(writer.path)
    assert store.read(["y"])["y"].shape == (154, D)
    np.testing.assert_array_equal(store.read_pooled(["x"])["x"], pooled[0].astype(np.float16))

    images = rng.uniform(-1, 1, size=(3, 3, 4, 4)).astype(np.float32)  # (N, C, H, W)
    inputs = pixels_inputs(4)
    with _writer(tmp_path, inputs) as writer:
        writer.set_value_shape((3, 4, 4))
        writer.write(pixels_table(["i0", "i1", "i2"], images), unit=0)
    store = CacheStore(writer.path)
    np.testing.assert_array_equal(store.read(["i1"])["i1"], images[1].astype(np.float16))
    with pytest.raises(CacheError, match="pooled"):
        store.read_pooled(["i1"])


def test_non_finite_states_rejected_with_key_named():
    rng = np.random.default_rng(3)
    states = _states(rng, [2, 2, 2])
    states[1][0, 3] = np.nan
    states[2][1, 0] = 1e6  # finite in fp32, inf once stored as fp16
    with pytest.raises(NonFiniteStatesError, match="k1") as info:
        states_table(["k0", "k1", "k2"], states)
    assert set(info.value.rejected) == {"k1", "k2"}


# ------------------------------------------------------------------------------- crash safety


def test_verify_names_corrupt_truncated_and_missing_shards(tmp_path):
    rng = np.random.default_rng(4)
    with _writer(tmp_path) as writer:
        writer.set_value_shape((D,))
        names = [writer.write(states_table([f"k{i}"], _states(rng, [4])), unit=i)["name"] for i in range(4)]
    shards = writer.path / SHARDS_DIR
    data = bytearray((shards / names[0]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (shards / names[0]).write_bytes(bytes(data))  # bit flip, same size
    (shards / names[1]).write_bytes((shards / names[1]).read_bytes()[:-20])  # truncated
    (shards / names[2]).unlink()
    report = CacheStore(writer.path).verify()
    assert not report.ok
    assert set(report.corrupt) == set(names[:3])
    assert "sha256" in report.corrupt[names[0]] and "missing" in report.corrupt[names[2]]
    with pytest.raises(CorruptShardError, match=names[1]):
        report.raise_if_corrupt()
    # Quarantine unlists them: their keys become missing and are recomputed by the next run.
    with _writer(tmp_path) as writer:
        assert names[2] in writer.recovered["missing"]
        writer.quarantine(report.corrupt)
        assert writer.cached([f"k{i}" for i in range(4)]) == {"k3"}
    assert CacheStore(writer.path).verify().ok


def test_unlisted_shard_from_killed_run_is_adopted_and_temps_removed(tmp_path):
    rng = np.random.default_rng(5)
    with _writer(tmp_path) as writer:
        writer.set_value_shape((D,))
        writer.write(states_table(["a", "b"], _states(rng, [2, 3])), unit=0)
        # A killed run: one shard renamed into place but never listed, one half-written temp file.
        write_shard_file(writer.path, writer.shard_name(1), states_table(["c"], _states(rng, [5])), writer.run_token)
        write_shard_file(writer.path, writer.shard_name(2), states_table(["b", "d"], _states(rng, [1, 1])))
        (writer.path / SHARDS_DIR / ".tmp-part-x.parquet-1234").write_bytes(b"PAR1 half")
        # A retried task rewrites a shard whose first copy was renamed but never reported.
        retried = write_shard_file(writer.path, writer.shard_name(1), states_table(["c"], _states(rng, [5])))
        assert retried["name"] != writer.shard_name(1)
    with _writer(tmp_path) as writer:
        assert writer.recovered["temp_removed"] == 1
        assert len(writer.recovered["adopted"]) == 2 and len(writer.recovered["dropped"]) == 1
        assert writer.cached(["a", "b", "c", "d", "e"]) == {"a", "b", "c", "d"}
    store = CacheStore(writer.path)
    report = store.verify()
    assert report.ok and report.rows == 4 and not report.unlisted  # "b" kept once
    assert store.read(["b"])["b"].shape == (3, D)  # the older shard's value


def test_duplicate_key_resolution_is_deterministic(tmp_path):
    rng = np.random.default_rng(6)
    with _writer(tmp_path) as writer:
        writer.set_value_shape((D,))
        writer.write(states_table(["a"], _states(rng, [2])), unit=0)
        newer = write_shard_file(writer.path, writer.shard_name(1), states_table(["a"], _states(rng, [9])))
    # Force a duplicate into the manifest the way an old, buggy writer could have.
    manifest = json.loads((writer.path / MANIFEST_NAME).read_text())
    manifest["shards"].append(newer)
    (writer.path / MANIFEST_NAME).write_text(json.dumps(manifest))
    for _ in range(2):
        store = CacheStore(writer.path)
        assert store.read(["a"])["a"].shape == (2, D)  # oldest shard wins, every time
        assert store.verify().duplicate_keys == 1
    with _writer(tmp_path) as w2, pytest.raises(CacheError, match="repeats"):
        w2.publish(newer)


# ------------------------------------------------------------------------------- the manifest journal (issue 17)


def test_a_shard_costs_one_journal_entry_and_the_manifest_is_rewritten_once_per_fold(tmp_path):
    """Listing a shard writes one small journal entry; the whole manifest is rewritten once per ``journal_fold``
    shards (it was rewritten after every shard: O(shards^2) bytes), and readers see every listed shard."""
    rng = np.random.default_rng(11)
    fold, shards = 8, 21
    with _writer(tmp_path) as writer:
        writer.journal_fold = fold
        writer.set_value_shape((D,))
        before = writer.manifest_writes
        names = [writer.write(states_table([f"k{i}"], _states(rng, [1 + i % 4])), unit=i)["name"]
                 for i in range(shards)]
        assert writer.manifest_writes - before == shards // fold
        on_disk = json.loads((writer.path / MANIFEST_NAME).read_text())
        assert len(on_disk["shards"]) == on_disk["journal_seq"] == fold * (shards // fold)
        assert len(journal_seqs(writer._listing)) == shards % fold  # the folded entries are deleted
        store = CacheStore(writer.path)  # a reader while the writer is still open
        assert store.shard_names == sorted(names) and len(store) == shards and store.verify().ok
        assert store.manifest["rows"] == shards and store.manifest["journal_seq"] == shards
    final = json.loads((writer.path / MANIFEST_NAME).read_text())  # close() folds the rest
    assert [e["name"] for e in final["shards"]] == names and final["journal_seq"] == shards
    assert not list((writer.path / JOURNAL_DIR).iterdir())


def test_a_killed_writers_journal_is_listed_and_the_next_writer_folds_it(tmp_path):
    """A writer killed before it folds leaves its listing in the journal: readers see those shards, the next writer
    folds them into the manifest and drops what a fold interrupted half-way left behind."""
    rng = np.random.default_rng(12)
    writer = _writer(tmp_path).open()
    writer.set_value_shape((D,))
    for i in range(5):
        writer.write(states_table([f"k{i}"], _states(rng, [2])), unit=i)
    writer.close(fold=False)  # what a SIGKILL leaves: no fold
    journal = writer.path / JOURNAL_DIR
    assert json.loads((writer.path / MANIFEST_NAME).read_text())["shards"] == []
    assert sorted(p.name for p in journal.iterdir()) == [f"{i:012d}.json" for i in range(1, 6)]
    (journal / ".tmp-000000000006.json-1-ab").write_text("{half")  # a journal write cut short
    assert sorted(CacheStore(writer.path).keys()) == [f"k{i}" for i in range(5)]
    # A fold cut between its manifest rewrite and its deletions: entries at or below journal_seq are skipped.
    manifest = json.loads((writer.path / MANIFEST_NAME).read_text())
    manifest["shards"] = read_manifest(writer.path)["shards"][:2]
    manifest["journal_seq"] = 2
    (writer.path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert sorted(CacheStore(writer.path).keys()) == [f"k{i}" for i in range(5)]  # no key twice, none lost
    with _writer(tmp_path) as rerun:
        assert rerun.cached([f"k{i}" for i in range(6)]) == {f"k{i}" for i in range(5)}
        assert rerun.recovered["temp_removed"] == 1 and not list(journal.iterdir())
        on_disk = json.loads((rerun.path / MANIFEST_NAME).read_text())
        assert len(on_disk["shards"]) == 5 and on_disk["journal_seq"] == 5
        rerun.write(states_table(["k5"], _states(rng, [1])), unit=0)
        assert journal_seqs(rerun._listing) == [6]  # the sequence goes on where the killed run stopped
    report = CacheStore(rerun.path).verify()
    assert report.ok and report.rows == 6 and report.duplicate_keys == 0


@pytest.mark.parametrize("moment", ["list", "read"])
def test_a_fold_between_the_manifest_read_and_the_journal_read_is_read_again(tmp_path, moment):
    """The writer folds (rewrites the manifest, deletes the folded entries) just after a reader read the old manifest:
    before the reader lists the journal (it sees a gap in the sequence) or before it reads an entry (gone). Either way
    the reader reads again and returns every listed shard, once."""
    from omnidiff.contracts.storage import Folder

    rng = np.random.default_rng(14)
    writer = _writer(tmp_path).open()
    writer.journal_fold = 4
    writer.set_value_shape((D,))
    for i in range(3):  # three entries in the journal, none folded
        writer.write(states_table([f"k{i}"], _states(rng, [1])), unit=i)

    class FoldingUnderneath(Folder):
        fired = 0

        def _fold_once(self) -> None:
            if not self.fired:
                type(self).fired = 1
                for i in range(3, 5):  # the 4th publish folds 1-4 and deletes them; the 5th is entry 5
                    writer.write(states_table([f"k{i}"], _states(rng, [1])), unit=i)

        def list(self, rel: str = ""):
            if moment == "list" and rel == JOURNAL_DIR:
                self._fold_once()
            return super().list(rel)

        def read_bytes(self, rel: str) -> bytes:
            if moment == "read" and rel.startswith(f"{JOURNAL_DIR}/"):
                self._fold_once()
            return super().read_bytes(rel)

    listing = read_manifest(FoldingUnderneath(writer.path))
    assert FoldingUnderneath.fired
    assert [e["rows"] for e in listing["shards"]] == [1] * 5 and listing["journal_seq"] == 5
    writer.close()
    assert sorted(CacheStore(writer.path).keys()) == [f"k{i}" for i in range(5)]


def publish_while_reading(directory, shards: int, fold: int) -> list[int]:
    """Publish ``shards`` one-row shards into the cache at ``directory`` (local or s3://) with a fold every ``fold``
    while a thread reads the listing over and over. Every read must be a prefix of the publish order that never
    shrinks (a fold's rewrite-then-delete read half-way would lose entries). Returns the listed counts seen."""
    import threading

    rng = np.random.default_rng(13)
    inputs = llm_inputs(ENCODER)
    target = f"{directory}/{fingerprint(inputs)}" if str(directory).startswith("s3://") else directory / fingerprint(
        inputs)
    names: list[str] = []
    seen: list[int] = []
    failures: list[str] = []
    done = threading.Event()
    with CacheWriter(target, inputs) as writer:
        writer.journal_fold = fold
        writer.set_value_shape((D,))

        def read() -> None:
            while not done.is_set():
                listed = [e["name"] for e in read_manifest(target)["shards"]]
                if listed != names[: len(listed)] or (seen and len(listed) < seen[-1]):
                    failures.append(f"read {len(listed)} shards after {seen[-1:]}: not a prefix of the publishes")
                seen.append(len(listed))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            for i in range(shards):
                entry = write_shard_file(target, writer.shard_name(i), states_table([f"k{i}"], _states(rng, [1])),
                                         writer.run_token)
                names.append(entry["name"])
                writer.publish(entry, [f"k{i}"], fresh=True)
                # let the reader finish a read after each publish, so the reads overlap the publishes and folds
                # however slow the store is under load
                after = len(seen) + 1
                deadline = time.monotonic() + 10
                while len(seen) <= after and reader.is_alive() and time.monotonic() < deadline:
                    time.sleep(0.002)
        finally:
            done.set()
            reader.join(timeout=60)
    assert not failures, failures[:3]
    assert [e["name"] for e in read_manifest(target)["shards"]] == names
    return seen


def test_a_reader_never_misses_a_listed_shard_while_the_writer_folds(tmp_path):
    seen = publish_while_reading(tmp_path, shards=120, fold=3)
    assert len(set(seen)) > 10  # the reads did overlap many publishes and folds


# ------------------------------------------------------------------------------- bounded key memory (issue 17)


def _partitioned_cache(tmp_path, n_keys: int, parts: int, shard_rows: int):
    """A cache filled as the embed job fills it: the keys split into ``parts`` hash ranges (``KeyPartitions``), each
    cut into shards of ``shard_rows`` listed with ``fresh=True``. Returns (keys per part, shards, the splitter)."""
    rng = np.random.default_rng(8)
    spill = KeyPartitions(tmp_path / "spill", parts, bytes)
    by_part: list[list[str]] = [[] for _ in range(parts)]
    for i in range(n_keys):
        key = text_key(f"caption {i}")
        by_part[spill.part_of(key)].append(key)
    unit = 0
    with _writer(tmp_path) as writer:
        writer.set_value_shape((D,))
        for part in by_part:
            for i in range(0, len(part), shard_rows):
                chunk = part[i : i + shard_rows]
                entry = write_shard_file(writer.path, writer.shard_name(unit), states_table(chunk, _states(rng, [1] * len(chunk))))
                writer.publish(entry, chunk, fresh=True)
                unit += 1
    return by_part, unit, spill


def test_the_writer_holds_one_partition_of_cached_keys_never_the_whole_cache(tmp_path):
    """issue 17: the writer's key memory is bounded by the partition asked about, not by the cache. Opening a cache
    loads no key; asking partition by partition which keys are missing holds at most a partition plus one shard,
    and reads each shard once (only the shards whose key range overlaps the partition's)."""
    n, parts, shard_rows = 2000, 10, 25
    by_part, shards, spill = _partitioned_cache(tmp_path, n, parts, shard_rows)
    largest = max(len(p) for p in by_part)
    assert sum(len(p) for p in by_part) == n and largest < n // 4
    with _writer(tmp_path) as writer:
        assert writer.peak_keys == 0 and writer.shard_reads == 0  # nothing loaded at open
        for p, part in enumerate(by_part):
            new = [k for k in (text_key(f"new {p} {i}") for i in range(100)) if spill.part_of(k) == p]
            assert new and writer.missing(part + new) == new
        assert 0 < writer.peak_keys <= largest + shard_rows < n // 3, writer.peak_keys
        assert writer.shard_reads == shards  # each shard once: the other partitions' shards are never opened
    assert sorted(CacheStore(writer.path).keys()) == sorted(k for p in by_part for k in p)


def test_the_writers_heap_stays_a_fraction_of_the_cache_key_set(tmp_path):
    """The same bound in bytes (tracemalloc), however the keys would be loaded: opening a 20000-key cache and asking
    every partition which keys are missing allocates under a quarter of what a set of the cache's keys takes."""
    import tracemalloc

    by_part, _, _ = _partitioned_cache(tmp_path, 20000, 20, 500)
    everything = [k for p in by_part for k in p]
    tracemalloc.start()
    try:
        whole = set(everything)
        key_set = tracemalloc.get_traced_memory()[0]
        del whole
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with _writer(tmp_path) as writer:
            for part in by_part:
                assert writer.missing(part) == []
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < key_set / 4, (peak, key_set)


def test_a_cache_listed_before_key_ranges_still_opens_in_bounded_memory(tmp_path):
    """A cache written before shard entries had ``key_range`` opens and answers right: its shards are read for every
    query (more reads), still one at a time (bounded memory); a shard listed now gets its range."""
    n, parts, shard_rows = 600, 4, 30
    by_part, shards, _ = _partitioned_cache(tmp_path, n, parts, shard_rows)
    path = _writer(tmp_path).path
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    for entry in manifest["shards"]:
        del entry["key_range"]
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with _writer(tmp_path) as writer:
        for part in by_part:
            assert writer.missing(["absent", *part]) == ["absent"]
        assert writer.peak_keys <= max(len(p) for p in by_part) + shard_rows < n
        assert writer.shard_reads == shards * parts
        with pytest.raises(CacheError, match="repeats 1 cached key"):
            writer.write(states_table([by_part[0][0]], _states(np.random.default_rng(0), [1])), unit=0)
        writer.write(states_table(["absent"], _states(np.random.default_rng(0), [1])), unit=1)
    entry = json.loads((path / MANIFEST_NAME).read_text())["shards"][-1]
    assert entry["key_range"] == [key_hash("absent")] * 2


def test_publish_refuses_a_unit_twice_and_checks_a_shard_it_did_not_plan(tmp_path):
    """``fresh=True`` skips reading the cache only for this run's own units, each listed once; a retried unit's
    second copy and a shard of another run are refused, and the next writer keeps every key once."""
    rng = np.random.default_rng(9)
    with _writer(tmp_path) as writer:
        writer.set_value_shape((D,))
        first = write_shard_file(writer.path, writer.shard_name(0), states_table(["a", "b"], _states(rng, [1, 2])))
        writer.publish(first, ["a", "b"], fresh=True)
        retried = write_shard_file(writer.path, writer.shard_name(0), states_table(["a", "b"], _states(rng, [1, 2])))
        assert retried["name"] != first["name"]
        with pytest.raises(CacheError, match="repeats unit"):
            writer.publish(retried, ["a", "b"], fresh=True)
        foreign = write_shard_file(writer.path, "part-20000101T000000000000-000000.parquet",
                                   states_table(["b", "c"], _states(rng, [3, 1])))
        with pytest.raises(CacheError, match="repeats 1 cached key"):
            writer.publish(foreign, ["b", "c"], fresh=True)
    assert CacheStore(writer.path).keys() == ["a", "b"]
    with _writer(tmp_path) as writer:  # the unlisted copies: the retried one dropped, "c" adopted without "b"
        assert writer.cached(["a", "b", "c", "d"]) == {"a", "b", "c"}
    report = CacheStore(writer.path).verify()
    assert report.ok and report.rows == 3 and report.duplicate_keys == 0


def test_stale_run_token_discards_shard_and_lock_is_exclusive(tmp_path):
    rng = np.random.default_rng(7)
    with _writer(tmp_path) as first:
        first.set_value_shape((D,))
        with pytest.raises(CacheError, match="another embed run"):
            _writer(tmp_path).open()
        old_token = first.run_token
    with _writer(tmp_path) as second:
        entry = write_shard_file(second.path, second.shard_name(0), states_table(["z"], _states(rng, [1])), old_token)
        assert entry["stale"] is True
        assert not list((second.path / SHARDS_DIR).iterdir())


def test_a_writer_waits_for_another_runs_lock_then_skips_what_it_listed(tmp_path):
    """The embed job's writer waits (``lock_wait_s``) for a run holding the cache, e.g. the 02:00 nightly re-embed
    while a pipeline runs, then sees what that run listed; past the wait it fails naming the holder."""
    import threading

    rng = np.random.default_rng(8)
    first = _writer(tmp_path).open()
    first.set_value_shape((D,))
    opened: dict = {}

    def second() -> None:
        start = time.monotonic()
        with CacheWriter(first.path, llm_inputs(ENCODER), lock_wait_s=30) as writer:
            opened["after_s"] = time.monotonic() - start
            opened["cached"] = writer.cached(["a", "b"])

    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not opened  # still waiting while the first run writes
    first.write(states_table(["a"], _states(rng, [2])), unit=0)
    first.close()
    waiter.join(timeout=30)
    assert opened["after_s"] >= 0.5 and opened["cached"] == {"a"}
    with _writer(tmp_path) as holder:
        with pytest.raises(CacheError, match=f"still being written by another embed run \\(run {holder.run_token}"):
            CacheWriter(holder.path, llm_inputs(ENCODER), lock_wait_s=0.3).open()


def test_writer_refuses_mismatched_manifest(tmp_path):
    with _writer(tmp_path) as writer:
        pass
    manifest = json.loads((writer.path / MANIFEST_NAME).read_text())
    manifest["fingerprint_inputs"]["encoder"]["layer"] = 7
    (writer.path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="do not match"):
        _writer(tmp_path).open()
    with pytest.raises(CacheError, match="not the fingerprint"):
        CacheWriter(tmp_path / "llm" / "wrongname", llm_inputs(ENCODER))
    with pytest.raises(CacheError, match="no manifest.json"):
        CacheStore(tmp_path / "nothing")
    assert os.environ.get("OMNIDIFF_HOME")
    assert (
        cache_dir("llm", "abc").parent.parent.parent
        == __import__("pathlib").Path(os.environ["OMNIDIFF_HOME"]).resolve()
    )
