"""Stage 1 on published SD 1.5 and SDXL folders: the adapter fits the base (issue 16 item 3).

    .venv/bin/pytest tests/test_base_stage1.py -x -q

For each tiny base of tests/fixtures_bases.py: ``omnidiff embed`` (llm + clip kinds, the ``tiny_llm``
fixture) over a small multilingual pair snapshot, then stage 1 from configs/train_test_stage1.yaml
with the folder as ``base_model``. The adapter's tokens are as wide as the UNet's cross-attention
(SDXL: both towers' features) and its pooled head as SDXL's ``text_embeds``; a few optimizer steps
lower the loss, by hand and through the real loop (DeepSpeed, one local rank).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnidiff.config import load_config
from tests.fixtures_embed import write_snapshot
from train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "star"]
FRENCH = {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "circle": "cercle", "square": "carré",
          "triangle": "triangle", "star": "étoile"}


def _rows() -> list[dict]:
    """English captions, French ones with their English side, and long ones (two CLIP windows)."""
    rows = []
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        side = "left" if i % 2 else "right"
        english = f"a {colour} {shape} on the {side}"
        split = "val" if i % 4 == 0 else "train"
        rows.append({"caption": english, "split": split})
        rows.append({"caption": f"un {FRENCH[shape]} {FRENCH[colour]} à {'gauche' if i % 2 else 'droite'}",
                     "caption_en": english, "lang": "fr", "split": split})
        if i % 3 == 0:
            rows.append({"caption": (english + " and a small white star in the top of a black picture ") * 4,
                         "split": split})
    return rows


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def embedded(request, tiny_llm, tmp_path_factory):
    """``(layout, base folder, snapshot, cache root)`` after ``omnidiff embed`` with kinds llm + clip."""
    from embed_cache.cli import main

    name = request.param
    folder = Path(request.getfixturevalue({"sd15": "sd15_base", "sdxl": "sdxl_base"}[name]))
    tmp = tmp_path_factory.mktemp(f"stage1-{name}")
    snapshot = write_snapshot(f"stage1-{name}", _rows(), root=tmp / "snapshots")
    code = main(["--config", str(REPO / "configs" / "embed.yaml"), "kinds=[llm, clip]", f"llm.path={tiny_llm}",
                 "llm.layer=-1", f"clip.base_model={folder}", f"snapshots=[{snapshot}]", f"cache_root={tmp / 'cache'}",
                 "executor=local", "track=false"])
    assert code == 0
    return name, folder, snapshot, tmp / "cache", tmp


def _config(embedded, tiny_llm, run: str, **extra) -> TrainConfig:
    _, folder, snapshot, cache_root, tmp = embedded
    items = {"name": run, "base_model": str(folder), "llm.path": str(tiny_llm), "data.snapshot": str(snapshot),
             "data.cache_root": str(cache_root), "checkpoint.dir": str(tmp / run / "checkpoints"),
             "registry.export_dir": str(tmp / run / "export"), "track": False, "samples.per_group": 0, **extra}
    overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in items.items()]
    return load_config(TrainConfig, REPO / "configs" / "train_test_stage1.yaml", overrides)


def test_the_adapter_fits_the_base_and_stage1_lowers_its_loss(embedded, tiny_llm):
    from omnidiff.contracts.base_folder import open_base_folder
    from train.data import CachedBatches
    from train.inputs import resolve_inputs
    from train.job import build_job
    from train.model import build_stage_model

    name, folder, _, _, tmp = embedded
    base = open_base_folder(folder)
    cfg = _config(embedded, tiny_llm, "by-hand")
    inputs = resolve_inputs(cfg)
    pooled_dim = base.pooled_dim if name == "sdxl" else base.cross_attention_dim
    assert (inputs.out_dim, inputs.pooled_dim) == (base.cross_attention_dim, pooled_dim)
    assert inputs.out_dim == (96 if name == "sdxl" else 32) and inputs.pooled_dim == (24 if name == "sdxl" else 32)
    # SDXL zeros its unconditional embedding: no '' -> zeros examples (no direction to learn); SD aligns "".
    assert ("empty" in set(inputs.examples["source"])) == (name == "sd15")
    (tmp / "by-hand").mkdir()
    job = build_job(cfg, inputs, tmp / "by-hand", None)
    model = build_stage_model(cfg, job)
    batches = CachedBatches(inputs.examples, "align", inputs.stores, seed=0)
    fixed = batches.batch(np.arange(16))
    # Every position of each used window is a target (the SD / SDXL UNet reads padding too).
    assert fixed["target_mask"].sum(1).remainder(77).eq(0).all()
    with torch.no_grad():
        tokens, pooled = model.adapter.eval()(fixed["llm_states"], fixed["llm_mask"])
    assert tokens.shape == (16, cfg.adapter.num_queries, base.cross_attention_dim)
    assert pooled.shape == (16, pooled_dim) and pooled.shape == fixed["target_pooled"].shape

    def loss_on(batch) -> float:
        model.eval()
        with torch.no_grad():
            return float(model(batch)[0])

    before = loss_on(fixed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(30):
        model.train()
        loss, _ = model(batches.batch(np.arange(step * 8, step * 8 + 8)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = loss_on(fixed)
    assert after < 0.8 * before, f"{name}: stage-1 loss {before:.4f} -> {after:.4f}"


def test_stage1_trains_through_the_real_loop(embedded, tiny_llm):
    """The loop (DeepSpeed engine, one local rank) on the base: validation loss falls, the final adapter fits."""
    from omnidiff.contracts.base_folder import open_base_folder
    from omnidiff.models.adapter import OmniAdapter
    from train.inputs import resolve_inputs
    from train.job import build_job
    from train.launch import launch

    name, folder, _, _, tmp = embedded
    cfg = _config(embedded, tiny_llm, "loop", max_steps=16)
    inputs = resolve_inputs(cfg)
    ckpt = Path(cfg.checkpoint.dir)
    ckpt.mkdir(parents=True)
    launch(cfg, build_job(cfg, inputs, ckpt, None))
    result = json.loads((ckpt / "result.json").read_text())
    val = {int(k): v for k, v in result["val_loss"].items()}
    assert val[max(val)] < 0.9 * val[0], f"{name}: val loss {val}"
    adapter = OmniAdapter.from_pretrained(Path(result["final_dir"]) / "adapter")
    base = open_base_folder(folder)
    assert adapter.shape.out_dim == base.cross_attention_dim
    assert adapter.shape.pooled_dim == (base.pooled_dim or base.cross_attention_dim)


def test_the_pooled_head_has_its_own_width_and_old_folders_load(tmp_path):
    from omnidiff.models.adapter import OmniAdapter

    kwargs = dict(llm_dim=12, width=16, out_dim=20, num_queries=6, encoder_layers=1, decoder_layers=1, heads=2,
                  input_norm=False, length_head=True, pooled_query=True)
    adapter = OmniAdapter(**kwargs, pooled_dim=7).eval()
    states, mask = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)
    tokens, pooled = adapter(states, mask)
    assert tokens.shape == (2, 6, 20) and pooled.shape == (2, 7)
    adapter.save_pretrained(tmp_path / "sdxl")
    loaded = OmniAdapter.from_pretrained(tmp_path / "sdxl")
    assert loaded.shape.pooled_dim == 7
    torch.testing.assert_close(loaded(states, mask)[1], pooled)
    # A folder saved before the pooled width existed: its head was out_dim wide.
    OmniAdapter(**kwargs).save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    assert config.pop("pooled_dim") == 20
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert OmniAdapter.from_pretrained(tmp_path / "old").shape.pooled_dim == 20
