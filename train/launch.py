"""The driver of a training stage: resolve and check inputs, run the workers, export, register.

    omnidiff train --config configs/train_stage1.yaml dist.num_workers=2

``run(cfg)``:

1. resolves and checks what the stage reads (train.inputs: base model, parent export, snapshot,
   caches, examples, sample prompts);
2. checks that an existing checkpoint folder belongs to the same training (train.identity), so a
   resume can never continue someone else's run;
3. opens an MLflow run (resolved config, inputs, lineage: train.lineage) and launches
   ``train.loop.train_worker`` on a typed ``TrainJob`` (train.job) as a Ray Train ``TorchTrainer``
   job of N workers (or in-process for ``dist.launcher: local``);
4. exports the pipeline folder (train.export) and registers it under the alias ``candidate`` with
   lineage tags (train.registry).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from omnidiff.env import subdir
from train.config import TrainConfig
from train.identity import check_checkpoint_folder, identity
from train.inputs import TrainingError, resolve_inputs
from train.job import TrainJob, build_job
from train.lineage import lineage, log_curves, log_inputs


def launch(cfg: TrainConfig, job: TrainJob, stale_ray_jobs: tuple[str, ...] = ()) -> None:
    """Run ``train_worker`` on every rank: a Ray Train job, or this process for ``dist.launcher: local``.

    ``stale_ray_jobs``: Ray jobs of killed runs of this checkpoint folder; what they left running
    (Ray Train's detached PlacementGroupCleaner) is stopped first (omnidiff/ray_orphans.py).
    """
    from train.loop import train_worker

    if cfg.dist.launcher == "local":
        train_worker(job)
        return
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from omnidiff import ray_orphans, tracking
    from omnidiff.stack import ensure_ray

    # Ray Train 2.x also routes workers' print() through its logger, so every progress line would
    # reach the driver twice; the plain stdout stream is enough.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ensure_ray()
    ckpt_dir = Path(job.checkpoint_dir)
    job_id = ray_orphans.current_job_id()
    stopped = ray_orphans.stop_orphans([j for j in stale_ray_jobs if j != job_id])  # never this driver's own
    if stopped:
        print(f"[train] stopped {len(stopped)} Ray actor(s) left by killed runs: "
              + ", ".join(f"{a['class']} of job {a['job_id']}" + (f" ({a['skipped']})" if a.get("skipped") else "")
                          for a in stopped), flush=True)
    tracking.update_claim(job.checkpoint_url or ckpt_dir, job.mlflow_run_id, settings=job.storage, ray_job_id=job_id)
    done = None
    if os.environ.get("RAY_ADDRESS"):  # a cluster that outlives this driver: watch for our orphans
        done = ckpt_dir / f".launch-{os.getpid()}-{time.time_ns()}.done"
        ray_orphans.start_watcher(job_id, done, ckpt_dir / "ray_watch.log")
    resources = {"CPU": cfg.dist.cpus_per_worker, **({"GPU": 1} if cfg.dist.use_gpu else {})}
    trainer = TorchTrainer(
        ray_train_worker,
        train_loop_config={"job": job},  # Ray Train takes a dict
        scaling_config=ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=cfg.dist.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(subdir("ray_train")),
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps the workers' tracebacks; keep them, name the stage
        _ended(done)  # Ray Train stopped its controller's helpers itself
        raise TrainingError(f"training workers of {cfg.name!r} (stage {cfg.stage}) failed: {exc}") from exc
    _ended(done)


def _ended(done: Path | None) -> None:
    """Tell the orphan watcher this launch ended cleanly (it exits without touching Ray)."""
    if done is not None:
        done.touch()


def ray_train_worker(config: dict) -> None:
    """Ray Train's per-worker function: ``train.loop.train_worker`` on the job in its config dict."""
    from train.loop import train_worker

    train_worker(config["job"])


def run(cfg: TrainConfig) -> dict:
    """Train one stage end to end; returns ``{export_dir, run_id, model_version, final_step, loss, ...}``."""
    import contextlib

    from omnidiff import tracking
    from omnidiff.contracts.storage import is_remote, open_folder, publish_folder
    from train.checkpoint import fetch_dir, local_dir

    settings = cfg.storage.s3.pinned()  # the driver's endpoint and credentials, handed to every rank
    inputs = resolve_inputs(cfg, settings)
    from train.registry import model_name_for

    model_name = model_name_for(cfg, inputs.snapshot.name)  # registry.model_name, or the run's own data's
    location = cfg.storage.under(cfg.checkpoint.dir, "checkpoints", cfg.name) or subdir("checkpoints") / cfg.name
    remote = open_folder(location, settings) if is_remote(location) else None
    ckpt_dir = local_dir(location)  # on object storage: this machine's work folder (train/checkpoint.py)
    if remote is not None:
        remote.ensure()
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume_tag = check_checkpoint_folder(cfg, ckpt_dir, identity(cfg, inputs), remote)
    export_location = cfg.storage.under(cfg.registry.export_dir, "exports", cfg.name) or subdir("exports") / cfg.name
    # An export to object storage is written locally first (a cache), then published with its manifest last.
    export_dir = (subdir("export_cache") / location_key(export_location) if is_remote(export_location)
                  else Path(export_location))
    result_path = ckpt_dir / "result.json"
    result_path.unlink(missing_ok=True)
    if remote is not None:
        remote.delete("result.json")

    tags = {"train.name": cfg.name, "resumed_from": resume_tag or ""}
    context = (tracking.start_run(f"train-stage{cfg.stage}", config=cfg, run_name=cfg.name, tags=tags)
               if cfg.track else contextlib.nullcontext())
    with context as mlrun:
        run_id = mlrun.info.run_id if mlrun is not None else None
        previous = tracking.claim_folder(remote.url if remote else ckpt_dir, run_id, settings=settings)
        takeover = take_over(ckpt_dir, resume_tag, previous, run_id, remote)
        lin = lineage(cfg, inputs, run_id)
        if run_id:
            log_inputs(cfg, inputs, lin)
        print(f"[train] stage {cfg.stage} '{cfg.name}': {len(inputs.examples)} examples, "
              f"{cfg.dist.num_workers} worker(s), checkpoints in {remote.url if remote else ckpt_dir}"
              + (f", {takeover['adopted']}" if takeover["adopted"] else ""), flush=True)
        t0 = time.perf_counter()
        stale = tuple(j for j in [(previous or {}).get("ray_job_id")] if j and not tracking.record_alive(previous))
        launch(cfg, build_job(cfg, inputs, ckpt_dir, run_id, remote.url if remote else None, settings),
               stale_ray_jobs=stale)
        wall = time.perf_counter() - t0
        if remote is not None:  # the ranks may have run elsewhere: their result and weights come from the prefix
            if not remote.exists("result.json"):
                raise TrainingError(f"training of {cfg.name!r} ended without a result ({remote.url_of('result.json')} "
                                    "missing)")
            result = json.loads(remote.read_bytes("result.json"))
            result["final_dir"] = str(fetch_dir(remote, "final", ckpt_dir / "final"))
        else:
            if not result_path.is_file():
                raise TrainingError(f"training of {cfg.name!r} ended without a result ({result_path} missing)")
            result = json.loads(result_path.read_text())

        from omnidiff.models.llm import LLMTextEncoder
        from train.export import export_card, export_pipeline

        llm = LLMTextEncoder(inputs.llm_path, layer=cfg.llm.layer, max_length=cfg.llm.max_length, dtype=cfg.llm.dtype)
        export_pipeline(export_dir, Path(result["final_dir"]), inputs.base_model, llm, lin, cfg.registry.copy_llm,
                        card=export_card(inputs.prompts, inputs.base_model))
        del llm
        if is_remote(export_location):
            published = publish_folder(export_dir, open_folder(export_location, settings))
            print(f"[train] export published to {export_location} (digest {published['digest'][:16]})", flush=True)
        version = None
        if run_id:
            import mlflow

            mlflow.log_metrics({"wall_s": wall, "final_loss": result["loss"],
                                "train_samples_per_s": result["samples_per_s"]})
            log_curves(run_id, f"{cfg.name}: stage {cfg.stage}")
            if cfg.registry.register:
                from train.registry import register_export

                aliases = [cfg.registry.alias] + ([f"stage{cfg.stage}"] if cfg.registry.stage_alias else [])
                version = register_export(export_dir, model_name, aliases, lin, run_id)
    print(f"[train] stage {cfg.stage} '{cfg.name}' done: loss {result['loss']:.5f}, export {export_location}"
          + (f", registered {model_name} v{version} @{cfg.registry.alias}" if version else ""), flush=True)
    return {**result, **takeover, "export_dir": str(export_dir), "run_id": run_id, "model_version": version,
            "model_name": model_name, "model_ref": f"{model_name}/{version}" if version else str(export_location),
            "checkpoint_dir": str(remote.url if remote else ckpt_dir), "wall_s": wall,
            **({"export_url": str(export_location)} if is_remote(export_location) else {})}


def location_key(location: str | Path) -> str:
    """A local folder name for an ``s3://`` location (the first 16 hex digits of its sha256)."""
    import hashlib

    return hashlib.sha256(str(location).encode()).hexdigest()[:16]


def take_over(ckpt_dir: Path, resume_tag: str | None, previous: dict | None, run_id: str | None,
              remote=None) -> dict:
    """Say what this run adopts from the one that wrote ``ckpt_dir`` before, and close that run if it was killed.

    Returns ``{"adopted": "resumed from step 6 (step00000006) of run X" or "", "supersedes": X or None}``;
    in MLflow the old run becomes KILLED (if it was left RUNNING by a dead driver) and the two runs
    name each other (``superseded_by`` / ``supersedes``, tracking.close_superseded).
    """
    from omnidiff import tracking
    from train.checkpoint import read_meta

    old = (previous or {}).get("run_id")
    old = old if old and old != run_id else None
    of = f" of run {old}" if old else ""
    if resume_tag:
        adopted = f"resumed from step {read_meta(ckpt_dir, resume_tag, remote)['step']} ({resume_tag}){of}"
    else:
        adopted = f"started at step 0 (run {old} left no complete checkpoint)" if old else ""
    closed = None
    if run_id and old:
        if resume_tag:
            tracking.set_tags(run_id, {"resumed_from_run": old})
        closed = tracking.close_superseded(previous, run_id, adopted)
        if closed:
            adopted += f"; run {old} was {closed['was']}, now {closed['status']}"
    return {"adopted": adopted, "supersedes": closed["run_id"] if closed else None}
