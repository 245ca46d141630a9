"""``PipelineConfig`` (kind ``pipeline``): every stage's typed config in one object.

    omnidiff pipeline --config configs/pipeline.yaml stage2.max_steps=200

In the YAML a stage may be given inline or as the path of that stage's own YAML
(``collect: configs/collect.yaml``); dotted overrides apply after the files are
read. The same object is the ``omnidiff-pipeline`` flow's parameter, so the
Prefect UI shows a form for every stage.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from data_prep.config import CollectConfig
from embed_cache.config import EmbedConfig
from omnidiff.base.config import BaseConfig
from omnidiff.config import ConfigModel, load_config, require
from omnidiff.contracts.storage import StorageSection
from omnidiff.world.config import WorldConfig
from serve.config import ServeConfig
from train.config import TrainConfig
from train.eval_config import EvalConfig


class PipelineConfig(ConfigModel):
    """url lists -> collect -> embed -> stage 1 -> stage 2 -> stage 3 -> evaluate -> register -> deploy.

    world: the tiny world to generate and serve over local HTTP as the url list source; ``null`` for a
        real corpus (then ``collect.url_lists`` names the lists).
    world_port: port of the local HTTP server for the world's images (fixed, so the url list and
        therefore the collect stage's input digest are the same on a rerun).
    base: the existing text-to-image model (pretrained once and cached) and the evaluator.
    base_model: a published Stable Diffusion 1.5 / SDXL diffusers folder (model_index.json, vocab.json +
        merges.txt tokenizers, fp16 variants accepted) to upgrade instead of the tiny base: no tiny base
        is built, and every stage uses the folder (embed's CLIP targets, VAE latents at its native
        resolution unless ``embed.pixels`` names a VAE, training, the evaluation baseline, serving).
        A folder of another layout fails the flow at its start, naming what is missing.
    collect / embed / stage1 / stage2 / stage3 / evaluate / serve: each stage's config; the pipeline
        fills in what flows between stages (url lists, snapshot, cache, base model, parent export).
    skip_unchanged: skip a stage whose input digest matches a completed earlier run (its outputs
        still there), so a rerun redoes only what a change touches.
    storage: where every stage's artifacts live (``StorageSection``): ``root: s3://bucket/prefix`` puts the
        snapshot, caches, checkpoints, exports, the published evaluation report and the stage index under
        it (configs/s3/pipeline.yaml); handed to each stage that names no ``storage.root`` of its own.
        ``null`` root: each stage's own ``storage`` (by default ``$OMNIDIFF_HOME``).
    deploy: promote the stage-3 model to ``production`` and roll (or start) the Serve app.
    """

    kind: ClassVar[str] = "pipeline"

    world: WorldConfig | None
    base: BaseConfig
    base_model: Path | None = None
    collect: CollectConfig
    embed: EmbedConfig
    stage1: TrainConfig
    stage2: TrainConfig
    stage3: TrainConfig
    evaluate: EvalConfig
    serve: ServeConfig
    world_port: int = Field(8765, ge=1, le=65535)
    skip_unchanged: bool = True
    deploy: bool = True
    storage: StorageSection = Field(default_factory=StorageSection)

    @model_validator(mode="after")
    def _stages_fit_their_slots(self) -> PipelineConfig:
        for name, stage in (("stage1", 1), ("stage2", 2), ("stage3", 3)):
            cfg = getattr(self, name)
            require(cfg.stage == stage, f"{name}.stage", cfg.stage, f"the {name} slot takes a stage-{stage} config")
        names = {self.stage1.name, self.stage2.name, self.stage3.name}
        require(len(names) == 3, "stage*.name", sorted(names), "the three stages need distinct names")
        return self


def load_pipeline_config(path: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Read the pipeline YAML (stages inline or as paths of their own YAMLs) and apply dotted overrides.

    A dotted override into a stage given as a file (``stage2.max_steps=50``) is applied on top of
    that file's content.
    """
    return load_config(PipelineConfig, path, overrides)
