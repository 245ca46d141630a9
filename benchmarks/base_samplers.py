"""Is it the sampler or the model? Score one base model under several samplers on short English prompts.

    .venv/bin/python benchmarks/base_samplers.py MODEL_DIR WORLD_DIR EVALUATOR_DIR [--prompts 24 --images 2]

For each sampler it prints the evaluator's per-attribute prompt-faithfulness on the world's short
English eval prompts, and writes a grid of the first 32 images to --out. Used to find why the
noise-prediction base model drew at chance (omnidiff/base/pretrain.py): every sampler agreed, so
the fault was the training target, not the sampler.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import numpy as np
    import pandas as pd
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
    from PIL import Image

    from omnidiff import scoring
    from omnidiff.models.evaluator import load_evaluator
    from omnidiff.pipeline import OmniDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("world")
    parser.add_argument("evaluator")
    parser.add_argument("--prompts", type=int, default=24, help="short English prompts (at most)")
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("base_samplers"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    evaluator = load_evaluator(args.evaluator)
    pipe = OmniDiffusionPipeline.from_pretrained(args.model)
    prompts = pd.read_parquet(Path(args.world) / "eval_prompts.parquet")
    prompts = prompts[(prompts["lang"] == "en") & (scoring.length_buckets(prompts) == scoring.SHORT).to_numpy()]
    prompts = scoring.select_prompts(prompts, ["en"], args.prompts, args.images, seed=0).reset_index(drop=True)
    train_cfg = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    variants = {
        "pipeline (DPM-Solver++ 20, thresholding)": (pipe.scheduler, 20),
        "DPM-Solver++ 20, no thresholding": (DPMSolverMultistepScheduler.from_config({**train_cfg, "thresholding": False}), 20),
        "DDPM 100, trailing": (DDPMScheduler.from_config({**train_cfg, "timestep_spacing": "trailing"}), 100),
        "DDIM 50, trailing": (DDIMScheduler.from_config({**train_cfg, "timestep_spacing": "trailing"}), 50),
    }
    print(f"{len(prompts)} images, attributes {list(evaluator.labels)}")
    for i, (name, (scheduler, steps)) in enumerate(variants.items()):
        pipe.scheduler = scheduler
        t0 = time.perf_counter()
        images = scoring.generate_images(pipe, prompts["prompt"].tolist(), 0, steps, 3.0, 64, name=f"sampler {i}")
        verdicts = scoring.judge(prompts, evaluator.predict(images))
        scores = {a: float(verdicts[f"ok_{a}"].dropna().astype(float).mean()) for a in evaluator.labels}
        print(f"{name:42s} " + " ".join(f"{a} {v:4.0%}" for a, v in scores.items())
              + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
        rows = [np.concatenate(list(images[r * 8:(r + 1) * 8]), 1) for r in range(min(4, len(images) // 8))]
        Image.fromarray(np.concatenate(rows, 0)).resize((512, 64 * len(rows)), 0).save(args.out / f"sampler_{i}.png")


if __name__ == "__main__":
    main()
