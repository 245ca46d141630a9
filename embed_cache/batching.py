"""Length-grouped batching: no compute spent on padding.

A transformer batch costs ``batch_size * longest_length`` token-slots. Padding every caption to a
fixed maximum (the method's release, PixArt) wastes most of them on a mix of short and long
captions. Here the work list is sorted by token length once, cut into shards (the unit of work one
actor call handles and writes), and each shard is packed greedily into compute batches under a
token-slot budget. Neighbours in the sorted order have nearly equal lengths, so the padding left is
a few percent (see :func:`padding_fraction`, logged per run, and benchmarks/embed_throughput.py).
Captions that start alike (one template in many variants) share their first tokens' states in a
causal LM; :func:`plan_prefix_sharing` plans computing each shared prefix once per shard.

Everything here is pure numpy / Python on lengths and token ids; the job applies it
(embed_cache/plan.py, embed_cache/actor.py, embed_cache/encoders/llm.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def length_order(lengths: Sequence[int], keys: Sequence[str] | None = None) -> np.ndarray:
    """Indices that sort by ascending length; ties broken by key so the plan is deterministic."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if keys is None:
        return np.argsort(lengths, kind="stable")
    if len(keys) != len(lengths):
        raise ValueError(f"{len(keys)} keys but {len(lengths)} lengths")
    # np.lexsort sorts by the last key first.
    return np.lexsort((np.asarray(keys, dtype=object).astype(str), lengths))


def pack_batches(
    lengths: Sequence[int], max_tokens: int, max_batch_size: int, batch_overhead: float | None = None
) -> list[slice]:
    """Contiguous batches over *length-sorted* ``lengths``.

    A batch's padded cost is ``len(batch) * max(lengths in batch)``; it stays ``<= max_tokens``
    and ``len(batch) <= max_batch_size``. An item longer than ``max_tokens`` gets a batch of its own
    (it must still be computed). Returns slices into ``lengths``.

    ``batch_overhead=None``: greedy, each batch as full as the budget allows. A number: the split
    that minimises total padded slots + ``batch_overhead`` per batch (dynamic programming), i.e.
    the fixed cost of one forward pass in token slots. Greedy packing of a few rows of widely
    spread lengths (the continuations of shared prefixes) pads a lot; this cuts such a run where
    the padding saved pays for the extra forward pass.
    """
    if max_tokens < 1 or max_batch_size < 1:
        raise ValueError(f"max_tokens={max_tokens}, max_batch_size={max_batch_size}: both must be >= 1")
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and np.any(np.diff(lengths) < 0):
        raise ValueError("pack_batches needs lengths sorted ascending (use length_order first)")
    n = len(lengths)
    if batch_overhead is not None:
        return _min_cost_batches(lengths, max_tokens, max_batch_size, float(batch_overhead))
    batches: list[slice] = []
    start = 0
    while start < n:
        end = start + 1
        # Sorted ascending: the newest item is the longest, so the padded cost is count * lengths[end].
        while end < n and (end - start + 1) <= max_batch_size and (end - start + 1) * lengths[end] <= max_tokens:
            end += 1
        batches.append(slice(start, end))
        start = end
    return batches


def _min_cost_batches(lengths: np.ndarray, max_tokens: int, max_batch_size: int, overhead: float) -> list[slice]:
    n = len(lengths)
    best = np.zeros(n + 1)  # best[e]: least cost of items [0, e)
    back = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        longest = int(lengths[end - 1])  # sorted: the last item of a batch is its longest
        size = max(1, min(max_batch_size, max_tokens // longest, end))
        starts = np.arange(end - size, end)
        cost = best[starts] + (end - starts) * longest + overhead
        k = int(np.argmin(cost))
        best[end], back[end] = cost[k], starts[k]
    batches: list[slice] = []
    end = n
    while end > 0:
        batches.append(slice(int(back[end]), end))
        end = int(back[end])
    return batches[::-1]


def plan_shards(lengths_sorted: Sequence[int], shard_tokens: int, shard_rows: int) -> list[slice]:
    """Cut a length-sorted work list into shards of at most ``shard_tokens`` useful tokens / ``shard_rows`` rows.

    Shards are balanced by tokens rather than rows so actor calls take similar time and the
    progress line's ETA is honest (short captions first would otherwise look deceptively fast).
    """
    if shard_tokens < 1 or shard_rows < 1:
        raise ValueError(f"shard_tokens={shard_tokens}, shard_rows={shard_rows}: both must be >= 1")
    lengths = np.asarray(lengths_sorted, dtype=np.int64)
    shards: list[slice] = []
    start = 0
    tokens = 0
    for i, length in enumerate(lengths):
        if i > start and (tokens + length > shard_tokens or i - start >= shard_rows):
            shards.append(slice(start, i))
            start, tokens = i, 0
        tokens += int(length)
    if start < len(lengths):
        shards.append(slice(start, len(lengths)))
    return shards


def padding_fraction(lengths: Sequence[int], batches: Sequence[slice]) -> float:
    """Share of computed token-slots that are padding (0 = none) for batches over sorted ``lengths``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    useful = int(lengths.sum())
    slots = sum((b.stop - b.start) * int(lengths[b.stop - 1]) for b in batches if b.stop > b.start)
    return 0.0 if slots == 0 else 1.0 - useful / slots


def fixed_padding_fraction(lengths: Sequence[int], pad_to: int) -> float:
    """Padding share when every item is padded (and truncated) to ``pad_to`` tokens: the peers' way."""
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), pad_to)
    return 1.0 - float(lengths.sum()) / (len(lengths) * pad_to) if len(lengths) else 0.0


@dataclass(frozen=True)
class PrefixPlan:
    """Which rows reuse another row's computed prefix (:func:`plan_prefix_sharing`).

    ``donor[i]``: the row whose cached keys/values and states row ``i`` continues (-1: none);
    ``shared[i]``: how many leading tokens it takes from there; ``wave[i]``: 0 for rows computed
    from scratch, ``wave[donor] + 1`` otherwise (a wave runs after the waves its donors are in);
    ``keep[i]``: how many of row ``i``'s leading tokens later rows reuse (0: nothing to keep);
    ``run[i]``: rows of different runs share nothing, so a run can finish (and free what it kept)
    before the next starts.
    """

    donor: np.ndarray
    shared: np.ndarray
    wave: np.ndarray
    keep: np.ndarray
    run: np.ndarray

    @property
    def shared_tokens(self) -> int:
        return int(self.shared.sum())


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def plan_prefix_sharing(
    ids: Sequence[Sequence[int]], min_prefix: int, max_length: int | None = None, max_kept: int | None = None
) -> PrefixPlan:
    """Compute each shared token prefix once: a causal LM's states of a prefix do not depend on what follows.

    Rows are sorted by their token ids; a row that shares at least ``min_prefix`` leading tokens
    with its predecessor in that order continues the *leftmost* earlier row it shares them with
    (the previous row with a strictly shorter common prefix, found with a monotonic stack), which
    keeps the chains of dependent waves short. The tokens saved equal those of a prefix trie over
    the rows. Rows longer than ``max_length`` neither give nor take a prefix (a sliding-window
    model's window must hold a prefix plus its continuation). ``max_kept`` bounds the tokens whose
    keys/values are held for later rows (their memory): once a run of rows would keep more, the
    next row starts a new run that shares nothing with the rows before it. ``min_prefix <= 0``
    disables sharing.
    """
    n = len(ids)
    donor = np.full(n, -1, dtype=np.int64)
    shared = np.zeros(n, dtype=np.int64)
    wave = np.zeros(n, dtype=np.int64)
    keep = np.zeros(n, dtype=np.int64)
    run = np.zeros(n, dtype=np.int64)
    if min_prefix > 0 and n > 1:
        rows = [i for i in range(n) if max_length is None or len(ids[i]) <= max_length]
        rows.sort(key=lambda i: tuple(ids[i]))
        stack: list[tuple[int, int]] = []  # (common prefix with its predecessor, position), increasing
        kept = current = 0
        for k, i in enumerate(rows):
            common = _common_prefix(ids[rows[k - 1]], ids[i]) if k else -1
            while stack and stack[-1][0] >= common:
                stack.pop()
            if k and common >= min_prefix:
                # Every row after the stack top shares >= common tokens with row i: take the first one.
                d = rows[stack[-1][1]]
                grow = max(0, common - int(keep[d]))
                if max_kept is not None and kept + grow > max_kept:
                    stack, kept, common = [], 0, -1  # a new run: nothing before row i is kept for it
                    current += 1
                else:
                    donor[i], shared[i], wave[i] = d, common, wave[d] + 1
                    keep[d] += grow
                    kept += grow
            stack.append((common, k))
            run[i] = current
    return PrefixPlan(donor, shared, wave, keep, run)
