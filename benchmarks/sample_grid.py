"""Sample grids on a latent base: how long the other ranks wait (issue 16 item 4).

    .venv/bin/python benchmarks/sample_grid.py                     # tiny SD 1.5 folder, 12 prompts
    .venv/bin/python benchmarks/sample_grid.py --world 4 --steps 8

train/samples.py has every rank draw ``prompts[rank::world]`` and meet at one ``all_gather_object``;
before, rank 0 drew the whole grid while the other ranks waited at a barrier. A rank's wait at the
collective is the longest share, so this measures, in the same run on the same modules (interleaved,
median of rounds): the time one rank needs for the whole grid (the old wait) against the time of the
largest share under ``--world`` ranks (the new one), and their ratio. The UNet, adapter and VAE are a
tiny published-layout SD 1.5 folder (tests/fixtures_bases.py) and random LLM states; the ratio, not
the seconds, is what carries over to an SD-size UNet (each prompt costs the same whatever the share).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    from omnidiff.models.adapter import OmniAdapter
    from tests.fixtures_bases import build_base_folder
    from train.config import SamplesSection
    from train.model import load_unet, load_vae
    from train.samples import draw_share

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base_folder(Path(tmp) / "sd15", "sd15")
        unet, vae = load_unet(base).eval(), load_vae(base)
        torch.manual_seed(0)
        adapter = OmniAdapter(64, 32, unet.config.cross_attention_dim, 16, 1, 1, 4, input_norm=False,
                              length_head=False, pooled_query=True).eval()
        rng = np.random.default_rng(0)
        prompts = [{"states": rng.standard_normal((int(rng.integers(4, 40)), 64)).astype(np.float16)}
                   for _ in range(args.prompts)]
        scheduler_config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
        job = SimpleNamespace(prompts=prompts, empty_states=rng.standard_normal((2, 64)).astype(np.float16),
                              sampling_scheduler=scheduler_config)
        cfg = SimpleNamespace(samples=SamplesSection(steps=args.steps))
        largest = 0  # the rank with the most prompts: prompts[0::world]
        whole, share = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            draw_share(cfg, job, adapter, unet, vae, rank=0, world=1, device="cpu")
            t1 = time.perf_counter()
            draw_share(cfg, job, adapter, unet, vae, rank=largest, world=args.world, device="cpu")
            t2 = time.perf_counter()
            whole.append(t1 - t0)
            share.append(t2 - t1)
    out = {"prompts": args.prompts, "world": args.world, "steps": args.steps,
           "whole_grid_s": statistics.median(whole), "largest_share_s": statistics.median(share),
           "wait_ratio": statistics.median(s / w for s, w in zip(share, whole, strict=True))}
    print(f"[sample_grid] {args.prompts} prompts x {args.steps} steps, tiny SD 1.5 + VAE decode on CPU: "
          f"one rank draws the grid in {out['whole_grid_s']:.2f}s (what the others waited); with {args.world} "
          f"ranks the largest share takes {out['largest_share_s']:.2f}s: ratio {out['wait_ratio']:.2f}")
    return out


if __name__ == "__main__":
    main()
