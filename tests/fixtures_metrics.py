"""Tiny local CLIP and feature-extractor folders for the evaluate stage's metrics (issue 16 item 7).

No real weights exist offline, so the folders are built with transformers' own classes and
``save_pretrained`` exactly as a published CLIP folder is laid out (config.json, model.safetensors,
preprocessor_config.json, a CLIP BPE tokenizer as vocab.json + merges.txt):

* ``build_clip_folder(out)``: a ``CLIPModel`` + ``CLIPProcessor``, trained for a few seconds with CLIP's
  own contrastive loss on solid-colour images captioned "a red picture", ... so that an image scores
  higher against its own caption than against another's (a random CLIP would not);
* ``build_dinov2_folder(out)``: a random ``Dinov2Model`` + ``BitImageProcessor``, a non-CLIP FID / KID
  feature extractor;
* ``write_images(out, colours)``: PNG files, one solid colour each (with a little noise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_bases import write_clip_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 50, 220), "yellow": (230, 220, 30),
           "white": (245, 245, 245), "black": (15, 15, 15)}


def colour_images(names: list[str], size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 (N, size, size, 3): each a solid colour of :data:`COLOURS` plus a little noise."""
    rng = np.random.default_rng(seed)
    base = np.array([COLOURS[n] for n in names], dtype=np.float64)[:, None, None, :]
    noise = rng.normal(0, 12, size=(len(names), size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def build_clip_folder(out: str | Path, train_steps: int = 50, seed: int = 0) -> Path:
    """A tiny CLIP folder that tells the colours of :data:`COLOURS` apart (see the module docstring)."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    out = Path(out)
    vocab_size = write_clip_tokenizer(out)
    tokenizer = CLIPTokenizer.from_pretrained(out)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    torch.manual_seed(seed)
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                          eos_token_id=vocab_size - 1, pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    names = list(COLOURS)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for step in range(train_steps):
        batch = list(rng.permutation(names))
        inputs = processor(text=[f"a {n} picture" for n in batch], images=list(colour_images(batch, seed=step)),
                           return_tensors="pt", padding=True)
        loss = model(**inputs, return_loss=True).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval().save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def build_dinov2_folder(out: str | Path, seed: int = 0) -> Path:
    """A random tiny ``Dinov2Model`` folder with its ``BitImageProcessor`` (24 px crops, 48 features)."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    out = Path(out)
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                     image_size=24, patch_size=8)).eval()
    model.save_pretrained(out, safe_serialization=True)
    BitImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
    return out


def write_images(out: str | Path, names: list[str], size: int = 32, seed: int = 0) -> Path:
    """``out/<i>_<colour>.png`` for each name (solid colour plus noise)."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(colour_images(names, size, seed)):
        Image.fromarray(image).save(out / f"{i:03d}_{names[i]}.png")
    return out


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> Path:
    return build_clip_folder(tmp_path_factory.mktemp("metrics") / "tiny-clip")


@pytest.fixture(scope="session")
def dinov2_folder(tmp_path_factory) -> Path:
    return build_dinov2_folder(tmp_path_factory.mktemp("metrics") / "tiny-dinov2")
