"""Does the base model draw position? Pretrain base variants (or load folders) and judge where they draw.

    .venv/bin/python benchmarks/base_position.py --config configs/base.yaml --evaluator EVALUATOR_DIR \\
        --variant before:unet.coord_channels=false --variant coord:unet.coord_channels=true \\
        [--set pretrain.steps=500 ...] [--model NAME=FOLDER ...] [--images 4] [--time-only]

Each ``--variant NAME:KEY=VALUE,...`` pretrains the base of ``--config`` with those dotted overrides
(plus every ``--set``; nothing is cached) and each ``--model NAME=FOLDER`` loads a pipeline folder. For
every model it prints:
- faithfulness per attribute on the world's short English eval prompts (``--images`` images each,
  the demo's sampler: 20 DPM-Solver++ steps, guidance 3), and the position confusion (asked x drawn);
- the corner test: one prompt in its four corner wordings, each sampled from the same noise
  (``--corner-seeds`` seeds). "follows word" is the share of images drawn in the corner asked for;
  "same corner" the share of seeds whose four images all land in one corner (1.0 = the noise decides);
- a linear probe of the text encoder: can the position be read from the states the UNet attends to
  (mean over the real tokens) and from the pooled state (what the UNet adds to its time embedding)?
- pretraining wall time and s/step, and its ratio to the first variant's, measured in the same run.

Used for issue 18 item 2 (omnidiff/models/unet.py: coordinate channels).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CORNERS = {"top-left": "top left", "top-right": "top right", "bottom-left": "bottom left", "bottom-right": "bottom right"}
CORNER_PROMPT = "a large red circle in the {} corner on a black background"


def text_probe(text_encoder, captions: list[str], labels: list[str], seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of a linear classifier of ``labels`` from the encoder's mean token state and its pooled state."""
    import torch

    with torch.no_grad():
        states, mask, pooled = text_encoder.encode(captions, 1)  # (N, 77, D), (N, 77), (N, D)
    mean = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (N, D)
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_fit = len(y) * 2 // 3
    fit, held = order[:n_fit], order[n_fit:]
    out = {}
    for name, x in (("mean_states", mean), ("pooled", pooled)):
        x = (x - x[fit].mean(0)) / (x[fit].std(0) + 1e-6)
        w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
        b = torch.zeros(len(classes), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.05)
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(x[fit] @ w + b, y[fit]).backward()
            opt.step()
        out[name] = float(((x[held] @ w + b).argmax(1) == y[held]).float().mean())
    return out


def with_spacing(pipe, spacing: str):
    """``pipe`` sampling with its scheduler's ``timestep_spacing`` set to ``spacing`` ("saved": unchanged).

    A shallow copy: the models are shared, only the sampler differs."""
    import copy

    if spacing == "saved":
        return pipe
    out = copy.copy(pipe)
    out.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, "timestep_spacing": spacing})
    return out


def first_step_test(pipe, seeds: int, guidance: float) -> dict[str, float]:
    """What the UNet predicts from pure noise at the training's noisiest timestep (999), where the input carries
    no image at all, so the prediction should follow the words only.

    For the four corner wordings from the same noise (``seeds`` seeds): the quadrant of the guided predicted
    image (x0 = alpha x - sigma v) with the most red. Returns {"follows": share in the asked quadrant (chance
    25%), "same": share of seeds whose four predictions share a quadrant}. v-prediction only."""
    import numpy as np
    import torch

    from omnidiff.pipeline import predict_noise

    if pipe.scheduler.config.prediction_type != "v_prediction":
        raise ValueError("first_step_test reads a v-prediction UNet")
    t = int(pipe.scheduler.config.num_train_timesteps) - 1
    alpha_bar = pipe.scheduler.alphas_cumprod[t]
    tokens, pooled, mask = pipe.encode_prompt([CORNER_PROMPT.format(c) for c in CORNERS.values()] + [""])
    hits, same = 0, 0
    for seed in range(seeds):
        noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1000 + seed)).expand(5, -1, -1, -1)
        with torch.no_grad():
            v = predict_noise(pipe.unet, noise, torch.full((5,), t), tokens, pooled, mask)  # (5, 3, 16, 16)
        x0 = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * v
        x0 = x0[4:] + guidance * (x0[:4] - x0[4:])  # (4, 3, 16, 16): guided, per wording
        red = x0[:, 0] - 0.5 * (x0[:, 1] + x0[:, 2])  # (4, 16, 16)
        quadrants = torch.stack([red[:, :8, :8], red[:, :8, 8:], red[:, 8:, :8], red[:, 8:, 8:]], 1).mean((2, 3))
        drawn = quadrants.argmax(1).tolist()  # CORNERS order: top-left, top-right, bottom-left, bottom-right
        hits += sum(d == i for i, d in enumerate(drawn))
        same += len(set(drawn)) == 1
    return {"follows": hits / (4 * seeds), "same": same / seeds, "t": t, "guided_x0_std": float(np.std(x0.numpy()))}


def text_effect_by_t(pipe, seeds: int, guidance: float, ts=(999, 950, 900, 850, 800, 700, 600, 400)) -> dict:
    """Where does the text move the shape? For each timestep ``t``: a black image without any shape, noised to ``t``
    (``seeds`` noises), so the input points at no corner; the UNet's predicted image (x0, guided by ``guidance``)
    under the four corner wordings. Returns {t: {"follows": share of wordings whose reddest quadrant is the one
    asked (chance 25%), "contrast": mean redness of the asked quadrant minus the other three's}} and
    {"pooled_cos": cosine of the pooled text state, top left vs bottom right}. v-prediction only."""
    import numpy as np
    import torch

    from omnidiff.pipeline import predict_noise

    if pipe.scheduler.config.prediction_type != "v_prediction":
        raise ValueError("text_effect_by_t reads a v-prediction UNet")
    tokens, pooled, mask = pipe.encode_prompt([CORNER_PROMPT.format(c) for c in CORNERS.values()] + [""])
    out: dict = {"pooled_cos": float(torch.nn.functional.cosine_similarity(pooled[0], pooled[3], dim=0))}
    black = -torch.ones(1, 3, 16, 16)
    for t in ts:
        alpha_bar = pipe.scheduler.alphas_cumprod[t]
        hits, contrast = 0, []
        for seed in range(seeds):
            noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1000 + seed))
            x = (alpha_bar.sqrt() * black + (1 - alpha_bar).sqrt() * noise).expand(5, -1, -1, -1)
            with torch.no_grad():
                v = predict_noise(pipe.unet, x, torch.full((5,), t), tokens, pooled, mask)  # (5, 3, 16, 16)
            x0 = alpha_bar.sqrt() * x - (1 - alpha_bar).sqrt() * v
            x0 = x0[4:] + guidance * (x0[:4] - x0[4:])  # (4, 3, 16, 16)
            red = x0[:, 0] - 0.5 * (x0[:, 1] + x0[:, 2])  # (4, 16, 16)
            q = torch.stack([red[:, :8, :8], red[:, :8, 8:], red[:, 8:, :8], red[:, 8:, 8:]], 1).mean((2, 3))  # (4, 4)
            hits += int((q.argmax(1) == torch.arange(4)).sum())
            contrast.append(float((q.diagonal() - (q.sum(1) - q.diagonal()) / 3).mean()))
        out[t] = {"follows": hits / (4 * seeds), "contrast": float(np.mean(contrast))}
    return out


def judge_model(pipe, name: str, world: Path, evaluator, images: int, corner_seeds: int, guidance: float = 3.0) -> dict:
    import numpy as np
    import pandas as pd

    from omnidiff import scoring
    from omnidiff.text import normalise_caption

    prompts = pd.read_parquet(world / "eval_prompts.parquet")
    prompts = prompts[(prompts["lang"] == "en") & (scoring.length_buckets(prompts) == scoring.SHORT).to_numpy()]
    prompts = scoring.select_prompts(prompts, ["en"], 0, images, seed=0).reset_index(drop=True)
    t0 = time.perf_counter()
    drawn = scoring.generate_images(pipe, prompts["prompt"].tolist(), 0, 20, guidance, 64, name=f"{name} eval")
    verdicts = scoring.judge(prompts, evaluator.predict(drawn))
    scores = {a: float(verdicts[f"ok_{a}"].dropna().astype(float).mean()) for a in evaluator.labels}
    confusion = pd.crosstab(verdicts["position"], verdicts["pred_position"])
    # The corner test: the same noise for all four wordings; the drawn corner should follow the words.
    words = [CORNER_PROMPT.format(c) for c in CORNERS.values()]
    rows = []
    for seed in range(corner_seeds):
        ims = pipe(words, num_inference_steps=20, guidance_scale=guidance, seed=[1000 + seed] * 4, output_type="np")
        rows.append(evaluator.predict(ims)["position"])
    rows = np.array(rows)  # (seeds, 4)
    follows = float((rows == np.array(list(CORNERS))).mean())
    same = float(np.mean([len(set(r)) == 1 for r in rows]))
    pairs = pd.read_parquet(world / "pairs.parquet", columns=["caption_en", "position", "is_long"])
    pairs = pairs[~pairs["is_long"]].drop_duplicates("caption_en").head(900)
    probe = text_probe(pipe.text_encoder, [normalise_caption(c) for c in pairs["caption_en"]], list(pairs["position"]))
    first = first_step_test(pipe, corner_seeds, guidance)
    by_t = text_effect_by_t(pipe, corner_seeds, guidance)
    return {"by_t": by_t, "scores": scores, "confusion": confusion, "follows_word": follows, "same_corner": same,
            "first_step": first, "probe": probe, "n_images": len(prompts), "judge_s": time.perf_counter() - t0}


def main() -> None:
    import torch

    from omnidiff.base.config import BaseConfig
    from omnidiff.base.pretrain import build_pipeline, load_pairs, resolve_world, train
    from omnidiff.config import load_config
    from omnidiff.models.evaluator import load_evaluator
    from omnidiff.pipeline import OmniDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/base.yaml"))
    parser.add_argument("--evaluator", type=Path, required=True, help="an evaluator folder fit for this world")
    parser.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,KEY=VALUE (dotted overrides)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE override for every variant")
    parser.add_argument("--model", action="append", default=[], help="NAME=FOLDER: a pipeline folder to judge")
    parser.add_argument("--images", type=int, default=4, help="images per short English eval prompt")
    parser.add_argument("--corner-seeds", type=int, default=16)
    parser.add_argument("--guidance", type=float, action="append", default=[],
                        help="classifier-free guidance scale (repeatable: every model is judged at each; default 3, the demo's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-only", action="store_true", help="pretrain and report the time; judge nothing")
    parser.add_argument("--diagnose-only", action="store_true",
                        help="only the text effect by timestep (seconds, no sampling): does the text move the shape?")
    parser.add_argument("--spacing", action="append", default=[], choices=["saved", "leading", "trailing", "linspace"],
                        help="judge every model with its sampler's timestep_spacing set to this (repeatable; "
                             "default: as saved). 'leading' starts 20 steps at t=940 of 1000, not at pure noise")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The test world's evaluator is not fit on every attribute (shape); position is what is read here.
    evaluator = load_evaluator(args.evaluator, require_fit=False)
    print(f"evaluator {args.evaluator}: held-out accuracy {evaluator.accuracy}")

    models: list[tuple[str, object, dict]] = []
    for spec in args.model:
        name, folder = spec.split("=", 1)
        models.append((name, OmniDiffusionPipeline.from_pretrained(folder), {}))
    world = None
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        cfg = load_config(BaseConfig, args.config, [*args.set, *[o for o in overrides.split(",") if o]])
        world = resolve_world(cfg)
        images, captions = load_pairs(world, cfg.resolution)
        print(f"[{name}] pretraining {cfg.pretrain.steps} steps, batch {cfg.pretrain.batch_size}, unet {cfg.unet}",
              flush=True)
        result = train(cfg, images, captions)
        pipe = build_pipeline(result["text_encoder"], result["unet"], result["scheduler"])
        n_params = sum(p.numel() for p in result["unet"].parameters())
        models.append((name, pipe, {"wall_s": result["wall_s"], "s_per_step": 1 / result["steps_per_s"],
                                    "unet_params": n_params}))
    if world is None:
        cfg = load_config(BaseConfig, args.config, args.set)
        world = resolve_world(cfg)

    if args.spacing:
        models = [(f"{name} [{sp}]" if len(args.spacing) > 1 or sp != "saved" else name, with_spacing(pipe, sp), timing)
                  for name, pipe, timing in models for sp in args.spacing]
    first_wall = None
    for name, pipe, timing in models:
        if args.time_only:
            if not timing:
                continue
            first_wall = first_wall or timing["wall_s"]
            print(f"== {name}: pretraining {timing['wall_s']:.0f} s, {timing['s_per_step']:.3f} s/step, "
                  f"{timing['wall_s'] / first_wall:.2f}x the first variant; UNet {timing['unet_params']:,} parameters")
            continue
        if args.diagnose_only:
            for guidance in args.guidance or [3.0]:
                by_t = text_effect_by_t(pipe, args.corner_seeds, guidance)
                print(f"== {name} g{guidance:g}: pooled cos TL-BR {by_t.pop('pooled_cos'):.3f}; asked quadrant "
                      "reddest / contrast by t: " + "  ".join(f"t{t} {v['follows']:.0%}/{v['contrast']:+.2f}"
                                                              for t, v in by_t.items()))
            continue
        for guidance in args.guidance or [3.0]:
            report(pipe, f"{name} g{guidance:g}" if args.guidance else name, timing, first_wall,
                   judge_model(pipe, name, world, evaluator, args.images, args.corner_seeds, guidance))
        if timing:
            first_wall = first_wall or timing["wall_s"]


def report(pipe, name: str, timing: dict, first_wall: float | None, r: dict) -> None:
    """Print one judged model."""
    first = type(pipe.scheduler).from_config(pipe.scheduler.config)
    first.set_timesteps(20)
    print(f"\n== {name}: {r['n_images']} images of short English prompts; sampler "
          f"{pipe.scheduler.config.timestep_spacing!r}, first timestep {int(first.timesteps[0])}, "
          f"judged in {r['judge_s']:.0f} s")
    print("   faithfulness: " + "  ".join(f"{a} {v:.1%}" for a, v in r["scores"].items()))
    print(f"   corner test: follows word {r['follows_word']:.1%}, same corner for all four words {r['same_corner']:.1%}")
    f = r["first_step"]
    print(f"   first step (predicted image from pure noise at t={f['t']}): red in the asked quadrant {f['follows']:.1%}, "
          f"same quadrant for all four words {f['same']:.1%}")
    by_t = r["by_t"]
    print(f"   text effect by t (black input + noise; asked quadrant reddest / contrast; pooled cos TL-BR "
          f"{by_t['pooled_cos']:.3f}): " + "  ".join(f"t{t} {v['follows']:.0%}/{v['contrast']:+.2f}"
                                                    for t, v in by_t.items() if t != "pooled_cos"))
    print(f"   text probe (position): mean states {r['probe']['mean_states']:.1%}, pooled {r['probe']['pooled']:.1%}")
    if timing:
        first_wall = first_wall or timing["wall_s"]
        print(f"   pretraining: {timing['wall_s']:.0f} s, {timing['s_per_step']:.3f} s/step, "
              f"{timing['wall_s'] / first_wall:.2f}x the first variant; UNet {timing['unet_params']:,} parameters")
    print("   position confusion (rows asked, columns drawn):")
    print("   " + r["confusion"].to_string().replace("\n", "\n   "))


if __name__ == "__main__":
    main()
