"""Lineage queries over MLflow: served model -> training runs -> cache -> snapshot -> source url lists.

    omnidiff lineage omnidiff-tiny@production          # the chain, human-readable
    omnidiff lineage omnidiff-tiny/3 --json            # the same for machines
    omnidiff lineage --snapshot 1a2b3c4d5e6f7a8b       # every model version built from a snapshot

It reads only what the stages already record: registered model version tags
(`stage`, `run_id`, `snapshot_digest`, `cache_fingerprint`, `parent_model`) and
run tags (`stage`, `snapshot_digest`, `cache_fingerprint*`, `prefect.flow_run_id`,
`git.commit`, `sources`).
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


def _run_summary(client, run_id: str | None) -> dict[str, Any] | None:
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # a deleted or foreign run: say so instead of failing the whole chain
        return {"run_id": run_id, "error": str(exc)}
    tags = run.data.tags
    return {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "stage": tags.get("stage"),
        "status": run.info.status,
        "prefect_flow_run_id": tags.get("prefect.flow_run_id"),
        "git_commit": tags.get("git.commit"),
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "snapshot_digest": tags.get("snapshot_digest"),
        "cache_fingerprints": {k: v for k, v in tags.items() if k.startswith("cache_fingerprint")},
    }


def _find_runs(client, stage: str, **tags: str) -> list[dict[str, Any]]:
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    clauses = [f"tags.stage = '{stage}'"] + [f"tags.{k} = '{v}'" for k, v in tags.items()]
    runs = client.search_runs(experiment_ids, filter_string=" and ".join(clauses), order_by=["attributes.start_time DESC"])
    return [_run_summary(client, r.info.run_id) | {"tags": dict(r.data.tags)} for r in runs]


def _sources(run: dict[str, Any]) -> list[Any]:
    raw = run.get("tags", {}).get("sources")
    if not raw:
        return []
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return [raw]


def model_lineage(ref: str) -> dict[str, Any]:
    """The whole chain for one model version, as plain data."""
    _, client = _client()
    chain = []
    seen = set()
    current: str | None = ref
    snapshot_digest = cache_fp = None
    while current and len(chain) < MAX_DEPTH and current not in seen:
        seen.add(current)
        try:
            version = _version(client, current)
        except ValueError:
            chain.append({"model": current, "note": "not a registry reference (a folder or an external model)"})
            break
        tags = dict(version.tags)
        entry = {
            "model": f"{version.name}/{version.version}",
            "aliases": list(getattr(version, "aliases", []) or []),
            "stage": tags.get("stage"),
            "tags": tags,
            "run": _run_summary(client, tags.get("run_id") or version.run_id),
        }
        chain.append(entry)
        snapshot_digest = snapshot_digest or tags.get("snapshot_digest")
        cache_fp = cache_fp or tags.get("cache_fingerprint")
        current = tags.get("parent_model")
        if current and not is_model_ref(current) and tags.get("parent_run_id"):
            # the parent was given as a folder: find its registered version by the run that made it
            parents = client.search_model_versions(f"run_id = '{tags['parent_run_id']}'")
            current = f"{parents[0].name}/{parents[0].version}" if parents else current
    embed_runs = []
    if cache_fp:
        for fp in {v for v in cache_fp.replace(",", " ").split() if v}:
            embed_runs += [r for r in _find_runs(client, "embed") if fp in json.dumps(r.get("tags", {}))]
    collect_runs = _find_runs(client, "collect", snapshot_digest=snapshot_digest) if snapshot_digest else []
    return {
        "model": ref,
        "chain": chain,
        "cache_fingerprint": cache_fp,
        "embed_runs": [{k: v for k, v in r.items() if k != "tags"} for r in embed_runs[:3]],
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


def format_lineage(data: dict[str, Any]) -> str:
    lines = [f"lineage of {data['model']}"]
    for i, entry in enumerate(data["chain"]):
        arrow = "  " * i + ("└─ " if i else "")
        if "note" in entry:
            lines.append(f"{arrow}{entry['model']}: {entry['note']}")
            continue
        run = entry["run"] or {}
        alias = f" [{', '.join(entry['aliases'])}]" if entry["aliases"] else ""
        lines.append(f"{arrow}model {entry['model']}{alias} stage={entry['stage']}")
        lines.append(f"{'  ' * (i + 1)}run {run.get('run_id')} ({run.get('run_name')}, {run.get('status')}), "
                     f"prefect flow run {run.get('prefect_flow_run_id')}, commit {str(run.get('git_commit'))[:10]}")
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
