"""Stage-2 step throughput on one CUDA GPU: an SDXL-shaped UNet, DeepSpeed bf16 ZeRO-2 against plain fp32 PyTorch.

    .venv/bin/python benchmarks/gpu_throughput.py                  # what benchmarks/gpu_check.sh runs
    .venv/bin/python benchmarks/gpu_throughput.py --side 64 --batch 16 --steps 10

The UNet has SDXL's layout (three levels, transformer depth growing with depth, ``text_time`` added
conditioning: pooled text embedding plus six time ids, cross-attention width 2048) at a reduced width so
the check stays short. Each step: noise a latent batch, predict the noise, MSE loss, backward, AdamW step
with gradient clipping (what train.engine configures). Variants, interleaved round by round on the same
batches: (a) plain PyTorch fp32 with torch AdamW (the baseline), (b) the DeepSpeed engine in bf16 with
ZeRO stage 2 (configs/gpu/train_stage2_sdxl.yaml's ``dist``). Printed: steps/s and samples/s of each,
the median per-round ratio (b)/(a), and peak GPU memory.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import sys
import time


def sdxl_shaped_unet(width: int, cross: int, pooled: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 4), attention_head_dim=(5, 10, 20), cross_attention_dim=cross,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=pooled + 6 * 256)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=160, help="first level's channels (SDXL: 320)")
    parser.add_argument("--side", type=int, default=64, help="latent side (SDXL at 1024 px: 128)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA GPU (torch.cuda.is_available() is False); nothing measured", file=sys.stderr)
        return 2
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    torch.manual_seed(0)
    cross, pooled = 2048, 1280
    base = sdxl_shaped_unet(args.width, cross, pooled)
    params = sum(p.numel() for p in base.parameters())

    plain = copy.deepcopy(base).to(dev).train()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-5, weight_decay=0.03)
    ds_config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
                 "gradient_clipping": 1.0, "bf16": {"enabled": True},
                 "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    ds_model = copy.deepcopy(base)
    ds_opt = torch.optim.AdamW(ds_model.parameters(), lr=1e-5, weight_decay=0.03)
    engine, *_ = deepspeed.initialize(model=ds_model, optimizer=ds_opt, config=ds_config)
    del base

    g = torch.Generator(device=dev).manual_seed(0)

    def batch(dtype):
        b, s = args.batch, args.side
        x = torch.randn(b, 4, s, s, device=dev, generator=g)
        t = torch.randint(0, 1000, (b,), device=dev, generator=g)
        states = torch.randn(b, args.tokens, cross, device=dev, generator=g)
        text = torch.randn(b, pooled, device=dev, generator=g)
        ids = torch.tensor([8 * s, 8 * s, 0, 0, 8 * s, 8 * s], device=dev, dtype=torch.float32).repeat(b, 1)
        cast = [v.to(dtype) for v in (x, states, text, ids)]
        return cast[0], t, cast[1], {"text_embeds": cast[2], "time_ids": cast[3]}

    def plain_step():
        x, t, states, added = batch(torch.float32)
        noise = torch.randn_like(x)
        loss = torch.nn.functional.mse_loss(plain(x + noise, t, states, added_cond_kwargs=added).sample, noise)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        plain_opt.step()
        return loss

    def ds_step():
        x, t, states, added = batch(torch.bfloat16)
        noise = torch.randn_like(x)
        out = engine(x + noise, t, states, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(out.float(), noise.float())
        engine.backward(loss)
        engine.step()
        return loss

    variants = {"plain fp32": plain_step, "deepspeed bf16 zero2": ds_step}
    for step in variants.values():  # warm-up: kernels, allocator, optimizer state
        for _ in range(2):
            loss = step()
        assert torch.isfinite(loss), loss
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = variants[name]()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / args.steps)
            assert torch.isfinite(loss), f"{name}: loss {loss}"
    print(f"gpu: {torch.cuda.get_device_name(dev)}; SDXL-shaped UNet {params / 1e6:.0f}M params, "
          f"latents {args.side}x{args.side}, batch {args.batch}, {args.rounds} rounds x {args.steps} steps")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:22s} {1 / med:7.2f} steps/s  {args.batch / med:8.1f} samples/s")
    ratios = [p / d for p, d in zip(times["plain fp32"], times["deepspeed bf16 zero2"], strict=True)]
    print(f"  speed-up bf16 ZeRO-2 / fp32 (median per-round ratio): {statistics.median(ratios):.2f}x")
    print(f"  peak GPU memory: {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
