"""What an embed run reports: per-kind stats, the run's summary, and its MLflow record.

    stats = new_stats(plan, directory, wanted); add_shard(stats, row, ...); finish_stats(stats, seconds)
    summary = summarize(inputs, kinds, seconds, run_id); log_run(summary, inputs, cfg)

Per kind: counts wanted / computed / skipped / rejected (by key, with the reason), useful tokens and
tokens/s (end to end and over the busy span), the share of computed slots that was padding and of
the tokens taken from shared prefixes, bytes on disk per token, and the manifest; for ``clip`` also
the share of unknown tokens and of distinct targets over the run's captions (:func:`add_target_stats`). MLflow gets the
fingerprints and cache folders as params and tags (lineage: a training run names the caches it
read by these), the numbers as metrics, the manifests and rejected keys as artifacts.

``roofline_gflops`` and the probe correction of the busy span are filled only when the actor's
report rows carry ``roofline_gflops`` / ``probe_s`` columns: benchmarks/embed_throughput.py's
probing actor adds them; the production actor does not probe (0).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from embed_cache.config import EmbedConfig
from embed_cache.inputs import EmbedInputs
from embed_cache.plan import KindPlan
from omnidiff.config import to_dict
from omnidiff.contracts.cache import CacheStore
from omnidiff.contracts.storage import S3Settings

# Metrics logged per kind as ``<kind>.<name>``.
METRICS = (
    "wanted",
    "computed",
    "skipped",
    "references",
    "rows",
    "tokens",
    "tokens_per_s",
    "seconds",
    "compute_seconds",
    "compute_tokens_per_s",
    "load_seconds",
    "roofline_gflops",
    "padding_fraction",
    "shared_fraction",
    "computed_tokens",
    "bytes",
    "bytes_per_token",
    "stale_shards",
)
# Logged for the clip kind only (``clip.<name>``): can its targets teach anything (issue 16 item 8)?
TARGET_METRICS = ("unknown_fraction", "distinct_fraction")


def new_stats(plan: KindPlan, directory: Path, wanted: int) -> dict[str, Any]:
    return {
        "kind": plan.kind,
        "fingerprint": plan.fingerprint,
        "dir": str(directory),
        "wanted": wanted,
        "computed": 0,
        "skipped": 0,
        "rejected": {},
        "tokens": 0,
        "planned": 0,
        "computed_tokens": 0,
        "shared_tokens": 0,
        "padded_slots": 0,
        "seconds": 0.0,
        "compute_seconds": 0.0,
        "load_seconds": 0.0,
        "roofline_gflop_s": 0.0,
        "probe_seconds": 0.0,
        "stale_shards": 0,
        "shards_written": 0,
    }


def add_shard(
    stats: dict[str, Any], row: Any, entry: dict[str, Any], keys: list[str], rejected: dict[str, str], n_actors: int
) -> None:
    """Add one actor report row (one finished shard of this kind) to the kind's ``stats``."""
    if entry.get("stale"):
        stats["stale_shards"] += 1
    elif entry["name"] is not None:
        stats["shards_written"] += 1
    stats["computed"] += len(keys)
    stats["tokens"] += int(entry.get("tokens", len(keys)))
    stats["planned"] += int(row.planned_tokens)
    stats["padded_slots"] += int(row.padded_slots)
    stats["computed_tokens"] += int(row.computed_tokens)
    stats["shared_tokens"] += int(row.shared_tokens)
    stats["compute_seconds"] += float(row.compute_s)
    stats["load_seconds"] += float(row.load_s)
    roofline, probe_s = float(getattr(row, "roofline_gflops", 0.0)), float(getattr(row, "probe_s", 0.0))
    if roofline > 0:  # probe on: compute-time-weighted mean
        stats["roofline_gflop_s"] += roofline * float(row.compute_s)
    stats["rejected"].update(rejected)
    # Busy span: from the first shard's compute start to the last shard's arrival; actor start-up
    # and model loads are outside it, idle actors (an unbalanced tail) inside it.
    now = time.perf_counter()
    stats.setdefault("first_compute_at", now - float(row.compute_s))
    # Probes after the first run between shards on every actor; their share of the span is not
    # compute. Never claim more than perfect overlap of the actors' compute.
    if "first_probe_s" not in stats:
        stats["first_probe_s"] = probe_s
    stats["probe_seconds"] += probe_s
    probes = (stats["probe_seconds"] - stats["first_probe_s"]) / n_actors
    span = now - stats["first_compute_at"] - probes
    stats["compute_span_s"] = max(span, stats["compute_seconds"] / n_actors)


def add_target_stats(stats: dict[str, Any], plan: KindPlan, parts: Iterable[list[str]], partitions: int = 1) -> None:
    """Add to the clip kind's ``stats`` the share of unknown tokens and of distinct targets over the texts of
    ``parts`` (disjoint lists of texts: the driver's ``partitions`` partitions, never every caption at once).

    Every caption of the run counts (cached or computed): the caption set stage 1 will align to. A
    high ``unknown_fraction`` or a low ``distinct_fraction`` means the targets cannot tell the captions
    apart (the tiny base's word tokenizer on another data set's words); the run logs a warning. Distinct
    targets are counted exactly, part by part: each target's token ids go, as a digest, to the hash partitions
    of embed_cache/inputs.py and are counted there once per partition.
    """
    import hashlib
    import tempfile

    from embed_cache.encoders.clip import target_token_counts, target_tokenizer
    from embed_cache.inputs import KeyPartitions

    enc = plan.encoder
    tokenizer = target_tokenizer(tokenizer=enc.get("tokenizer"), base_model=enc.get("base_model"))
    captions = total = unknown = distinct = 0
    digests = None
    with tempfile.TemporaryDirectory(prefix="omnidiff-embed-targets-") as folder:
        for texts in parts:
            if isinstance(texts, str):
                raise TypeError(f"add_target_stats: parts must be lists of texts, got the text {texts[:40]!r}")
            n, tokens, unk, pieces = target_token_counts(texts, enc["max_windows"], tokenizer)
            captions, total, unknown = captions + n, total + tokens, unknown + unk
            if digests is None:  # partitioned like the captions: about as many distinct targets per partition
                digests = KeyPartitions(folder, partitions, bytes)
            for piece in pieces:
                digests.add(hashlib.blake2b(repr(piece).encode(), digest_size=16).hexdigest(), b"")
        if digests is not None:
            distinct = sum(len(part) for part in digests)
            digests.cleanup()
    found = {"captions": captions, "unknown_fraction": unknown / total if total else 0.0,
             "distinct_fraction": distinct / captions if captions else 1.0}
    stats.update(found)
    if found["captions"] and (found["unknown_fraction"] > 0.2 or found["distinct_fraction"] < 0.5):
        import logging

        logging.getLogger("omnidiff.embed").warning(
            "embed clip: %.0f%% of the target tokens are unknown to the base's tokenizer and only %.0f%% of %d "
            "captions have a distinct target: stage 1 aligned to these targets cannot tell the captions apart",
            100 * found["unknown_fraction"], 100 * found["distinct_fraction"], found["captions"],
        )


def finish_stats(stats: dict[str, Any], seconds: float) -> None:
    manifest = stats["manifest"]
    stats["seconds"] = seconds
    stats["rows"] = manifest["rows"]
    # Of the slots computed, the share that was padding; tokens taken from a shared prefix were not computed.
    slots = stats["padded_slots"]
    stats["padding_fraction"] = 1.0 - stats["computed_tokens"] / slots if slots else 0.0
    stats["shared_fraction"] = stats["shared_tokens"] / stats["planned"] if stats["planned"] else 0.0
    stats["tokens_per_s"] = stats["tokens"] / seconds if stats["tokens"] and seconds > 0 else 0.0
    stats.pop("first_compute_at", None)
    stats.pop("first_probe_s", None)
    stats.setdefault("compute_span_s", 0.0)
    # Useful tokens per second of the busy span: the steady rate of the whole pool.
    stats["compute_tokens_per_s"] = stats["tokens"] / stats["compute_span_s"] if stats["compute_span_s"] else 0.0
    stats["roofline_gflops"] = (
        stats.pop("roofline_gflop_s") / stats["compute_seconds"] if stats["compute_seconds"] else 0.0
    )
    stats["bytes"] = sum(s["bytes"] for s in manifest["shards"])
    cached_tokens = sum(s.get("tokens", s["rows"]) for s in manifest["shards"])
    stats["bytes_per_token"] = stats["bytes"] / cached_tokens if cached_tokens else 0.0


def summarize(inputs: EmbedInputs, kinds: dict[str, Any], seconds: float, run_id: str | None) -> dict[str, Any]:
    return {
        "snapshots": inputs.snapshots,
        "kinds": kinds,
        "fingerprints": {k: v["fingerprint"] for k, v in kinds.items()},
        "dirs": {k: v["dir"] for k, v in kinds.items()},
        "computed": {k: v["computed"] for k, v in kinds.items()},
        "skipped": {k: v["skipped"] for k, v in kinds.items()},
        "rejected": sum(len(v["rejected"]) for v in kinds.values()),
        "seconds": seconds,
        "run_id": run_id,
    }


def identity_tags(snapshots: list[dict[str, Any]], fingerprints: dict[str, str], dirs: dict[str, str]) -> dict[str, str]:
    """The tags that say what an embed run read and wrote, readable back by flows/lineage.py.

    ``snapshot_digest``: the digests of its snapshots, comma-separated (one, usually);
    ``cache_fingerprint.<kind>`` and ``cache_dir.<kind>`` (absolute) per cache it filled.
    """
    return {"snapshot_digest": ",".join(s["digest"] for s in snapshots),
            **{f"cache_fingerprint.{k}": v for k, v in fingerprints.items()},
            **{f"cache_dir.{k}": str(Path(v).resolve()) for k, v in dirs.items()}}


def log_run(summary: dict[str, Any], inputs: EmbedInputs, cfg: EmbedConfig) -> None:
    """Log ``summary`` to the active MLflow run (``tracking.start_run("embed", ...)``)."""
    import mlflow

    from omnidiff import tracking

    params: dict[str, Any] = {}
    metrics: dict[str, float] = {"seconds": summary["seconds"]}
    tags: dict[str, str] = {}
    for kind, stats in summary["kinds"].items():
        params[f"{kind}.fingerprint"] = stats["fingerprint"]
        params[f"{kind}.cache_dir"] = stats["dir"]
        if stats.get("executor"):
            tags["executor"] = stats["executor"]
        for name in METRICS:
            metrics[f"{kind}.{name}"] = float(stats[name])
        metrics[f"{kind}.rejected"] = float(len(stats["rejected"]))
        for name in TARGET_METRICS:
            if name in stats:
                metrics[f"{kind}.{name}"] = float(stats[name])
        tracking.log_json(stats["manifest"], f"manifests/{kind}.json")
        if stats["rejected"]:
            tracking.log_json(stats["rejected"], f"rejected/{kind}.json")
    for i, snap in enumerate(summary["snapshots"]):
        params[f"snapshot.{i}.digest"] = snap["digest"]
        params[f"snapshot.{i}.path"] = snap["path"]
    # One readable tag per fact (issue 15: tags of the form ``snapshot_digest.0`` read back as no snapshot).
    tags.update(identity_tags(summary["snapshots"], summary["fingerprints"], summary["dirs"]))
    mlflow.log_params(params)
    mlflow.log_metrics(metrics)
    mlflow.set_tags(tags)
    tracking.log_json(
        {k: v for k, v in summary.items() if k != "kinds"} | {"config": to_dict(cfg)}, "embed_summary.json"
    )


def open_caches(summary_or_dirs: dict[str, Any], storage: S3Settings | None = None) -> dict[str, CacheStore]:
    """``{kind: CacheStore}`` from :func:`embed_cache.job.run`'s result (or its ``dirs``)."""
    dirs = summary_or_dirs.get("dirs", summary_or_dirs)
    return {kind: CacheStore(path, storage=storage) for kind, path in dirs.items()}
