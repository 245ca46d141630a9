"""Session fixtures for stages 2-3 on published-layout SD 1.5 / SDXL bases (issue 16 item 4).

    .venv/bin/pytest tests/test_base_latent.py tests/test_export_diffusers.py -x -q

``latent_caches(base)``: the LLM cache (``tiny_llm``) and the base's latent image cache (its own VAE,
at its native resolution) of ``train_snapshot``, computed by the embed stage's shard encoders and
written with its ``CacheWriter`` in-process; one cache root for every base.
``fresh_adapter_folder(base, out)``: a stage-1-shaped export holding only a fresh ``adapter/`` whose
widths come from the base folder (``BaseFolder.cross_attention_dim`` / ``pooled_dim``): what stage 2
starts from when no stage-1 run is at hand.
``sd15_stage2``: a few stage-2 steps on the ``sd15_base`` fixture (one rank, launcher local), exported.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from tests.fixtures_train import run_encoders_in_process

REPO = Path(__file__).resolve().parents[1]


def embed_latents(snapshot: Path, base: Path, llm: Path, cache_root: Path) -> dict[str, Path]:
    """Fill the ``llm`` and latent ``pixels`` caches of ``snapshot`` for ``base`` (its VAE, native size)."""
    from embed_cache.config import EmbedConfig, LLMSection, PixelsSection
    from omnidiff.contracts.base_folder import open_base_folder

    folder = open_base_folder(base)
    cfg = EmbedConfig(snapshots=(str(snapshot),), kinds=("llm", "pixels"), cache_root=cache_root,
                      llm=LLMSection(path=llm), pixels=PixelsSection(resolution=folder.native_resolution, vae=folder.vae),
                      track=False)  # fmt: skip
    return run_encoders_in_process(cfg, skip_existing=True)  # the LLM cache is shared by every base


def adapter_takes_pooled_dim() -> bool:
    """Whether ``OmniAdapter`` can give a pooled output narrower than its tokens (SDXL: issue 16 item 3)."""
    from omnidiff.models.adapter import OmniAdapter

    return "pooled_dim" in inspect.signature(OmniAdapter.__init__).parameters


def fresh_adapter_folder(base: Path, out: Path, llm_dim: int = 64, seed: int = 0) -> Path:
    """``out/adapter/``: a fresh adapter mapping ``llm_dim`` LLM features to the base's token (and pooled) widths."""
    import torch

    from omnidiff.contracts.base_folder import open_base_folder
    from omnidiff.models.adapter import OmniAdapter

    folder = open_base_folder(base)
    extra = {}
    if folder.pooled_dim is not None and folder.pooled_dim != folder.cross_attention_dim:
        if not adapter_takes_pooled_dim():
            pytest.skip("OmniAdapter has no pooled_dim yet (issue 16 item 3, another branch): "
                        f"{folder.layout} needs pooled width {folder.pooled_dim} != tokens {folder.cross_attention_dim}")
        extra["pooled_dim"] = folder.pooled_dim
    torch.manual_seed(seed)
    adapter = OmniAdapter(llm_dim, 32, folder.cross_attention_dim, 16, 1, 1, 4, input_norm=False,
                          length_head=False, pooled_query=True, **extra)  # fmt: skip
    adapter.save_pretrained(out / "adapter")
    return out


@pytest.fixture(scope="session")
def latent_cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("latent-cache")


@pytest.fixture(scope="session")
def latent_caches(train_snapshot: Path, tiny_llm: Path, latent_cache_root: Path):
    """``latent_caches(base) -> {"llm": dir, "pixels": dir}`` for a base folder (cached per base)."""
    done: dict[Path, dict] = {}

    def caches(base: Path) -> dict[str, Path]:
        if base not in done:
            done[base] = embed_latents(train_snapshot, base, tiny_llm, latent_cache_root)
        return done[base]

    return caches


def stage2_overrides(name: str, base: Path, init_from: Path, snapshot: Path, llm: Path, cache_root: Path,
                     out: Path, **extra) -> list[str]:
    """configs/train_test_stage2.yaml pointed at a published-layout base and the latent caches."""
    items = {
        "name": name,
        "base_model": str(base),
        "init_from": str(init_from),
        "llm.path": str(llm),
        "data.snapshot": str(snapshot),
        "data.cache_root": str(cache_root),
        "data.val_examples": 16,
        "checkpoint.dir": str(out / name / "checkpoints"),
        "registry.export_dir": str(out / name / "export"),
        "max_steps": 6,
        "log_every": 3,
        "checkpoint.every_steps": 3,
        "track": False,
        **extra,
    }
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in items.items()]


def run_stage2(base: Path, name: str, train_snapshot: Path, tiny_llm: Path, latent_caches, latent_cache_root: Path,
               out: Path, **extra) -> dict:
    from omnidiff.config import load_config
    from train import run
    from train.config import TrainConfig

    latent_caches(base)
    init = fresh_adapter_folder(base, out / f"{name}-init")
    cfg = load_config(TrainConfig, REPO / "configs" / "train_test_stage2.yaml",
                      stage2_overrides(name, base, init, train_snapshot, tiny_llm, latent_cache_root, out, **extra))
    return run(cfg)


@pytest.fixture(scope="session")
def sd15_stage2(sd15_base, train_snapshot, tiny_llm, latent_caches, latent_cache_root, tmp_path_factory) -> dict:
    """Six stage-2 steps on the tiny SD 1.5 folder (latents, its PNDM schedule as DDPM, gradient checkpointing)."""
    result = run_stage2(sd15_base, "sd15-s2", train_snapshot, tiny_llm, latent_caches, latent_cache_root,
                        tmp_path_factory.mktemp("latent-train"), **{"diffusion.gradient_checkpointing": True})
    return {**result, "base_model": str(sd15_base)}
