"""The training loop: one function every rank runs, top to bottom (STYLE.md: the loop stays visible).

``train_worker(job)`` is Ray Train's per-worker function (train.ray_job launches N of them with
``TorchTrainer``); ``dist.launcher: local`` runs the same function in the calling process as a
single rank. Each rank:

1. builds its batches from the cache (train.data; the LLM never runs here),
2. builds the stage's modules (adapter, plus the UNet for stages 2-3) and freezes what the config
   freezes,
3. wraps them in ``deepspeed.initialize`` (torch AdamW, ZeRO stage, grad clipping, warm-up),
4. resumes from the newest complete checkpoint (converting it to a universal checkpoint first when
   the worker count or ZeRO stage changed),
5. loops: micro-batches -> ``engine.backward`` -> ``engine.step``; EMA; loss line with rate and ETA
   and MLflow metrics on rank 0; a DeepSpeed checkpoint every N steps and at the end,
6. writes the final weights (EMA where kept) and ``result.json`` from rank 0; the driver exports.

A run is a function of (config, seed): data order, noise and dropout are seeded by the global
sample position (train.data), so a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

LATEST = "latest"
META_NAME = "omnidiff_meta.json"
UNIVERSAL_SUFFIX = "_universal"


# ----------------------------------------------------------------------------------- modules


class StageModel(nn.Module):
    """What the DeepSpeed engine wraps: the adapter (+ UNet) with the family's loss as ``forward``.

    Composition only: ``loss_fn(batch, self) -> (loss, metrics)`` is train.losses'
    ``compute_align_loss`` or ``compute_diffusion_loss`` with its settings bound.
    """

    def __init__(self, adapter: nn.Module, unet: nn.Module | None, loss_fn):
        super().__init__()
        self.adapter = adapter
        self.unet = unet
        self.loss_fn = loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(batch, self)

    def __getitem__(self, name: str) -> nn.Module:
        return getattr(self, name)


def unet_trainable(name: str, part: str) -> bool:
    """Whether UNet parameter ``name`` trains under ``train_unet=part``.

    ``attention``: every transformer block; ``cross_attention``: the blocks that read the text
    (``attn2``, cross-attention) and the pooled-text (class) embedding.
    """
    if part == "all":
        return True
    if part == "attention":
        return ".attentions." in name or name.startswith("class_embedding.")
    if part == "cross_attention":
        return ".attn2." in name or name.startswith("class_embedding.")
    return False


def build_stage_model(cfg, job: dict) -> StageModel:
    """The stage's modules, initialised as the config says, with frozen parts' ``requires_grad`` off."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from train.losses import compute_align_loss, compute_diffusion_loss

    torch.manual_seed(cfg.seed)  # adapter init is part of "a run is a function of (config, seed)"
    init_from = Path(job["init_from"]) if job.get("init_from") else None
    adapter = initial_adapter(cfg, job)
    adapter.requires_grad_(cfg.diffusion is None or cfg.diffusion.train_adapter)
    if adapter.length_head is not None and cfg.stage != 1:
        adapter.length_head.requires_grad_(False)  # stage 1 taught it; the UNet's mask stays what it learned
    if cfg.family == "align":
        return StageModel(adapter, None, partial(compute_align_loss, norm_weight=cfg.align.norm_weight,
                                                 length_weight=cfg.align.length_weight, match="set"))
    # Stage 3 continues the stage-2 UNet; stage 2 starts from the base model's.
    unet_root = init_from if (cfg.stage == 3 and init_from is not None) else Path(job["base_model"])
    unet = UNet2DConditionModel.from_pretrained(unet_root / "unet", use_safetensors=True)
    for name, p in unet.named_parameters():
        p.requires_grad_(unet_trainable(name, cfg.diffusion.train_unet))
    noise_scheduler = DDPMScheduler.from_pretrained(Path(job["base_model"]) / "scheduler")
    return StageModel(adapter, unet, partial(compute_diffusion_loss, noise_scheduler=noise_scheduler,
                                             min_snr_gamma=cfg.diffusion.min_snr_gamma))


def initial_adapter(cfg, job: dict):
    """The adapter a stage starts from: the parent export's (``init_from``), else a fresh one of
    ``cfg.adapter``'s shape whose input statistics (``input_norm``) come from the driver's cache scan."""
    from omnidiff.models.adapter import OmniAdapter

    init_from = Path(job["init_from"]) if job.get("init_from") else None
    if init_from is not None and (init_from / "adapter").is_dir():
        return OmniAdapter.from_pretrained(init_from / "adapter")
    a = cfg.adapter
    adapter = OmniAdapter(job["llm_dim"], a.width, job["out_dim"], a.num_queries, a.encoder_layers, a.decoder_layers,
                          a.heads, a.dropout, input_norm=a.input_norm, length_head=a.length_head,
                          pooled_query=a.pooled_query)
    if a.input_norm:
        if job.get("llm_stats") is None:
            raise ValueError("adapter.input_norm needs the LLM cache's per-dimension statistics (job['llm_stats'])")
        mean, std = job["llm_stats"]
        adapter.set_input_stats(torch.as_tensor(mean), torch.as_tensor(std))
    return adapter


def set_train_mode(model: StageModel, cfg) -> None:
    """Training mode where weights train; frozen parts stay in eval (no dropout noise from them)."""
    model.train()
    if cfg.diffusion is not None and not cfg.diffusion.train_adapter:
        model.adapter.eval()
    if model.unet is not None and cfg.diffusion.train_unet == "none":
        model.unet.eval()


# ----------------------------------------------------------------------------------- DeepSpeed


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warm-up, then constant / linear / cosine decay."""
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


# ----------------------------------------------------------------------------------- checkpoints


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest *complete* checkpoint tag (we write ``latest`` only after every rank has saved)."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag / META_NAME).is_file() else None


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((Path(ckpt_dir) / tag / META_NAME).read_text())


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(engine, ckpt_dir: Path, step: int, rank: int, world: int, cfg, client_state: dict) -> str:
    """DeepSpeed checkpoint of ``step``; ``latest`` moves only after all ranks finished writing.

    DeepSpeed itself writes ``latest`` from rank 0 before the closing barrier, i.e. possibly before
    another rank's ZeRO shard is on disk; a kill in that window would leave ``latest`` naming an
    incomplete checkpoint. So we save with ``save_latest=False`` (its closing barrier then means
    every shard is written) and move ``latest`` ourselves, atomically, with a metadata file beside it.
    """
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    tag = step_tag(step)
    # The marker ds_to_universal looks for: this checkpoint may be converted for another worker count.
    client_state = {**client_state,
                    UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if rank == 0:
        meta = {"step": step, "world_size": world, "zero_stage": cfg.dist.zero_stage, "tag": tag,
                "precision": cfg.dist.precision, "saved_at": time.time()}
        _atomic_write(Path(ckpt_dir) / tag / META_NAME, json.dumps(meta, indent=1))
        _atomic_write(Path(ckpt_dir) / LATEST, tag)
        _prune(Path(ckpt_dir), keep=cfg.checkpoint.keep)
    _barrier(world)
    return tag


def _prune(ckpt_dir: Path, keep: int) -> None:
    tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir() and not p.name.endswith(UNIVERSAL_SUFFIX))
    for old in tags[:-keep]:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        shutil.rmtree(ckpt_dir / (old + UNIVERSAL_SUFFIX), ignore_errors=True)


def prepare_resume(ckpt_dir: Path, cfg, rank: int, world: int) -> tuple[str | None, bool]:
    """``(tag to load, load_universal)``: the latest checkpoint, as a universal one when the layout changed.

    A ZeRO-1/2/3 checkpoint partitions the optimizer state by data-parallel rank, so DeepSpeed refuses
    it on another worker count. ``ds_to_universal`` rewrites it per parameter; DeepSpeed then
    re-partitions it for the new layout (``checkpoint.load_universal``). Rank 0 converts once, the
    other ranks wait at a barrier.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None, False
    meta = read_meta(ckpt_dir, tag)
    same_layout = meta["world_size"] == world and meta["zero_stage"] == cfg.dist.zero_stage
    if same_layout or (meta["zero_stage"] == 0 and cfg.dist.zero_stage == 0):
        return tag, False  # ZeRO-0 keeps the whole optimizer state in the model file: any worker count loads it
    if meta["zero_stage"] == 0:
        raise RuntimeError(
            f"checkpoint {ckpt_dir / tag} was saved with ZeRO stage 0 and cannot be converted to ZeRO "
            f"stage {cfg.dist.zero_stage}; resume with dist.zero_stage=0 (any worker count works)"
        )
    universal = tag + UNIVERSAL_SUFFIX
    if rank == 0 and not (Path(ckpt_dir) / universal / META_NAME).is_file():
        print(f"[train] checkpoint {tag} was saved by {meta['world_size']} worker(s) with ZeRO-{meta['zero_stage']}; "
              f"converting it to a universal checkpoint for {world} worker(s) with ZeRO-{cfg.dist.zero_stage}", flush=True)
        try:
            to_universal(Path(ckpt_dir) / tag, Path(ckpt_dir) / universal)
        except Exception as exc:  # DeepSpeed's converter raises bare asserts; say what to do instead
            raise RuntimeError(
                f"cannot resume {ckpt_dir / tag} (saved by {meta['world_size']} workers, ZeRO-{meta['zero_stage']}) "
                f"on {world} workers with ZeRO-{cfg.dist.zero_stage}: universal conversion failed ({exc}). "
                f"Resume with dist.num_workers={meta['world_size']} dist.zero_stage={meta['zero_stage']}"
            ) from exc
        _atomic_write(Path(ckpt_dir) / universal / META_NAME, json.dumps({**meta, "tag": universal}, indent=1))
    _barrier(world)
    return universal, True


def to_universal(src: Path, dst: Path) -> None:
    """``ds_to_universal`` in-process, single-threaded (2 cores, no process pools needed for small models)."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(dst, ignore_errors=True)
    args = Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=False)
    ds_to_universal.main(args)


LOCK_NAME = ".train.lock"
WORKERS_NAME = "workers.json"


def hold_checkpoint_lock(ckpt_dir: Path, cfg, wait_s: float = 120.0):
    """Rank 0 holds an exclusive ``flock`` on the checkpoint folder for the whole run.

    One training per folder: after a driver is killed, Ray needs a moment to kill its workers; a
    resumed run waits here until the old rank 0 is gone instead of writing beside it. The kernel
    drops the lock when its holder dies, so a crash never leaves the folder locked.
    """
    import fcntl

    fh = (Path(ckpt_dir) / LOCK_NAME).open("a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                fh.close()
                raise RuntimeError(f"checkpoint folder {ckpt_dir} is in use by another training run ({holder}) "
                                   f"for more than {wait_s:.0f}s; stop it or use another checkpoint.dir") from None
            time.sleep(1.0)
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} host {socket.gethostname()} run {cfg.name}\n")
    fh.flush()
    return fh


def _record_workers(ckpt_dir: Path, rank: int, world: int) -> None:
    """``workers.json``: which processes train this folder now (operators' ``kill``/``py-spy`` target)."""
    me = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname()}
    everyone = [me]
    if world > 1:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, me)
    if rank == 0:
        _atomic_write(Path(ckpt_dir) / WORKERS_NAME, json.dumps({"world_size": world, "workers": everyone,
                                                                 "started": time.time()}, indent=1))
    _barrier(world)


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------- weights


def full_state(engine, cfg) -> dict[str, torch.Tensor]:
    """The whole model's weights as CPU tensors (all ranks must call: ZeRO-3 gathers them)."""
    model = engine.module
    if cfg.dist.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def ema_update(ema: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ema:
                ema[name].mul_(decay).add_(p.detach().float(), alpha=1 - decay)


# ----------------------------------------------------------------------------------- worker


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


def train_worker(job: dict) -> None:
    """One rank of a training stage. ``job`` is built by train.ray_job (plain, picklable data)."""
    os.environ.update(job.get("env", {}))
    import omnidiff  # noqa: F401  (offline switches in a fresh Ray worker)
    from omnidiff.config import from_dict
    from train.config import TrainConfig

    cfg_dict = dict(job["config"])
    cfg_dict.pop("kind", None)
    cfg = from_dict(TrainConfig, cfg_dict)
    rank, world = dist_context(cfg.dist.launcher)
    # One intra-op thread per reserved CPU: more threads than cores makes every small op wait on
    # OpenMP barriers (measured here: 10x slower per op with 2 threads on a busy 2-core box).
    threads = torch.get_num_threads()
    if not cfg.dist.use_gpu:
        torch.set_num_threads(cfg.dist.cpus_per_worker)
    try:
        _train(cfg, job, rank, world)
    finally:
        torch.set_num_threads(threads)


def _train(cfg, job: dict, rank: int, world: int) -> None:
    avoid_shm_op_build()
    ckpt_dir = Path(job["checkpoint_dir"])
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    lock = hold_checkpoint_lock(ckpt_dir, cfg) if rank == 0 else None
    try:
        _record_workers(ckpt_dir, rank, world)
        _loop(cfg, job, rank, world, ckpt_dir)
    finally:
        if lock is not None:
            lock.close()  # closing the file releases the flock


def _loop(cfg, job: dict, rank: int, world: int, ckpt_dir: Path) -> None:
    import deepspeed
    import numpy as np
    import pandas as pd

    from omnidiff.contracts.cache import CacheStore
    from omnidiff.progress import Progress
    from train.data import CachedBatches

    # -- data: keys -> cached states (never the LLM)
    stores = {kind: CacheStore(path, max_cached_shards=1 << 16) for kind, path in job["caches"].items()}
    model = build_stage_model(cfg, job)
    batches = CachedBatches(
        pd.read_parquet(job["examples"]),
        cfg.family,
        stores,
        seed=cfg.seed,
        caption_dropout=cfg.diffusion.caption_dropout if cfg.diffusion else 0.0,
        empty_states=job["empty_states"],
        num_train_timesteps=(model.loss_fn.keywords["noise_scheduler"].config.num_train_timesteps
                             if model.loss_fn.keywords.get("noise_scheduler") is not None else 1000),
        image_pool=job.get("image_pool"),
    )

    val_batch = None
    if job.get("val_examples"):
        val_df = pd.read_parquet(job["val_examples"])
        val = CachedBatches(val_df, cfg.family, stores, seed=cfg.seed + 1, caption_dropout=0.0,
                            empty_states=job["empty_states"], num_train_timesteps=batches.num_train_timesteps,
                            image_pool=job.get("image_pool"))
        val_batch = val.batch(np.arange(len(val_df)))  # fixed examples, noise and timesteps: comparable values
    val_losses: dict[int, float] = {}

    # -- engine, resumed from the newest complete checkpoint
    load_tag, load_universal = prepare_resume(ckpt_dir, cfg, rank, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        config=deepspeed_config(cfg, world, load_universal),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, partial(lr_factor, warmup_steps=o.warmup_steps, max_steps=cfg.max_steps, schedule=o.schedule)
        ),
    )
    ema = ({n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
           if cfg.ema_decay > 0 else {})
    start_step = 0
    if load_tag is not None:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=load_tag)
        start_step = int(client["step"])
        if ema:
            ema = {k: v.float().clone() for k, v in client["ema"].items()}
        if rank == 0:
            print(f"[train] resumed from {ckpt_dir / load_tag} at step {start_step}", flush=True)

    tracker = _Tracker(job.get("mlflow_run_id")) if rank == 0 else None
    accum, micro, g_batch = cfg.grad_accum_steps, cfg.micro_batch_size, cfg.global_batch_size
    prompts = job.get("prompts") or []
    last_saved = start_step if load_tag is not None else -1
    window_loss, window_n, window_steps, window_metrics = 0.0, 0, 0, {}
    t_window = time.perf_counter()
    t_train, trained_samples = 0.0, 0
    loss_value = float("nan")

    if val_batch is not None and start_step == 0:
        val_losses[0] = validation_loss(engine, val_batch)
        if rank == 0:
            print(f"[train stage{cfg.stage}] step 0 val_loss {val_losses[0]:.5f}", flush=True)
            tracker.log({"val_loss": val_losses[0]}, 0)
    progress = Progress(f"train stage{cfg.stage}", total=cfg.max_steps - start_step, unit="step") if rank == 0 else None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        set_train_mode(model, cfg)
        for m in range(accum):
            positions = CachedBatches.positions(step, g_batch, rank, world, micro, m)
            batch = to_engine(batches.batch(positions), engine)
            # Dropout noise seeded by the micro-batch's first sample: same on resume, any worker count.
            torch.manual_seed(int(positions[0]) * 7919 + cfg.seed)
            loss, metrics = engine(batch)
            engine.backward(loss)
            engine.step()
            window_loss += float(loss.item())
            window_n += 1
            for k, v in metrics.items():
                window_metrics[k] = window_metrics.get(k, 0.0) + v
        if ema:
            ema_update(ema, model, cfg.ema_decay)
        t_train += time.perf_counter() - t0
        trained_samples += g_batch
        window_steps += 1
        done = step + 1
        if progress is not None:
            progress.update(1)

        if done % cfg.log_every == 0 or done == cfg.max_steps:
            # Mean over ranks and micro-batches since the last line (one small all-reduce).
            stats = torch.tensor([window_loss, float(window_n), *window_metrics.values()], dtype=torch.float64)
            if world > 1:
                torch.distributed.all_reduce(stats)
            loss_value = float(stats[0] / stats[1])
            extra = {k: float(v / stats[1]) for k, v in zip(window_metrics, stats[2:].tolist(), strict=True)}
            elapsed = time.perf_counter() - t_window
            rate = g_batch * window_steps / elapsed if elapsed > 0 else 0.0
            lr = engine.get_lr()[0]
            if rank == 0:
                eta = (cfg.max_steps - done) * elapsed / window_steps
                extras = " ".join(f"{k} {v:.4f}" for k, v in extra.items())
                print(f"[train stage{cfg.stage}] step {done}/{cfg.max_steps} loss {loss_value:.5f} {extras} "
                      f"lr {lr:.2e} {rate:.1f} samples/s eta {eta:.0f}s", flush=True)
                tracker.log({"loss": loss_value, "lr": lr, "samples_per_s": rate, **extra}, done)
            window_loss, window_n, window_steps, window_metrics, t_window = 0.0, 0, 0, {}, time.perf_counter()

        if done % cfg.checkpoint.every_steps == 0 or done == cfg.max_steps:
            save_checkpoint(engine, ckpt_dir, done, rank, world, cfg, {"step": done, "ema": ema})
            last_saved = done
            if val_batch is not None:
                val_losses[done] = validation_loss(engine, val_batch)
                if rank == 0:
                    print(f"[train stage{cfg.stage}] step {done} val_loss {val_losses[done]:.5f}", flush=True)
                    tracker.log({"val_loss": val_losses[done]}, done)
        if cfg.samples.every_steps and done % cfg.samples.every_steps == 0 and done < cfg.max_steps and prompts:
            state = full_state(engine, cfg)
            if rank == 0:
                _log_samples(cfg, job, state, ema, prompts, done, tracker)
            _barrier(world)

    if progress is not None:
        progress.emit(final=True)
    if last_saved != cfg.max_steps:  # resumed at the end already: nothing new to save
        save_checkpoint(engine, ckpt_dir, cfg.max_steps, rank, world, cfg, {"step": cfg.max_steps, "ema": ema})

    # -- final weights from rank 0 (EMA where kept) for the driver's export, samples, result
    state = full_state(engine, cfg)
    if rank == 0:
        adapter, unet = eval_modules(cfg, job, final_weights(state, ema))
        final_dir = Path(job["final_dir"])
        shutil.rmtree(final_dir, ignore_errors=True)
        adapter.save_pretrained(final_dir / "adapter")
        unet.save_pretrained(final_dir / "unet", safe_serialization=True)
        if prompts:
            _log_samples(cfg, job, state, ema, prompts, cfg.max_steps, tracker, modules=(adapter, unet))
        throughput = trained_samples / t_train if t_train > 0 else 0.0
        if tracker is not None:
            tracker.log({"train_samples_per_s": throughput}, cfg.max_steps)
        result = {"final_step": cfg.max_steps, "start_step": start_step, "loss": loss_value,
                  "samples_per_s": throughput, "final_dir": str(final_dir), "world_size": world,
                  "resumed_from": load_tag, "val_loss": val_losses}
        _atomic_write(Path(job["result_path"]), json.dumps(result, indent=1))
    _barrier(world)
    if cfg.dist.launcher == "ray":
        import ray.train

        ray.train.report({"step": cfg.max_steps, "loss": loss_value})
    # launcher local: the one-rank process group stays up; DeepSpeed keeps module-level groups bound
    # to it, so the next local run in this process reuses it instead of re-initialising.


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


def final_weights(state: dict[str, torch.Tensor], ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights to export or sample with: the EMA of trained parameters where kept, else the raw ones."""
    return {**state, **{k: v for k, v in ema.items()}}


def eval_modules(cfg, job: dict, weights: dict[str, torch.Tensor]):
    """Fresh ``(adapter, unet)`` holding ``weights`` for sampling / export, apart from the engine's modules.

    Stage 1 has no UNet in training: the base model's UNet is used (the stage-1 export pairs the
    aligned adapter with the unchanged base UNet).
    """
    from diffusers import UNet2DConditionModel

    init_from = Path(job["init_from"]) if job.get("init_from") else None
    adapter = initial_adapter(cfg, job)
    adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in weights.items() if k.startswith("adapter.")})
    unet_root = init_from if (cfg.stage == 3 and init_from is not None) else Path(job["base_model"])
    unet = UNet2DConditionModel.from_pretrained(unet_root / "unet", use_safetensors=True)
    unet_weights = {k.removeprefix("unet."): v for k, v in weights.items() if k.startswith("unet.")}
    if unet_weights:
        unet.load_state_dict(unet_weights)
    return adapter.eval(), unet.eval()


def _log_samples(cfg, job, state, ema, prompts, step, tracker, modules=None) -> None:
    import numpy as np

    from train.samples import grid_figure, prompt_label, sample_images

    adapter, unet = modules or eval_modules(cfg, job, final_weights(state, ema))
    images = sample_images(
        adapter, unet, job["sampling_scheduler"], [np.asarray(p["states"]) for p in prompts], job["empty_states"],
        steps=cfg.samples.steps, guidance_scale=cfg.samples.guidance_scale, seed=cfg.samples.seed,
    )
    labels = [prompt_label(p["prompt"], p["lang"], p["group"], i) for i, p in enumerate(prompts)]
    fig = grid_figure(images, labels, f"{cfg.name} stage {cfg.stage}, step {step}")
    if tracker is not None:
        tracker.figure(fig, f"samples/step_{step:06d}.png")
        tracker.json([{"index": i, "lang": p["lang"], "group": p["group"], "prompt": p["prompt"]}
                      for i, p in enumerate(prompts)], f"samples/step_{step:06d}.json")
    import matplotlib.pyplot as plt

    plt.close(fig)


class _Tracker:
    """Rank 0's MLflow writer into the driver's run (``MlflowClient``: no active-run state in the worker)."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self.client = None
        if run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def figure(self, fig, artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_figure(self.run_id, fig, artifact_file)

    def json(self, obj, artifact_file: str) -> None:
        if self.client is not None:
            self.client.log_dict(self.run_id, obj, artifact_file)
