"""``ClipShardEncoder``: the base model's CLIP text states of the English side, the stage-1 target.

Captions go through the base model's own 77-token text tower in up to ``clip.max_windows``
stitched windows (omnidiff/models/clip_text.py); the cache keeps the mask-true tokens and the
pooled vector.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embed_cache.encoders import require_same_inputs
from omnidiff.contracts.cache import states_table


def load_clip(text_encoder: Path, tokenizer: Path):
    from omnidiff.models.clip_text import ClipTextEncoder

    return ClipTextEncoder.from_pretrained(text_encoder, tokenizer_folder=tokenizer)


class ClipShardEncoder:
    """CLIP text states of the English side in stitched 77-token windows (mask-true tokens), plus pooled."""

    def __init__(
        self,
        text_encoder: str,
        tokenizer: str,
        max_windows: int,
        device: str,
        expected_inputs: dict,
        max_batch_size: int,
    ):
        self.model = load_clip(Path(text_encoder), Path(tokenizer)).to(device).eval()
        self.max_windows = int(max_windows)
        require_same_inputs("CLIP", expected_inputs, self.model.fingerprint_inputs(self.max_windows))

    def compute(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        import torch

        # Windows a caption does not need are skipped inside encode(), so sorting by length (= windows
        # used) already keeps the compute to the windows that hold text.
        with torch.inference_mode():
            states, mask, pooled = self.model.encode(list(texts), self.max_windows)  # (B, W*77, D), (B, W*77), (B, D)
        states, mask, pooled = states.float().cpu().numpy(), mask.cpu().numpy(), pooled.float().cpu().numpy()
        return [(states[i][mask[i]], pooled[i]) for i in range(len(texts))]

    def table(self, keys, values):
        pooled = np.stack([v[1] for v in values]) if values else None
        return states_table(keys, [v[0] for v in values], pooled=pooled)
