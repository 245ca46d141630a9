"""Stage-2 training step: cached LLM states vs the LLM online (as the release does), and DeepSpeed vs plain PyTorch.

    .venv/bin/python benchmarks/train_step.py                       # Gemma 3 270M (omnidiff llm convert)
    .venv/bin/python benchmarks/train_step.py --llm tiny --steps 4  # quick check with the tiny random Gemma
    .venv/bin/python benchmarks/train_step.py --adapter             # 3. the adapter's training body alone

3. (``--adapter``, issue 18 item 5) forward + backward of the demo's adapter on micro-batches of 16 world
   captions (Gemma token counts, random states: the cost depends on the shapes only) through torch's modules
   as they are (``OmniAdapter._stock_body``, what training ran before) against the training body
   (``_training_body``: real-token projection and feed-forward, the first decoder self-attention once per
   batch), interleaved step by step; also the largest difference of their outputs and gradients.
   Measured 2026-12-07 (2 cores, busy): 394 -> 297 ms a micro-batch (0.756x, median of 3 rounds), outputs
   identical, gradients within 1.2e-6 of each tensor's max. The real stage 1 (2 Ray workers, ZeRO-2, 80 steps,
   seed 0; old vs new tree back to back) logged the same losses to 5 digits (0.48741 at step 80, val_loss
   0.48833 / 0.48835) at 32.2 -> 41.6 samples/s.

Both figures are ratios measured in the same run on the same model, batches and thread count, with
the variants interleaved step by step in a rotating order (so load from other processes hits them
alike); each figure is the median over rounds of the per-round ratio.

1. samples/s of stage-2 training whose LLM states come from the Parquet cache (train.data, what
   train.loop does) against the same step preceded by ``LLMTextEncoder.encode`` of the batch's
   captions (the release runs the LLM inside every step). Goal: >= 10x with Gemma.
2. step time of the DeepSpeed engine (torch AdamW, grad clipping, one rank, ZeRO 0 and the
   configs' ZeRO 2) against a plain PyTorch loop (the same AdamW and clipping). Goal: within 15%.

The model is the demo's stage 2 (configs/train_stage1.yaml's adapter, configs/train_stage2.yaml's loss,
configs/base.yaml's UNet): adapter width 128, 231 queries, 1 encoder + 2 decoder layers, input
standardisation, length head (the UNet reads the predicted number of text tokens), pooled query;
UNet (32, 64, 64) at 16x16 with pooled conditioning.
Captions are the tiny world's (configs/world_test.yaml: six languages, 20% long); images are random
(the step's cost does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_world_captions(tmp: Path) -> list[str]:
    import pandas as pd

    from omnidiff.config import load_config
    from omnidiff.text import normalise_caption
    from omnidiff.world import WorldConfig, generate_world

    world = generate_world(load_config(WorldConfig, REPO / "configs" / "world_test.yaml", [f"out_dir={tmp / 'world'}"]))
    return sorted({normalise_caption(c) for c in pd.read_parquet(world / "pairs.parquet")["caption"]})


def build_caches(tmp: Path, llm, captions: list[str], image_shape=(3, 16, 16)):
    """LLM-states and pixel caches in the training format (omnidiff/contracts/cache.py), like the embed stage writes."""
    import numpy as np

    from embed_cache.writer import open_writer
    from omnidiff.contracts.cache import CacheStore, cache_dir, pixels_table, states_table
    from omnidiff.contracts.encoders import fingerprint, llm_inputs, pixels_inputs
    from omnidiff.contracts.keys import text_key

    keys = [text_key(c) for c in captions]
    t0 = time.perf_counter()
    states, mask = llm.encode(captions + [""])  # (N+1, T, D)
    embed_s = time.perf_counter() - t0
    values = [states[i, mask[i]].numpy() for i in range(len(captions) + 1)]
    inputs = llm_inputs(llm.fingerprint_inputs())
    llm_dir = cache_dir("llm", fingerprint(inputs), tmp / "cache")
    with open_writer(llm_dir, inputs) as writer:
        writer.set_value_shape((llm.hidden_size,))
        writer.write(states_table(keys + [text_key("")], values), unit=0)
    rng = np.random.default_rng(0)
    digests = [f"img{i:05d}" for i in range(len(captions))]
    p_inputs = pixels_inputs(image_shape[-1])
    pix_dir = cache_dir("pixels", fingerprint(p_inputs), tmp / "cache")
    with open_writer(pix_dir, p_inputs) as writer:
        writer.set_value_shape(image_shape)
        writer.write(pixels_table(digests, rng.uniform(-1, 1, (len(captions), *image_shape)).astype(np.float16)), 0)
    tokens = int(sum(int(m.sum()) for m in mask[:-1]))
    return CacheStore(llm_dir), CacheStore(pix_dir), keys, digests, values[-1], embed_s, tokens


def build_model(llm_dim: int, llm_stats, seed: int = 0):
    """The demo's stage-2 model: the adapter of configs/train_stage1.yaml (its options included) with
    input statistics from the cache, the base UNet shape, and stage 2's loss (v-prediction, Min-SNR)."""
    import torch
    from diffusers import DDPMScheduler

    from omnidiff.config import load_config
    from omnidiff.models.adapter import OmniAdapter
    from omnidiff.models.unet import build_unet
    from train.config import TrainConfig
    from train.losses import compute_diffusion_loss
    from train.model import StageModel

    a = load_config(TrainConfig, REPO / "configs" / "train_stage1.yaml").adapter
    stage2 = load_config(TrainConfig, REPO / "configs" / "train_stage2.yaml")
    torch.manual_seed(seed)
    adapter = OmniAdapter(llm_dim, a.width, 128, a.num_queries, a.encoder_layers, a.decoder_layers, a.heads, a.dropout,
                          input_norm=a.input_norm, length_head=a.length_head, pooled_query=a.pooled_query)
    if a.input_norm:
        adapter.set_input_stats(*(torch.from_numpy(v) for v in llm_stats))
    if adapter.length_head is not None:
        # A trained length head predicts each caption's CLIP token count; an untrained one predicts ~1
        # token, which would make the UNet's cross-attention (and so the cached step) unrealistically
        # cheap. Stand-in: predict the caption's LLM token count (its last input feature is log T),
        # about what the world's captions have in CLIP tokens (English 1:1, long captions over windows).
        with torch.no_grad():
            first, last = adapter.length_head[0], adapter.length_head[2]
            first.weight.zero_(), first.bias.zero_(), last.weight.zero_(), last.bias.zero_()
            first.weight[0, -1], last.weight[0, 0] = 1.0, 1.0  # log T -> GELU (~identity above 2) -> log count
        adapter.length_head.requires_grad_(False)  # as train.model freezes it in stages 2-3
    unet = build_unet(16, 3, 3, (32, 64, 64), cross_attention_dim=128, layers_per_block=1, attention_head_dim=8,
                      pooled_dim=128)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    return StageModel(adapter, unet, partial(compute_diffusion_loss, noise_scheduler=scheduler,
                                             min_snr_gamma=stage2.diffusion.min_snr_gamma))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", default="gemma", help="'gemma' (converted Gemma 3 270M), 'tiny', or an LLM folder")
    parser.add_argument("--batch", type=int, default=32, help="examples per step (one micro-batch)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    parser.add_argument("--online-steps", type=int, default=2, help="timed steps of the online-LLM variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every variant")
    parser.add_argument("--adapter", action="store_true", help="only 3.: the adapter's training body vs torch's modules")
    args = parser.parse_args(argv)
    if args.adapter:
        return adapter_main(args)

    import pandas as pd
    import torch

    import omnidiff  # noqa: F401
    from omnidiff.models.llm import LLMTextEncoder
    from omnidiff.models.llm_folders import build_tiny_llm, ensure_gemma
    from train.data import CachedBatches
    from train.engine import avoid_shm_op_build, deepspeed_config, dist_context

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="train-step-bench-"))
    if args.llm == "gemma":
        llm_path = ensure_gemma()
    elif args.llm == "tiny":
        llm_path = build_tiny_llm(tmp / "tiny-llm")
    else:
        llm_path = Path(args.llm)
    llm = LLMTextEncoder(llm_path, max_length=512)
    captions = build_world_captions(tmp)
    llm_store, pix_store, keys, digests, empty, embed_s, tokens = build_caches(tmp, llm, captions)
    print(f"LLM {llm.model_id} (hidden {llm.hidden_size}); {len(captions)} distinct captions, "
          f"{tokens / len(captions):.1f} tokens each on average; caching them once took {embed_s:.1f}s "
          f"({len(captions) / embed_s:.1f} captions/s); threads {args.threads}, batch {args.batch}", flush=True)

    examples = pd.DataFrame({"llm_key": keys, "pixel_key": digests, "lang": "x"})
    text_of = dict(zip(keys, captions, strict=True))
    batches = CachedBatches(examples, "diffusion", {"llm": llm_store, "pixels": pix_store}, seed=0,
                            caption_dropout=0.0, empty_states=empty)

    def batch_at(step: int) -> dict:
        return batches.batch(CachedBatches.positions(step, args.batch, 0, 1, args.batch, 0))

    def captions_at(step: int) -> list[str]:
        rows = batches.example_index(CachedBatches.positions(step, args.batch, 0, 1, args.batch, 0))
        return [text_of[examples["llm_key"].iloc[i]] for i in rows]

    from train.inputs import llm_state_stats

    base = build_model(llm.hidden_size, llm_state_stats(llm_store, keys))
    plain_model = copy.deepcopy(base)
    params = [p for p in plain_model.parameters() if p.requires_grad]
    plain_opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.03)

    def plain_step(batch: dict) -> None:
        loss, _ = plain_model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def online_step(step: int) -> None:
        batch = batch_at(step)  # pixels, noise, timesteps as in the cached run; the text goes through the LLM
        with torch.no_grad():
            states, mask = llm.encode(captions_at(step))  # (B, T, D), (B, T)
        batch["llm_states"], batch["llm_mask"] = states, mask
        plain_step(batch)

    import deepspeed

    from omnidiff.config import from_dict
    from train.config import TrainConfig

    avoid_shm_op_build()
    dist_context("local")
    engines = {}
    for zero in (0, 2):
        cfg = from_dict(TrainConfig, {"stage": 2, "name": "bench", "base_model": "-", "init_from": "-",
                                      "micro_batch_size": args.batch, "global_batch_size": args.batch,
                                      "optim": {"lr": 5e-4, "weight_decay": 0.03, "grad_clip": 1.0},
                                      "dist": {"launcher": "local", "zero_stage": zero}, "track": False,
                                      "registry": {"register": False}})
        model = copy.deepcopy(base)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                          config=deepspeed_config(cfg, 1, False))
        engines[zero] = engine

    def ds_step(zero: int, batch: dict) -> None:
        engine = engines[zero]
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()

    def timed(fn, *args) -> float:
        t0 = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t0

    # Every variant runs the same steps (same batches) in each round, so batch content cannot favour one.
    # The online variant runs only the first --online-steps of them (it is the slow one); its ratio is
    # taken against the cached variant on exactly those steps.
    variants = {
        "cached": lambda s, b: plain_step(batch_at(s)),  # batch built from the Parquet cache + step
        "online_llm": lambda s, b: online_step(s),  # the same, with the LLM encoding the captions first
        "plain_pytorch": lambda s, b: plain_step(b),  # prebuilt batch: the step alone
        "deepspeed_zero0": lambda s, b: ds_step(0, b),
        "deepspeed_zero2": lambda s, b: ds_step(2, b),
    }
    for fn in variants.values():  # warm-up: allocator, lazy inits, first-call overheads
        fn(0, batch_at(0))
    times: dict[str, list[float]] = {name: [] for name in variants}
    online_ratio, ds_ratio = [], {0: [], 2: []}
    names = list(variants)
    for r in range(args.rounds):
        steps = list(range(1 + r * args.steps, 1 + (r + 1) * args.steps))
        prebuilt = {s: batch_at(s) for s in steps}
        t = {name: {} for name in variants}
        for i, s in enumerate(steps):
            # every variant once per step, in a rotating order, so load spikes spread evenly over them
            for name in names[i % len(names):] + names[: i % len(names)]:
                if name == "online_llm" and i >= args.online_steps:
                    continue
                t[name][s] = timed(variants[name], s, prebuilt[s])
        for name in variants:
            times[name] += list(t[name].values())
        same = steps[: args.online_steps]
        online_ratio.append(sum(t["online_llm"][s] for s in same) / sum(t["cached"][s] for s in same))
        for zero in (0, 2):
            ds_ratio[zero].append(sum(t[f"deepspeed_zero{zero}"].values()) / sum(t["plain_pytorch"].values()))
        print(f"round {r + 1}/{args.rounds}: online/cached {online_ratio[-1]:.1f}x, "
              + ", ".join(f"ZeRO-{z}/plain {ds_ratio[z][-1]:.3f}" for z in (0, 2)), flush=True)

    print(f"\nper-step medians (batch {args.batch}, {args.threads} thread(s)):")
    for name in variants:
        med = statistics.median(times[name])
        print(f"  {name:<17} {med:7.3f} s/step  {args.batch / med:8.1f} samples/s  ({len(times[name])} steps)")
    speedup = statistics.median(online_ratio)
    print(f"\n1. cached vs online LLM ({llm.model_id}): {speedup:.1f}x samples/s, median of {args.rounds} rounds "
          f"(goal >= 10x) -> {'met' if speedup >= 10 else 'NOT met'}")
    for zero in (0, 2):
        ratio = statistics.median(ds_ratio[zero])
        print(f"2. DeepSpeed ZeRO-{zero} step / plain PyTorch step: {ratio:.3f} ({(ratio - 1) * 100:+.1f}%, goal within "
              f"15%) -> {'met' if ratio <= 1.15 else 'NOT met'}")
    return 0


def adapter_main(args) -> int:
    """3.: the stage-1 adapter (configs/train_stage1.yaml) trained through its stock modules vs its training body."""
    import copy

    import torch

    import omnidiff  # noqa: F401
    from omnidiff.config import load_config
    from omnidiff.models.adapter import OmniAdapter
    from omnidiff.models.llm import load_tokenizer
    from omnidiff.models.llm_folders import build_tiny_llm, ensure_gemma
    from train.config import TrainConfig

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="train-step-bench-"))
    llm_path = ensure_gemma() if args.llm == "gemma" else build_tiny_llm(tmp / "tiny-llm") if args.llm == "tiny" \
        else Path(args.llm)
    llm_dim = json_hidden_size(llm_path)
    tokenizer = load_tokenizer(llm_path)
    captions = build_world_captions(tmp)
    lengths = [max(1, len(ids)) for ids in tokenizer(captions, add_special_tokens=True)["input_ids"]]
    a = load_config(TrainConfig, REPO / "configs" / "train_stage1.yaml").adapter
    torch.manual_seed(0)
    fast = OmniAdapter(llm_dim, a.width, 128, a.num_queries, a.encoder_layers, a.decoder_layers, a.heads, a.dropout,
                       input_norm=a.input_norm, length_head=a.length_head, pooled_query=a.pooled_query).train()
    stock = copy.deepcopy(fast)
    stock._training_body = stock._stock_body  # this instance trains through torch's modules, as before
    micro = 16
    gen = torch.Generator().manual_seed(0)

    def batch(step: int):
        rows = torch.randperm(len(lengths), generator=gen)[:micro].tolist()
        n = torch.tensor([lengths[i] for i in rows])
        mask = torch.arange(int(n.max()))[None] < n[:, None]  # (B, T)
        return torch.randn(micro, mask.shape[1], llm_dim, generator=gen) * mask[..., None], mask

    def run(model, states, mask):
        model.zero_grad(set_to_none=True)
        tokens, pooled, log_count = model.forward_all(states, mask)
        (tokens.pow(2).mean() + pooled.pow(2).mean() + log_count.pow(2).mean()).backward()
        return tokens.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    states, mask = batch(0)
    (t_fast, g_fast), (t_stock, g_stock) = run(fast, states, mask), run(stock, states, mask)
    out_diff = float((t_fast - t_stock).abs().max())
    grad_diff = max(float((g_fast[k] - g_stock[k]).abs().max() / g_stock[k].abs().max().clamp_min(1e-12))
                    for k in g_stock)
    times = {"stock": [], "training_body": []}
    ratios = []
    for r in range(args.rounds):
        pair = {}
        for i in range(args.steps):
            states, mask = batch(i)
            for name in (("stock", "training_body") if (r + i) % 2 == 0 else ("training_body", "stock")):
                t0 = time.perf_counter()
                run(stock if name == "stock" else fast, states, mask)
                pair[name] = pair.get(name, 0.0) + time.perf_counter() - t0
                times[name].append(time.perf_counter() - t0)
        ratios.append(pair["training_body"] / pair["stock"])
        print(f"round {r + 1}/{args.rounds}: training body / stock {ratios[-1]:.3f}", flush=True)
    print(f"\nadapter forward + backward, micro-batch {micro}, {args.threads} thread(s), mean caption "
          f"{sum(lengths) / len(lengths):.1f} tokens:")
    for name, values in times.items():
        print(f"  {name:<14} {statistics.median(values) * 1000:7.1f} ms/step  ({len(values)} steps)")
    print(f"3. training body / stock modules: {statistics.median(ratios):.3f} (median of {args.rounds} rounds); "
          f"largest output difference {out_diff:.2e}, largest gradient difference {grad_diff:.2e} of its tensor's max")
    return 0


def json_hidden_size(llm_path: Path) -> int:
    import json

    config = json.loads((Path(llm_path) / "config.json").read_text())
    return int(config.get("text_config", config).get("hidden_size") or config["hidden_size"])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
