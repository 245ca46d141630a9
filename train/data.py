"""Training data from the embedding cache: which examples, which caches, and the batches.

Training never runs the LLM (PAPER.md "Known weak points": the release does, at every step). The
driver (train.inputs) resolves the pair snapshot into an *example table* of cache keys and opens
the caches whose fingerprints match the configured encoders; each rank then builds its batches
straight from the Parquet cache with :class:`CachedBatches`.

Example tables (pandas, one row per training example):

* stage 1 ``align``:      ``llm_key`` (caption in any language), ``target_key`` (CLIP cache key
  of the English side), ``lang``, ``source`` (``pair`` | ``parallel``)
* stages 2-3 ``diffusion``: ``llm_key``, ``pixel_key`` (the image digest), ``lang``

Data order is a function of (seed, global sample position) only: step ``s`` of a run with global
batch ``G`` always trains on positions ``s*G .. s*G+G-1`` whatever the worker count, each rank
taking its slice. Per-example randomness (caption dropout, noise, timestep) is seeded by the
position too, so a resumed run, or one on a different worker count, sees the same examples.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from omnidiff.contracts.cache import SIZE_COLUMNS, decode_fixed
from omnidiff.contracts.keys import cache_key, english_side

# A caption is "long" when the LLM needs more tokens than one CLIP window holds (PAPER.md "The problem").
LONG_PROMPT_TOKENS = 77


class CacheMismatchError(ValueError):
    """A cache does not match the configured encoder (or is missing); the message says what differs."""


# ------------------------------------------------------------------------------------ example tables


def align_examples(pairs: pd.DataFrame, parallel: pd.DataFrame | None, split: str) -> pd.DataFrame:
    """Stage-1 examples: LLM(caption in any language) -> CLIP(its English side).

    ``pairs`` needs ``caption, lang, caption_en, split``; ``parallel`` (optional) ``text, lang,
    text_en, split``. Pairs with no English side cannot be aligned and are left out. Duplicate
    (LLM text, English text) combinations are kept once: the same caption on many images would
    otherwise weigh more in an image-free objective.
    """
    rows = []
    for caption, lang, caption_en in pairs.loc[pairs["split"] == split, ["caption", "lang", "caption_en"]].itertuples(
        index=False
    ):
        english = english_side(caption, lang, caption_en)
        if english is not None:
            rows.append((_key(caption), _key(english), lang, "pair"))
    if parallel is not None and len(parallel):
        for text, lang, text_en in parallel.loc[parallel["split"] == split, ["text", "lang", "text_en"]].itertuples(
            index=False
        ):
            english = english_side(text, lang, text_en, parallel=True)
            if english is not None:
                rows.append((_key(text), _key(english), lang, "parallel"))
    table = pd.DataFrame(rows, columns=["llm_key", "target_key", "lang", "source"])
    return table.drop_duplicates(["llm_key", "target_key"]).sort_values(["llm_key", "target_key"]).reset_index(drop=True)


def diffusion_examples(pairs: pd.DataFrame, split: str, aesthetic_min: float | None = None) -> pd.DataFrame:
    """Stage 2-3 examples: (caption, image) pairs of ``split``, optionally only ``aesthetic >= aesthetic_min``.

    ``pairs`` needs ``caption, lang, image_digest, split`` (+ ``aesthetic`` when filtering).
    """
    chosen = pairs[pairs["split"] == split]
    if aesthetic_min is not None:
        if "aesthetic" not in chosen.columns:
            raise ValueError("data.aesthetic_min is set but the snapshot has no 'aesthetic' column")
        chosen = chosen[chosen["aesthetic"].astype(float) >= float(aesthetic_min)]
    table = pd.DataFrame(
        {
            "llm_key": [_key(c) for c in chosen["caption"]],
            "pixel_key": chosen["image_digest"].astype(str).to_numpy(),
            "lang": chosen["lang"].astype(str).to_numpy(),
        }
    )
    return table.sort_values(["pixel_key", "llm_key"]).reset_index(drop=True)


def sample_prompt_table(pairs: pd.DataFrame, token_lengths: dict[str, int], per_group: int) -> pd.DataFrame:
    """The fixed prompt set of the sample grids: ``per_group`` val captions per (language, short/long).

    ``token_lengths`` maps LLM cache keys to token counts (captions absent from it count as short).
    Chosen by key order, so the set is the same for every run on the same snapshot.
    """
    val = pairs[pairs["split"] == "val"] if (pairs["split"] == "val").any() else pairs
    table = pd.DataFrame({"prompt": val["caption"].astype(str), "lang": val["lang"].astype(str)})
    table["llm_key"] = [_key(p) for p in table["prompt"]]
    table = table.drop_duplicates("llm_key")
    table["length"] = [int(token_lengths.get(k, 0)) for k in table["llm_key"]]
    table["group"] = np.where(table["length"] > LONG_PROMPT_TOKENS, "long", "short")
    table = table.sort_values(["lang", "group", "llm_key"])
    return table.groupby(["lang", "group"], sort=True).head(per_group).reset_index(drop=True)


def _key(text: str) -> str:
    return cache_key(text)[1]


# ------------------------------------------------------------------------------------ caches


def open_checked_cache(kind: str, inputs: dict, root: Path | str | None, what: str, storage=None):
    """The ``CacheStore`` of ``<root>/<kind>/<fingerprint(inputs)>``; a clear :class:`CacheMismatchError`
    when there is none for these encoder settings (naming the caches that exist and how their encoders
    differ) or when the folder's manifest was built from other inputs. ``what`` names the encoder in
    messages (e.g. "the configured LLM (llm.*)").
    """
    from omnidiff.contracts.cache import MANIFEST_NAME, CacheStore, cache_dir, cache_root
    from omnidiff.contracts.encoders import fingerprint
    from omnidiff.contracts.storage import is_remote, open_folder

    expected = fingerprint(inputs)
    path = cache_dir(kind, expected, root)
    present = (open_folder(path, storage).exists(MANIFEST_NAME) if is_remote(path)
               else (path / MANIFEST_NAME).is_file())
    if not present:
        others = "" if is_remote(path) else _describe_other_caches(cache_root(root) / kind, inputs)
        raise CacheMismatchError(
            f"no {kind} cache for {what} at {path} (fingerprint {expected}). "
            + (f"Caches of other encoders there: {others}. " if others else "")
            + "Run 'omnidiff embed' with the same encoder settings, or point the config at the encoder the cache was built with."
        )
    store = CacheStore(path, max_cached_shards=1 << 16, storage=storage)
    found = _plain(store.manifest.get("fingerprint_inputs") or {})
    if store.fingerprint != expected or found != _plain(inputs):
        raise CacheMismatchError(
            f"{kind} cache {path} was built for a different encoder than {what}: fingerprint {store.fingerprint} "
            f"!= expected {expected}; differs in {_diff(found, _plain(inputs))}. Refusing to train on mismatched "
            "states: re-embed with 'omnidiff embed' or configure the encoder the cache was built with."
        )
    return store


def require_keys(store, keys: Sequence[str], what: str) -> None:
    """Raise naming how many (and one) of ``keys`` the cache lacks."""
    present = store.keys()
    have = set(present)
    missing = sorted({k for k in keys if k not in have})
    if missing:
        raise CacheMismatchError(
            f"{len(missing)} of {len(set(keys))} {what} are not in the {store.kind} cache {store.path} "
            f"(e.g. key {missing[0]}); run 'omnidiff embed' over the snapshot first"
        )


def _plain(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _diff(found: Any, expected: Any, prefix: str = "") -> str:
    if isinstance(found, dict) and isinstance(expected, dict):
        parts = []
        for key in sorted(set(found) | set(expected)):
            if found.get(key) != expected.get(key):
                parts.append(_diff(found.get(key), expected.get(key), f"{prefix}{key}."))
        return "; ".join(parts) or "(nothing)"
    return f"{prefix.rstrip('.')}: cache {_short(found)} vs configured {_short(expected)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe_other_caches(kind_dir: Path, inputs: dict) -> str:
    import json

    from omnidiff.contracts.cache import MANIFEST_NAME

    if not kind_dir.is_dir():
        return ""
    out = []
    for manifest in sorted(kind_dir.glob(f"*/{MANIFEST_NAME}"))[:5]:
        try:
            found = json.loads(manifest.read_text()).get("fingerprint_inputs") or {}
        except (OSError, ValueError):
            continue
        out.append(f"{manifest.parent.name} (differs in {_diff(_plain(found), _plain(inputs))})")
    return ", ".join(out)


# ------------------------------------------------------------------------------------ batches


def pad_states(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded per-token states ``[(L_i, D)]`` -> ``(states float32 (B, T, D), mask bool (B, T))``, T = max L_i."""
    if not arrays:
        raise ValueError("pad_states: no arrays")
    lengths = np.array([int(a.shape[0]) for a in arrays], dtype=np.int64)
    return pad_flat(np.concatenate([np.asarray(a) for a in arrays], axis=0), lengths)


def pad_flat(flat: np.ndarray, lengths: np.ndarray, t_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of B sequences back to back ``(sum L, D)`` + ``lengths (B,)`` -> ``(states (B, T, D), mask (B, T))``.

    One scatter for the whole batch (no per-sample copies); T = ``t_max`` or max L_i.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    t_max = int(lengths.max(initial=0)) if t_max is None else int(t_max)
    rows = np.repeat(np.arange(len(lengths)), lengths)  # (sum L,) batch index of each token
    starts = np.cumsum(lengths) - lengths  # (B,)
    cols = np.arange(len(rows)) - np.repeat(starts, lengths)  # (sum L,) token index inside its sequence
    states = torch.zeros(len(lengths), t_max, int(flat.shape[-1]), dtype=torch.float32)  # (B, T, D)
    states[torch.from_numpy(rows), torch.from_numpy(cols)] = torch.from_numpy(np.asarray(flat, dtype=np.float32))
    mask = torch.from_numpy(np.arange(t_max)[None, :] < lengths[:, None])  # (B, T)
    return states, mask


def clip_target_mask(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Real CLIP tokens among the stored positions: ``(B, T, D)``, ``(B, T)`` -> ``(B, T)``.

    The CLIP cache keeps each window at its own offset ``w*77`` and stores positions up to the last
    real token, so the padding between stitched windows is stored too, as exact zeros
    (ClipTextEncoder zeroes it). Only non-zero positions are real tokens (the loss ignores the rest).
    """
    return mask & (states != 0).any(-1)


def cached_image_sizes(store) -> bool:
    """Whether an image cache holds each image's original size and crop (latent caches, issue 16)."""
    vae = (store.manifest.get("fingerprint_inputs") or {}).get("vae") or {}
    return "sizes" in vae


def image_time_ids(store, pixel_keys: Sequence[str]) -> torch.Tensor:
    """SDXL's time ids ``long (B, 6)`` of cached images: original size + crop as cached, target = the
    cache's resolution (what diffusers' SDXL training script builds per image, ``compute_time_ids``)."""
    from omnidiff.pipeline import sdxl_time_ids

    resolution = int(store.manifest["fingerprint_inputs"]["resolution"])
    sizes = store.read_sizes(pixel_keys)
    table = np.stack([sizes[k] for k in pixel_keys])  # (B, 4): height, width, top, left
    return sdxl_time_ids(table[:, :2], table[:, 2:], (resolution, resolution))


def sample_seed(seed: int, position: int) -> int:
    """A 63-bit torch seed per (run seed, global sample position), well mixed by NumPy's SeedSequence."""
    return int(np.random.SeedSequence([int(seed), int(position)]).generate_state(1, np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------------ the stream
#
# What a rank holds (issue 17): per example, where its states live in each cache, as two int32
# arrays (shard id, row in the shard): 8 bytes per example per cache instead of a table of Python
# strings; with data.micro_by_length each example's LLM token count (int32, 4 bytes per example); the epoch's
# permutation (int32 below 2**31 examples); per shard the first row of each
# Parquet row group (a few int64 per shard); and decoded row groups holding at most ``max_resident_shards``
# shards' worth of rows per cache (an LRU). The keys are read once, compared with each shard's key column as fixed-width bytes
# (sorted + searchsorted, no dict of the cache's keys) and dropped. A batch decodes only the row groups
# holding its own rows (ParquetFile.read_row_group; the embed writer cuts shards into groups of
# omnidiff.contracts.cache.SHARD_ROW_GROUP_ROWS rows), each once; a shard written as one row group (caches
# from before) is read whole, as it was.

DEFAULT_RESIDENT_SHARDS = 8
DEFAULT_ORDER_BLOCK_ROWS = 64  # data.order_block_rows
DEFAULT_ORDER_WINDOW_ROWS = 8192  # data.order_window_rows: above the tiny world's example counts
DEFAULT_ORDER_LANES = 16  # data.order_lanes: blocks a stretch of positions draws from (0: each window permuted whole)
_FILES_OPEN = 64  # shard files a rank keeps open per cache (a file descriptor and the parsed footer each)


def fixed_width_keys(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A string key column -> numpy fixed-width bytes ``S<w>`` (zero copy when every key has one length)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    if arr.null_count:
        raise ValueError(f"{arr.null_count} null key(s) in an example or cache key column")
    if len(arr) == 0:
        return np.zeros(0, dtype="S1")
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset : arr.offset + len(arr) + 1]
    widths = np.diff(offsets)
    if widths[0] > 0 and (widths == widths[0]).all():
        data = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
        return data.view(f"S{int(widths[0])}")
    return np.array([k.encode() for k in arr.to_pylist()], dtype="S")


class ResidentShards:
    """One cache's shards as a training rank reads them: only the Parquet row groups that hold a batch's
    rows, only the value columns it needs, and at most ``max_resident`` shards' worth of decoded rows at a time
    (``budget_rows`` = ``max_resident`` x the rows of the largest shard; least recently used groups out first).
    So the bound means what it meant when a shard was read whole (a shard written as one row group, as before
    row groups, is still one piece), while a batch decodes only the groups it needs.

    ``peak_resident`` / ``peak_resident_rows`` / ``group_reads`` / ``shard_reads`` say how many row groups /
    rows were ever held at once, how many groups were decoded in total and how many times a shard was read
    from (its missing groups, once per batch); ``read_log`` (a list, optional) receives every
    ``(shard ids, rows)`` a batch took (tests use it to check that a rank reads only its share).
    """

    def __init__(self, store, max_resident: int = DEFAULT_RESIDENT_SHARDS, read_log: list | None = None):
        if int(max_resident) < 1:
            raise ValueError(f"max_resident_shards={max_resident}: must be >= 1")
        self.store, self.max_resident, self.read_log = store, int(max_resident), read_log
        self.names = store.shard_names  # oldest first: the order that resolves duplicate keys
        self.group_starts: list[np.ndarray] = []  # per shard: int64 (G+1,), the first row of each row group + rows
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._ahead_files: OrderedDict[int, pq.ParquetFile] = OrderedDict()  # the read-ahead thread's (warm)
        self._tables: OrderedDict[tuple[int, int, tuple[str, ...]], pa.Table] = OrderedDict()
        self.budget_rows, self.resident_rows = 0, 0  # the budget is set by locate (it reads each shard's size)
        self.peak_resident, self.peak_resident_rows, self.shard_reads, self.group_reads = 0, 0, 0, 0

    def locate(self, keys: np.ndarray, what: str, lengths: bool = False) -> tuple[np.ndarray, ...]:
        """Fixed-width ``keys (N,)`` -> ``(shard id int32 (N,), row int32 (N,))``; the oldest shard wins a
        duplicate key. Raises :class:`CacheMismatchError` naming a missing key. ``lengths``: a third array, each
        key's token count ``int32 (N,)`` from the shards' ``length`` column, read with the keys (0 where a shard
        has no such column: a pixel cache)."""
        unique, inverse = np.unique(keys, return_inverse=True)  # sorted, so each shard's keys are searched
        shard = np.full(len(unique), -1, dtype=np.int32)
        row = np.full(len(unique), -1, dtype=np.int32)
        length = np.zeros(len(unique), dtype=np.int32)
        self.group_starts = []
        for shard_id in range(len(self.names)):
            parquet = self._file(shard_id)
            footer = parquet.metadata
            rows = [footer.row_group(g).num_rows for g in range(footer.num_row_groups)]
            self.group_starts.append(np.cumsum([0, *rows], dtype=np.int64))
            counted = lengths and "length" in parquet.schema_arrow.names
            table = parquet.read(columns=["key", "length"] if counted else ["key"], use_threads=False)
            shard_keys = fixed_width_keys(table.column("key"))  # (s,)
            at = np.minimum(np.searchsorted(unique, shard_keys), max(len(unique) - 1, 0))
            hit = (unique[at] == shard_keys) if len(unique) else np.zeros(len(shard_keys), bool)
            new = hit & (shard[at] < 0)
            shard[at[new]] = shard_id
            row[at[new]] = np.flatnonzero(new)
            if counted:
                length[at[new]] = table.column("length").to_numpy()[new]
        self.budget_rows = self.max_resident * max((int(s[-1]) for s in self.group_starts), default=1)
        missing = np.flatnonzero(shard < 0)
        if len(missing):
            raise CacheMismatchError(
                f"{len(missing)} of {len(unique)} {what} are not in the {self.store.kind} cache {self.store.path} "
                f"(e.g. key {unique[missing[0]].decode()}); run 'omnidiff embed' over the snapshot first"
            )
        return (shard[inverse], row[inverse], length[inverse]) if lengths else (shard[inverse], row[inverse])

    def take(self, shard: np.ndarray, row: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """The rows ``(shard[i], row[i])`` in that order, ``columns`` only: the row groups holding them are
        decoded (or found resident) once each, in rounds of at most ``budget_rows`` rows."""
        columns = tuple(columns)
        shard = np.asarray(shard, dtype=np.int64)
        wanted, inverse, inner, sizes = self._plan(shard, row)
        parts, order, first = [], [], 0
        while first < len(wanted):
            last = self._round_end(sizes, first)
            tables = self._pieces(wanted[first:last], columns)
            base = np.cumsum([0] + [t.num_rows for t in tables[:-1]])
            mine = np.flatnonzero((inverse >= first) & (inverse < last))  # batch rows of this round
            parts.append(pa.concat_tables(tables).take(pa.array(base[inverse[mine] - first] + inner[mine])))
            order.append(mine)
            first = last
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts).take(pa.array(np.argsort(np.concatenate(order))))
        if self.read_log is not None:
            self.read_log.append((shard.astype(np.int32), np.asarray(row).copy()))
        return table

    def warm(self, shard: np.ndarray, row: np.ndarray, columns: Sequence[str], lock=None) -> None:
        """Decode the row groups holding ``(shard[i], row[i])`` (``columns`` only) into the resident set, as many as
        ``budget_rows`` holds, without taking rows: a later :meth:`take` of them finds them resident. With ``lock`` (a
        background read-ahead, :meth:`CachedBatches.prefetch`) the groups are decoded without it, through this
        thread's own open files, and the lock is held only to look up and insert them, so a :meth:`take` under the
        same lock goes on meanwhile."""
        columns = tuple(columns)
        shard = np.asarray(shard, dtype=np.int64)
        wanted, _, _, sizes = self._plan(shard, row)  # reads only what locate wrote: no lock needed
        wanted = wanted[: self._round_end(sizes, 0)]
        if lock is None:
            self._pieces(wanted, columns)
            return
        for shard_id in np.unique(wanted >> 32).tolist():  # shard-major pieces
            groups = (wanted[(wanted >> 32) == shard_id] & 0xFFFFFFFF).tolist()
            with lock:  # what is resident already: touched (most recently used), not decoded again
                missing = [g for g in groups if self._touch((shard_id, g, columns)) is None]
            if missing:  # decoded without the lock, on this thread's own open files: a take goes on meanwhile
                tables = self._decode(shard_id, missing, columns, self._ahead_files)
                with lock:
                    self._insert(shard_id, tables, columns)

    def group_index(self, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
        """The row group holding each ``(shard[i], row[i])`` as one index over the whole cache, ``int64 (N,)``,
        increasing with (shard, row): one search over every group's first row (any N, no loop over shards)."""
        sizes = np.array([int(s[-1]) for s in self.group_starts], dtype=np.int64)  # rows per shard
        base = np.cumsum(sizes) - sizes  # (shards,) the first row of each shard in the whole cache
        firsts = np.concatenate([b + s[:-1] for b, s in zip(base, self.group_starts, strict=True)])  # (groups,)
        rows = base[np.asarray(shard, dtype=np.int64)] + np.asarray(row, dtype=np.int64)
        return np.searchsorted(firsts, rows, side="right") - 1

    def _plan(self, shard: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, ...]:
        """What a batch's rows need (``shard`` int64): the row groups holding them as pieces ``shard << 32 | group``
        (P,) shard-major, each row's piece (B,), its row inside the piece (B,) and each piece's rows (P,)."""
        group, inner = self._groups(shard, row)
        wanted, inverse = np.unique(shard << 32 | group, return_inverse=True)
        sizes = np.array([self._group_rows(p) for p in wanted.tolist()], dtype=np.int64)
        return wanted, inverse, inner, sizes

    def _round_end(self, sizes: np.ndarray, first: int) -> int:
        """The end of the round of pieces from ``first``: at most ``budget_rows`` decoded rows, at least one piece."""
        return first + max(1, int(np.searchsorted(np.cumsum(sizes[first:]), self.budget_rows, side="right")))

    def _groups(self, shard: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(group in its shard, row inside the group)`` of each ``(shard[i], row[i])``: ``int64 (B,)`` each."""
        row = np.asarray(row, dtype=np.int64)
        group, inner = np.empty(len(shard), np.int64), np.empty(len(shard), np.int64)
        for s in np.unique(shard):
            chosen = shard == s
            starts = self.group_starts[int(s)]
            g = np.searchsorted(starts, row[chosen], side="right") - 1
            group[chosen], inner[chosen] = g, row[chosen] - starts[g]
        return group, inner

    def _pieces(self, pieces: np.ndarray, columns: tuple[str, ...]) -> list[pa.Table]:
        """The decoded row groups ``pieces`` (``shard << 32 | group``), reading the missing ones shard by shard."""
        found: dict[int, pa.Table] = {}
        for piece in pieces.tolist():
            table = self._touch((piece >> 32, piece & 0xFFFFFFFF, columns))
            if table is not None:
                found[piece] = table
        missing = [p for p in pieces.tolist() if p not in found]
        for shard_id in sorted({p >> 32 for p in missing}):
            groups = [p & 0xFFFFFFFF for p in missing if p >> 32 == shard_id]
            tables = self._decode(shard_id, groups, columns, self._files)
            self._insert(shard_id, tables, columns)
            found.update({shard_id << 32 | g: t for g, t in tables.items()})
        return [found[p] for p in pieces.tolist()]

    def _touch(self, key: tuple) -> pa.Table | None:
        """A resident group (now the most recently used), or None."""
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
        return table

    def _decode(self, shard_id: int, groups: list[int], columns: tuple[str, ...], files: OrderedDict) -> dict:
        """``{group: table}`` of one shard's ``groups``, read through the open files ``files`` (each thread its own)."""
        parquet = self._file(shard_id, files)
        try:  # small reads: Arrow's thread pool costs more than it saves here
            return {g: parquet.read_row_group(g, columns=list(columns), use_threads=False).combine_chunks()
                    for g in groups}
        except (OSError, pa.ArrowException) as exc:
            from omnidiff.contracts.cache import CorruptShardError

            raise CorruptShardError(self.store.path, {self.names[shard_id]: f"cannot read: {exc}"}) from None

    def _insert(self, shard_id: int, tables: dict, columns: tuple[str, ...]) -> None:
        """Decoded groups into the resident set (least recently used out first, within ``budget_rows``)."""
        self.shard_reads += 1
        self.group_reads += len(tables)
        for g, table in tables.items():
            key = (shard_id, g, columns)
            if key in self._tables:  # decoded by the other thread meanwhile
                self.resident_rows -= self._tables.pop(key).num_rows
            self._tables[key] = table
            self.resident_rows += table.num_rows
            while self.resident_rows > self.budget_rows and len(self._tables) > 1:
                self.resident_rows -= self._tables.popitem(last=False)[1].num_rows
            self.peak_resident = max(self.peak_resident, len(self._tables))
            self.peak_resident_rows = max(self.peak_resident_rows, self.resident_rows)

    def _group_rows(self, piece: int) -> int:
        starts = self.group_starts[piece >> 32]
        return int(starts[(piece & 0xFFFFFFFF) + 1] - starts[piece & 0xFFFFFFFF])

    def _file(self, shard_id: int, files: OrderedDict | None = None) -> pq.ParquetFile:
        """A listed shard as an open ``ParquetFile``: plain reads locally (no memory map, whose touched pages would
        count as this rank's memory), ranged GETs of the groups read on S3. At most ``_FILES_OPEN`` stay open in
        ``files`` (default: the caller's thread's; the read-ahead thread keeps its own)."""
        from omnidiff.contracts.cache import SHARDS_DIR, CorruptShardError

        files = self._files if files is None else files
        if shard_id in files:
            files.move_to_end(shard_id)
            return files[shard_id]
        name = self.names[shard_id]
        folder = getattr(self.store, "folder", None)
        try:
            if folder is not None:
                source = folder.fs.open_input_file(folder.path(f"{SHARDS_DIR}/{name}"))
            else:
                source = pa.OSFile(str(Path(self.store.path) / SHARDS_DIR / name))
            parquet = pq.ParquetFile(source)
        except (OSError, pa.ArrowException) as exc:
            raise CorruptShardError(self.store.path, {name: f"cannot read: {exc}"}) from None
        files[shard_id] = parquet
        while len(files) > _FILES_OPEN:
            files.popitem(last=False)[1].close(force=True)  # closes the file it was given
        return parquet

    def close(self) -> None:
        """Close the shard files kept open (the read-ahead thread's too)."""
        for files in (self._files, self._ahead_files):
            while files:
                files.popitem()[1].close(force=True)

    def release(self) -> None:
        """Drop every decoded row group and close the files; what :meth:`locate` found stays valid."""
        self._tables.clear()
        self.resident_rows = 0
        self.close()

    @property
    def resident(self) -> int:
        return len(self._tables)


def _states_of(table: pa.Table, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A taken ``states`` column -> token rows back to back ``float16 (sum L, D)`` + ``lengths (B,)``."""
    arr = table.column("states").combine_chunks()
    offsets = arr.offsets.to_numpy()
    flat = arr.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)  # (sum L, D)
    return flat, np.diff(offsets).astype(np.int64)


def _read_example_keys(examples: pd.DataFrame | pa.Table | str | Path, columns: list[str]) -> dict[str, np.ndarray]:
    """The key columns of an example table (a DataFrame, an Arrow table or a Parquet file) as fixed-width bytes."""
    if isinstance(examples, (str, Path)):
        table = pq.read_table(examples, columns=columns)
    elif isinstance(examples, pd.DataFrame):
        missing = [c for c in columns if c not in examples.columns]
        if missing:
            raise ValueError(f"example table has no column(s) {missing}; expected {columns}")
        table = pa.table({c: pa.array(examples[c].astype(str).to_numpy(), pa.string()) for c in columns})
    else:
        table = examples.select(columns)
    return {c: fixed_width_keys(table.column(c)) for c in columns}


def epoch_order(n: int, seed: int, epoch: int, window_rows: int, located: np.ndarray | None = None,
                block_starts: np.ndarray | None = None, lanes: int = 0) -> np.ndarray:
    """The examples of epoch ``epoch`` in visiting order, ``int64 (n,)``: every example exactly once.

    ``n <= window_rows`` (or ``located`` None): ``default_rng([seed, epoch]).permutation(n)``, the order of
    runs before the block order. Above, a block shuffle (as streaming loaders shuffle shards): ``located`` (the
    examples sorted by where their LLM states live) is cut into blocks at ``block_starts`` (offsets into
    ``located``, first 0: :func:`order_blocks`), the blocks are permuted, the sequence is cut into windows of
    ``window_rows`` and each window permuted, all drawn from that one generator.

    ``lanes`` K > 0 (data.order_lanes) orders each window in lanes instead of permuting it whole: the window's rows
    shuffled within their block, its blocks dealt to K lanes by where they lie in the cache (lane k: the k-th slice
    of the window's blocks in cache order, taken in the window's random order, one after another), and the lanes
    merged at one rate, row ``j`` of a lane of ``L`` rows at ``(j + u) / L`` (``u`` uniform),
    so any stretch of positions draws from about K blocks at once (one per lane, two where a lane moves on). A
    run's first positions then read K blocks' row groups instead of nearly every block of the window (the cold
    start of a large corpus), and a batch still mixes up to K blocks from across the corpus.
    """
    rng = np.random.default_rng([int(seed), int(epoch)])
    if located is None or n <= window_rows:
        return rng.permutation(n)
    if len(located) != n or block_starts is None or not len(block_starts) or block_starts[0] != 0:
        raise ValueError(f"epoch_order: located must hold the {n} examples and block_starts start at 0")
    lengths = np.diff(np.append(block_starts, n))  # (blocks,)
    chosen = rng.permutation(len(block_starts))  # the blocks' order
    starts, lengths = block_starts[chosen].astype(np.int64), lengths[chosen]
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)  # (n,) where each row's block begins in `sequence`
    sequence = located[np.repeat(starts, lengths) + np.arange(n) - first]  # (n,) rows in block order
    order = np.empty(n, dtype=np.int64)
    if lanes > 0:
        block_of = np.repeat(np.arange(len(lengths)), lengths)  # (n,) the block of each place in `sequence`
    for start in range(0, n, window_rows):
        window = sequence[start:start + window_rows]
        if lanes > 0:
            chunk = block_of[start:start + len(window)]
            window = window[_lane_order(chunk, starts[chunk], int(lanes), rng)]
        else:
            window = window[rng.permutation(len(window))]
        order[start:start + len(window)] = window
    return order


def _lane_order(block: np.ndarray, where: np.ndarray, lanes: int, rng: np.random.Generator) -> np.ndarray:
    """The visiting order (indices into the window) of a window whose rows belong to the non-decreasing blocks
    ``block (W,)``, each block starting at ``where (W,)`` in the LLM cache's order: rows shuffled within their
    block; blocks dealt to ``lanes`` lanes by where they lie in the cache (lane k: the k-th of ``lanes`` equal
    slices of the window's blocks in cache order), each lane taking its blocks in the window's (random) order;
    lanes merged at one rate (:func:`epoch_order`). So the blocks open at once come one from each slice of the cache
    (which the embed stage writes length-sorted): a short run sees the window's mix of caption lengths, not the few
    blocks it happened to open. Vectorised: a few sorts of W keys."""
    w = len(block)
    segment = np.cumsum(np.r_[0, block[1:] != block[:-1]]) if w else np.zeros(0, np.int64)  # (W,) 0, 0, 1, ...
    shuffled = np.lexsort((rng.random(w), segment))  # (W,) rows shuffled within each segment, segments in order
    first = np.flatnonzero(np.r_[True, segment[1:] != segment[:-1]]) if w else np.zeros(0, np.int64)  # (S,)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(where[first], kind="stable")] = np.arange(len(first))  # (S,) each block's place in cache order
    lane = (rank * lanes // max(len(first), 1))[segment]  # (W,) lane of each place in `shuffled` (it keeps segments)
    by_lane = np.argsort(lane, kind="stable")  # (W,) places grouped by lane, in order inside a lane
    size = np.bincount(lane, minlength=lanes)  # (K,) rows per lane
    index = np.empty(w, dtype=np.int64)
    index[by_lane] = np.arange(w) - np.repeat(np.cumsum(size) - size, size)  # (W,) the place's index in its lane
    when = (index + rng.random(w)) / size[lane]  # (W,) in [0, 1): each lane advances at the same rate
    return shuffled[np.argsort(when, kind="stable")]


def order_blocks(pieces: np.ndarray, block_rows: int) -> np.ndarray:
    """Where the blocks of a location-sorted sequence start: ``pieces (n,)`` are the sequence's row groups
    (non-decreasing ids); a block is a run of whole row groups, starting at the first group that starts at or past
    each multiple of ``block_rows`` (so blocks hold about ``block_rows`` examples and no group is split)."""
    pieces = np.asarray(pieces)
    group_starts = np.flatnonzero(np.r_[True, pieces[1:] != pieces[:-1]]) if len(pieces) else np.zeros(0, np.int64)
    block = group_starts // int(block_rows)
    return group_starts[np.r_[True, block[1:] != block[:-1]]] if len(group_starts) else group_starts


def _layout_digest(*arrays: np.ndarray) -> str:
    """A short digest of integer arrays (the examples' cache locations and the blocks cut from them): the block
    order's input besides (seed, epoch), recorded so a resume over a rewritten cache is refused."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(array.dtype.str.encode())
        digest.update(memoryview(array).cast("B"))  # no copy of the (N,) arrays
    return digest.hexdigest()


class CachedBatches:
    """One rank's micro-batches from the cache, a pure function of the global sample positions (no state
    to checkpoint beyond the step).

    ``examples``: the example table (DataFrame, Arrow table or Parquet path; only its key columns are
    read). ``stores``: ``{"llm": CacheStore, "clip"|"pixels": CacheStore}``. ``empty_states`` are the LLM
    states of "" (caption dropout's replacement). ``num_train_timesteps`` is the diffusion schedule's
    length (stages 2-3). ``max_resident_shards`` bounds the decoded shards kept per cache.

    Order (docs/architecture.md "Training data"): global position ``p`` is example ``perm[p // N][p % N]``,
    ``perm[e]`` the order of epoch ``e``, a pure function of ``(seed, e)``, the three order sizes and the LLM
    cache's layout (:func:`epoch_order`). When the examples fit one window (``N <= order_window_rows``) it is
    ``default_rng([seed, e]).permutation(N)``; above, a block shuffle: examples sorted by where their LLM
    states live, cut into blocks of about ``order_block_rows`` (whole row groups), the blocks permuted, cut into
    windows of ``order_window_rows`` and each window visited in ``order_lanes`` lanes (``0``: permuted whole), so
    an LLM row group is decoded about once per window whatever the corpus size, and a run's first steps read
    about ``order_lanes`` blocks' groups, not the whole window's. ``micro_by_length``: a step's positions are dealt
    to its micro-batches by their captions' LLM token counts (:meth:`micro_positions`); the order is untouched.
    """

    def __init__(
        self,
        examples: pd.DataFrame | pa.Table | str | Path,
        family: str,
        stores: dict[str, Any],
        seed: int,
        caption_dropout: float = 0.0,
        empty_states: np.ndarray | None = None,
        num_train_timesteps: int = 1000,
        max_resident_shards: int = DEFAULT_RESIDENT_SHARDS,
        read_log: list | None = None,
        order_block_rows: int = DEFAULT_ORDER_BLOCK_ROWS,
        order_window_rows: int = DEFAULT_ORDER_WINDOW_ROWS,
        order_lanes: int = DEFAULT_ORDER_LANES,
        micro_by_length: bool = False,
    ):
        if family not in ("align", "diffusion"):
            raise ValueError(f"family={family!r}: expected 'align' or 'diffusion'")
        if family == "diffusion" and caption_dropout > 0 and empty_states is None:
            raise ValueError("caption dropout needs the LLM states of the empty prompt")
        if int(order_block_rows) < 1 or int(order_window_rows) < 1:
            raise ValueError(f"order_block_rows={order_block_rows}, order_window_rows={order_window_rows}: "
                             "both must be >= 1")
        if int(order_lanes) < 0:
            raise ValueError(f"order_lanes={order_lanes}: must be >= 0 (0: each window permuted whole)")
        self.family, self.seed = family, int(seed)
        self.caption_dropout = float(caption_dropout)
        self.empty_states = empty_states
        self.num_train_timesteps = int(num_train_timesteps)
        self.other = "clip" if family == "align" else "pixels"
        key_column = "target_key" if family == "align" else "pixel_key"
        keys = _read_example_keys(examples, ["llm_key", key_column])
        self.n = len(keys["llm_key"])
        if self.n == 0:
            raise ValueError("no training examples: the snapshot split (and filters) left nothing to train on")
        self.shards = {kind: ResidentShards(stores[kind], max_resident_shards, read_log) for kind in ("llm", self.other)}
        what = {"llm": "captions", "clip": "English-side texts", "pixels": "images"}
        column = {"llm": "llm_key", self.other: key_column}
        # (shard id, row) per example and cache: int32 (N,) each; the key strings are dropped here. With
        # micro_by_length also each example's LLM token count, int32 (N,), read with the LLM cache's keys.
        located = {kind: self.shards[kind].locate(keys[column[kind]], what[kind], lengths=micro_by_length and kind == "llm")
                   for kind in self.shards}
        del keys
        self.where = {kind: found[:2] for kind, found in located.items()}
        self.lengths = located["llm"][2] if micro_by_length else None
        self.sizes = family == "diffusion" and cached_image_sizes(stores["pixels"])
        self._perms: dict[int, np.ndarray] = {}
        import threading
        from collections import deque

        # the read-ahead thread (started by the first prefetch), its jobs in order ((positions bytes, future)), and
        # the lock that lets one thread at a time touch the resident sets
        self._executor, self._pending, self._lock = None, deque(), threading.Lock()
        # The LLM cache's row groups of a window stay decoded through it when the window fits the resident budget
        # (the other cache's rows follow the LLM's order only as far as the two caches' orders agree).
        self.block_rows, self.window_rows, self.lanes = int(order_block_rows), int(order_window_rows), int(order_lanes)
        self.windowed = self.n > self.window_rows
        budget = self.shards["llm"].budget_rows
        if self.windowed and self.window_rows > budget:
            import warnings

            warnings.warn(f"data.order_window_rows={self.window_rows} is more than the LLM cache rows a rank keeps "
                          f"decoded ({budget} = data.max_resident_shards x its largest shard): row groups may be "
                          "decoded more than once per window; lower order_window_rows or raise max_resident_shards",
                          stacklevel=2)
        self._located = self._blocks = self._layout = None  # None: the whole-epoch permutation
        if self.windowed:  # examples sorted by (shard, row) of the LLM cache (a stable sort), cut at row groups
            shard, row = self.where["llm"]
            located = np.lexsort((row, shard))
            self._located = located.astype(np.int32) if self.n < 2**31 else located  # 4 bytes per example
            self._blocks = order_blocks(self.shards["llm"].group_index(shard[self._located], row[self._located]),
                                        self.block_rows)
            self._layout = _layout_digest(shard, row, self._blocks)

    def __len__(self) -> int:
        return self.n

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            perm = epoch_order(self.n, self.seed, epoch, self.window_rows, self._located, self._blocks, self.lanes)
            self._perms[epoch] = perm.astype(np.int32) if self.n < 2**31 else perm
        return self._perms[epoch]

    @property
    def order(self) -> str:
        """The order scheme in words (what a checkpoint records and a refused resume names)."""
        if not self.windowed:
            return "permutation (whole epoch)"
        lanes = f", lanes={self.lanes}" if self.lanes else ""
        return f"blocks (block_rows={self.block_rows}, window_rows={self.window_rows}{lanes})"

    def example_index(self, positions: np.ndarray) -> np.ndarray:
        """Global sample positions -> example rows ``int64 (B,)``: a fresh order per epoch (:func:`epoch_order`)."""
        epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.n)
        out = np.empty(len(epochs), dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = self._perm(int(epoch))[offsets[chosen]]
        return out

    @staticmethod
    def positions(step: int, global_batch: int, rank: int, world: int, micro: int, micro_step: int) -> np.ndarray:
        """Global sample positions of one rank's micro-batch ``micro_step`` at optimizer ``step``."""
        start = step * global_batch + micro_step * micro * world + rank * micro
        return np.arange(start, start + micro, dtype=np.int64)

    def micro_positions(self, step: int, global_batch: int, rank: int, world: int, micro: int,
                        micro_step: int) -> np.ndarray:
        """The global sample positions of one rank's micro-batch ``micro_step`` at optimizer ``step``, ascending,
        ``int64 (micro,)``: :meth:`positions` (consecutive), or with ``micro_by_length`` (data.micro_by_length) the
        step's positions dealt to its micro-batches by their examples' LLM token counts: the step's
        ``global_batch`` positions sorted by (length, position) and cut where :meth:`positions` cuts them (rank
        ``r`` of micro-step ``m`` takes the slice at ``(m * world + r) * micro``). A micro-batch is padded to its
        longest caption, so the short captions of a step no longer pad to a long one: fewer padded tokens, the same
        examples per step and the same example at each position (the order is untouched), and the same
        micro-batches on any worker count with the same ``micro``; ranks of one micro-step take neighbouring
        slices (similar lengths). A function of (seed, position, global batch) and the cache's lengths."""
        mine = self.positions(step, global_batch, rank, world, micro, micro_step)
        if self.lengths is None:
            return mine
        first = int(step) * int(global_batch)
        positions = np.arange(first, first + int(global_batch), dtype=np.int64)  # (G,) the step's
        dealt = positions[np.argsort(self.lengths[self.example_index(positions)], kind="stable")]  # (G,) by length
        return np.sort(dealt[int(mine[0]) - first : int(mine[0]) - first + len(mine)])

    def position_state(self, step: int, global_batch: int) -> dict:
        """What a checkpoint records about the data position (the order itself follows from it). The block order
        adds its scheme, sizes and a digest of the LLM cache layout it is cut from; no ``order`` key means the
        whole-epoch permutation (as in checkpoints from before the block order)."""
        state = {"examples": self.n, "seed": self.seed, "next_position": int(step) * int(global_batch)}
        if self.windowed:
            state.update(order="blocks", order_block_rows=self.block_rows, order_window_rows=self.window_rows,
                         order_layout=self._layout)
            if self.lanes:  # no key: each window permuted whole (checkpoints from before the lanes)
                state["order_lanes"] = self.lanes
        if self.lengths is not None:  # no key: consecutive micro-batches (checkpoints from before the option)
            state["micro_batches"] = "by_length"
        return state

    def check_resume(self, state: dict | None, step: int, global_batch: int) -> None:
        """A clear error when a checkpoint's data position belongs to another example set, seed or order."""
        if not state:
            return  # a checkpoint from before the position was recorded
        mine = self.position_state(step, global_batch)
        theirs = {**state, "order": state.get("order", "permutation")}
        mine["order"] = mine.get("order", "permutation")
        differs = {k: (theirs.get(k), mine.get(k)) for k in dict.fromkeys([*mine, *theirs])
                   if theirs.get(k) != mine.get(k)}
        if differs:
            shown = "; ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in differs.items())
            hint = ""
            if any(k.startswith("order") for k in differs):
                hint = (f" This run's order is {self.order}; the checkpoint's is "
                        + (f"blocks (block_rows={state.get('order_block_rows')}, window_rows="
                           f"{state.get('order_window_rows')}, lanes={state.get('order_lanes', 0)})"
                           if theirs["order"] == "blocks"
                           else "the whole-epoch permutation (data.order_window_rows >= the example count gives it)")
                        + ": set data.order_block_rows / data.order_window_rows / data.order_lanes as it was saved "
                        "(order_lanes 0: a checkpoint from before the lanes; order_layout differs when the LLM cache "
                        "was rewritten).")
            if "micro_batches" in differs:
                hint += (" Set data.micro_by_length as the checkpoint was saved (false: a checkpoint from before the "
                         "option, whose micro-batches took consecutive positions).")
            raise RuntimeError(f"the checkpoint's data position does not match this run ({shown}): resuming would "
                               "train on another order. Use the snapshot, split, seed and global_batch_size it was "
                               f"saved with, or another checkpoint.dir.{hint}")

    def _columns(self) -> dict[str, list[str]]:
        """The value columns a batch reads from each cache."""
        if self.family == "align":
            return {"llm": ["states"], "clip": ["states", "pooled"]}
        return {"llm": ["states"], "pixels": ["pixels", *SIZE_COLUMNS] if self.sizes else ["pixels"]}

    def prefetch(self, positions: np.ndarray) -> None:
        """Queue the decoding of the row groups of the batch at ``positions`` on a background thread (Arrow decodes
        without the GIL) while the caller computes. Jobs run in the order queued, so a caller may queue several
        micro-batches ahead (train.loop: data.prefetch_batches) and the thread keeps decoding through the model's
        steps; :meth:`batch` waits only for the jobs up to its own (re-raising what they raised) and finds its
        groups resident. The resident sets are touched under one lock (a job holds it for one shard's groups at a
        time). Only when groups are decoded changes, never a batch's content."""
        rows = self.example_index(positions)  # (B,) here: the epoch orders are computed in the caller's thread
        wanted = {kind: tuple(w[rows] for w in self.where[kind]) for kind in self.shards}
        columns = self._columns()
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omnidiff-prefetch")

        def warm() -> None:
            for kind, (shard, row) in wanted.items():
                self.shards[kind].warm(shard, row, columns[kind], self._lock)

        key = np.asarray(positions, dtype=np.int64).tobytes()
        self._pending.append((key, self._executor.submit(warm)))

    def _wait(self, positions: np.ndarray | None = None) -> None:
        """Wait for the queued jobs up to the one of ``positions`` (every job when None; none when no job is queued
        for them), re-raising what they raised."""
        if positions is not None:
            key = np.asarray(positions, dtype=np.int64).tobytes()
            if not any(k == key for k, _ in self._pending):
                return
        while self._pending:
            k, job = self._pending.popleft()
            job.result()
            if positions is not None and k == key:
                return

    def close(self) -> None:
        """Wait for a prefetch, stop its thread and close the shard files kept open."""
        self._wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
        for shards in self.shards.values():
            shards.close()

    def batch(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        self._wait(positions)  # its own read-ahead job (if queued) and those before it; later ones go on decoding
        rows = self.example_index(positions)  # (B,)
        columns = self._columns()
        llm_shards = self.shards["llm"]
        other = self.shards[self.other]
        shard, row = (w[rows] for w in self.where[self.other])
        with self._lock:  # the read-ahead thread may be decoding later batches' groups
            taken = llm_shards.take(*(w[rows] for w in self.where["llm"]), columns["llm"])
            other_taken = other.take(shard, row, columns[self.other])
        flat, lengths = _states_of(taken, llm_shards.store.hidden_size)  # (sum L, Dl), (B,)
        if self.family == "align":
            clip = other_taken
            c_flat, c_lengths = _states_of(clip, other.store.hidden_size)
            target, target_mask = pad_flat(c_flat, c_lengths)  # (B, Tc, Dc)
            llm_states, llm_mask = pad_flat(flat, lengths)  # (B, T, Dl)
            pooled = decode_fixed(clip.column("pooled"), (other.store.pooled_dim,))  # (B, P): SDXL P != Dc
            return {
                "llm_states": llm_states,
                "llm_mask": llm_mask,
                "target": target,
                "target_mask": clip_target_mask(target, target_mask),
                "target_pooled": torch.from_numpy(pooled.astype(np.float32)),
            }
        pixels = other_taken
        images = torch.from_numpy(decode_fixed(pixels.column("pixels"), other.store.value_shape).astype(np.float32))
        noise, timesteps, dropped = self._draws(images.shape[1:], positions)
        llm_states, llm_mask = self._with_dropout(flat, lengths, dropped.numpy())
        batch = {
            "llm_states": llm_states,
            "llm_mask": llm_mask,
            "pixels": images,  # (B, C, H, W)
            "noise": noise,
            "timesteps": timesteps,
            "dropped": dropped,
        }
        if self.sizes:
            from omnidiff.pipeline import sdxl_time_ids

            resolution = int(other.store.manifest["fingerprint_inputs"]["resolution"])
            table = np.concatenate([decode_fixed(pixels.column(c), (2,)) for c in SIZE_COLUMNS], 1).astype(np.int32)
            batch["time_ids"] = sdxl_time_ids(table[:, :2], table[:, 2:], (resolution, resolution))  # (B, 6) long
        return batch

    def _with_dropout(self, flat: np.ndarray, lengths: np.ndarray, dropped: np.ndarray):
        """Padded LLM states where dropped captions carry the states of "" instead (one scatter each)."""
        if not dropped.any():
            return pad_flat(flat, lengths)
        empty = np.asarray(self.empty_states)  # (Le, D)
        kept = np.repeat(~dropped, lengths)  # (sum L,) tokens of kept captions
        lengths_out = np.where(dropped, len(empty), lengths)
        kept_lengths = np.where(dropped, 0, lengths)
        states, _ = pad_flat(flat[kept], kept_lengths, t_max=int(lengths_out.max()))
        states[torch.from_numpy(dropped), : len(empty)] = torch.from_numpy(empty.astype(np.float32))
        mask = torch.from_numpy(np.arange(states.shape[1])[None, :] < lengths_out[:, None])
        return states, mask

    def _draws(self, shape: torch.Size, positions: np.ndarray):
        """Noise ``(B, *shape)``, timesteps and caption-dropout draws, each seeded by its sample's position.

        One generator per sample is what makes the draws a function of the position alone (the same on
        any worker count, and after a resume); the rest of the batch is assembled without per-sample code.
        """
        noise = torch.empty(len(positions), *shape)
        timesteps = torch.empty(len(positions), dtype=torch.long)
        dropped = torch.zeros(len(positions), dtype=torch.bool)
        for i, p in enumerate(positions):
            g = torch.Generator().manual_seed(sample_seed(self.seed, int(p)))
            noise[i] = torch.randn(shape, generator=g)
            timesteps[i] = int(torch.randint(0, self.num_train_timesteps, (1,), generator=g))
            dropped[i] = bool(torch.rand((), generator=g) < self.caption_dropout)
        return noise, timesteps, dropped
