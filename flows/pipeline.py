"""The ``omnidiff-pipeline`` Prefect flow: url lists to a served model, each stage a subflow.

    omnidiff pipeline --config configs/pipeline.yaml          # in this process
    omnidiff flows run omnidiff-pipeline                     # through the deployment, like the UI's Run

prepare-base (world, base model, evaluator) -> collect -> embed -> stage 1 -> stage 2 -> stage 3
-> evaluate -> deploy (promote @production, roll the Serve app).

One MLflow parent run per pipeline run; every stage's own run nests under it (omnidiff.tracking
nests under the active run). A stage whose input digest (its resolved config plus the digests of
the files it reads) matches an earlier completed run, whose outputs are still there, is skipped
and its outputs reused: a rerun after a change redoes only what the change touches.

Object storage (issue 17; configs/s3/pipeline.yaml): ``storage.root: s3://bucket/prefix`` in the pipeline
config is handed to every stage that names no root of its own, and the flow passes ``s3://`` locations
between stages: the snapshot URL to embed and training, each stage's export URL to the next stage and
to evaluate; checkpoints and exports go to ``<root>/checkpoints|exports/<stage>/<digest12>``, the
evaluation report is published to ``<root>/reports/evaluate/<digest12>`` and the stage index lives at
``<root>/pipeline/stage_index.json``. A stage counts as done only while what its manifest commits is
there (a snapshot's ``manifest.json``, an export's ``folder_manifest.json``).
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
from omnidiff.contracts.storage import (
    FOLDER_MANIFEST,
    Folder,
    S3Settings,
    StorageSection,
    is_remote,
    join_location,
    open_folder,
    publish_folder,
)
from omnidiff.env import subdir
from omnidiff.progress import emit_event
from train.registry import model_name_for

SKIP_INDEX = "stage_index.json"


# ---------------------------------------------------------------- skipping unchanged stages

def input_digest(stage: str, cfg: Any, files: list[Path | str] = (), settings: S3Settings | None = None) -> str:
    """Stable digest of a stage's inputs: its resolved config and the content of the files it reads
    (local paths, or ``s3://`` objects read with ``settings``)."""
    digests = {str(p): d for p in files if (d := _file_digest(p, settings)) is not None}
    record = {"stage": stage, "config": to_dict(cfg) if cfg is not None else None, "files": digests}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _file_digest(location: Path | str, settings: S3Settings | None) -> str | None:
    """sha256 of a local file or an ``s3://`` object; None when it does not exist."""
    if is_remote(location):
        parent, _, name = str(location).rpartition("/")
        folder = open_folder(parent, settings)
        return folder.sha256(name) if folder.exists(name) else None
    return sha256_file(location) if Path(location).is_file() else None


def committed(location: str | Path, settings: S3Settings | None = None) -> bool:
    """Whether a stage output is there: a local path that exists; on object storage a prefix whose commit
    point (``manifest.json`` of a snapshot, ``folder_manifest.json`` of a published folder) exists."""
    if not is_remote(location):
        return Path(location).exists()
    folder = open_folder(location, settings)
    return folder.exists("manifest.json") or folder.exists(FOLDER_MANIFEST)


class StageIndex:
    """input digest -> outputs of the completed stage run: ``stage_index.json`` in a folder (``home/pipeline/``,
    or ``<storage.root>/pipeline/`` on object storage, so a rerun from any machine skips what is done)."""

    def __init__(self, path: Path | None = None, folder: Folder | None = None, settings: S3Settings | None = None):
        if folder is None:
            path = path or subdir("pipeline") / SKIP_INDEX
            folder, self.name = open_folder(path.parent), path.name
        else:
            self.name = SKIP_INDEX
        self.folder, self.settings = folder, settings
        self.path = folder.url_of(self.name) if folder.remote else folder.local / self.name

    def _read(self) -> dict[str, Any]:
        return json.loads(self.folder.read_bytes(self.name)) if self.folder.exists(self.name) else {}

    def get(self, stage: str, digest: str) -> dict[str, Any] | None:
        entry = self._read().get(f"{stage}:{digest}")
        if not entry:
            return None
        missing = [p for p in entry.get("paths", []) if not committed(p, self.settings)]
        return None if missing else entry["outputs"]

    def put(self, stage: str, digest: str, outputs: dict[str, Any], paths: list[str]) -> None:
        data = self._read()
        data[f"{stage}:{digest}"] = {"outputs": outputs, "paths": paths, "at": time.time()}
        self.folder.write_bytes(self.name, json.dumps(data, indent=1, default=str).encode())  # temp + rename / one PUT


def run_stage(name: str, cfg: Any, files: list[Path | str], fn: Callable[[], dict[str, Any]], index: StageIndex,
              skip: bool, timings: dict[str, float], path_keys: tuple[str, ...]) -> dict[str, Any]:
    """Run ``fn`` unless an earlier run with the same input digest left its outputs; time it either way."""
    import mlflow

    logger = get_run_logger()
    digest = input_digest(name, cfg, files, index.settings)
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


def _per_input_folders(name: str, cfg: Any, files: list[Path | str], settings: S3Settings | None = None) -> Any:
    """Checkpoint and export folders of their own for each set of stage inputs (unless the config
    names them): a pipeline rerun after a crash resumes from its own checkpoints, while a run with
    other inputs (a new base model, snapshot or config) starts fresh instead of meeting another
    training's checkpoints, and never overwrites an export that the stage index still points to.
    Under ``storage.root`` (``s3://`` or a folder) they are ``<root>/checkpoints|exports/<name>/<digest12>``."""
    digest = input_digest(name, cfg, files, settings)[:12]

    def folder(kind: str) -> Path | str:
        return cfg.storage.under(None, kind, cfg.name, digest) or subdir(kind, cfg.name) / digest

    if cfg.checkpoint.dir is None:
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, dir=folder("checkpoints")))
    if cfg.registry.export_dir is None:
        cfg = replace(cfg, registry=replace(cfg.registry, export_dir=folder("exports")))
    return cfg


def with_storage(stage_cfg: Any, storage: StorageSection) -> Any:
    """``stage_cfg`` with the pipeline's ``storage`` section, unless the stage names a root of its own."""
    if storage.root is None or stage_cfg.storage.root is not None:
        return stage_cfg
    return replace(stage_cfg, storage=storage)


def upload_lists(paths: tuple[Path, ...], location: str, settings: S3Settings) -> tuple[str, ...]:
    """Each local url list as an object under ``location`` (same name; not uploaded again when the object holds
    the same bytes); returns their URLs."""
    folder = open_folder(location, settings)
    for path in paths:
        if not (folder.exists(path.name) and folder.sha256(path.name) == sha256_file(path)):
            folder.upload(path, path.name)
    return tuple(folder.url_of(path.name) for path in paths)


def publish_report(report: dict[str, Any], storage: StorageSection, digest: str) -> dict[str, Any]:
    """On object storage: the evaluation report folder published to ``<root>/reports/evaluate/<digest12>``
    (manifest last); the returned outputs gain ``report_url``. Locally: unchanged."""
    if not storage.remote or not report.get("report_dir"):
        return report
    url = str(join_location(storage.root, "reports", "evaluate", digest[:12]))
    publish_folder(Path(report["report_dir"]), open_folder(url, storage.s3.pinned()))
    return {**report, "report_url": url}


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
    settings = cfg.storage.s3.pinned() if cfg.storage.remote else cfg.storage.s3
    index = (StageIndex(folder=open_folder(join_location(cfg.storage.root, "pipeline"), settings), settings=settings)
             if cfg.storage.root is not None else StageIndex())
    timings, out = {}, {}
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
            collect_cfg = with_storage(cfg.collect, cfg.storage)
            server = None
            if world_dir is not None:
                from omnidiff.world import serve_world, write_url_list

                server = serve_world(world_dir, port=cfg.world_port)
                base_url = server.__enter__()
                url_list = write_url_list(world_dir, base_url, out_path=world_dir / f"urls_{cfg.world_port}.parquet")
                lists = (Path(url_list), world_dir / "parallel.parquet")
                if cfg.storage.remote:  # the url lists on the store too: collect reads them from there
                    lists = upload_lists(lists, join_location(cfg.storage.root, "lists", world_dir.name), settings)
                collect_cfg = replace(collect_cfg, url_lists=(lists[0],), parallel_lists=(lists[1],))
            try:
                collected = run_stage("collect", collect_cfg, list(collect_cfg.url_lists) + list(collect_cfg.parallel_lists),
                                      lambda: {"snapshot": str(collect_flow(collect_cfg))}, index, skip, timings,
                                      ("snapshot",))
            finally:
                if server is not None:
                    server.__exit__(None, None, None)
            snapshot = collected["snapshot"]  # a folder, or an s3:// URL under storage.root
            snapshot_manifest = join_location(snapshot, "manifest.json")
            out["collect"] = collected

            # 3. embed: LLM states of every caption, CLIP targets, pixels -> the Parquet cache
            embed_cfg = replace(with_storage(cfg.embed, cfg.storage), snapshots=(snapshot,),
                                clip=replace(cfg.embed.clip, base_model=Path(base["base_model"])))
            if published is not None:
                embed_cfg = replace(embed_cfg, pixels=latent_pixels(cfg.embed.pixels, published))
            out["embed"] = run_stage("embed", embed_cfg, [snapshot_manifest],
                                     lambda: _train_outputs(embed_flow(embed_cfg)), index, skip, timings,
                                     tuple(f"{kind}_dir" for kind in embed_cfg.kinds))  # each cache still there

            # 4-6. the three training stages, each from the previous one's export
            parent_export = None
            exports = {}
            for name in ("stage1", "stage2", "stage3"):
                stage_cfg = with_storage(getattr(cfg, name), cfg.storage)
                stage_cfg = replace(stage_cfg, base_model=base["base_model"],
                                    data=replace(stage_cfg.data, snapshot=snapshot),
                                    init_from=parent_export if stage_cfg.stage > 1 else stage_cfg.init_from)
                stage_cfg = _per_input_folders(name, stage_cfg, [snapshot_manifest], settings)
                # on object storage the export's URL is what the stage index checks and the next stage reads
                # (export_dir is then this machine's local copy, a cache)
                remote_export = is_remote(stage_cfg.registry.export_dir)
                result = run_stage(name, stage_cfg, [snapshot_manifest],
                                   lambda c=stage_cfg: _train_outputs(train_flow(c)), index, skip, timings,
                                   ("export_url",) if remote_export else ("export_dir",))
                out[name] = result
                parent_export = result.get("export_url") or result["export_dir"]
                exports[name] = result

            # 7. evaluate: base vs every stage, per language and prompt length
            eval_cfg = replace(cfg.evaluate, world_dir=world_dir, baseline=base["base_model"],
                               evaluator_dir=Path(base["evaluator"]))
            models = {"base": base["base_model"],
                      **{n: r.get("export_url") or r["export_dir"] for n, r in exports.items()}}
            eval_inputs = {"cfg": eval_cfg, "models": models}
            eval_digest = input_digest("evaluate", eval_inputs, [], settings)
            out["evaluate"] = run_stage(
                "evaluate", eval_inputs, [],
                lambda: publish_report(evaluate_flow(models, eval_cfg), cfg.storage, eval_digest), index, skip,
                timings, ("report_url",) if cfg.storage.remote else ("report_html",))
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
