"""The ``omnidiff-pipeline`` Prefect flow: url lists to a served model, each stage a subflow.

    omnidiff pipeline --config configs/pipeline.yaml          # in this process
    omnidiff flows run omnidiff-pipeline                     # through the deployment, like the UI's Run

prepare-base (world, base model, evaluator) -> collect -> embed -> stage 1 -> stage 2 -> stage 3
-> evaluate -> deploy (promote @production, roll the Serve app).

One MLflow parent run per pipeline run; every stage's own run nests under it (omnidiff.tracking
nests under the active run). A stage whose input digest (its resolved config plus the digests of
the files it reads) matches an earlier completed run, whose outputs are still on disk, is skipped
and its outputs reused: a rerun after a change redoes only what the change touches.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.config import PipelineConfig
from omnidiff.config import replace, to_dict
from omnidiff.contracts.io import sha256_file
from omnidiff.env import subdir
from omnidiff.progress import emit_event
from train.registry import model_name_for

SKIP_INDEX = "stage_index.json"


# ---------------------------------------------------------------- skipping unchanged stages

def input_digest(stage: str, cfg: Any, files: list[Path] = ()) -> str:
    """Stable digest of a stage's inputs: its resolved config and the content of the files it reads."""
    record = {"stage": stage, "config": to_dict(cfg) if cfg is not None else None,
              "files": {str(p): sha256_file(p) for p in files if Path(p).is_file()}}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:24]


class StageIndex:
    """input digest -> outputs of the completed stage run (a JSON file under home/pipeline/)."""

    def __init__(self, path: Path | None = None):
        self.path = path or subdir("pipeline") / SKIP_INDEX

    def _read(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, stage: str, digest: str) -> dict[str, Any] | None:
        entry = self._read().get(f"{stage}:{digest}")
        if not entry:
            return None
        missing = [p for p in entry.get("paths", []) if not Path(p).exists()]
        return None if missing else entry["outputs"]

    def put(self, stage: str, digest: str, outputs: dict[str, Any], paths: list[str]) -> None:
        data = self._read()
        data[f"{stage}:{digest}"] = {"outputs": outputs, "paths": paths, "at": time.time()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.path)


def run_stage(name: str, cfg: Any, files: list[Path], fn: Callable[[], dict[str, Any]], index: StageIndex,
              skip: bool, timings: dict[str, float], path_keys: tuple[str, ...]) -> dict[str, Any]:
    """Run ``fn`` unless an earlier run with the same input digest left its outputs; time it either way."""
    import mlflow

    logger = get_run_logger()
    digest = input_digest(name, cfg, files)
    t0 = time.perf_counter()
    emit_event("stage_start", stage=name, run=_flow_run_id())
    cached = index.get(name, digest) if skip else None
    if cached is not None:
        logger.info("%s: inputs unchanged (digest %s): skipped, reusing %s", name, digest, cached)
        outputs, skipped = cached, True
    else:
        outputs, skipped = fn(), False
        index.put(name, digest, outputs, [str(outputs[k]) for k in path_keys if outputs.get(k)])
    timings[name] = time.perf_counter() - t0
    if mlflow.active_run() is not None:
        mlflow.set_tags({f"stage.{name}.input_digest": digest, f"stage.{name}.skipped": str(skipped)})
        mlflow.log_metric(f"time_s.{name}", timings[name])
    logger.info("%s: %.1fs%s", name, timings[name], " (skipped)" if skipped else "")
    emit_event("stage_end", stage=name, run=_flow_run_id(), seconds=timings[name], skipped=skipped, digest=digest)
    return outputs


def _flow_run_id() -> str | None:
    """The pipeline's Prefect flow-run id (a watcher shows only its own run's stages)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None


def _per_input_folders(name: str, cfg: Any, files: list[Path]) -> Any:
    """Checkpoint and export folders of their own for each set of stage inputs (unless the config
    names them): a pipeline rerun after a crash resumes from its own checkpoints, while a run with
    other inputs (a new base model, snapshot or config) starts fresh instead of meeting another
    training's checkpoints, and never overwrites an export that the stage index still points to."""
    digest = input_digest(name, cfg, files)[:12]
    if cfg.checkpoint.dir is None:
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, dir=subdir("checkpoints", cfg.name) / digest))
    if cfg.registry.export_dir is None:
        cfg = replace(cfg, registry=replace(cfg.registry, export_dir=subdir("exports", cfg.name) / digest))
    return cfg


# ---------------------------------------------------------------- the flow

def _train_outputs(result: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in result.items()
            if isinstance(v, (str, int, float, Path, type(None)))}


@flow(name="omnidiff-pipeline", log_prints=True)
def omnidiff_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run every stage on ``config``; returns the outputs of each stage, the report and the timings."""
    import mlflow

    from flows.base import prepare_base_flow
    from flows.collect import collect_flow
    from flows.embed import embed_flow
    from flows.evaluate import evaluate_flow
    from flows.training import train_flow
    from omnidiff.stack import apply_env
    from omnidiff.tracking import close_dead, enter_live, leave_live, start_run

    apply_env()
    cfg = config
    index, timings, out = StageIndex(), {}, {}
    skip = cfg.skip_unchanged
    # Stage runs nest under the pipeline's run, from whichever thread Prefect runs them in.
    with start_run("pipeline", config=cfg, run_name="omnidiff-pipeline", parent_of_any_thread=True) as parent:
        out["mlflow_parent_run_id"] = parent.info.run_id
        # A pipeline killed before its run ended (SIGKILL, OOM) left it RUNNING: close it, linked to this one.
        for closed in close_dead("pipeline", parent.info.run_id,
                                 "the stage outputs whose inputs are unchanged (skip_unchanged)" if skip else "nothing"):
            print(f"pipeline run {closed['run_id']} was {closed['was']} with its process gone: now {closed['status']}")
        enter_live("pipeline", parent.info.run_id)
        try:

            # 1. what the pipeline stands on: the world (url-list source), the base model, the evaluator
            published = published_base(cfg.base_model)  # a bad folder fails here, before any stage
            # build_base enters the digest only when off, so the tiny-base runs keep their digest (and skip).
            base_inputs = {"world": cfg.world, "base": cfg.base, **({} if published is None else {"build_base": False})}
            base = run_stage("prepare-base", base_inputs, [],
                             lambda: prepare_base_flow(cfg.base, cfg.world, build_base=published is None), index, skip,
                             timings, ("base_model", "evaluator"))
            if published is not None:
                base = {**base, "base_model": str(published.path)}
            out["base"] = base
            world_dir = Path(base["world_dir"]) if base.get("world_dir") else None

            # 2. collect: the world's images over local HTTP, through img2dataset, into a pair snapshot
            collect_cfg = cfg.collect
            server = None
            if world_dir is not None:
                from omnidiff.world import serve_world, write_url_list

                server = serve_world(world_dir, port=cfg.world_port)
                base_url = server.__enter__()
                url_list = write_url_list(world_dir, base_url, out_path=world_dir / f"urls_{cfg.world_port}.parquet")
                collect_cfg = replace(collect_cfg, url_lists=(Path(url_list),),
                                      parallel_lists=(world_dir / "parallel.parquet",))
            try:
                collected = run_stage("collect", collect_cfg, list(collect_cfg.url_lists) + list(collect_cfg.parallel_lists),
                                      lambda: {"snapshot": str(collect_flow(collect_cfg))}, index, skip, timings,
                                      ("snapshot",))
            finally:
                if server is not None:
                    server.__exit__(None, None, None)
            snapshot = collected["snapshot"]
            out["collect"] = collected

            # 3. embed: LLM states of every caption, CLIP targets, pixels -> the Parquet cache
            embed_cfg = replace(cfg.embed, snapshots=(snapshot,),
                                clip=replace(cfg.embed.clip, base_model=Path(base["base_model"])))
            if published is not None:
                embed_cfg = replace(embed_cfg, pixels=latent_pixels(cfg.embed.pixels, published))
            out["embed"] = run_stage("embed", embed_cfg, [Path(snapshot) / "manifest.json"],
                                     lambda: _train_outputs(embed_flow(embed_cfg)), index, skip, timings, ())

            # 4-6. the three training stages, each from the previous one's export
            parent_export = None
            exports = {}
            for name in ("stage1", "stage2", "stage3"):
                stage_cfg = getattr(cfg, name)
                stage_cfg = replace(stage_cfg, base_model=base["base_model"],
                                    data=replace(stage_cfg.data, snapshot=snapshot),
                                    init_from=parent_export if stage_cfg.stage > 1 else stage_cfg.init_from)
                stage_cfg = _per_input_folders(name, stage_cfg, [Path(snapshot) / "manifest.json"])
                result = run_stage(name, stage_cfg, [Path(snapshot) / "manifest.json"],
                                   lambda c=stage_cfg: _train_outputs(train_flow(c)), index, skip, timings,
                                   ("export_dir",))
                out[name] = result
                parent_export = result["export_dir"]
                exports[name] = result

            # 7. evaluate: base vs every stage, per language and prompt length
            eval_cfg = replace(cfg.evaluate, world_dir=world_dir, baseline=base["base_model"],
                               evaluator_dir=Path(base["evaluator"]))
            models = {"base": base["base_model"], **{n: r["export_dir"] for n, r in exports.items()}}
            out["evaluate"] = run_stage("evaluate", {"cfg": eval_cfg, "models": models}, [],
                                        lambda: evaluate_flow(models, eval_cfg), index, skip, timings, ("report_html",))
            mlflow.set_tag("report_html", out["evaluate"].get("report_html"))

            # 8. register + deploy: stage 3's version -> @production, roll (or start) the Serve app
            if cfg.deploy:
                version = exports["stage3"].get("model_version")
                # the model stage 3 registered into: registry.model_name, or the run's own data's (omnidiff-<snapshot>)
                model = exports["stage3"].get("model_name") or model_name_for(stage_cfg)
                t0 = time.perf_counter()
                emit_event("stage_start", stage="deploy", run=_flow_run_id())
                out["deploy"] = deploy_and_serve(cfg, version, model)
                timings["deploy"] = time.perf_counter() - t0
                emit_event("stage_end", stage="deploy", run=_flow_run_id(), seconds=timings["deploy"], skipped=False)
            out["timings_s"] = timings
            mlflow.log_dict(out, "pipeline_outputs.json")
        finally:
            leave_live("pipeline", parent.info.run_id)
    print_summary(out)
    return out


def published_base(base_model: Path | None):
    """The ``BaseFolder`` of the pipeline's ``base_model`` (None: the tiny base is built). A folder that
    is not a published SD / SDXL layout raises ``BaseFolderError`` naming what is missing."""
    if base_model is None:
        return None
    from omnidiff.contracts.base_folder import open_base_folder

    return open_base_folder(base_model)


def latent_pixels(pixels: Any, base: Any) -> Any:
    """Embed's image section for a published base: its VAE's latents at its native resolution. A
    section that names a VAE of its own is kept; ``resolution`` other than the default is kept."""
    if pixels.vae is not None:
        return pixels
    default = type(pixels).model_fields["resolution"].default
    resolution = pixels.resolution if pixels.resolution != default else base.native_resolution
    return replace(pixels, vae=base.vae, resolution=resolution)


def deploy_and_serve(cfg: PipelineConfig, version: str | None, model: str) -> dict[str, Any]:
    """Promote stage 3's version of ``model`` to @production; roll the running Serve app, or start it."""
    from flows.deploy import deploy
    from serve import app as serve_app

    result = deploy(model=model, version=str(version) if version else None, app_name=cfg.serve.app_name)
    if not serve_app.running(cfg.serve.app_name):
        serve_app.run(replace(cfg.serve, model=f"{model}@production"))
        result["started"] = True
    result["endpoint"] = serve_app.base_url(cfg.serve)
    return result


def print_summary(out: dict[str, Any]) -> None:
    print("\n=== omnidiff pipeline ===")
    for stage, seconds in out.get("timings_s", {}).items():
        print(f"  {stage:<14} {seconds:8.1f} s")
    ev = out.get("evaluate", {})
    if ev.get("report_html"):
        print(f"  report: {ev['report_html']}")
    if out.get("deploy", {}).get("endpoint"):
        print(f"  endpoint: {out['deploy']['endpoint']}")
    print(f"  MLflow parent run: {out.get('mlflow_parent_run_id')}")
