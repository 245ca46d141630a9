"""Shipped base artifacts (omnidiff/base/shipped.py, issue 18 item 5): a shipped copy of exactly this base is
installed instead of pretraining, verified file by file; anything else trains as before.

    .venv/bin/pytest tests/test_base_shipped.py -x -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures_base import tiny_base_config

REPO = Path(__file__).resolve().parents[1]


class Trained(Exception):
    """Raised by the stand-in for the training loop: reaching it means no shipped copy was used."""


@pytest.fixture
def fresh_models(tmp_path, monkeypatch) -> Path:
    """An empty models cache and an empty shipped tree of this test's own."""
    models, shipped_dir = tmp_path / "models", tmp_path / "shipped"
    monkeypatch.setenv("OMNIDIFF_MODELS", str(models))
    monkeypatch.setenv("OMNIDIFF_SHIPPED_DIR", str(shipped_dir))
    return shipped_dir


def _refuse_training(monkeypatch):
    from omnidiff.base import evaluator_train, pretrain

    def refuse(*args, **kwargs):
        raise Trained

    monkeypatch.setattr(pretrain, "train", refuse)
    monkeypatch.setattr(evaluator_train, "fit_classifier", refuse)


def test_a_shipped_base_and_evaluator_are_installed_instead_of_trained(tiny_base_model, tiny_evaluator, tiny_world,
                                                                     fresh_models, monkeypatch):
    from omnidiff.base import shipped
    from omnidiff.base.evaluator_train import train_evaluator
    from omnidiff.base.pretrain import pretrain

    shipped.pack("base", tiny_base_model, rebuild="omnidiff base pretrain --config configs/base_test.yaml")
    shipped.pack("evaluator", tiny_evaluator, rebuild="omnidiff base evaluator --config configs/base_test.yaml")
    _refuse_training(monkeypatch)
    cfg = tiny_base_config(tiny_world)

    base = pretrain(cfg)
    assert base != tiny_base_model and base.name == tiny_base_model.name  # the same hash, in the fresh cache
    for original in sorted(p for p in tiny_base_model.rglob("*") if p.is_file()):
        assert (base / original.relative_to(tiny_base_model)).read_bytes() == original.read_bytes(), original
    evaluator = train_evaluator(cfg)
    assert evaluator.name == tiny_evaluator.name
    assert (evaluator / "model.safetensors").read_bytes() == (tiny_evaluator / "model.safetensors").read_bytes()

    # the installed base loads and samples like the trained one
    from omnidiff.pipeline import OmniDiffusionPipeline

    images = OmniDiffusionPipeline.from_pretrained(base)(["a red circle"], num_inference_steps=2, output_type="np")
    assert images.shape[0] == 1

    # force=true trains even with a shipped copy
    with pytest.raises(Trained):
        pretrain(tiny_base_config(tiny_world, "force=true"))


def test_another_config_finds_no_shipped_copy_and_trains(tiny_base_model, tiny_world, fresh_models, monkeypatch,
                                                         capsys):
    from omnidiff.base import shipped
    from omnidiff.base.pretrain import pretrain

    shipped.pack("base", tiny_base_model, rebuild="omnidiff base pretrain --config configs/base_test.yaml")
    _refuse_training(monkeypatch)
    with pytest.raises(Trained):
        pretrain(tiny_base_config(tiny_world, "pretrain.seed=123"))
    assert "no shipped base model matches" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["change", "remove", "add"])
def test_a_shipped_folder_that_does_not_verify_is_refused_naming_the_file(tiny_base_model, tiny_world, fresh_models,
                                                                          monkeypatch, damage):
    from omnidiff.base import shipped
    from omnidiff.base.pretrain import pretrain

    folder = shipped.pack("base", tiny_base_model, rebuild="x")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "change":
        blob = bytearray(weights.read_bytes())
        blob[-1] ^= 0xFF
        weights.write_bytes(bytes(blob))
    elif damage == "remove":
        weights.unlink()
    else:
        (folder / "unet" / "extra.bin").write_bytes(b"\0")
    _refuse_training(monkeypatch)
    with pytest.raises(shipped.ShippedArtifactError, match="unet/(diffusion_pytorch_model.safetensors|extra.bin)"):
        pretrain(tiny_base_config(tiny_world))
    assert not (fresh_models.parent / "models" / "base" / folder.name / "model_index.json").exists()


def test_a_half_packed_base_is_installed_as_float32_rounded_weights(tiny_base_model, tiny_world, fresh_models,
                                                                   monkeypatch):
    """``--half`` stores float32 tensors as float16 (the repository's copy stays small) and install widens them
    back: the cache holds float32 weights equal to the trained ones rounded to float16, and the base samples."""
    import torch
    from safetensors.torch import load_file

    from omnidiff.base import shipped
    from omnidiff.base.pretrain import pretrain
    from omnidiff.pipeline import OmniDiffusionPipeline

    folder = shipped.pack("base", tiny_base_model, rebuild="omnidiff base pretrain --config configs/base_test.yaml",
                          half=True)
    manifest = shipped.verify(folder)
    weight_files = sorted(p.relative_to(tiny_base_model).as_posix() for p in tiny_base_model.rglob("*.safetensors"))
    assert manifest["widened"] == weight_files and manifest["stored_dtype"] == "float16"
    for rel in weight_files:
        packed = load_file(folder / rel)
        assert {t.dtype for t in packed.values() if t.is_floating_point()} == {torch.float16}, rel
        assert (folder / rel).stat().st_size < 0.6 * (tiny_base_model / rel).stat().st_size, rel

    _refuse_training(monkeypatch)
    base = pretrain(tiny_base_config(tiny_world))
    assert base.name == tiny_base_model.name
    for rel in weight_files:
        trained, installed = load_file(tiny_base_model / rel), load_file(base / rel)
        assert set(trained) == set(installed), rel
        for key, tensor in trained.items():
            assert installed[key].dtype == tensor.dtype, (rel, key)
            assert torch.equal(installed[key], tensor.to(torch.float16).to(tensor.dtype) if tensor.dtype == torch.float32
                               else tensor), (rel, key)
    images = OmniDiffusionPipeline.from_pretrained(base)(["a red circle"], num_inference_steps=2, output_type="np")
    assert images.shape[0] == 1 and images.std() > 0  # an image, not a constant


def test_the_repository_ships_the_demo_base_of_configs_base_yaml(tmp_path):
    """The repository's shipped tree verifies and holds the base and evaluator of configs/base.yaml as it is now
    (a config change without re-packing fails here: `python -m omnidiff.base.shipped pack base ... --half`),
    every file under 5 MB, weights stored as float16."""
    import json

    from omnidiff.base import shipped
    from omnidiff.base.config import BaseConfig
    from omnidiff.base.evaluator_train import evaluator_hash
    from omnidiff.base.pretrain import base_hash, model_record
    from omnidiff.config import load_config
    from omnidiff.world import WorldConfig, generate_world, pairs_digest

    root = shipped.PACKAGED
    cfg = load_config(BaseConfig, REPO / "configs" / "base.yaml")
    bases = [shipped.verify(p.parent) for p in sorted((root / "base").glob(f"*/{shipped.MANIFEST}"))]
    evaluators = [shipped.verify(p.parent) for p in sorted((root / "evaluator").glob(f"*/{shipped.MANIFEST}"))]
    assert any(m["record"]["config"] == model_record(cfg, "")["config"] for m in bases), \
        "no shipped base for configs/base.yaml as it is now"
    # ... under the name `make demo` looks up: the config's model part and the default world's images and pairs
    # (a change to the world's parallel texts or eval prompts keeps it; one to its images or pairs needs a re-pack)
    world = generate_world(load_config(WorldConfig, REPO / "configs" / "world.yaml", [f"out_dir={tmp_path / 'w'}"]))
    assert base_hash(cfg, pairs_digest(world)) in {m["hash"] for m in bases}
    assert evaluator_hash(cfg.evaluator, cfg.resolution) in {m["hash"] for m in evaluators}
    for m in bases:
        assert m["rebuild"].startswith("omnidiff base pretrain") and json.dumps(m["record"])
        assert m["stored_dtype"] == "float16" and any(rel.startswith("unet/") for rel in m["widened"])
    assert max(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 5 * 2**20
