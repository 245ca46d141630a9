"""``LLMShardEncoder``: per-token states of the frozen LLM, each shared token prefix computed once.

fp32 compute, unpadded rows (the cache stores them in fp16). With ``share_prefixes`` on (causal
LMs only), the rows of a shard that start with the same tokens reuse the keys/values of the first
of them (``batching.plan_prefix_sharing``); the states are the same as without sharing
(tests/test_embed_job.py), only the compute differs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from embed_cache import batching
from embed_cache.encoders import require_same_inputs
from omnidiff.contracts.cache import states_table

log = logging.getLogger("omnidiff.embed")


class LLMShardEncoder:
    """LLM per-token states: fp32 compute, unpadded rows, fp16 storage, shared prefixes computed once."""

    def __init__(
        self,
        path: str,
        layer: int,
        max_length: int,
        dtype: str,
        device: str,
        expected_inputs: dict,
        max_batch_size: int,
        share_prefixes: int = 0,
        share_cache_mb: float = 2048,
    ):
        from omnidiff.models.llm import LLMTextEncoder

        self.model = LLMTextEncoder(
            path, layer=layer, max_length=max_length, dtype=dtype, device=device, batch_size=max_batch_size
        )
        self.share_prefixes = int(share_prefixes)
        if self.share_prefixes and not self.model.causal:  # a bidirectional model's prefix states depend on the rest
            log.warning("embed llm: %s is not a causal LM: share_prefixes=%d ignored", path, self.share_prefixes)
            self.share_prefixes = 0
        self.max_kept = int(share_cache_mb * 2**20 // self.model.kv_bytes_per_token)
        require_same_inputs("LLM", expected_inputs, self.model.fingerprint_inputs())

    def compute(self, texts: list[str]) -> list[np.ndarray]:
        states, mask = self.model.encode(list(texts))  # (B, T, D) float32, (B, T) bool
        states, mask = states.numpy(), mask.numpy()
        return [states[i][mask[i]] for i in range(len(texts))]  # (L_i, D) each

    def compute_shard(self, texts: list[str], max_tokens: int, max_batch_size: int, batch_overhead: float | None = None):
        """A whole shard at once, each shared token prefix computed once (``batching.plan_prefix_sharing``).

        Run by run (the keys/values kept for later rows stay under ``share_cache_mb``), wave by wave
        (a row runs after the row whose prefix it continues), each wave's rows are packed by
        continuation length (``batching.pack_batches``). Returns ``(values, counts)``:
        ``(L_i, D)`` float32 states per text and ``{"padded_slots", "computed_tokens", "shared_tokens"}``.
        """
        ids = self.model.tokenize(list(texts))
        limit = self.model.share_limit
        plan = batching.plan_prefix_sharing(ids, self.share_prefixes, limit, self.max_kept)
        last_use = np.full(len(ids), -1)
        for i, d in enumerate(plan.donor):
            if d >= 0:
                last_use[d] = max(last_use[d], plan.wave[i])
        states: list[Any] = [None] * len(ids)
        kept: list[Any] = [None] * len(ids)
        counts = {"padded_slots": 0, "computed_tokens": 0, "shared_tokens": plan.shared_tokens}
        for run in np.unique(plan.run):  # a run's kept keys/values are freed before the next starts
            in_run = plan.run == run
            for wave in range(int(plan.wave[in_run].max()) + 1):
                todo = []
                for i in np.flatnonzero(in_run & (plan.wave == wave)):
                    d, n = int(plan.donor[i]), int(plan.shared[i])
                    if d >= 0 and n >= len(ids[i]):  # the same tokens as its donor's start (a cut at max_length)
                        states[i] = states[d][:n]
                        kept[i] = [(k[:, : plan.keep[i]], v[:, : plan.keep[i]]) for k, v in kept[d]] if plan.keep[i] else None
                    else:
                        todo.append(int(i))
                self._compute_wave(ids, todo, plan, states, kept, counts, max_tokens, max_batch_size, batch_overhead)
                for i in np.flatnonzero(in_run & (last_use == wave)):  # no later wave continues these rows
                    kept[i] = None
        return [s.numpy() for s in states], counts

    def _compute_wave(self, ids, todo, plan, states, kept, counts, max_tokens, max_batch_size, batch_overhead):
        import torch

        limit = self.model.share_limit

        def continuation(i: int) -> int:
            return len(ids[i]) - int(plan.shared[i])

        # Rows a sliding window could not hold with a prefix never share, and never share a batch with
        # rows that do (the window bounds prefix + continuation).
        fits = [i for i in todo if limit is None or len(ids[i]) <= limit]
        too_long = [i for i in todo if limit is not None and len(ids[i]) > limit]
        for group in (sorted(fits, key=continuation), sorted(too_long, key=continuation)):
            suffix = np.asarray([continuation(i) for i in group], dtype=np.int64)
            for sl in batching.pack_batches(suffix, max_tokens, max_batch_size, batch_overhead):
                batch = group[sl]
                prefixes = []
                for i in batch:
                    d, n = int(plan.donor[i]), int(plan.shared[i])
                    prefixes.append([(k[:, :n], v[:, :n]) for k, v in kept[d]] if d >= 0 else None)
                new, new_kept = self.model.forward_rows(
                    [ids[i][int(plan.shared[i]) :] for i in batch], prefixes, [int(plan.keep[i]) for i in batch]
                )
                for i, h, kv in zip(batch, new, new_kept, strict=True):
                    d = int(plan.donor[i])
                    states[i] = torch.cat([states[d][: int(plan.shared[i])], h]) if d >= 0 else h
                    kept[i] = kv
                counts["padded_slots"] += len(batch) * int(suffix[sl.stop - 1])
                counts["computed_tokens"] += int(suffix[sl].sum())

    def table(self, keys, values):
        return states_table(keys, values)
