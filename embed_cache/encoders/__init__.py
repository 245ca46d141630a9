"""The shard encoders of the embed job: one class per cache kind, each loading its model once.

* :mod:`embed_cache.encoders.llm`:    ``LLMShardEncoder``, per-token LLM states, shared prefixes computed once;
* :mod:`embed_cache.encoders.clip`:   ``ClipShardEncoder``, the base model's CLIP text states + pooled vector;
* :mod:`embed_cache.encoders.pixels`: ``PixelShardEncoder``, decoded images or their VAE latents.

Each takes its kind's ``KindPlan.encoder`` keyword arguments (embed_cache/plan.py) plus
``max_batch_size`` and offers ``compute(payloads) -> values`` and ``table(keys, values)`` (a cache
shard's Arrow table); the LLM also ``compute_shard`` (plans its own batches), the pixels a
``batch_size``. The actor (embed_cache/actor.py) calls them; nothing here knows about Ray.
"""

from __future__ import annotations


def require_same_inputs(what: str, expected: dict, got: dict) -> None:
    """Refuse to compute when the loaded model's fingerprint inputs differ from the driver's.

    The cache directory was named from ``expected`` (embed_cache/plan.py): never write under a wrong name.
    """
    if got != expected:
        raise RuntimeError(f"{what} fingerprint inputs differ between driver {expected} and actor {got}")
