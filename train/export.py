"""Export a trained stage as a pipeline folder that ``OmniDiffusionPipeline.from_pretrained`` loads.

The folder (docs/architecture.md "Pipeline folder") is written by the pipeline class itself
(``OmniDiffusionPipeline.save_pretrained``), so its format cannot drift from what the loader
expects: ``unet/`` and ``adapter/`` (safetensors), ``scheduler/`` (the base model's sampler),
``text_encoder/encoder.json`` (a reference to the converted LLM: path, weights digest, layer, max
length, dtype), ``model_index.json``, ``lineage.json`` and ``card.json`` (what the served model can
do: example prompts from its training data, the base model's sizes; serve/models.py reads it). It is
written to a temporary folder and renamed into place, so a reader never sees half an export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def load_scheduler(folder: Path):
    """The base model's scheduler (a sampler config stays a sampler; a training schedule is converted by the pipeline)."""
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


def export_pipeline(out_dir: Path, final_dir: Path, base_model: Path, llm, lineage: dict, card: dict | None = None) -> Path:
    """Pipeline folder at ``out_dir`` from the trained ``final_dir/{adapter,unet}``, the base model's
    scheduler (and VAE, if any) and the LLM encoder ``llm`` (an ``LLMTextEncoder``, referenced, not copied);
    ``card`` (:func:`export_card`) becomes its ``card.json``."""
    from diffusers import AutoencoderKL

    from omnidiff.pipeline import OmniDiffusionPipeline
    from train.model import load_modules

    out_dir, final_dir, base_model = Path(out_dir), Path(final_dir), Path(base_model)
    adapter, unet = load_modules(final_dir)  # what rank 0 saved with train.model.save_modules
    vae = AutoencoderKL.from_pretrained(base_model / "vae", use_safetensors=True) if (base_model / "vae").is_dir() else None
    pipe = OmniDiffusionPipeline(unet, load_scheduler(base_model / "scheduler"), "llm_adapter", adapter=adapter,
                                 llm=llm, vae=vae)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        pipe.save_pretrained(staging, lineage=lineage)
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
