"""Export a trained stage as a pipeline folder that ``OmniDiffusionPipeline.from_pretrained`` loads.

The folder (docs/architecture.md "Pipeline folder") is written by the pipeline class itself
(``OmniDiffusionPipeline.save_pretrained``), so its format cannot drift from what the loader
expects: ``unet/`` and ``adapter/`` (safetensors), ``scheduler/`` (the base model's sampler),
``text_encoder/encoder.json`` (a reference to the converted LLM: path, weights digest, layer, max
length, dtype), ``model_index.json`` and ``lineage.json``. It is written to a temporary folder and
renamed into place, so a reader never sees half an export.
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


def export_pipeline(out_dir: Path, final_dir: Path, base_model: Path, llm, lineage: dict) -> Path:
    """Pipeline folder at ``out_dir`` from the trained ``final_dir/{adapter,unet}``, the base model's
    scheduler (and VAE, if any) and the LLM encoder ``llm`` (an ``LLMTextEncoder``, referenced, not copied)."""
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
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
            os.replace(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
