"""Export a trained stage as a pipeline folder that ``OmniDiffusionPipeline.from_pretrained`` loads.

The folder (docs/architecture.md "Pipeline folder") is written by the pipeline class itself
(``OmniDiffusionPipeline.save_pretrained``), so its format cannot drift from what the loaders
expect (``OmniDiffusionPipeline.from_pretrained`` and diffusers' ``DiffusionPipeline.from_pretrained(
folder, trust_remote_code=True)``): ``unet/`` and ``adapter/`` (safetensors), ``scheduler/`` (the
base model's sampler), ``vae/`` (SD / SDXL bases), ``text_encoder/encoder.json`` (a portable
reference to the LLM: model id, folder name, weights digest, layer, max length, dtype; no path of
the training machine) or the LLM itself (``registry.copy_llm``), ``model_index.json``, ``lineage.json``
and ``card.json`` (what the served model can do: example prompts from its training data, the base
model's sizes; serve/models.py reads it). It is written to a temporary folder and renamed into
place, so a reader never sees half an export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def load_scheduler(folder: Path):
    """The base model's scheduler as the pipeline's sampler: a DPM-Solver config stays as it is; any other
    (SD's PNDM, SDXL's Euler, the tiny base's DDPM) keeps its noise schedule and prediction type and
    becomes a DDPM config, which the pipeline turns into its sampler (no thresholding for latents)."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    config = json.loads((Path(folder) / "scheduler_config.json").read_text())
    if config.get("_class_name") == "DPMSolverMultistepScheduler":
        return DPMSolverMultistepScheduler.from_config(config)
    return DDPMScheduler.from_config(config)


CARD_FILE = "card.json"
EXAMPLES_PER_LANG = 2


def export_card(prompts: list[dict], base_model: Path) -> dict:
    """``card.json`` of an export: ``example_prompts``, the short prompts of the stage's sample set (val
    captions of its training snapshot, ``EXAMPLES_PER_LANG`` per language: what the model was taught to
    draw, issue 15 item 11), and the base model card's ``sizes`` when it lists any (the adapter does not
    change what sizes the UNet can draw; a folder without them is served at the size it was trained at)."""
    examples, per_lang = [], {}
    for prompt in prompts:
        lang = str(prompt["lang"])
        if prompt.get("group", "short") == "short" and per_lang.get(lang, 0) < EXAMPLES_PER_LANG:
            examples.append({"prompt": str(prompt["prompt"]), "lang": lang})
            per_lang[lang] = per_lang.get(lang, 0) + 1
    card: dict = {"example_prompts": examples}
    base_card = Path(base_model) / CARD_FILE
    if base_card.is_file() and json.loads(base_card.read_text()).get("sizes"):
        card["sizes"] = list(json.loads(base_card.read_text())["sizes"])
    return card


def portable_lineage(lineage: dict) -> dict:
    """``lineage`` with no path of this machine: a path under ``$OMNIDIFF_HOME`` becomes
    ``$OMNIDIFF_HOME/<relative>``, any other absolute path its last component. The folder then moves
    between machines as it is; the MLflow run's own ``lineage.json`` keeps the full paths."""
    from omnidiff.env import home

    root = home().resolve()

    def portable(value):
        if isinstance(value, dict):
            return {k: portable(v) for k, v in value.items()}
        if isinstance(value, list):
            return [portable(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value):
            path = Path(value)
            return f"$OMNIDIFF_HOME/{path.relative_to(root)}" if path.is_relative_to(root) else path.name
        return value

    return portable(lineage)


def export_pipeline(out_dir: Path, final_dir: Path, base_model: Path, llm, lineage: dict, copy_llm: bool = False,
                    card: dict | None = None) -> Path:
    """Pipeline folder at ``out_dir`` from the trained ``final_dir/{adapter,unet}``, the base model's
    scheduler (and VAE, if any) and the LLM encoder ``llm`` (an ``LLMTextEncoder``): referenced by id and
    weights digest, or copied into the folder with ``copy_llm`` (``registry.copy_llm``); ``card``
    (:func:`export_card`) becomes its ``card.json``."""
    from omnidiff.pipeline import OmniDiffusionPipeline
    from train.model import load_modules, load_vae

    out_dir, final_dir, base_model = Path(out_dir), Path(final_dir), Path(base_model)
    adapter, unet = load_modules(final_dir)  # what rank 0 saved with train.model.save_modules
    vae = load_vae(base_model)  # SD / SDXL: the base's VAE (fp16-only folders too); None in pixel space
    scheduler = load_scheduler(base_model / "scheduler")
    pipe = OmniDiffusionPipeline(unet, scheduler, "llm_adapter", adapter=adapter, llm=llm, vae=vae,
                                 force_zeros_for_empty_prompt=_force_zeros(base_model))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        pipe.save_pretrained(staging, lineage=portable_lineage(lineage), copy_llm=copy_llm)
        if card is not None:
            (staging / CARD_FILE).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
            os.replace(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _force_zeros(base_model: Path) -> bool:
    """A published SDXL base's ``force_zeros_for_empty_prompt`` (the pipeline then feeds zeros as the
    unconditional embedding, as diffusers does); False for the tiny base and SD 1.5."""
    from omnidiff.contracts.base_folder import open_base_folder
    from omnidiff.contracts.encoders import is_published_base

    return is_published_base(base_model) and open_base_folder(base_model).force_zeros_for_empty_prompt
