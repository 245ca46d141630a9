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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

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


def open_checked_cache(kind: str, inputs: dict, root: Path | None, what: str):
    """The ``CacheStore`` of ``<root>/<kind>/<fingerprint(inputs)>``; a clear :class:`CacheMismatchError`
    when there is none for these encoder settings (naming the caches that exist and how their encoders
    differ) or when the folder's manifest was built from other inputs. ``what`` names the encoder in
    messages (e.g. "the configured LLM (llm.*)").
    """
    from omnidiff.contracts.cache import MANIFEST_NAME, CacheStore, cache_dir, cache_root
    from omnidiff.contracts.encoders import fingerprint

    expected = fingerprint(inputs)
    path = cache_dir(kind, expected, root)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        others = _describe_other_caches(cache_root(root) / kind, inputs)
        raise CacheMismatchError(
            f"no {kind} cache for {what} at {path} (fingerprint {expected}). "
            + (f"Caches of other encoders there: {others}. " if others else "")
            + "Run 'omnidiff embed' with the same encoder settings, or point the config at the encoder the cache was built with."
        )
    store = CacheStore(path, max_cached_shards=1 << 16)
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
    dim = int(arrays[0].shape[-1])
    t_max = max(int(a.shape[0]) for a in arrays)
    states = torch.zeros(len(arrays), t_max, dim, dtype=torch.float32)  # (B, T, D)
    mask = torch.zeros(len(arrays), t_max, dtype=torch.bool)  # (B, T)
    for i, a in enumerate(arrays):
        states[i, : a.shape[0]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
        mask[i, : a.shape[0]] = True
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


class CachedBatches:
    """Builds one rank's micro-batches from the cache (pure function of the step; no state to checkpoint).

    ``stores``: ``{"llm": CacheStore, "clip"|"pixels": CacheStore}``. ``empty_states`` are the LLM
    states of "" (caption dropout's replacement). ``num_train_timesteps`` is the diffusion schedule's
    length (stages 2-3).
    """

    def __init__(
        self,
        examples: pd.DataFrame,
        family: str,
        stores: dict[str, Any],
        seed: int,
        caption_dropout: float = 0.0,
        empty_states: np.ndarray | None = None,
        num_train_timesteps: int = 1000,
    ):
        if family not in ("align", "diffusion"):
            raise ValueError(f"family={family!r}: expected 'align' or 'diffusion'")
        if len(examples) == 0:
            raise ValueError("no training examples: the snapshot split (and filters) left nothing to train on")
        if family == "diffusion" and caption_dropout > 0 and empty_states is None:
            raise ValueError("caption dropout needs the LLM states of the empty prompt")
        self.examples = examples.reset_index(drop=True)
        self.family, self.stores, self.seed = family, stores, int(seed)
        self.caption_dropout = float(caption_dropout)
        self.empty_states = empty_states
        self.num_train_timesteps = int(num_train_timesteps)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def example_index(self, positions: np.ndarray) -> np.ndarray:
        """Global sample positions -> example rows: a fresh permutation per epoch."""
        n = len(self.examples)
        out = np.empty(len(positions), dtype=np.int64)
        for i, p in enumerate(positions):
            epoch, offset = divmod(int(p), n)
            if epoch not in self._perms:
                if len(self._perms) > 4:
                    self._perms.clear()
                self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
            out[i] = self._perms[epoch][offset]
        return out

    @staticmethod
    def positions(step: int, global_batch: int, rank: int, world: int, micro: int, micro_step: int) -> np.ndarray:
        """Global sample positions of one rank's micro-batch ``micro_step`` at optimizer ``step``."""
        start = step * global_batch + micro_step * micro * world + rank * micro
        return np.arange(start, start + micro, dtype=np.int64)

    def batch(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        rows = self.examples.iloc[self.example_index(positions)]
        llm = self.stores["llm"].read(rows["llm_key"].tolist())
        llm_arrays = [llm[k] for k in rows["llm_key"]]
        if self.family == "align":
            clip = self.stores["clip"]
            keys = rows["target_key"].tolist()
            targets, pooled = clip.read(keys), clip.read_pooled(keys)
            target, target_mask = pad_states([targets[k] for k in keys])  # (B, Tc, Dc)
            llm_states, llm_mask = pad_states(llm_arrays)  # (B, T, Dl)
            return {
                "llm_states": llm_states,
                "llm_mask": llm_mask,
                "target": target,
                "target_mask": clip_target_mask(target, target_mask),
                "target_pooled": torch.from_numpy(np.stack([pooled[k] for k in keys]).astype(np.float32)),  # (B, Dc)
            }
        pixel_keys = rows["pixel_key"].tolist()
        images, noise, timesteps, dropped = self._noised(pixel_keys, positions)
        if dropped.any():
            llm_arrays = [self.empty_states if d else a for a, d in zip(llm_arrays, dropped.tolist(), strict=True)]
        llm_states, llm_mask = pad_states(llm_arrays)
        batch = {
            "llm_states": llm_states,
            "llm_mask": llm_mask,
            "pixels": images,
            "noise": noise,
            "timesteps": timesteps,
            "dropped": dropped,
        }
        if cached_image_sizes(self.stores["pixels"]):
            batch["time_ids"] = image_time_ids(self.stores["pixels"], pixel_keys)  # (B, 6) long
        return batch

    def _noised(self, pixel_keys: list[str], positions: np.ndarray):
        """Cached images ``(B, C, H, W)`` with their noise, timesteps and caption-dropout draws, seeded by position."""
        pixels = self.stores["pixels"].read(pixel_keys)
        images = torch.from_numpy(np.stack([pixels[k] for k in pixel_keys]).astype(np.float32))  # (B, C, H, W)
        noise = torch.empty_like(images)
        timesteps = torch.empty(len(positions), dtype=torch.long)
        dropped = torch.zeros(len(positions), dtype=torch.bool)
        for i, p in enumerate(positions):
            g = torch.Generator().manual_seed(sample_seed(self.seed, int(p)))
            noise[i] = torch.randn(images.shape[1:], generator=g)
            timesteps[i] = int(torch.randint(0, self.num_train_timesteps, (1,), generator=g))
            dropped[i] = bool(torch.rand((), generator=g) < self.caption_dropout)
        return images, noise, timesteps, dropped
