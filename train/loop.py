"""The training loop: one function every rank runs, top to bottom (STYLE.md: the loop stays visible).

    omnidiff train --config configs/train_stage1.yaml dist.num_workers=2   # train.launch runs this per rank

``train_worker(job)`` runs one rank of a stage described by a ``TrainJob`` (train.job). Ray Train
starts N of them (train.launch); ``dist.launcher: local`` runs one in the calling process. Each rank:

1. builds its batches from the cache (train.data; the LLM never runs here),
2. builds the stage's modules (train.model: adapter, plus the UNet for stages 2-3), frozen as the
   config says,
3. wraps them in DeepSpeed (train.engine: torch AdamW, ZeRO stage, grad clipping, warm-up),
4. resumes from the newest complete checkpoint (train.checkpoint; converted to a universal
   checkpoint first when the worker count or ZeRO stage changed),
5. loops: micro-batches -> ``engine.backward`` -> ``engine.step``; EMA; a loss line with rate and
   ETA and MLflow metrics on rank 0; a checkpoint (and the validation loss) every N steps and at the end,
6. writes the final weights (EMA where kept) and ``result.json`` from rank 0; the driver exports.

A run is a function of (config, seed): data order, noise and dropout are seeded by the global
sample position (train.data), so a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from train.job import TrainJob


def train_worker(job: TrainJob) -> None:
    """One rank of a training stage: the environment, the process group, the folder's lock, then :func:`train`."""
    os.environ.update(job.env)
    import omnidiff  # noqa: F401  (offline switches in a fresh Ray worker)
    from train.checkpoint import hold_checkpoint_lock, record_workers
    from train.engine import avoid_shm_op_build, dist_context

    cfg = job.config
    rank, world = dist_context(cfg.dist.launcher)
    # One intra-op thread per reserved CPU: more threads than cores makes every small op wait on
    # OpenMP barriers (measured here: 10x slower per op with 2 threads on a busy 2-core box).
    threads = torch.get_num_threads()
    if not cfg.dist.use_gpu:
        torch.set_num_threads(cfg.dist.cpus_per_worker)
    avoid_shm_op_build()
    ckpt_dir = Path(job.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    lock = hold_checkpoint_lock(ckpt_dir, cfg) if rank == 0 else None
    try:
        record_workers(ckpt_dir, rank, world, cfg.name)
        train(job, rank, world)
    finally:
        if lock is not None:
            lock.release()
        torch.set_num_threads(threads)


def train(job: TrainJob, rank: int, world: int) -> None:
    """The loop of one rank (steps 1-6 of the module docstring)."""
    import numpy as np

    from omnidiff.contracts.cache import CacheStore
    from omnidiff.contracts.io import atomic_write
    from omnidiff.progress import Progress
    from train.checkpoint import barrier, prepare_resume, publish_dir, save_checkpoint
    from train.data import CachedBatches
    from train.engine import (
        ema_init,
        ema_update,
        final_weights,
        full_state,
        init_engine,
        to_engine,
        validation_loss,
    )
    from train.lineage import Tracker
    from train.model import build_modules, build_stage_model, save_modules, set_train_mode
    from train.samples import log_samples

    cfg, ckpt_dir = job.config, Path(job.checkpoint_dir)
    remote = job.remote()  # the checkpoint prefix on object storage, or None (train/checkpoint.py)

    # -- 1-2. data (keys -> cached states, never the LLM) and modules
    # Each rank keeps (shard, row) int32 pairs per example and at most data.max_resident_shards decoded
    # shards per cache; a batch reads only its own positions' rows (train.data, issue 17).
    resident = cfg.data.max_resident_shards
    stores = {kind: CacheStore(path, max_cached_shards=resident, storage=job.storage)
              for kind, path in job.caches.items()}
    examples, val_examples = (_local_examples(job, ckpt_dir, rank, path) for path in (job.examples, job.val_examples))
    model = build_stage_model(cfg, job)
    noise_scheduler = model.loss_fn.keywords.get("noise_scheduler")
    timesteps = noise_scheduler.config.num_train_timesteps if noise_scheduler is not None else 1000
    batches = CachedBatches(examples, cfg.family, stores, seed=cfg.seed,
                            caption_dropout=cfg.diffusion.caption_dropout if cfg.diffusion else 0.0,
                            empty_states=job.empty_states, num_train_timesteps=timesteps,
                            max_resident_shards=resident, order_block_rows=cfg.data.order_block_rows,
                            order_window_rows=cfg.data.order_window_rows, order_lanes=cfg.data.order_lanes,
                            micro_by_length=cfg.data.micro_by_length)
    val_batch = None
    if val_examples:
        val = CachedBatches(val_examples, cfg.family, stores, seed=cfg.seed + 1, caption_dropout=0.0,
                            empty_states=job.empty_states, num_train_timesteps=timesteps,
                            max_resident_shards=resident)
        val_batch = val.batch(np.arange(len(val)))  # fixed examples, noise and timesteps: comparable values
    val_losses: dict[int, float] = {}

    # -- 3-4. engine, resumed from the newest complete checkpoint
    load_tag, load_universal = prepare_resume(ckpt_dir, cfg, rank, world, remote)
    engine = init_engine(model, cfg, world, load_universal)
    ema = ema_init(model, cfg.ema_decay)  # {name: float32 tensor} of trained parameters, {} when off
    start_step = 0
    if load_tag is not None:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=load_tag)
        start_step = int(client["step"])
        batches.check_resume(client.get("data"), start_step, cfg.global_batch_size)
        if ema:
            ema = {k: v.float().clone() for k, v in client["ema"].items()}
        if rank == 0:
            print(f"[train] resumed from {ckpt_dir / load_tag} at step {start_step}", flush=True)

    tracker = Tracker(job.mlflow_run_id) if rank == 0 else None
    accum, micro, g_batch = cfg.grad_accum_steps, cfg.micro_batch_size, cfg.global_batch_size
    last_saved = start_step if load_tag is not None else -1
    window_loss, window_n, window_steps, window_metrics = 0.0, 0, 0, {}
    t_window = time.perf_counter()
    t_train, trained_samples = 0.0, 0
    loss_value = float("nan")

    def log_validation(step: int) -> None:
        val_losses[step] = validation_loss(engine, val_batch)  # every rank: ZeRO-3 gathers
        if rank == 0:
            print(f"[train stage{cfg.stage}] step {step} val_loss {val_losses[step]:.5f}", flush=True)
            tracker.log({"val_loss": val_losses[step]}, step)

    if val_batch is not None and start_step == 0:
        log_validation(0)

    # -- 5. the loop: one optimizer step = accum micro-batches per rank = g_batch examples overall
    progress = Progress(f"train stage{cfg.stage}", total=cfg.max_steps - start_step, unit="step") if rank == 0 else None
    # Read-ahead: the row groups of the next data.prefetch_batches micro-batches decode on a background thread
    # while the model computes (micro-batch i of the run: step i // accum, micro-step i % accum).
    ahead = cfg.data.prefetch_batches if cfg.data.prefetch else 0

    def read_ahead(index: int) -> None:
        if index < cfg.max_steps * accum:
            batches.prefetch(batches.micro_positions(index // accum, g_batch, rank, world, micro, index % accum))

    for index in range(start_step * accum, start_step * accum + ahead):
        read_ahead(index)
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        set_train_mode(model, cfg)
        for m in range(accum):
            positions = batches.micro_positions(step, g_batch, rank, world, micro, m)  # (micro,) global sample ids
            batch = to_engine(batches.batch(positions), engine)  # llm_states (micro, T, Dl), llm_mask, targets...
            if ahead:  # its row groups decode while this one and the ones between compute
                read_ahead(step * accum + m + ahead)
            # Dropout noise seeded by the micro-batch's first sample: same on resume, any worker count.
            torch.manual_seed(int(positions[0]) * 7919 + cfg.seed)
            loss, metrics = engine(batch)  # scalar loss, {name: float}
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer (and LR) only at the accumulation boundary
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
            save_checkpoint(engine, ckpt_dir, done, rank, world, cfg,
                            {"step": done, "ema": ema, "data": batches.position_state(done, g_batch)}, remote)
            last_saved = done
            if val_batch is not None:
                log_validation(done)
        if cfg.samples.every_steps and done % cfg.samples.every_steps == 0 and done < cfg.max_steps and job.prompts:
            state = full_state(engine, cfg)  # every rank: ZeRO-3 gathers
            # every rank draws its share on its own device; rank 0 gathers and logs (train.samples)
            log_samples(cfg, job, state, ema, done, tracker, rank=rank, world=world, device=engine.device)

    if progress is not None:
        progress.emit(final=True)
    batches.close()  # the prefetch thread and the shard files
    if last_saved != cfg.max_steps:  # resumed at the end already: nothing new to save
        save_checkpoint(engine, ckpt_dir, cfg.max_steps, rank, world, cfg,
                        {"step": cfg.max_steps, "ema": ema, "data": batches.position_state(cfg.max_steps, g_batch)},
                        remote)

    # -- 6. final weights from rank 0 (EMA where kept) for the driver's export, samples, result
    state = full_state(engine, cfg)
    adapter, unet = build_modules(cfg, job, final_weights(state, ema))
    if job.prompts:  # every rank draws its share (train.samples), before rank 0 writes the weights
        log_samples(cfg, job, state, ema, cfg.max_steps, tracker, modules=(adapter, unet), rank=rank, world=world,
                    device=engine.device)
    if rank == 0:
        final_dir = Path(job.final_dir)
        shutil.rmtree(final_dir, ignore_errors=True)
        save_modules(final_dir, adapter, unet)
        throughput = trained_samples / t_train if t_train > 0 else 0.0
        tracker.log({"train_samples_per_s": throughput}, cfg.max_steps)
        result = {"final_step": cfg.max_steps, "start_step": start_step, "loss": loss_value,
                  "samples_per_s": throughput, "final_dir": str(final_dir), "world_size": world,
                  "resumed_from": load_tag, "val_loss": val_losses}
        atomic_write(Path(job.result_path), json.dumps(result, indent=1))
        if remote is not None:  # the final weights, then the result (the run's last word) on the prefix
            publish_dir(final_dir, remote, "final")
            remote.write_bytes("result.json", json.dumps(result, indent=1).encode())
    barrier(world)
    if cfg.dist.launcher == "ray":
        import ray.train

        ray.train.report({"step": cfg.max_steps, "loss": loss_value})
    # launcher local: the one-rank process group stays up; DeepSpeed keeps module-level groups bound
    # to it, so the next local run in this process reuses it instead of re-initialising.


def _local_examples(job: TrainJob, ckpt_dir: Path, rank: int, path: str | None) -> str | None:
    """An example table on the checkpoint prefix, copied for this rank (the ranks read Parquet files)."""
    from omnidiff.contracts.storage import is_remote, location_name, open_folder

    if path is None or not is_remote(path):
        return path
    name = location_name(path)
    local = ckpt_dir / f".{name}-rank{rank}"
    open_folder(path.rsplit("/", 1)[0], job.storage).download(name, local)
    return str(local)
