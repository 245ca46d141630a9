"""The plan of each cache kind: what names its cache, what shape its values have, how much work a key is.

    plan = plan_kind("llm", cfg)      # KindPlan: fingerprint inputs, value shape, encoder kwargs, lengths
    cache_dirs(cfg)                   # {kind: cache folder}: what train reads, nothing computed

* ``llm``:    the LLM folder's fingerprint inputs (read without loading weights), (hidden,) per token,
  cost = tokens;
* ``clip``:   the base model's CLIP text tower(s) (their weights digest, from the files, names the cache),
  (hidden,) per token in up to ``clip.max_windows`` 77-token windows, cost = tokens; the tiny base
  stores its real tokens, a published SD / SDXL folder all 77 positions of each used window
  (``(hidden, pooled)`` for SDXL, whose pooled ``text_embeds`` have their own width);
* ``pixels``: the resolution (and the VAE's digest and scaling factor), (C, H, W), cost = 1 per image.

:func:`plan_units` then cuts a kind's missing keys into length-sorted, token-balanced shards
(embed_cache/batching.py): one DataFrame = one Ray block = one actor call (embed_cache/actor.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embed_cache import batching
from embed_cache.actor import encode_payload
from embed_cache.config import EmbedConfig
from embed_cache.encoders.clip import load_clip
from embed_cache.inputs import ImageRef
from embed_cache.writer import CacheWriter
from omnidiff.contracts.cache import cache_dir
from omnidiff.contracts.encoders import (
    base_clip_spec,
    clip_spec,
    fingerprint,
    is_published_base,
    llm_folder,
    llm_spec,
    pixels_spec,
)

log = logging.getLogger("omnidiff.embed")


def llm_path(cfg: EmbedConfig) -> Path:
    return llm_folder(cfg.llm.path)


def llm_token_lengths(path: Path, texts: list[str], max_length: int) -> list[int]:
    """Token counts as ``LLMTextEncoder.token_lengths`` gives them, from the tokenizer alone (no weights)."""
    from omnidiff.models.llm import load_tokenizer

    ids = load_tokenizer(path)(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return [max(1, len(x)) for x in ids]


def newest_base_model() -> Path:
    """The most recently pretrained base model under ``models_dir()/base`` (``omnidiff base pretrain``)."""
    from omnidiff.env import models_dir

    found = [
        p
        for p in (models_dir() / "base").glob("*/")
        if (p / "model_index.json").is_file() and (p / "text_encoder").is_dir() and (p / "tokenizer").is_dir()
    ]
    if not found:
        raise FileNotFoundError(
            "clip.base_model is not set and no pretrained base model exists under "
            f"{models_dir() / 'base'}: run 'omnidiff base pretrain', set clip.base_model to the base model's "
            "pipeline folder (it holds text_encoder/ and tokenizer/), or drop 'clip' from kinds"
        )
    return max(found, key=lambda p: (p / "model_index.json").stat().st_mtime)


def clip_base(cfg: EmbedConfig) -> Path:
    """The base model's pipeline folder (``clip.base_model``: a path or a registry reference; ``null`` = the
    newest pretrained tiny base)."""
    base = cfg.clip.base_model
    if base is None:
        base = newest_base_model()
        log.info("embed clip: clip.base_model not set, using the newest base model %s", base)
    base = Path(base)
    if not base.is_dir() and ("@" in str(base) or str(base).count("/") == 1):
        from omnidiff.tracking import resolve_model  # e.g. omnidiff-base@production

        base = Path(resolve_model(str(base)))
    return base.resolve()


def clip_folders(cfg: EmbedConfig, base: Path | None = None) -> tuple[Path, Path]:
    """``(text_encoder/, tokenizer/)`` of the tiny base's pipeline folder (``base``, else :func:`clip_base`)."""
    base = clip_base(cfg) if base is None else base
    text_encoder, tokenizer = base / "text_encoder", base / "tokenizer"
    for folder in (text_encoder, tokenizer):
        if not folder.is_dir():
            raise FileNotFoundError(f"clip.base_model={str(cfg.clip.base_model)!r}: {folder} does not exist")
    return text_encoder.resolve(), tokenizer.resolve()


def base_text_lengths(base: Path, texts: list[str], windows: int, tokenizer=None) -> list[int]:
    """Positions a published base's target stores per text (77 per used window), from its tokenizer alone
    (``tokenizer``: the base's, already loaded)."""
    from omnidiff.contracts.base_folder import open_base_folder
    from omnidiff.models.clip_text import WINDOW, load_base_tokenizer, window_ids

    if tokenizer is None:
        tokenizer = load_base_tokenizer(open_base_folder(base).towers[0].tokenizer)
    return (window_ids(tokenizer, list(texts), windows)[1].sum(1) * WINDOW).tolist()


TOKENIZE_CHUNK = 4096  # texts the driver tokenises at once to plan the shards


@dataclass
class KindPlan:
    """Everything the generic driver loop needs for one cache kind."""

    kind: str
    inputs: dict[str, Any]
    value_shape: tuple[int, ...]
    encoder: dict[str, Any]  # keyword arguments of the kind's *ShardEncoder
    lengths: Callable[[list[str], list[Any]], list[int]]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)

    def token_lengths(self, keys: list[str], payloads: list[Any], chunk: int = TOKENIZE_CHUNK) -> np.ndarray:
        """int64 ``(N,)``: :attr:`lengths` of ``keys``, ``chunk`` texts per tokenizer call, so the token ids held
        at once are one chunk's, whatever the number of texts (a single call held every caption's ids)."""
        parts = [np.asarray(self.lengths(keys[i : i + chunk], payloads[i : i + chunk]), dtype=np.int64)
                 for i in range(0, len(keys), chunk)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def plan_kind(kind: str, cfg: EmbedConfig) -> KindPlan:
    """Fingerprint inputs, value shape, actor class and cost function of ``kind`` under ``cfg``."""
    if kind == "llm":
        path = llm_path(cfg)
        spec = llm_spec(path, cfg.llm.layer, cfg.llm.max_length, cfg.llm.dtype)
        return KindPlan(
            kind,
            spec.inputs,
            spec.value_shape,
            {
                "path": str(path),
                "layer": cfg.llm.layer,
                "max_length": cfg.llm.max_length,
                "dtype": cfg.llm.dtype,
                "device": cfg.device,
                "expected_inputs": spec.inputs["encoder"],
                "share_prefixes": cfg.share_prefixes,
                "share_cache_mb": cfg.share_cache_mb,
            },
            lambda keys, texts: llm_token_lengths(path, list(texts), cfg.llm.max_length),
        )
    base = clip_base(cfg) if kind == "clip" else None
    if kind == "clip" and is_published_base(base):
        windows = cfg.clip.max_windows

        def load_tokenizer():
            from omnidiff.contracts.base_folder import open_base_folder
            from omnidiff.models.clip_text import load_base_tokenizer

            return load_base_tokenizer(open_base_folder(base).towers[0].tokenizer)

        base_tokenizer = functools.cache(load_tokenizer)  # loaded once per plan, for every chunk
        spec = base_clip_spec(base, windows)  # named from the files: no tower loaded here
        return KindPlan(
            kind,
            spec.inputs,
            spec.value_shape,
            {"base_model": str(base), "max_windows": windows, "device": cfg.device,
             "expected_inputs": spec.inputs["encoder"]},
            lambda keys, texts: base_text_lengths(base, list(texts), windows, base_tokenizer()),
        )  # fmt: skip
    if kind == "clip":
        text_encoder, tokenizer = clip_folders(cfg, base)
        windows = cfg.clip.max_windows
        clip = functools.cache(lambda: load_clip(text_encoder, tokenizer))  # loaded once per plan, for every chunk
        spec = clip_spec(text_encoder, tokenizer, windows)  # named from the files: no model loaded here
        return KindPlan(
            kind,
            spec.inputs,
            spec.value_shape,
            {
                "text_encoder": str(text_encoder),
                "tokenizer": str(tokenizer),
                "max_windows": windows,
                "device": cfg.device,
                "expected_inputs": spec.inputs["encoder"],
            },
            # The driver loads the (small) CLIP text tower only when there is something to compute.
            lambda keys, texts: clip().token_lengths(list(texts), windows),
        )
    if kind == "pixels":
        res = cfg.pixels.resolution
        spec = pixels_spec(res, cfg.pixels.vae)
        return KindPlan(
            kind,
            spec.inputs,
            spec.value_shape,
            {
                "resolution": res,
                "vae": str(cfg.pixels.vae) if cfg.pixels.vae else None,
                "batch_size": cfg.pixels.batch_size,
                "device": cfg.device,
            },
            lambda keys, payloads: [1] * len(keys),
        )
    raise ValueError(f"kind={kind!r}: expected llm, clip or pixels")


def cache_dirs(cfg: EmbedConfig) -> dict[str, Path | str]:
    """The cache directory of every kind in ``cfg`` (what train reads), without computing anything
    (an ``s3://`` URL under an object-storage root)."""
    root = cfg.storage.under(cfg.cache_root, "cache")
    return {kind: cache_dir(kind, plan_kind(kind, cfg).fingerprint, root) for kind in cfg.kinds}


def plan_units(
    kind: str, writer: CacheWriter, todo: list[str], payloads: list[Any], lengths: np.ndarray, cfg: EmbedConfig,
    first_unit: int = 0,
) -> list[pd.DataFrame]:
    """Length-sorted, token-balanced shards of missing keys: one DataFrame (= one Ray block) per shard, numbered
    from ``first_unit`` (the shard's name; the job plans one partition of the keys after another).

    Images (cost 1 each) referenced in snapshots (``ImageRef``) go in snapshot order instead, so the actor of
    a shard reads a run of neighbouring rows: few row groups, each read once."""
    if kind == "pixels" and payloads and all(isinstance(p, ImageRef) for p in payloads):
        order = np.asarray(sorted(range(len(todo)), key=lambda i: (payloads[i].path, payloads[i].row, todo[i])),
                           dtype=np.int64)
    else:
        order = batching.length_order(lengths, todo)
    keys = [todo[i] for i in order]
    payloads = [encode_payload(kind, payloads[i]) for i in order]
    lengths = lengths[order]
    return [
        pd.DataFrame({"kind": kind, "shard": writer.shard_name(unit), "key": keys[sl], "payload": payloads[sl],
                      "length": lengths[sl]})
        for unit, sl in enumerate(batching.plan_shards(lengths, cfg.shard_tokens, cfg.shard_rows), start=first_unit)
    ]  # fmt: skip
