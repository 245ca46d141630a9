"""The embed job: pair snapshots -> LLM / CLIP / pixel caches, with Ray Data actors.

    omnidiff embed --config configs/embed.yaml            # or: embed_cache.job.run(cfg)

What it computes (docs/architecture.md "Embedding cache"):
* ``llm``:    per-token states of every distinct normalised caption, every parallel text (the
  language side) and "" (the unconditional prompt), keyed by ``text_key``;
* ``clip``:   the base model's CLIP text states of the English side (``caption_en``, else the caption
  when ``lang == "en"``; the parallel ``text_en``) in up to ``clip.max_windows`` stitched 77-token
  windows, with the pooled vector: the stage-1 target;
* ``pixels``: each distinct image (by ``image_digest``) as float16 (C, H, W) in [-1, 1], or its VAE
  latents when ``pixels.vae`` is set: what stages 2-3 train on.

How (each step is why the cache beats padded per-file caches; each has its file):
1. The driver gathers the distinct keys (embed_cache/inputs.py: it streams the snapshots' small columns,
   keeps, per image, only where it is, an ``ImageRef`` (the actors read the images), and spills every key to
   hash partitions on its disk, so it holds one partition's keys at a time, never every caption), opens the
   cache directory named by the fingerprint
   (omnidiff/contracts/encoders.py) as its only writer and, partition by partition, subtracts what is cached:
   a caption that is in ten snapshots is computed once, and a rerun computes only what is new.
2. Each partition's missing work is sorted by token length and cut into shards balanced by tokens
   (embed_cache/plan.py, embed_cache/batching.py); each shard is one Ray Data block (so a small input still spreads over
   every actor, NOTES.md), put in Ray's object store as it is planned (:class:`PlannedUnits`).
3. ``map_batches`` over an ``ActorPoolStrategy(size=num_actors)`` (embed_cache/actor.py, the models in
   embed_cache/encoders/): each actor loads its model once,
   packs its shard into compute batches under a token-slot budget (no compute on padding), computes
   in fp32, rejects NaN/inf rows by key, and writes the shard itself (temp name + atomic rename).
4. The driver lists every finished shard in the manifest (one journal entry; the manifest folds them) as it arrives and prints
   progress in tokens/s with an ETA. Killed at any point, a rerun adopts finished shards and
   computes the rest (embed_cache/writer.py "Crash safety").
5. The run is logged to MLflow (embed_cache/report.py): fingerprints, counts computed/skipped/rejected,
   throughput, cache locations, manifests.

This file is the driver: :func:`run` (snapshots -> inputs -> :func:`embed` -> MLflow), the executor
choice (an actor pool, or the same actor class in this process) and the collection of finished shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import pandas as pd

from embed_cache.actor import CALLS_PER_ACTOR, EncodeShardActor
from embed_cache.config import EmbedConfig
from embed_cache.inputs import EmbedInputs, gather_inputs, resolve_snapshots
from embed_cache.plan import KindPlan, plan_kind, plan_units
from embed_cache.report import add_shard, add_target_stats, finish_stats, identity_tags, log_run, new_stats, summarize
from embed_cache.writer import CacheWriter
from omnidiff.contracts.cache import cache_dir
from omnidiff.progress import Progress

log = logging.getLogger("omnidiff.embed")

UNIT = {"llm": "tok", "clip": "tok", "pixels": "img"}
# A local cache another embed run holds (the 02:00 nightly re-embed while a pipeline runs): wait this long for it,
# then skip what it listed, instead of failing at once. A CI run across 02:00 UTC met exactly that collision.
CACHE_LOCK_WAIT_S = 1800.0


def run(cfg: EmbedConfig, *, actor: type = EncodeShardActor) -> dict[str, Any]:
    """The embed stage: resolve snapshots, gather inputs, fill the caches, log to MLflow.

    Returns ``{"snapshots": [...], "kinds": {kind: stats}, "fingerprints": {kind: fp}, "dirs": {kind: dir},
    "rejected": n, "run_id": mlflow run id or None}``.
    """
    start = time.perf_counter()
    settings = cfg.storage.s3.pinned()  # the driver's endpoint and credentials, for every reader and writer
    snapshots = resolve_snapshots(cfg.snapshots, cfg.storage.under(cfg.snapshot_root, "data", "snapshots"), settings)
    inputs = gather_inputs(snapshots, cfg, settings)
    try:
        if not cfg.track:
            kinds = embed(inputs, cfg, actor=actor)
            return summarize(inputs, kinds, time.perf_counter() - start, None)

        from omnidiff import tracking

        with tracking.start_run("embed", config=cfg) as mlrun:
            takeover: dict[str, Any] = {}
            kinds = embed(inputs, cfg, actor=actor, run_id=mlrun.info.run_id, takeover=takeover)
            summary = summarize(inputs, kinds, time.perf_counter() - start, mlrun.info.run_id)
            summary["takeover"] = takeover
            log_run(summary, inputs, cfg)
        return summary
    finally:
        inputs.close()  # the spilled key partitions on the driver's disk


def embed(inputs: EmbedInputs, cfg: EmbedConfig, *, actor: type = EncodeShardActor, run_id: str | None = None,
          takeover: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill every cache in ``cfg.kinds`` with the keys of ``inputs`` it lacks; returns per-kind stats.

    All kinds share one actor pool (each actor loads each model once, on first use), so a run pays
    the actors' start-up once however many caches it fills. ``actor`` is the callable class each shard
    goes through (benchmarks/embed_throughput.py passes one that also samples the matmul roofline).
    ``run_id``: the MLflow run of this job; once the caches are locked it is tagged with what it
    reads and writes, and a killed run that wrote these caches before is closed (:func:`take_over`,
    whose report lands in ``takeover``).
    """
    start = time.perf_counter()
    plans = {kind: plan_kind(kind, cfg) for kind in cfg.kinds}
    settings = cfg.storage.s3.pinned()
    cache_root = cfg.storage.under(cfg.cache_root, "cache")
    stats: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        writers: dict[str, CacheWriter] = {}
        units = PlannedUnits(cfg)
        totals: dict[str, int] = {}
        for kind, plan in plans.items():
            directory = cache_dir(kind, plan.fingerprint, cache_root)
            writer = writers[kind] = stack.enter_context(CacheWriter(directory, plan.inputs, settings,
                                                                     lock_wait_s=CACHE_LOCK_WAIT_S))
            writer.set_value_shape(plan.value_shape)
            stats[kind] = new_stats(plan, directory, 0)
            stats[kind]["references"] = inputs.references[kind]
            if writer.recovered_anything:
                stats[kind]["recovered"] = {k: v for k, v in writer.recovered.items() if v}
                log.info("embed %s: recovered after an interrupted run: %s", kind, stats[kind]["recovered"])
            todo_count = shards = 0
            # One partition of the distinct keys at a time (embed_cache/inputs.py): its keys are planned into
            # shards and handed on before the next is read, so the driver never holds every caption.
            for work in inputs.partitions(kind):
                stats[kind]["wanted"] += len(work)
                todo = sorted(writer.missing(work))  # reads only the shards this partition's hash range overlaps
                stats[kind]["skipped"] += len(work) - len(todo)
                if todo:
                    payloads = [work[k] for k in todo]
                    del work
                    lengths = plan.token_lengths(todo, payloads)
                    kind_units = plan_units(kind, writer, todo, payloads, lengths, cfg, first_unit=units.count(kind))
                    del todo, payloads
                    units.add(kind, kind_units, int(lengths.sum()))
                    todo_count += sum(len(u) for u in kind_units)
                    shards += len(kind_units)
                    totals[kind] = totals.get(kind, 0) + int(lengths.sum())
            stats[kind]["driver_peak_keys"] = inputs.peak_keys(kind)
            stats[kind]["writer_peak_keys"] = writer.peak_keys  # cached keys held at once (not the cache's size)
            if todo_count:
                log.info("embed %s: %d cached, %d to compute in %d shards (%d %s) -> %s", kind,
                         stats[kind]["skipped"], todo_count, shards, totals[kind], UNIT[kind], directory)
            else:
                log.info("embed %s: all %d keys cached -> %s", kind, stats[kind]["wanted"], directory)
        result = take_over(run_id, inputs, writers)
        if takeover is not None:
            takeover.update(result)
        executor = units.executor()
        for kind_stats in stats.values():
            kind_stats["executor"] = executor
        if executor is not None:
            log.info("embed: %d units of work -> %s executor", sum(totals.values()), executor)
            results = (
                _execute_ray(units.refs, plans, writers, cfg, actor)
                if executor == "ray"
                else _execute_local(units.local, plans, writers, cfg, actor)
            )
            _collect(results, writers, stats, totals, cfg, executor)
        for kind, writer in writers.items():
            stats[kind]["manifest"] = dict(writer.manifest)
    if "clip" in plans:
        spill = inputs.spilled.get("clip")
        add_target_stats(stats["clip"], plans["clip"], (list(part.values()) for part in inputs.partitions("clip")),
                         spill.parts if spill is not None else 1)
    seconds = time.perf_counter() - start
    for kind_stats in stats.values():
        finish_stats(kind_stats, seconds)
    return stats


class PlannedUnits:
    """The planned shards (one DataFrame each) until they run. While the run may still go ``local`` (``executor``
    auto and the work so far small) they stay here; once it goes to Ray each is put in Ray's object store as it is
    planned, and the driver keeps only its object ref (issue 17: captions never gather on the driver)."""

    def __init__(self, cfg: EmbedConfig):
        self.cfg = cfg
        self.local: list[pd.DataFrame] = []
        self.refs: list[Any] = []
        self.work = 0  # tokens (+ images) planned
        self.per_kind: dict[str, int] = {}

    def count(self, kind: str) -> int:
        """Shards of ``kind`` planned so far (the next shard's unit number)."""
        return self.per_kind.get(kind, 0)

    def add(self, kind: str, units: list[pd.DataFrame], work: int) -> None:
        self.work += work
        self.per_kind[kind] = self.count(kind) + len(units)
        self.local += units
        if choose_executor(self.cfg, self.work) == "ray":
            from omnidiff.stack import ensure_ray

            ensure_ray()
            import ray

            self.refs += [ray.put(unit) for unit in self.local]
            self.local = []

    def executor(self) -> str | None:
        """``ray`` or ``local`` (:func:`choose_executor` on the whole work), None when nothing is to compute."""
        if not self.local and not self.refs:
            return None
        return "ray" if self.refs else choose_executor(self.cfg, self.work)


def take_over(run_id: str | None, inputs: EmbedInputs, writers: dict[str, CacheWriter]) -> dict[str, Any]:
    """Claim the (locked) cache folders for run ``run_id``; close the killed runs that wrote them before.

    The run is tagged at once with its snapshots and caches (``snapshot_digest``, ``cache_fingerprint.<kind>``,
    ``cache_dir.<kind>``), so even a run killed later is found by lineage queries. Each folder's
    previous writer (tracking.claim_folder) that did not finish is marked KILLED and linked both ways
    (tracking.close_superseded) with what this run adopted from it: the shards named by its run stamp
    that are in the manifest now (listed by it, or recovered unlisted by :class:`CacheWriter`).
    Returns ``{"adopted": "adopted 3 cache shards (48 rows) of run X (llm 3)" or "", "supersedes": [ids]}``.
    """
    from omnidiff import tracking
    from omnidiff.contracts.cache import SHARD_PREFIX

    out: dict[str, Any] = {"adopted": "", "supersedes": []}
    if run_id is None:
        return out
    tracking.set_tags(run_id, identity_tags(inputs.snapshots, {k: w.fingerprint for k, w in writers.items()},
                                            {k: str(w.path) for k, w in writers.items()}))
    previous: dict[str, dict[str, Any]] = {}
    per_run: dict[str, dict[str, list[dict]]] = {}
    for kind, writer in writers.items():
        prev = tracking.claim_folder(writer.path, run_id, settings=writer.storage, run_stamp=writer.run_stamp)
        if not prev or not prev.get("run_id") or prev["run_id"] == run_id:
            continue
        previous[prev["run_id"]] = prev
        prefix = f"{SHARD_PREFIX}{prev.get('run_stamp')}-"
        per_run.setdefault(prev["run_id"], {})[kind] = [s for s in writer.manifest["shards"]
                                                         if s["name"].startswith(prefix)]
    sentences = []
    for old, by_kind in per_run.items():
        shards = [s for kind_shards in by_kind.values() for s in kind_shards]
        sentence = (f"adopted {len(shards)} cache shards ({sum(s['rows'] for s in shards)} rows) of run {old} ("
                    + ", ".join(f"{kind} {len(v)}" for kind, v in by_kind.items()) + ")")
        closed = tracking.close_superseded(previous[old], run_id, sentence)
        if closed:  # a FINISHED earlier run is just an earlier increment, not something taken over
            sentences.append(f"{sentence}; run {old} was {closed['was']}, now {closed['status']}")
            out["supersedes"].append(old)
    out["adopted"] = "; ".join(sentences)
    if out["adopted"]:
        log.warning("embed: %s", out["adopted"])
    return out


def choose_executor(cfg: EmbedConfig, units: int) -> str:
    """``cfg.executor``, with ``auto`` resolved: in this process when the missing work is small.

    An actor pool costs a process start, a torch import and a model load per actor before the first
    token; a nightly delta of a few thousand tokens would spend most of its time there. Only CPU
    runs go local (the driver may have no GPU).
    """
    if cfg.executor != "auto":
        return cfg.executor
    on_cpu = cfg.device == "cpu" and not cfg.num_gpus_per_actor
    return "local" if on_cpu and units <= cfg.auto_local_max_units else "ray"


def _actor_kwargs(plans: dict[str, KindPlan], writers: dict[str, CacheWriter], cfg: EmbedConfig) -> dict[str, Any]:
    return {
        "caches": {k: str(w.path) for k, w in writers.items()},
        "run_tokens": {k: w.run_token for k, w in writers.items()},
        "storage": next(iter(writers.values())).storage if writers else None,  # pinned S3 settings (pickled)
        "encoders": {k: p.encoder for k, p in plans.items()},
        "threads": cfg.threads_per_actor,
        "max_tokens": cfg.max_tokens,
        "max_batch_size": cfg.max_batch_size,
        "batch_overhead": cfg.batch_overhead_slots or None,
        "row_group_rows": cfg.row_group_rows,
    }


def _execute_ray(units: list[Any], plans, writers, cfg: EmbedConfig, actor: type) -> Iterable[pd.DataFrame]:
    """Map the shards (object refs of their DataFrames) over an actor pool; yields each finished shard's report as
    it arrives."""
    from omnidiff.stack import ensure_ray

    ensure_ray()
    import ray.data
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress lines (tokens/s, ETA) instead of Ray's bars
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # One block per shard: every actor gets work even for a small input (NOTES.md "Ray").
    ds = ray.data.from_pandas_refs(list(units))
    out = ds.map_batches(
        actor,
        fn_constructor_kwargs=_actor_kwargs(plans, writers, cfg),
        batch_size=None,
        batch_format="pandas",
        # two calls at once per actor: one computes while the other reads images or uploads its shard
        # (EncodeShardActor's compute lock keeps the models to one shard at a time)
        compute=ActorPoolStrategy(size=min(cfg.num_actors, len(units)), max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                                  enable_true_multi_threading=True),
        num_cpus=cfg.threads_per_actor,
        num_gpus=cfg.num_gpus_per_actor or None,
    )
    yield from out.iter_batches(batch_size=None, batch_format="pandas")


def _execute_local(units: list[pd.DataFrame], plans, writers, cfg: EmbedConfig, actor: type) -> Iterable[pd.DataFrame]:
    """The same actor class called in this process, shard after shard (debugging, tiny updates, no Ray)."""
    call = actor(**_actor_kwargs(plans, writers, cfg))
    for unit in units:
        yield call(unit)


def _collect(
    results: Iterable[pd.DataFrame],
    writers: dict[str, CacheWriter],
    stats: dict[str, dict[str, Any]],
    totals: dict[str, int],
    cfg: EmbedConfig,
    executor: str,
) -> None:
    """List each finished shard in its manifest as it arrives; progress per kind with rate and ETA."""
    progress = {kind: Progress(f"embed {kind}", total=total, unit=UNIT[kind], every_s=cfg.progress_every_s)
                for kind, total in totals.items()}  # fmt: skip
    n_actors = cfg.num_actors if executor == "ray" else 1
    for batch in results:
        for row in batch.itertuples(index=False):
            entry, keys, rejected = json.loads(row.entry), json.loads(row.shard_keys), json.loads(row.rejected)
            if not entry.get("stale") and entry["name"] is not None:
                writers[row.kind].publish(entry, keys, fresh=True)  # planned from writer.missing: not re-read
            for key, why in rejected.items():
                log.error("embed %s: rejected key %s: %s", row.kind, key, why)
            add_shard(stats[row.kind], row, entry, keys, rejected, n_actors)
            bar = progress[row.kind]
            if bar.done == 0:
                # Rate and ETA from this kind's first shard's compute on, not from before the actors
                # started (their start-up and model loads would make the ETA meaningless).
                bar.start = time.perf_counter() - float(row.compute_s)
            bar.update(int(row.planned_tokens))
            if bar.done >= bar.total:
                bar.emit(final=True)
