"""The DeepSpeed engine of a training stage: its config, the LR schedule, the process group, EMA.

Everything here is per rank and stateless apart from the engine itself; train.loop calls it.
"""

from __future__ import annotations

import math
import os
import socket
from functools import partial
from typing import Any

import torch
from torch import nn


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warm-up, then constant / linear / cosine decay.

    Not diffusers' ``get_scheduler``: its warm-up is ``step / warmup`` (0 at the first step, so the
    first step is lost) where this one is ``(step + 1) / warmup``; after warm-up the decays are the
    same (tests/test_train.py checks both facts).
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg, world_size: int, load_universal: bool) -> dict:
    """The DeepSpeed config of a stage (https://www.deepspeed.ai/docs/config-json/)."""
    o = cfg.optim
    ds: dict[str, Any] = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.global_batch_size // (cfg.micro_batch_size * world_size),
        "gradient_clipping": o.grad_clip,
        # torch AdamW: DeepSpeed's FusedAdam / cpu_adam compile for minutes on first use (NOTES.md).
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": True},
        },
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.dist.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.dist.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


def init_engine(model: nn.Module, cfg, world: int, load_universal: bool):
    """``deepspeed.initialize`` over the trainable parameters, with the stage's AdamW and LR schedule."""
    import deepspeed

    o = cfg.optim
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, cfg),
        config=deepspeed_config(cfg, world, load_universal),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, partial(lr_factor, warmup_steps=o.warmup_steps, max_steps=cfg.max_steps, schedule=o.schedule)
        ),
    )
    return engine


def parameter_groups(model: nn.Module, cfg) -> list:
    """The trainable parameters for the optimizer: one list, or (``diffusion.adapter_lr_scale`` < 1) two AdamW
    param groups, the adapter's at ``optim.lr`` x the scale and the rest at ``optim.lr``. The LR schedule
    multiplies each group's own rate, so the ratio holds at every step."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    scale = cfg.diffusion.adapter_lr_scale if cfg.diffusion is not None else 1.0
    if scale == 1.0:
        return [p for _, p in trainable]
    adapter = [p for name, p in trainable if name.startswith("adapter.")]
    rest = [p for name, p in trainable if not name.startswith("adapter.")]
    groups = [{"params": rest, "lr": cfg.optim.lr}] if rest else []
    if adapter:
        groups.append({"params": adapter, "lr": cfg.optim.lr * scale})
    return groups


def avoid_shm_op_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op at ``init_distributed``.

    DeepSpeed's TorchBackend builds ``deepspeed_shm_comm`` whenever the op probes as compatible (2-3
    minutes of C++ compilation with an empty extension cache, NOTES.md). The op only serves
    ``inference_all_reduce``; training collectives go through torch.distributed (gloo / nccl) either
    way. DeepSpeed keeps its probe results in one module-level dict and consults it before building,
    so marking the op incompatible there skips the build and nothing else.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def dist_context(launcher: str) -> tuple[int, int]:
    """``(rank, world size)``: from Ray Train's context, or a one-rank rendezvous in this process (``local``)."""
    if launcher == "ray":
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    # One rank in this process: torch.distributed still needs a rendezvous address.
    if torch.distributed.is_initialized():
        return 0, 1  # an earlier local run in this process set it up
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    return 0, 1


def to_engine(batch: dict, engine) -> dict:
    """Batch tensors on the engine's device; floating ones in its compute dtype (bf16/fp16 when enabled)."""
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
    out = {}
    for key, value in batch.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.to(engine.device)
    return out


def validation_loss(engine, batch: dict) -> float:
    """Loss of the fixed validation batch under the current weights (every rank calls: ZeRO-3 gathers)."""
    model = engine.module
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss, _ = model(to_engine(batch, engine))
    model.train(was_training)
    return float(loss.item())


def full_state(engine, cfg) -> dict[str, torch.Tensor]:
    """The whole model's weights as CPU tensors (all ranks must call: ZeRO-3 gathers them)."""
    model = engine.module
    if cfg.dist.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


# EMA: a float32 copy of every trained parameter, updated after each optimizer step. Not diffusers'
# EMAModel: it always warms its decay up ((1 + t) / (10 + t), and 0 at the first update) where ours is
# constant from the start (matching it needs update_after_step=-1 and min_decay=decay, i.e. relying on
# get_decay's internals), and it keeps its copy in the parameters' dtype (bf16 under DeepSpeed bf16).
# ZeRO is no obstacle at stages <= 2 (whole parameters on every rank; the config refuses EMA with ZeRO-3).


def ema_init(model: nn.Module, decay: float) -> dict[str, torch.Tensor]:
    """The EMA's starting point: float32 copies of the trained parameters (``{}`` when ``decay`` is 0)."""
    if decay <= 0:
        return {}
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def ema_update(ema: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * param`` for every parameter the EMA keeps."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ema:
                ema[name].mul_(decay).add_(p.detach().float(), alpha=1 - decay)


def final_weights(state: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights to export or sample with: the EMA of trained parameters where kept, else the raw ones."""
    return {**state, **{k: v for k, v in ema.items()}}
