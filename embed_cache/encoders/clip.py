"""``ClipShardEncoder``: the base model's CLIP text states of the English side, the stage-1 target.

Two kinds of base (omnidiff/models/clip_text.py):

* the tiny base (``text_encoder=`` + ``tokenizer=``): its word-level tower in up to
  ``clip.max_windows`` stitched windows; the cache keeps the mask-true tokens (its UNet masks
  CLIP's padding) and the pooled vector;
* a published SD / SDXL folder (``base_model=``): ``BaseTextEncoder``, exactly what the folder's
  own pipeline feeds its UNet; the cache keeps all 77 positions of each used window (padding
  included: that UNet reads it) and the pooled vector (SDXL: ``text_embeds``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embed_cache.encoders import require_same_inputs
from omnidiff.contracts.cache import states_table


def load_clip(text_encoder: Path, tokenizer: Path):
    from omnidiff.models.clip_text import ClipTextEncoder

    return ClipTextEncoder.from_pretrained(text_encoder, tokenizer_folder=tokenizer)


def load_base_text(base_model: Path):
    from omnidiff.models.clip_text import BaseTextEncoder

    return BaseTextEncoder.from_base_folder(base_model)


class ClipShardEncoder:
    """The base's text states of the English side in stitched 77-token windows (the positions its UNet
    reads), plus pooled. Give ``text_encoder`` + ``tokenizer`` (tiny base) or ``base_model`` (SD / SDXL)."""

    def __init__(
        self,
        max_windows: int,
        device: str,
        expected_inputs: dict,
        max_batch_size: int,
        text_encoder: str | None = None,
        tokenizer: str | None = None,
        base_model: str | None = None,
    ):
        if (base_model is None) == (text_encoder is None or tokenizer is None):
            raise ValueError("ClipShardEncoder: give base_model (SD / SDXL folder) or text_encoder + tokenizer")
        if base_model is not None:
            self.model = load_base_text(Path(base_model)).to(device).eval()
        else:
            self.model = load_clip(Path(text_encoder), Path(tokenizer)).to(device).eval()
        self.max_windows = int(max_windows)
        require_same_inputs("CLIP", expected_inputs, self.model.fingerprint_inputs(self.max_windows))

    def compute(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        import torch

        # Windows a caption does not need are skipped inside encode(), so sorting by length (= windows
        # used) already keeps the compute to the windows that hold text.
        with torch.inference_mode():
            states, mask, pooled = self.model.encode(list(texts), self.max_windows)  # (B, W*77, D), (B, W*77), (B, P)
        states, mask, pooled = states.float().cpu().numpy(), mask.cpu().numpy(), pooled.float().cpu().numpy()
        return [(states[i][mask[i]], pooled[i]) for i in range(len(texts))]

    def table(self, keys, values):
        pooled = np.stack([v[1] for v in values]) if values else None
        return states_table(keys, [v[0] for v in values], pooled=pooled)


def target_token_stats(
    texts: list[str], max_windows: int, *, tokenizer: str | None = None, base_model: str | None = None
) -> dict[str, float]:
    """How much the CLIP targets of ``texts`` can teach, from the base's tokenizer alone (no weights).

    ``unknown_fraction``: the share of the targets' tokens (within ``max_windows`` windows) that are the
    tokenizer's unknown token. The tiny base's word tokenizer maps every word outside its world to
    ``<unk>``, so captions of another data set can collapse to ``a <unk> <unk> of a <unk>``; a
    published byte-level BPE has no unknown words (~0). ``distinct_fraction``: distinct token-id
    sequences / captions; 1 when every caption gets its own target, near 1/captions when they share one.
    Give ``tokenizer`` (the tiny base's tokenizer/ folder) or ``base_model`` (a published SD / SDXL folder).
    """
    tok = target_tokenizer(tokenizer=tokenizer, base_model=base_model)
    captions, total, unknown, pieces = target_token_counts(texts, max_windows, tok)
    return {
        "captions": captions,
        "unknown_fraction": unknown / total if total else 0.0,
        "distinct_fraction": len(set(pieces)) / captions if captions else 1.0,
    }


def target_tokenizer(*, tokenizer: str | None = None, base_model: str | None = None):
    """``(encode, unknown token id)`` of the base's CLIP tokenizer (:func:`target_token_stats`' arguments):
    ``encode(texts)`` gives each text's token ids without special tokens."""
    if (tokenizer is None) == (base_model is None):
        raise ValueError("target_token_stats: give tokenizer (tiny base) or base_model (SD / SDXL folder)")
    if base_model is not None:
        from omnidiff.contracts.base_folder import open_base_folder
        from omnidiff.models.clip_text import load_base_tokenizer

        tok = load_base_tokenizer(open_base_folder(Path(base_model)).towers[0].tokenizer)
        return (lambda texts: tok(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
                if texts else []), tok.unk_token_id
    from omnidiff.models.clip_text import load_clip_tokenizer

    tok = load_clip_tokenizer(Path(tokenizer))
    return (lambda texts: [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]), \
        tok.unk_token_id


def target_token_counts(texts: list[str], max_windows: int, tokenizer) -> tuple[int, int, int, list[tuple[int, ...]]]:
    """``(captions, tokens, unknown tokens, token ids per caption)`` of ``texts`` under ``tokenizer``
    (:func:`target_tokenizer`): the parts of :func:`target_token_stats`, to add up over parts of a caption set."""
    from omnidiff.models.clip_text import WINDOW_TOKENS

    encode, unk = tokenizer
    pieces = [tuple(p[: WINDOW_TOKENS * int(max_windows)]) for p in encode(list(texts))]
    total = sum(len(p) for p in pieces)
    unknown = sum(1 for p in pieces for i in p if i == unk) if unk is not None else 0
    return len(pieces), total, unknown, pieces
