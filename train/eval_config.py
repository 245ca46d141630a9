"""Config of the evaluate stage (issue 6): ``omnidiff evaluate MODEL --config configs/evaluate.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from omnidiff.config import ConfigModel, require


class MetricsSection(ConfigModel):
    """CLIP score per language and prompt length, FID / KID against reference images (train/metrics.py).

    Every path is local; nothing is downloaded (transformers loads with ``local_files_only``).

    prompt_set: a JSONL prompt set (omnidiff/contracts/prompt_sets.py), e.g. configs/prompts/multilingual_v1.jsonl.
    clip: a CLIP folder as ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained`` write it
        (config.json, model.safetensors, tokenizer and preprocessor files), e.g. a local copy of
        openai/clip-vit-large-patch14. CLIP reads English: every prompt is scored against its English reference.
    reference_images: a folder of real images (png / jpg / webp, searched recursively): the real side of
        FID and KID; None: no FID / KID.
    feature_extractor: the image features FID / KID compare: a local transformers vision model folder
        (config.json + model.safetensors + preprocessor_config.json; CLIP, CLIP vision, DINOv2, ...) or its
        ``.safetensors`` file; None: the image tower of ``clip``.
    max_reference_images: at most this many reference images (a seeded pick).
    images_per_prompt: images drawn per prompt (each its own seed); a prompt's images are one bootstrap unit.
    langs, lengths: only these languages / length buckets of the prompt set (empty = all).
    kid_subsets, kid_subset_size: KID's subsets and their size (the size is capped at the smaller image count).
    feature_batch_size: images per CLIP / feature-extractor forward pass.
    """

    prompt_set: Path
    clip: Path
    reference_images: Path | None = None
    feature_extractor: Path | None = None
    max_reference_images: int = Field(1000, ge=2)
    eval_specs: int = Field(0, ge=0)
    images_per_prompt: int = Field(1, ge=1)
    langs: tuple[str, ...] = ()
    lengths: tuple[Literal["short", "long"], ...] = ()
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    feature_batch_size: int = Field(32, ge=1)


class EvalConfig(ConfigModel):
    """Prompt-faithfulness per language and per prompt length, against the base model.

    base_config: the base model's YAML; gives the baseline model (its CLIP encoder, 77 tokens,
        English only), the evaluator and the world whose eval prompts are scored.
    world_dir: an already generated world folder (tests); None -> the one base_config names.
    evaluator_dir: an already trained evaluator folder; None -> the one base_config trains (cached).
    baseline: the model every other model is compared with; None -> the base model of base_config.
    max_per_group: prompts per (language, length) group, seeded; 0 = every prompt. Where the eval prompts
        identify specs (the world's do), the same specs in every language.
    eval_specs: 0 = the world's eval prompts (``eval_prompts.parquet``: 32 specs in the default world, 24 short
        and 8 long); N > 0 = N specs planned by the world's own generator and config, each in every eval
        language (captions only: the world and the models trained on it are unchanged; train/evaluate.py
        ``eval_prompts``). More specs narrow the intervals where specs, not seeds, dominate them.
    images_per_prompt: images drawn per prompt, each from its own seed; a prompt's images are one bootstrap
        unit, and a spec's k-th image starts from the same noise in every language and model
        (train/evaluate.py ``with_image_seeds``). More images narrow the intervals at the UNet's cost only
        (a batch encodes each distinct prompt once).
    langs: only these languages (empty = all, zero-shot ones included).
    steps, guidance, seed, batch_size: sampling (the same for every model, so the table compares models).
    real_images: world images on the real side of the Fréchet distance (evaluator features).
    score_attributes: the attributes whose mean faithfulness is "the score" of a (model, lang, length).
    bootstrap_resamples, bootstrap_seed: the bootstrap behind every score's interval and every claim's
        verdict (specs resampled with replacement, jointly across languages and models, seeds of a prompt
        kept together; fixed seed, so a report reproduces its intervals exactly; train/claims.py).
    confidence: the intervals' coverage (0.95: 95% intervals).
    claim_min_ratio: the "at least Nx" of the claims (each trained language against English, long
        prompts against short, short English against the base); judged on the ratio's interval
        (train/claims.py: pass only when its lower bound reaches it).
    report_dir: where report.html, summary.csv, charts and grids go; None -> home()/reports/evaluate/<id>.
    track: log to MLflow (an evaluate run, plus metrics and the report on each evaluated model's run).
    require_fit_evaluator: refuse an evaluator below 95% held-out accuracy (issue 2); false only for
        smoke runs on tiny budgets (tests), where the report then says the evaluator is unfit.
    judge: ``world`` scores prompt faithfulness with the tiny world's attribute judge (the demo); ``none``
        skips it (a real base has no such judge) and needs ``metrics``; the baseline is then only what
        ``baseline`` names.
    metrics: optional CLIP score / FID / KID on a prompt set (train/metrics.py); None: not computed.
    allow_other_world: judge a model whose training snapshot (its ``lineage.json``) holds mostly captions
        that are not in the judged world (train/evaluate.py ``check_judge_applies``); by default such a
        model is refused, since the world's judge only reads that world's attributes and every score
        would sit at chance.
    """

    kind: ClassVar[str] = "evaluate"

    base_config: Path = Path("configs/base.yaml")
    world_dir: Path | None = None
    evaluator_dir: Path | None = None
    baseline: str | None = None
    max_per_group: int = Field(24, ge=0)
    eval_specs: int = Field(0, ge=0)
    images_per_prompt: int = Field(1, ge=1)
    langs: tuple[str, ...] = ()
    steps: int = Field(20, ge=1, le=1000)
    guidance: float = Field(3.0, ge=0)
    seed: int = 0
    batch_size: int = Field(64, ge=1)
    real_images: int = Field(512, ge=2)
    score_attributes: tuple[str, ...] = Field(("shape", "colour", "position"), min_length=1)
    bootstrap_resamples: int = Field(2000, ge=100)
    bootstrap_seed: int = 0
    confidence: float = Field(0.95, gt=0.5, lt=1)
    claim_min_ratio: float = Field(0.95, gt=0, le=1)
    report_dir: Path | None = None
    track: bool = True
    require_fit_evaluator: bool = True
    allow_other_world: bool = False
    judge: Literal["world", "none"] = "world"
    metrics: MetricsSection | None = None

    @model_validator(mode="after")
    def _something_to_measure(self) -> EvalConfig:
        require(self.judge == "world" or self.metrics is not None, "judge", self.judge,
                "with no world judge there is nothing to measure: set metrics.prompt_set and metrics.clip")
        return self
