"""The embed job's Ray Data actor: one call = one shard of one cache kind, written by the actor itself.

    ds.map_batches(EncodeShardActor, fn_constructor_kwargs=..., batch_size=None, compute=ActorPoolStrategy(...))

The driver (embed_cache/job.py) hands each shard over as one pandas block (columns ``kind``,
``shard``, ``key``, ``payload``, ``length``: ``plan_units`` in embed_cache/plan.py; a pixel payload is
where the image is in the snapshot, an ``ImageRef``, and the actor reads the bytes itself) and gets back
one report row per shard (what was written, rejected keys, token counts, seconds). A worker
reports failure as data: a non-finite row is rejected by key and the rest of the shard is kept.
The ``local`` executor calls the same class in the driver's process.

Ray runs :data:`CALLS_PER_ACTOR` calls of an actor at once (embed_cache/job.py), and a call holds the actor's
compute lock only while it computes: reading a shard's images before and encoding and uploading its Parquet after
(one PUT on object storage) overlap the next shard's compute, while the models still compute one shard at a time
(issue 17: embed with its cache on S3 at >= 0.9x the throughput of local disk).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import numpy as np
import pandas as pd

from embed_cache import batching
from embed_cache.encoders.clip import ClipShardEncoder
from embed_cache.encoders.llm import LLMShardEncoder
from embed_cache.encoders.pixels import PixelShardEncoder
from embed_cache.inputs import ImageRef, is_image_ref, read_images
from embed_cache.writer import write_shard_file
from omnidiff.contracts.cache import SHARD_ROW_GROUP_ROWS, NonFiniteStatesError
from omnidiff.contracts.storage import S3Settings

SHARD_ENCODERS = {"llm": LLMShardEncoder, "clip": ClipShardEncoder, "pixels": PixelShardEncoder}
CALLS_PER_ACTOR = 2  # one computing, one reading its inputs or writing its shard


class EncodeShardActor:
    """The Ray Data callable class: one call = one shard of one cache kind.

    Each model (LLM, CLIP, VAE) is loaded once per actor, on the first shard of its kind, so one
    actor pool serves every kind of a run. A call packs its (length-sorted) shard into compute
    batches under the token-slot budget, computes them, rejects non-finite rows by key (reported as
    data; the rest is still written) and writes the shard itself: the driver only lists finished
    shards in the manifest.
    """

    def __init__(
        self,
        caches: dict[str, str],
        run_tokens: dict[str, str],
        encoders: dict[str, dict[str, Any]],
        threads: int,
        max_tokens: int,
        max_batch_size: int,
        batch_overhead: float | None = None,
        storage: S3Settings | None = None,
        row_group_rows: int = SHARD_ROW_GROUP_ROWS,
    ):
        import torch
        import transformers

        torch.set_num_threads(int(threads))
        transformers.utils.logging.disable_progress_bar()  # no per-actor "Loading weights" bars in the log
        self.caches, self.run_tokens, self.encoder_kwargs = caches, run_tokens, encoders
        self.max_tokens, self.max_batch_size = int(max_tokens), int(max_batch_size)
        self.batch_overhead = batch_overhead
        self.storage = storage  # the driver's resolved S3 settings: an s3:// cache is written with them
        self.row_group_rows = int(row_group_rows)
        self.encoders: dict[str, Any] = {}
        self._compute = threading.Lock()  # the models compute one shard at a time; I/O runs beside them

    def encoder(self, kind: str):
        if kind not in self.encoders:
            build = SHARD_ENCODERS[kind]
            self.encoders[kind] = build(**self.encoder_kwargs[kind], max_batch_size=self.max_batch_size)
        return self.encoders[kind]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        kind = str(batch["kind"].iloc[0])
        order = np.argsort(batch["length"].to_numpy(), kind="stable")  # the driver sorted already
        keys = [batch["key"].iloc[i] for i in order]
        payloads = [decode_payload(kind, batch["payload"].iloc[i]) for i in order]
        if kind == "pixels":  # this shard's images, read here from their snapshot rows (never on the driver)
            payloads = resolve_images(payloads, self.storage)
        lengths = batch["length"].to_numpy()[order]
        with self._compute:
            start = time.perf_counter()
            encoder = self.encoder(kind)
            load_s = time.perf_counter() - start
            start = time.perf_counter()
            table, keys, rejected, counts = self._compute_shard(encoder, keys, payloads, lengths)
            compute_s = time.perf_counter() - start
        entry: dict[str, Any] = {"name": None, "rows": 0, "sha256": None, "bytes": 0, "stale": False}
        if table is not None:
            entry.update(write_shard_file(self.caches[kind], str(batch["shard"].iloc[0]), table, self.run_tokens[kind],
                                          self.storage, self.row_group_rows))
        entry.setdefault("tokens", len(keys))
        return pd.DataFrame([{
            "kind": kind,
            "entry": json.dumps(entry),
            "shard_keys": json.dumps(keys),
            "rejected": json.dumps(rejected),
            "planned_tokens": int(lengths.sum()),
            "padded_slots": counts["padded_slots"],
            "computed_tokens": counts["computed_tokens"],
            "shared_tokens": counts["shared_tokens"],
            "compute_s": compute_s,
            "load_s": load_s,
            "pid": os.getpid(),
        }])  # fmt: skip

    def _compute_shard(self, encoder, keys: list[str], payloads: list[Any], lengths: np.ndarray):
        """``(table or None, kept keys, rejected {key: why}, token counts)`` of one shard's payloads."""
        batch_limit = min(self.max_batch_size, getattr(encoder, "batch_size", self.max_batch_size))
        if hasattr(encoder, "compute_shard"):  # plans its own batches (the LLM: shared prefixes)
            values, counts = encoder.compute_shard(payloads, self.max_tokens, batch_limit, self.batch_overhead)
        else:
            values, counts = [], {"padded_slots": 0, "computed_tokens": int(lengths.sum()), "shared_tokens": 0}
            for sl in batching.pack_batches(lengths, self.max_tokens, batch_limit, self.batch_overhead):
                values.extend(encoder.compute(payloads[sl]))
                counts["padded_slots"] += (sl.stop - sl.start) * int(lengths[sl.stop - 1])
        rejected: dict[str, str] = {}
        try:
            table = encoder.table(keys, values)
        except NonFiniteStatesError as exc:  # report the bad rows as data, keep the good ones
            rejected = exc.rejected
            good = [i for i, k in enumerate(keys) if k not in rejected]
            keys = [keys[i] for i in good]
            values = [values[i] for i in good]
            table = encoder.table(keys, values) if keys else None
        return table, keys, rejected, counts


def encode_payload(kind: str, payload: Any) -> bytes:
    """Every unit's payload column is binary (one Arrow schema for all kinds): texts go as UTF-8, an image
    as its :class:`ImageRef` (or its bytes, for inputs built in memory)."""
    if isinstance(payload, ImageRef):
        return payload.encode()
    return payload if kind == "pixels" else str(payload).encode("utf-8")


def decode_payload(kind: str, payload: bytes) -> Any:
    if kind == "pixels":
        return ImageRef.decode(payload) if is_image_ref(payload) else payload
    return bytes(payload).decode("utf-8")


def resolve_images(payloads: list[Any], storage: S3Settings | None) -> list[bytes]:
    """Image bytes for a shard's pixel payloads: each :class:`ImageRef` read from its snapshot shard."""
    refs = [i for i, p in enumerate(payloads) if isinstance(p, ImageRef)]
    if not refs:
        return payloads
    out = list(payloads)
    for i, data in zip(refs, read_images([payloads[i] for i in refs], storage), strict=True):
        out[i] = data
    return out
