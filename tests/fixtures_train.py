"""Session fixtures for the training stage (loaded as a pytest plugin by conftest).

    .venv/bin/pytest tests/test_train.py -x -q

``train_snapshot``: a pair snapshot of the ``tiny_world`` fixture (150 images at 32 px, 6 languages,
long captions, parallel texts), written with the real ``SnapshotWriter``, split train/val by key and
scored by the real ``image_quality`` aesthetic scorer (collect's img2dataset download is the data_prep
tests' business; here the same rows arrive without the HTTP round trip).
``train_base``: a randomly initialised tiny base model (CLIP-style encoder + 16 px UNet with pooled
conditioning) saved as a ``clip`` pipeline folder: enough to show each stage lowers its loss.
``train_caches``: the LLM (``tiny_llm``), CLIP and pixel caches of that snapshot, computed by the embed
stage's own shard encoders and written with its ``CacheWriter`` in-process (no Ray Data start-up).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def write_world_snapshot(world_dir: Path, root: Path, name: str = "train-test") -> Path:
    """A pair snapshot of a generated world (every pair kept; 20% val by key)."""
    import pandas as pd
    import pyarrow as pa

    from data_prep.aesthetic import ImageQualityScorer, decode_rgb
    from omnidiff.contracts.keys import digest_bytes, pair_key, text_key
    from omnidiff.contracts.snapshot import SnapshotWriter
    from omnidiff.text import normalise_caption

    pairs = pd.read_parquet(world_dir / "pairs.parquet")
    images = [(world_dir / rel).read_bytes() for rel in pairs["image"]]
    scores = ImageQualityScorer()([decode_rgb(b) for b in images])
    captions = [normalise_caption(c) for c in pairs["caption"]]
    digests = [digest_bytes(b) for b in images]
    keys = [pair_key(d, c) for d, c in zip(digests, captions, strict=True)]
    split = ["val" if int(k[:8], 16) % 5 == 0 else "train" for k in keys]
    table = pa.table({
        "key": keys,
        "caption": captions,
        "caption_en": [normalise_caption(c) if isinstance(c, str) else None for c in pairs["caption_en"]],
        "lang": pairs["lang"].astype(str).tolist(),
        "image": images,
        "image_digest": digests,
        "width": [32] * len(keys),
        "height": [32] * len(keys),
        "aesthetic": scores.astype(np.float64),
        "split": split,
    })
    parallel = pd.read_parquet(world_dir / "parallel.parquet")
    p_text = [normalise_caption(t) for t in parallel["text"]]
    p_keys = [text_key(t) for t in p_text]
    p_table = pa.table({
        "key": p_keys,
        "text": p_text,
        "text_en": [normalise_caption(t) for t in parallel["text_en"]],
        "lang": parallel["lang"].astype(str).tolist(),
        "split": ["val" if int(k[:8], 16) % 5 == 0 else "train" for k in p_keys],
    })
    writer = SnapshotWriter(name, root=root)
    writer.write_shard("pairs", table)
    writer.write_shard("parallel", p_table)
    return writer.finish({"sources": [{"path": str(world_dir)}],
                          "counts": {"pairs": {"kept": table.num_rows}, "parallel": {"kept": p_table.num_rows}}})


def build_tiny_base(folder: Path, seed: int = 0) -> Path:
    """A random base model (conditioning ``clip``): word encoder hidden 32 + UNet (16, 32) at 16 px."""
    import torch
    from diffusers import DDPMScheduler

    from omnidiff.models.clip_text import build_clip_text_encoder
    from omnidiff.models.unet import build_unet
    from omnidiff.pipeline import OmniDiffusionPipeline
    from omnidiff.world import english_vocabulary

    torch.manual_seed(seed)
    text_encoder = build_clip_text_encoder(english_vocabulary(), hidden=32, layers=1, heads=2, seed=seed)
    unet = build_unet(16, 3, 3, (16, 32), cross_attention_dim=32, layers_per_block=1, attention_head_dim=8,
                      pooled_dim=32)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    pipe = OmniDiffusionPipeline(unet, scheduler, "clip", text_encoder=text_encoder)
    return pipe.save_pretrained(folder, lineage={"stage": "base", "run_id": None})


def embed_in_process(snapshot: Path, base: Path, llm: Path, cache_root: Path, resolution: int = 16,
                     llm_max_length: int = 512) -> dict:
    """Fill the llm / clip / pixels caches of ``snapshot`` with the embed stage's encoders, in this process."""
    from embed_cache.config import ClipSection, EmbedConfig, LLMSection, PixelsSection

    cfg = EmbedConfig(snapshots=(str(snapshot),), cache_root=cache_root, llm=LLMSection(path=llm, max_length=llm_max_length),
                      clip=ClipSection(base_model=base, max_windows=3), pixels=PixelsSection(resolution=resolution),
                      track=False)
    return run_encoders_in_process(cfg)


def run_encoders_in_process(cfg, skip_existing: bool = False) -> dict:
    """Compute every kind of ``cfg`` (an EmbedConfig) with the embed stage's own shard encoders and write each
    cache with its ``CacheWriter``, in this process (no Ray). ``skip_existing``: keep a kind whose cache already
    has a manifest (e.g. the LLM cache shared by several bases). Returns kind -> cache folder."""
    from embed_cache.encoders.clip import ClipShardEncoder
    from embed_cache.encoders.llm import LLMShardEncoder
    from embed_cache.encoders.pixels import PixelShardEncoder
    from embed_cache.inputs import gather_inputs
    from embed_cache.plan import plan_kind
    from embed_cache.writer import open_writer
    from omnidiff.contracts.cache import MANIFEST_NAME, cache_dir

    inputs = gather_inputs(list(cfg.snapshots), cfg)
    encoders = {"llm": LLMShardEncoder, "clip": ClipShardEncoder, "pixels": PixelShardEncoder}
    dirs = {}
    for kind in cfg.kinds:
        plan = plan_kind(kind, cfg)
        directory = cache_dir(kind, plan.fingerprint, cfg.cache_root)
        dirs[kind] = directory
        if skip_existing and (directory / MANIFEST_NAME).is_file():
            continue
        keys = sorted(inputs.work(kind))
        encoder = encoders[kind](**plan.encoder, max_batch_size=64)
        values = encoder.compute(inputs.payloads(kind, keys))  # images read from their snapshot rows
        with open_writer(directory, plan.inputs) as writer:
            writer.set_value_shape(plan.value_shape)
            writer.write(encoder.table(keys, values), unit=0)
    return dirs


@pytest.fixture(scope="session")
def train_snapshot(tiny_world: Path, tmp_path_factory) -> Path:
    return write_world_snapshot(tiny_world, tmp_path_factory.mktemp("snapshots"))


@pytest.fixture(scope="session")
def train_base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("base") / "tiny-base")


@pytest.fixture(scope="session")
def train_caches(train_snapshot: Path, train_base: Path, tiny_llm: Path, tmp_path_factory) -> Path:
    """The cache root holding llm/, clip/ and pixels/ caches of ``train_snapshot``."""
    root = tmp_path_factory.mktemp("cache")
    embed_in_process(train_snapshot, train_base, tiny_llm, root)
    return root


@pytest.fixture(scope="session")
def train_overrides(train_snapshot: Path, train_base: Path, train_caches: Path, tiny_llm: Path, tmp_path_factory):
    """Dotted overrides that point a ``configs/train_test_stage*.yaml`` at the session's fixtures.

    Call it with a run name; checkpoints and exports go to a fresh folder per name. Untracked unless
    ``track=True`` is passed (the shipped test YAMLs track, for the pipeline test).
    """
    root = tmp_path_factory.mktemp("train")

    def overrides(name: str, **extra) -> list[str]:
        items = {
            "name": name,
            "base_model": str(train_base),
            "llm.path": str(tiny_llm),
            "data.snapshot": str(train_snapshot),
            "data.cache_root": str(train_caches),
            "checkpoint.dir": str(root / name / "checkpoints"),
            "registry.export_dir": str(root / name / "export"),
            "track": False,
            **extra,
        }
        return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in items.items()]

    return overrides


TWO_WORKERS = {"dist.launcher": "ray", "dist.num_workers": 2, "dist.zero_stage": 2}
TWO_WORKER_MODEL = "omnidiff-train-test"


@pytest.fixture(scope="session")
def two_worker_reference(stack, train_overrides) -> dict:
    """An uninterrupted two-worker stage-1 run of configs/train_test_stage1.yaml (12 steps), tracked, registered
    as ``TWO_WORKER_MODEL``, with a sample grid: the run every kill-and-resume test compares its weights with
    (tests/test_train_e2e.py on a local disk, tests/test_s3_kill.py on S3), trained once per session."""
    from omnidiff.config import load_config
    from train import run
    from train.config import TrainConfig

    repo = Path(__file__).resolve().parents[1]
    return run(load_config(TrainConfig, repo / "configs" / "train_test_stage1.yaml", train_overrides(
        "ray-reference", **TWO_WORKERS, track=True, **{
            "registry.register": True, "registry.model_name": TWO_WORKER_MODEL, "samples.per_group": 1,
            "samples.steps": 2})))
