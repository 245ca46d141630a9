"""Evaluate stage's sampling time: every model on its own LLM (as before) vs one shared LLM whose batch encodings
the next model reuses (train.evaluate.SharedLLMs; issue 18 item 5).

    .venv/bin/python benchmarks/eval_speed.py stage1=REF stage2=REF stage3=REF [--batches 4] [-o key=value ...]

REF: an export folder or registry reference of an ``llm_adapter`` model (the demo's three stages). The prompt
rows, seeds, steps, guidance and batch size are the evaluate config's (configs/evaluate.yaml); only ``--batches``
of its batches are drawn, evenly spaced (the rows run short specs first, then long ones: 4 of 16 take 3 short
batches and 1 long, the evaluation's mix). For each model in turn both variants draw the same rows, in alternating order, so
load from other processes hits them alike; the shared variant's LLM encodes once (the first model) and the
others reuse it, as in a real evaluation. Prints each model's seconds in each variant, the share of the
separate variant's time spent in the LLM, the total ratio, and checks every image is identical bit for bit.

Measured 2026-12-07 (2 cores, busy: another demo ran beside it), --batches 2 on the exports of notes/s11/demo_seed0.log's run:
stage1 separate 54.0 s (LLM 42%) / shared 49.5 s; stage2 64.7 s (LLM 36%) / 33.1 s; stage3 53.3 s (LLM 45%) /
42.5 s; total 172.0 -> 125.0 s (0.727x), every image identical. The first model still runs the LLM; each
later one saves its LLM share.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class TimedLLM:
    """Counts the seconds an LLM spends in ``encode`` (everything else passed through)."""

    def __init__(self, llm):
        object.__setattr__(self, "llm", llm)
        object.__setattr__(self, "seconds", 0.0)

    def __getattr__(self, name: str):
        return getattr(self.llm, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.llm, name, value)

    def encode(self, texts):
        t0 = time.perf_counter()
        try:
            return self.llm.encode(texts)
        finally:
            object.__setattr__(self, "seconds", self.seconds + time.perf_counter() - t0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="LABEL=REF of llm_adapter exports, in evaluation order")
    parser.add_argument("--config", default=str(REPO / "configs" / "evaluate.yaml"))
    parser.add_argument("-o", "--override", action="append", default=[], help="dotted.key=value of the config")
    parser.add_argument("--batches", type=int, default=4, help="evenly spaced batches drawn per model and variant")
    args = parser.parse_args(argv)

    import numpy as np
    import pandas as pd

    import omnidiff  # noqa: F401
    from omnidiff.config import load_config
    from omnidiff.scoring import generate_images
    from train.eval_config import EvalConfig
    from train.evaluate import SharedLLMs, _load_pipeline, resolve_inputs
    from train.evaluate_cli import parse_models

    cfg = load_config(EvalConfig, args.config, [*args.override, "track=false"])
    models = parse_models(args.models)
    inputs = resolve_inputs(cfg)
    n_batches = -(-len(inputs.prompts) // cfg.batch_size)
    chosen = sorted({int(round(x)) for x in np.linspace(0, n_batches - 1, min(args.batches, n_batches))})
    rows = pd.concat([inputs.prompts.iloc[b * cfg.batch_size:(b + 1) * cfg.batch_size] for b in chosen])
    prompts, seeds = rows["prompt"].tolist(), rows["seed"].tolist()
    resolution = inputs.evaluator.resolution
    print(f"{len(models)} models x {len(rows)} images ({rows['prompt'].nunique()} prompts; batches {chosen} of "
          f"{n_batches}; {int(rows['is_long'].sum())} long), {cfg.steps} steps, "
          f"guidance {cfg.guidance}, batch {cfg.batch_size}", flush=True)

    def draw(pipe) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        images = generate_images(pipe, prompts, cfg.seed, cfg.steps, cfg.guidance, cfg.batch_size, name="bench",
                                 seeds=seeds)
        return images, time.perf_counter() - t0

    llms = SharedLLMs()
    seconds = {"separate": {}, "shared": {}}
    llm_share = {}
    for i, (label, ref) in enumerate(models.items()):
        images = {}
        for variant in (("separate", "shared") if i % 2 == 0 else ("shared", "separate")):
            pipe = _load_pipeline(ref, resolution, llms if variant == "shared" else None)
            if variant == "separate":
                pipe.pipe.llm = timed = TimedLLM(pipe.pipe.llm)
            images[variant], seconds[variant][label] = draw(pipe)
            if variant == "separate":
                llm_share[label] = timed.seconds / seconds[variant][label]
            del pipe
        same = np.array_equal(images["separate"], images["shared"])
        print(f"{label}: separate {seconds['separate'][label]:.1f}s (LLM {llm_share[label]:.0%}), shared "
              f"{seconds['shared'][label]:.1f}s, images identical: {same}", flush=True)
        if not same:
            raise SystemExit(f"{label}: the shared LLM changed the images")
    total = {variant: sum(s.values()) for variant, s in seconds.items()}
    print(f"\ntotal: separate {total['separate']:.1f}s, shared {total['shared']:.1f}s -> "
          f"{total['shared'] / total['separate']:.3f}x the time ({len(models)} models, every image identical)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
