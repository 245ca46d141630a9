"""Fine-tune a base pipeline folder with a high-noise share (issue 18 item 2, the experiments f1 / f2 of
benchmarks/base_position_results.md): what ``pretrain.high_noise_steps`` does inside a pretraining, on a folder.

    python benchmarks/base_layout_finetune.py SRC_FOLDER OUT_FOLDER --world WORLD_DIR \\
        [--steps 300 --lr 5e-4 --fraction 0.5 --high-from 850 --weight 1 --text-grad]

Each step: a batch of 64 world pairs (10% captions dropped); the first ``fraction`` of the batch draws t from
[high_from, 1000) and is weighted by ``weight`` x the predicted image's squared error (text states detached unless
--text-grad), the rest is the usual Min-SNR-5 v loss; loss = mean(rest) + weight x mean(high share). AdamW at a
constant lr after a 20-step warm-up, grad clip 1. Then judge OUT_FOLDER with benchmarks/base_position.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from diffusers import DDPMScheduler

    from omnidiff.base.pretrain import build_pipeline, load_pairs
    from omnidiff.pipeline import OmniDiffusionPipeline, min_snr_weights, predict_noise

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--high-from", type=int, default=850)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--text-grad", action="store_true", help="let the high-noise share's gradient into the text encoder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=123)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe = OmniDiffusionPipeline.from_pretrained(a.src)
    te, unet = pipe.text_encoder, pipe.unet
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    images, captions = load_pairs(a.world, 16)
    ids_all, mask_all = te.tokenize(captions, max_windows=1)
    null_ids, null_mask = te.tokenize([""], max_windows=1)
    params = list(te.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed)
    te.train()
    unet.train()
    batch, n_high, t0 = 64, round(a.fraction * 64), time.time()
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, (step + 1) / 20)
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        ids, mask = ids_all[idx].clone(), mask_all[idx].clone()
        drop = torch.rand(batch, generator=gen) < 0.1
        ids[drop], mask[drop] = null_ids, null_mask
        x = images[idx]
        states, pooled = te(ids, mask)
        if not a.text_grad:
            high = torch.arange(batch) < n_high
            states = torch.where(high[:, None, None], states.detach(), states)
            pooled = torch.where(high[:, None], pooled.detach(), pooled)
        noise = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        t[:n_high] = torch.randint(a.high_from, 1000, (n_high,), generator=gen)
        noisy = sched.add_noise(x, noise, t)
        pred = predict_noise(unet, noisy, t, states, pooled, mask)
        per = ((pred - sched.get_velocity(x, noise, t)) ** 2).mean((1, 2, 3))
        rest = (per[n_high:] * min_snr_weights(sched, t, 5.0)[n_high:]).mean()
        high_loss = (per[:n_high] * (1 - sched.alphas_cumprod[t[:n_high]])).mean()  # the predicted image's error
        loss = rest + a.weight * high_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step} rest {rest.item():.4f} high {high_loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    te.eval()
    unet.eval()
    build_pipeline(te, unet, sched).save_pretrained(a.out)
    print(f"saved {a.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
