"""Text keys, the English-side rule and the empty prompt: how every stage names a text or a pair.

The embedding cache is keyed by :func:`text_key` of the *normalised* text (omnidiff/text.py holds
the normaliser), so collect, embed, train and serve must all key the same way: :func:`cache_key` is
that rule, once.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable
from typing import Any

from omnidiff.contracts.io import sha256_bytes
from omnidiff.text import normalise_caption

# The unconditional prompt: the embed stage caches its states in every cache, stage 1 aligns it, and
# classifier-free guidance contrasts every prompt with it (PAPER.md "Release hyper-parameters").
EMPTY_PROMPT = ""


def text_key(normalised_text: str) -> str:
    """Stable key of an already normalised text: 32 hex chars of SHA-256."""
    return hashlib.sha256(normalised_text.encode("utf-8")).hexdigest()[:32]


def digest_bytes(data: bytes) -> str:
    """SHA-256 hex digest of raw bytes (image digests, file checksums)."""
    return sha256_bytes(data)


def pair_key(image_digest: str, normalised_caption: str) -> str:
    """Row key of a pair snapshot: stable hash of (image bytes digest, caption)."""
    return hashlib.sha256(f"{image_digest}\x1f{normalised_caption}".encode()).hexdigest()[:32]


KEY_HASH_SPACE = 1 << 32  # key_hash values lie in [0, KEY_HASH_SPACE)


def key_hash(key: str) -> int:
    """Where a cache key falls in the hash space: crc32 of its UTF-8 bytes, stable across runs and machines.

    The embed driver splits its distinct keys into contiguous ranges of this hash (embed_cache/inputs.py
    ``KeyPartitions``), and each cache shard's manifest entry records the ``key_range`` ``[min, max]`` of its keys'
    hashes, so the writer reads only the shards that can hold a partition's keys (embed_cache/writer.py)."""
    return zlib.crc32(key.encode("utf-8"))


def key_range(keys: Iterable[str]) -> list[int] | None:
    """``[min, max]`` of :func:`key_hash` over ``keys`` (None for no keys)."""
    hashes = [key_hash(k) for k in keys]
    return [min(hashes), max(hashes)] if hashes else None


def cache_key(text: str) -> tuple[str, str]:
    """``(normalised text, key)``: the cache key every stage computes (``text_key(normalise_caption(t))``).

    Normalisation is idempotent, so a snapshot caption (already normalised) keeps its text.
    """
    normalised = normalise_caption(text)
    return normalised, text_key(normalised)


def english_side(text: Any, lang: Any, text_en: Any, parallel: bool = False) -> str | None:
    """The English text whose CLIP states are a row's stage-1 target, or None when it has none.

    A pair's English side is its translation (``caption_en``) when it has one, else the caption itself
    when it is English. A parallel row (``parallel=True``: a text and its translation) has only its
    translation (``text_en``). Missing values (None, NaN) and blank translations count as absent.
    """
    if isinstance(text_en, str) and text_en.strip():
        return text_en
    if not parallel and lang == "en" and isinstance(text, str):
        return text
    return None
