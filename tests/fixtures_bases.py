"""Tiny Stable Diffusion 1.5 and SDXL folders laid out exactly as the published ones (issue 16).

``build_base_folder(out, arch)`` builds a randomly initialised diffusers pipeline with the
libraries' own classes (``CLIPTextModel``, ``CLIPTextModelWithProjection``, ``UNet2DConditionModel``,
``AutoencoderKL``, the published scheduler class) and ``save_pretrained``, then rewrites each
tokenizer folder the way the published repositories ship it: ``vocab.json`` + ``merges.txt`` +
``tokenizer_config.json`` + ``special_tokens_map.json``, no ``tokenizer.json``. ``variant="fp16"``
writes only ``*.fp16.safetensors`` weights, as fp16-only mirrors do.

Shapes are arguments so tests can vary them (the code must read widths from the folder, never
assume one fixture's numbers): text widths, heads and layers, UNet channels, attention heads per
block (diffusers' ``attention_head_dim``, which is a head count), transformer layers per block,
resnet layers per block. Cross-attention sits where the published models put it: SD 1.5 in the
high-resolution blocks, SDXL only in the low-resolution ones. The session fixtures ``sd15_base`` and
``sdxl_base`` use different shapes on purpose:

| fixture | text widths (heads) | UNet channels | attention blocks | heads (head width) | transformer layers | resnets |
|---|---|---|---|---|---|---|
| sd15_base | 32 (2) | 16, 32 | 16-ch blocks + mid | 2 (8; mid 16) | 1 | 1 |
| sdxl_base | 40 (5) + 56 (4) | 16, 24 | 24-ch blocks + mid | 2 (12) | 2 | 2 |

    folder = build_base_folder(tmp / "sd15", "sd15", text_width=32)
    pipe = StableDiffusionPipeline.from_pretrained(folder)   # loads as a published SD 1.5 does
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

# Words the tiny BPE vocabularies merge into single tokens (everything else is byte-level pieces),
# so a caption's token count depends on its words as with the real CLIP vocabulary.
DEFAULT_WORDS = (
    "a", "an", "the", "of", "on", "in", "and", "with", "red", "green", "blue", "yellow", "white", "black",
    "circle", "square", "triangle", "star", "small", "large", "big", "left", "right", "top", "bottom",
    "photo", "picture", "background",
)  # fmt: skip

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: 256 printable stand-ins for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def write_clip_tokenizer(folder: Path, words=DEFAULT_WORDS, pad_token: str = EOS) -> int:
    """A published-layout CLIP BPE tokenizer folder; returns its vocabulary size.

    SD 1.5's tokenizer pads with ``<|endoftext|>``; SDXL's ``tokenizer_2`` pads with ``!``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for c in alphabet:
        vocab[c] = len(vocab)
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def _text_encoder(cls, vocab_size: int, width: int, layers: int, seed: int, projection_dim: int | None = None,
                  heads: int = 4):
    import torch
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection_dim or width,
        hidden_act="quick_gelu" if projection_dim is None else "gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=1,
    )
    return cls(config).eval()


def build_base_folder(
    out: str | Path,
    arch: str = "sd15",
    *,
    text_width: int = 32,
    text_width_2: int = 48,
    projection_dim: int = 24,
    text_layers: int = 3,
    unet_channels: tuple[int, ...] = (16, 32),
    latent_channels: int = 4,
    sample_size: int = 32,
    time_embed_dim: int = 8,
    text_heads: int | tuple[int, int] = 4,
    attention_heads: int | tuple[int, ...] = 4,
    transformer_layers_per_block: int | tuple[int, ...] = 1,
    layers_per_block: int = 1,
    variant: str | None = None,
    words=DEFAULT_WORDS,
    seed: int = 0,
) -> Path:
    """Save a tiny ``StableDiffusionPipeline`` (``arch="sd15"``) or ``StableDiffusionXLPipeline``
    (``arch="sdxl"``) folder at ``out``. ``sample_size`` is the image size in pixels. ``text_heads``: one
    count for every tower or one per tower; ``attention_heads`` / ``transformer_layers_per_block``: one
    value for every UNet block or one per block (diffusers' ``attention_head_dim`` and
    ``transformer_layers_per_block``)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if arch not in ("sd15", "sdxl"):
        raise ValueError(f"arch={arch!r}: sd15 or sdxl")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    scratch = out.with_name(out.name + ".tokenizers")
    vocab_size = write_clip_tokenizer(scratch / "tokenizer", words)
    if arch == "sdxl":
        write_clip_tokenizer(scratch / "tokenizer_2", words, pad_token="!")

    vae_blocks = (8, 16)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
        up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
        block_out_channels=vae_blocks,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=sample_size,
        scaling_factor=0.18215 if arch == "sd15" else 0.13025,
        force_upcast=arch == "sdxl",
    ).eval()
    latent_size = sample_size // 2 ** (len(vae_blocks) - 1)
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, prediction_type="epsilon")  # fmt: skip
    levels = len(unet_channels)
    # SD 1.5 attends in its high-resolution blocks, SDXL only in its low-resolution ones (as published)
    if arch == "sd15":
        down = ("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (levels - 1)
    else:
        down = ("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",)
    up = tuple(name.replace("Down", "Up") for name in reversed(down))
    unet_common = dict(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=unet_channels,
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=attention_heads,
        transformer_layers_per_block=transformer_layers_per_block,
        norm_num_groups=8,
    )
    heads_1, heads_2 = (text_heads, text_heads) if isinstance(text_heads, int) else text_heads
    text_encoder = _text_encoder(CLIPTextModel, vocab_size, text_width, text_layers, seed + 2, heads=heads_1)
    if arch == "sd15":
        from diffusers import StableDiffusionPipeline

        torch.manual_seed(seed + 3)
        unet = UNet2DConditionModel(cross_attention_dim=text_width, **unet_common).eval()
        scheduler = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **schedule)
        from transformers import CLIPTokenizer

        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=CLIPTokenizer.from_pretrained(scratch / "tokenizer"),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        from diffusers import StableDiffusionXLPipeline
        from transformers import CLIPTokenizer

        text_encoder_2 = _text_encoder(
            CLIPTextModelWithProjection, vocab_size, text_width_2, text_layers + 1, seed + 4, projection_dim,
            heads=heads_2,
        )
        torch.manual_seed(seed + 3)
        unet = UNet2DConditionModel(
            cross_attention_dim=text_width + text_width_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
            **unet_common,
        ).eval()
        scheduler = EulerDiscreteScheduler(interpolation_type="linear", timestep_spacing="leading", **schedule)
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=CLIPTokenizer.from_pretrained(scratch / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(scratch / "tokenizer_2"),
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    if variant is not None:
        pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True, variant=variant)
    # Published tokenizer folders: vocab.json + merges.txt + configs, no tokenizer.json.
    for name in ("tokenizer", "tokenizer_2"):
        if (scratch / name).is_dir():
            shutil.rmtree(out / name)
            shutil.copytree(scratch / name, out / name)
    shutil.rmtree(scratch)
    return out


@pytest.fixture(scope="session")
def sd15_base(tmp_path_factory) -> Path:
    """A tiny SD 1.5 folder: CLIP width 32 (2 heads), UNet channels (16, 32) with 2 attention heads a block,
    32 px images (8x8 latents)."""
    return build_base_folder(tmp_path_factory.mktemp("bases") / "tiny-sd15", "sd15", text_heads=2, attention_heads=2)


@pytest.fixture(scope="session")
def sdxl_base(tmp_path_factory) -> Path:
    """A tiny SDXL folder: CLIP widths 40 + 56 (cross-attention 96; 5 and 4 heads), pooled projection 24,
    UNet channels (16, 24) with (4, 2) attention heads and (1, 2) transformer layers, 2 resnets a block,
    32 px images."""
    return build_base_folder(
        tmp_path_factory.mktemp("bases") / "tiny-sdxl",
        "sdxl",
        text_width=40,
        text_width_2=56,
        projection_dim=24,
        unet_channels=(16, 24),
        text_heads=(5, 4),
        attention_heads=(4, 2),
        transformer_layers_per_block=(1, 2),
        layers_per_block=2,
        seed=1,
    )
