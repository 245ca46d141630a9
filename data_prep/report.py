"""The collect run in MLflow: the snapshot and its source lists as dataset inputs, counts as metrics,
the manifest and a chart of counts as artifacts, the source lists as a tag (what flows/lineage.py reads).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from data_prep.readers import read_file
from omnidiff.contracts.snapshot import Snapshot
from omnidiff.contracts.storage import is_remote

if TYPE_CHECKING:
    from data_prep.collect import CollectResult


def flat_metrics(counts: dict) -> dict[str, float]:
    """Manifest counts -> MLflow metrics (``pairs.kept``, ``pairs.quarantined.http_404``, ``pairs.lang.zh``...)."""
    out: dict[str, float] = {}
    for table, c in counts.items():
        out[f"{table}.input_rows"] = c["input_rows"]
        out[f"{table}.kept"] = c["kept"]
        out[f"{table}.quarantined"] = c["quarantined"]
        out[f"{table}.lang_mismatch"] = c["lang_mismatch"]
        for reason, n in c["quarantined_by_reason"].items():
            out[f"{table}.quarantined.{reason}"] = n
        for lang, n in c["by_language"].items():
            out[f"{table}.lang.{lang}"] = n
        for split, n in c["by_split"].items():
            out[f"{table}.split.{split}"] = n
    return out


def counts_figure(counts: dict):
    """Bar charts: kept pairs by language, parallel by language, quarantined rows by reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pairs kept, by language", counts["pairs"]["by_language"]),
              ("parallel kept, by language", counts["parallel"]["by_language"]),
              ("quarantined, by reason",
               Counter(counts["pairs"]["quarantined_by_reason"]) + Counter(counts["parallel"]["quarantined_by_reason"]))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, data) in zip(axes, panels, strict=True):
        labels = list(data)
        ax.bar(range(len(labels)), [data[k] for k in labels], color="#4c72b0")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_title(title)
        ax.set_ylabel("rows")
    fig.tight_layout()
    return fig


def log_to_mlflow(result: CollectResult) -> None:
    """The snapshot and its source lists as dataset inputs, counts as metrics, manifest + chart as artifacts."""
    import matplotlib.pyplot as plt
    import mlflow

    from omnidiff import tracking

    snapshot = Snapshot.open(result.path, verify=False)
    digest16 = snapshot.digest[:16]
    pairs = snapshot.pairs(columns=["key", "caption", "lang", "split", "aesthetic", "url", "source"]).to_pandas()
    dataset = mlflow.data.from_pandas(pairs, source=str(result.path), name=f"pairs:{snapshot.name}", digest=digest16)
    mlflow.log_input(dataset, context="pair_snapshot",
                     tags={"snapshot_digest": snapshot.digest, "snapshot_path": str(result.path)})
    for kind, sources in (("url_list", result.url_sources), ("parallel_list", result.parallel_sources)):
        for s in sources:
            frame = _source_frame(Path(s.path)) if not is_remote(s.path) else _columns_frame(s)
            ds = mlflow.data.from_pandas(frame, source=s.path, name=s.name, digest=s.sha256[:16])
            mlflow.log_input(ds, context=kind, tags={"sha256": s.sha256, "rows": str(s.rows)})
    mlflow.set_tags({"snapshot_name": snapshot.name, "snapshot_digest": snapshot.digest,
                     "snapshot_path": str(result.path), "sources": sources_tag(result)})
    mlflow.log_metrics(flat_metrics(snapshot.counts))
    mlflow.log_metrics({"download.shards": result.stats["shards"], "download.shards_new": result.stats["shards_new"],
                        "download.seconds": result.stats["download_seconds"], "seconds": result.stats["seconds"]})
    tracking.log_json(snapshot.manifest, "snapshot/manifest.json")
    fig = counts_figure(snapshot.counts)
    tracking.log_figure(fig, "snapshot/counts.png")
    plt.close(fig)


def sources_tag(result: CollectResult, max_chars: int = 5000) -> str:
    """The source lists as a JSON tag (what flows/lineage.py reads), cut to fit MLflow's tag size."""
    entries = [{"kind": kind, "name": s.name, "path": s.path, "sha256": s.sha256, "rows": s.rows}
               for kind, sources in (("url_list", result.url_sources), ("parallel_list", result.parallel_sources))
               for s in sources]
    shown = list(entries)
    while shown and len(json.dumps(shown + [{"more": len(entries) - len(shown)}])) > max_chars:
        shown.pop()
    if len(shown) < len(entries):
        shown.append({"more": len(entries) - len(shown)})
    return json.dumps(shown, ensure_ascii=False)


def _columns_frame(source):
    """An ``s3://`` list (its local copy is gone by now): the dataset records its columns and digest only."""
    import pandas as pd

    return pd.DataFrame(columns=sorted(set(source.columns.values())))


def _source_frame(path: Path):
    """A source list as a DataFrame for mlflow.data (schema + row count; its digest is the file's sha256)."""
    table = read_file(path)
    # Binary/nested extras do not profile well; the dataset records the list, not the images.
    keep = [f.name for f in table.schema if not (pa.types.is_binary(f.type) or pa.types.is_nested(f.type))]
    return table.select(keep).to_pandas()
