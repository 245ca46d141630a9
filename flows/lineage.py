"""Lineage queries over MLflow: served model -> training runs -> cache -> snapshot -> source url lists.

    omnidiff lineage omnidiff-tiny@production          # the chain, human-readable
    omnidiff lineage omnidiff-tiny/3 --json            # the same for machines
    omnidiff lineage --snapshot 1a2b3c4d5e6f7a8b       # every model version built from a snapshot

It reads only what the stages already record: registered model version tags
(`stage`, `run_id`, `snapshot_digest`, `cache_fingerprint`, `parent_model`, `parent_run_id`) and
run tags (`stage`, `snapshot_digest`, `cache_fingerprint.<kind>`, `cache_dir.<kind>`, `base_run_id`,
`base_hash`, `prefect.flow_run_id`, `git.commit`, `sources`, `superseded_by`). A training's embed
runs are those over its snapshot AND into its caches, started before it (:func:`embed_runs_for`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from omnidiff.tracking import is_model_ref

MAX_DEPTH = 16


def _client():
    import mlflow
    from mlflow import MlflowClient

    from omnidiff.stack import apply_env

    apply_env()
    return mlflow, MlflowClient()


def parse_model_ref(ref: str) -> tuple[str, str, str]:
    """``name@alias`` -> (name, "alias", alias); ``name/3`` -> (name, "version", "3")."""
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if name and alias:
            return name, "alias", alias
    if "/" in ref:
        name, _, version = ref.rpartition("/")
        if name and version.isdigit():
            return name, "version", version
    raise ValueError(f"model reference {ref!r}: expected name@alias or name/version")


def _version(client, ref: str):
    name, how, value = parse_model_ref(ref)
    if how == "alias":
        return client.get_model_version_by_alias(name, value)
    return client.get_model_version(name, value)


def _summary_of(run) -> dict[str, Any]:
    tags = run.data.tags
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "stage": tags.get("stage"),
        "status": run.info.status,
        "start_time": run.info.start_time,
        "prefect_flow_run_id": tags.get("prefect.flow_run_id"),
        "git_commit": tags.get("git.commit"),
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "snapshot_digest": tags.get("snapshot_digest"),
        "cache_fingerprints": {k: v for k, v in tags.items() if k.startswith("cache_fingerprint")},
        # a run closed because a later one took its work over (issue 15): both ends of the link
        **{k: tags[k] for k in ("superseded_by", "supersedes", "adopted", "resumed_from_run") if tags.get(k)},
    }


def _get_run(client, run_id: str | None):
    """The run, or a ``{"run_id", "error"}`` dict for a deleted or foreign run (the chain goes on without it)."""
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception as exc:
        return {"run_id": run_id, "error": str(exc)}


def _run_summary(client, run_id: str | None) -> dict[str, Any] | None:
    run = _get_run(client, run_id)
    return run if run is None or isinstance(run, dict) else _summary_of(run)


def _search(client, filter_string: str) -> list:
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiment_ids, filter_string=filter_string, order_by=["attributes.start_time DESC"])


def _find_runs(client, stage: str, **tags: str) -> list[dict[str, Any]]:
    clauses = [f"tags.stage = '{stage}'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    return [_summary_of(r) | {"tags": dict(r.data.tags)} for r in _search(client, " and ".join(clauses))]


def snapshot_digests(tags: dict[str, str]) -> set[str]:
    """The snapshots an embed run read: its ``snapshot_digest`` tag (comma-separated), and the
    ``snapshot_digest.<i>`` tags that runs before issue 15 wrote instead."""
    values = [tags.get("snapshot_digest", "")] + [v for k, v in tags.items() if k.startswith("snapshot_digest.")]
    return {d.strip() for v in values for d in v.split(",") if d.strip()}


def embed_runs_for(client, snapshot_digest: str, fingerprints: dict[str, str], cache_dirs: dict[str, str],
                   before_ms: int | None = None) -> list[dict[str, Any]]:
    """The embed runs that filled a training's caches from its snapshot: newest first.

    A run counts when, for some kind, it wrote the cache of that fingerprint (and, where both runs
    name it, the same cache folder), its snapshots include ``snapshot_digest``, and it started before
    the training (``before_ms``). The fingerprint alone does not depend on the snapshot: runs over
    other snapshots fill the same folder and are not this model's (issue 15 item 8).
    """
    found: dict[str, dict[str, Any]] = {}
    for kind, fp in sorted(fingerprints.items()):
        for run in _search(client, f"tags.stage = 'embed' and tags.`cache_fingerprint.{kind}` = '{fp}'"):
            tags = run.data.tags
            if snapshot_digest not in snapshot_digests(tags):
                continue
            folder = tags.get(f"cache_dir.{kind}")
            if folder and cache_dirs.get(kind) and folder != cache_dirs[kind]:
                continue
            if before_ms is not None and run.info.start_time > before_ms:
                continue
            entry = found.setdefault(run.info.run_id, _summary_of(run) | {"kinds": []})
            entry["kinds"].append(kind)
    return sorted(found.values(), key=lambda r: r["start_time"] or 0, reverse=True)


def _training_inputs(client, version_tags: dict[str, str], run) -> dict[str, Any]:
    """What one training read (its run's tags and params; the version's tags where the run lacks them)."""
    tags = run.data.tags if run is not None and not isinstance(run, dict) else {}
    params = run.data.params if run is not None and not isinstance(run, dict) else {}
    prefix = "cache_fingerprint."
    fingerprints = {k[len(prefix):]: v for k, v in tags.items() if k.startswith(prefix) and v}
    if not fingerprints and version_tags.get("cache_fingerprint"):
        fingerprints = {"llm": version_tags["cache_fingerprint"]}
    cache_dirs = {k[len("cache_dir."):]: v for k, v in params.items() if k.startswith("cache_dir.")}
    snapshot = tags.get("snapshot_digest") or version_tags.get("snapshot_digest")
    embed = []
    if snapshot and fingerprints:
        start = run.info.start_time if tags else None
        embed = embed_runs_for(client, snapshot, fingerprints, cache_dirs, start)
    return {"snapshot_digest": snapshot, "cache_fingerprints": fingerprints, "cache_dirs": cache_dirs,
            "embed_runs": embed}


def _base_entry(client, folder: str, run_id: str | None) -> dict[str, Any]:
    """A chain entry for a base model given as a folder, with the MLflow run that pretrained it.

    The run is the one the training recorded (``parent_run_id`` / ``base_run_id``: omnidiff/base/pretrain.py
    writes its run id into the folder's ``base.json``), else the ``base-pretrain`` run tagged with the
    folder's name (its content hash) or path.
    """
    from pathlib import Path

    run = _run_summary(client, run_id) if run_id else None
    if run is None:
        name = Path(folder).name
        found = _find_runs(client, "base-pretrain", base_hash=name) or _find_runs(client, "base-pretrain",
                                                                                   base_dir=folder)
        run = {k: v for k, v in found[0].items() if k != "tags"} if found else None
    note = "a folder (base model)" + ("" if run else ", no pretraining run found in MLflow")
    return {"model": folder, "note": note, "stage": "base", "run": run}


def _sources(run: dict[str, Any]) -> list[Any]:
    raw = run.get("tags", {}).get("sources")
    if not raw:
        return []
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return [raw]


def model_lineage(ref: str) -> dict[str, Any]:
    """The whole chain for one model version, as plain data.

    ``chain``: the version, its parents, down to the base model (with its pretraining run); each
    training entry has ``inputs`` (snapshot, caches, the embed runs that filled them). Top level:
    the first entry's snapshot and LLM cache, the embed runs of every entry, the collect runs.
    """
    from mlflow.exceptions import MlflowException

    _, client = _client()
    chain = []
    seen = set()
    current: str | None = ref
    base_run_id: str | None = None
    while current and len(chain) < MAX_DEPTH and current not in seen:
        seen.add(current)
        try:
            version = _version(client, current)
        except (ValueError, MlflowException):
            chain.append(_base_entry(client, current, base_run_id) if chain else
                         {"model": current, "note": "not a registry reference (a folder or an external model)"})
            break
        tags = dict(version.tags)
        run_id = tags.get("run_id") or version.run_id
        run = _get_run(client, run_id)
        entry = {
            "model": f"{version.name}/{version.version}",
            "aliases": list(getattr(version, "aliases", []) or []),
            "stage": tags.get("stage"),
            "tags": tags,
            "run": run if run is None or isinstance(run, dict) else _summary_of(run),
            "inputs": _training_inputs(client, tags, run),
        }
        chain.append(entry)
        run_tags = run.data.tags if run is not None and not isinstance(run, dict) else {}
        base_run_id = tags.get("parent_run_id") or run_tags.get("base_run_id") or None
        current = tags.get("parent_model")
        if current and not is_model_ref(current) and tags.get("parent_run_id"):
            # the parent was given as a folder: find its registered version by the run that made it
            parents = client.search_model_versions(f"run_id = '{tags['parent_run_id']}'")
            current = f"{parents[0].name}/{parents[0].version}" if parents else current
    trained = [e for e in chain if "inputs" in e]
    first = trained[0]["inputs"] if trained else {}
    snapshot_digest = first.get("snapshot_digest")
    embed_runs: dict[str, dict[str, Any]] = {}
    for e in trained:
        for r in e["inputs"]["embed_runs"]:
            embed_runs.setdefault(r["run_id"], r)
    collect_runs = _find_runs(client, "collect", snapshot_digest=snapshot_digest) if snapshot_digest else []
    return {
        "model": ref,
        "chain": chain,
        "cache_fingerprint": (first.get("cache_fingerprints") or {}).get("llm"),
        "embed_runs": sorted(embed_runs.values(), key=lambda r: r["start_time"] or 0, reverse=True),
        "snapshot_digest": snapshot_digest,
        "collect_runs": [{k: v for k, v in r.items() if k != "tags"} for r in collect_runs[:3]],
        "sources": _sources(collect_runs[0]) if collect_runs else [],
    }


def models_from_snapshot(digest: str) -> list[dict[str, Any]]:
    """Every registered model version whose lineage starts at snapshot ``digest`` (prefix match)."""
    _, client = _client()
    out = []
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name = '{model.name}'"):
            tags = dict(version.tags)
            if tags.get("snapshot_digest", "").startswith(digest):
                out.append({"model": f"{version.name}/{version.version}", "stage": tags.get("stage"),
                            "aliases": list(getattr(version, "aliases", []) or []), "run_id": version.run_id})
    return sorted(out, key=lambda v: (v["model"].rpartition("/")[0], int(v["model"].rpartition("/")[2])))


def _run_line(run: dict[str, Any]) -> str:
    closed = f", superseded by {run['superseded_by']}" if run.get("superseded_by") else ""
    adopted = f", {run['adopted']}" if run.get("adopted") else ""
    return f"run {run.get('run_id')} ({run.get('run_name')}, {run.get('status')}{closed}{adopted})"


def format_lineage(data: dict[str, Any]) -> str:
    lines = [f"lineage of {data['model']}"]
    for i, entry in enumerate(data["chain"]):
        arrow = "  " * i + ("└─ " if i else "")
        pad = "  " * (i + 1)
        run = entry.get("run") or {}
        if "note" in entry:
            lines.append(f"{arrow}{entry['model']}: {entry['note']}")
            if run:
                lines.append(f"{pad}pretraining {_run_line(run)}, prefect flow run {run.get('prefect_flow_run_id')}")
            continue
        alias = f" [{', '.join(entry['aliases'])}]" if entry["aliases"] else ""
        lines.append(f"{arrow}model {entry['model']}{alias} stage={entry['stage']}")
        lines.append(f"{pad}{_run_line(run)}, prefect flow run {run.get('prefect_flow_run_id')}, "
                     f"commit {str(run.get('git_commit'))[:10]}")
        inputs = entry.get("inputs") or {}
        caches = ", ".join(f"{k}={v}" for k, v in sorted((inputs.get("cache_fingerprints") or {}).items()))
        lines.append(f"{pad}read snapshot {inputs.get('snapshot_digest')}, caches {caches or '-'}")
        for embed in inputs.get("embed_runs") or []:
            lines.append(f"{pad}  embed {_run_line(embed)} for {','.join(embed['kinds'])}")
        if not inputs.get("embed_runs"):
            lines.append(f"{pad}  no embed run of this snapshot and these caches found")
    lines.append(f"cache fingerprint: {data['cache_fingerprint']}")
    for run in data["embed_runs"]:
        lines.append(f"  embed run {run['run_id']} (prefect flow run {run.get('prefect_flow_run_id')})")
    lines.append(f"snapshot digest: {data['snapshot_digest']}")
    for run in data["collect_runs"]:
        lines.append(f"  collect run {run['run_id']} (prefect flow run {run.get('prefect_flow_run_id')})")
    lines.append("source url lists:")
    for source in data["sources"]:
        lines.append(f"  {json.dumps(source, ensure_ascii=False) if not isinstance(source, str) else source}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omnidiff lineage", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="name@alias or name/version")
    parser.add_argument("--snapshot", help="list the model versions built from this snapshot digest")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if not args.model and not args.snapshot:
        parser.error("give a MODEL (name@alias or name/version) or --snapshot DIGEST")
    try:
        data: Any = models_from_snapshot(args.snapshot) if args.snapshot else model_lineage(args.model)
    except ValueError as exc:
        print(f"omnidiff lineage: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    elif args.snapshot:
        if not data:
            print(f"no registered model was built from snapshot {args.snapshot}")
        for row in data:
            print(f"{row['model']:<28} stage={row['stage']} aliases={','.join(row['aliases']) or '-'} run={row['run_id']}")
    else:
        print(format_lineage(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
