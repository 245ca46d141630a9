"""Config of the evaluate stage (issue 6): ``omnidiff evaluate MODEL --config configs/evaluate.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from omnidiff.config import require


@dataclass(frozen=True)
class EvalConfig:
    """Prompt-faithfulness per language and per prompt length, against the base model.

    base_config: the base model's YAML; gives the baseline model (its CLIP encoder, 77 tokens,
        English only), the evaluator and the world whose eval prompts are scored.
    world_dir: an already generated world folder (tests); None -> the one base_config names.
    evaluator_dir: an already trained evaluator folder; None -> the one base_config trains (cached).
    baseline: the model every other model is compared with; None -> the base model of base_config.
    max_per_group: prompts per (language, length) group, seeded; 0 = every prompt.
    langs: only these languages (empty = all, zero-shot ones included).
    steps, guidance, seed, batch_size: sampling (the same for every model, so the table compares models).
    real_images: world images on the real side of the Fréchet distance (evaluator features).
    score_attributes: the attributes whose mean faithfulness is "the score" of a (model, lang, length).
    report_dir: where report.html, summary.csv, charts and grids go; None -> home()/reports/evaluate/<id>.
    track: log to MLflow (an evaluate run, plus metrics and the report on each evaluated model's run).
    require_fit_evaluator: refuse an evaluator below 95% held-out accuracy (issue 2); false only for
        smoke runs on tiny budgets (tests), where the report then says the evaluator is unfit.
    """

    kind: ClassVar[str] = "evaluate"

    base_config: Path = Path("configs/base.yaml")
    world_dir: Path | None = None
    evaluator_dir: Path | None = None
    baseline: str | None = None
    max_per_group: int = 24
    langs: tuple[str, ...] = ()
    steps: int = 20
    guidance: float = 3.0
    seed: int = 0
    batch_size: int = 64
    real_images: int = 512
    score_attributes: tuple[str, ...] = ("shape", "colour", "position")
    report_dir: Path | None = None
    track: bool = True
    require_fit_evaluator: bool = True

    def __post_init__(self) -> None:
        require(self.max_per_group >= 0, "max_per_group", self.max_per_group, "must be >= 0")
        require(1 <= self.steps <= 1000, "steps", self.steps, "must be in [1, 1000]")
        require(self.guidance >= 0, "guidance", self.guidance, "must be >= 0")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.real_images >= 2, "real_images", self.real_images, "must be >= 2")
        require(len(self.score_attributes) >= 1, "score_attributes", self.score_attributes, "name at least one")
