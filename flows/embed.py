"""Prefect flows of the embed stage, and the ``nightly-reembed`` deployment.

    python -m flows.embed configs/embed.yaml            # one run, as a Prefect flow run
    python -m flows.embed --nightly [CRON]              # create/update nightly-reembed in the running server

``embed`` runs ``embed_cache.job.run`` as a task; the job is incremental and resumable, so the task's
retry after a crash computes only what is still missing. ``nightly-reembed`` does the same on the
newest snapshot of each configured snapshot name (a snapshot folder counts as its name), so the
nightly run embeds whatever collect added since the last one and nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow, task

from embed_cache.config import EmbedConfig
from omnidiff.config import replace

DEFAULT_CRON = "0 2 * * *"
DEFAULT_CONFIG = Path("configs/embed.yaml")
DEPLOYMENT_NAME = "nightly-reembed"


@task(name="embed-caches", retries=1, retry_delay_seconds=10)
def embed_task(cfg: EmbedConfig) -> dict[str, Any]:
    from embed_cache.job import run

    summary = run(cfg)
    # Manifests can be large; the flow result keeps counts and locations (MLflow has the rest).
    return {k: v for k, v in summary.items() if k != "kinds"} | {
        "throughput": {k: v["tokens_per_s"] for k, v in summary["kinds"].items()},
        **{f"{k}_dir": v for k, v in summary["dirs"].items()},
        **{f"{k}_fingerprint": v for k, v in summary["fingerprints"].items()},
    }


@flow(name="embed", log_prints=True)
def embed_flow(cfg: EmbedConfig) -> dict[str, Any]:
    """Fill the LLM / CLIP / pixel caches for ``cfg.snapshots`` (only the keys not cached yet)."""
    from omnidiff.stack import apply_env

    apply_env()
    return embed_task(cfg)


def latest_snapshot_names(snapshots: tuple[str, ...]) -> tuple[str, ...]:
    """Snapshot folders -> their snapshot name (whose ``LATEST`` is resolved at run time); names stay."""
    out = []
    for entry in snapshots:
        path = Path(entry)
        if path.is_dir() and (path / "manifest.json").exists() and (path.parent / "LATEST").exists():
            out.append(path.parent.name)
        else:
            out.append(entry)
    return tuple(dict.fromkeys(out))


@flow(name="nightly-reembed", log_prints=True)
def nightly_reembed(cfg: EmbedConfig) -> dict[str, Any]:
    """Embed whatever is new in the newest snapshots (scheduled nightly; incremental by construction)."""
    from omnidiff.stack import apply_env

    apply_env()
    return embed_task(replace(cfg, snapshots=latest_snapshot_names(cfg.snapshots)))


def nightly_reembed_deployment(cfg: EmbedConfig | None = None, cron: str = DEFAULT_CRON):
    """The ``nightly-reembed`` RunnerDeployment (for ``prefect.serve``), parameterised with ``cfg``."""
    from omnidiff.config import load_config, to_dict

    if cfg is None:
        cfg = load_config(EmbedConfig, DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    params = to_dict(cfg)
    params.pop("kind", None)
    return nightly_reembed.to_deployment(
        name=DEPLOYMENT_NAME,
        cron=cron,
        parameters={"cfg": params},
        tags=["omnidiff", "embed"],
        description="embed whatever is new in the latest snapshots",
    )


def create_nightly_reembed(cfg: EmbedConfig | None = None, cron: str = DEFAULT_CRON) -> str:
    """Create or update ``nightly-reembed/nightly-reembed`` in the running Prefect server; returns its id.

    Its scheduled runs execute in the process that serves the project's deployments
    (``omnidiff flows deploy``, started by ``omnidiff stack up``).
    """
    from omnidiff.stack import apply_env

    apply_env()
    return str(nightly_reembed_deployment(cfg, cron).apply())


if __name__ == "__main__":
    import omnidiff  # noqa: F401  (offline switches)
    from omnidiff.config import load_config

    if sys.argv[1:2] == ["--nightly"]:
        print(create_nightly_reembed(cron=sys.argv[2] if len(sys.argv) > 2 else DEFAULT_CRON))
    else:
        print(embed_flow(load_config(EmbedConfig, sys.argv[1] if len(sys.argv) > 1 else None)))
