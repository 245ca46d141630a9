"""Prefect flow of the collect stage: ``data_prep.collect.run`` as a task that retries transient failures.

    python -m flows.collect configs/collect.yaml [dotted.key=value ...]

Transient = the download did not finish (img2dataset killed or crashed:
``DownloadError``) or a connection/timeout error. The stage resumes from its
finished img2dataset shards, so a retry downloads only what is missing. Bad
input (``CollectError``, ``ConfigError``) fails at once: retrying cannot fix it.
"""

from __future__ import annotations

import sys

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from data_prep.config import CollectConfig

TRANSIENT_RETRIES = 2


def is_transient(exc: BaseException) -> bool:
    from data_prep.download import DownloadError

    return isinstance(exc, (DownloadError, ConnectionError, TimeoutError))


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only failures a rerun can fix."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


# NO_CACHE: the stage is idempotent by itself (finished shards are skipped, same content -> same
# snapshot folder); a cached task result could point at a snapshot that was deleted since.
@task(name="collect-pairs", retries=TRANSIENT_RETRIES, retry_delay_seconds=5, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def collect_task(cfg: CollectConfig) -> str:
    from data_prep.collect import run

    return str(run(cfg))


@flow(name="collect", log_prints=True)
def collect_flow(cfg: CollectConfig) -> str:
    """Collect ``cfg.url_lists`` into a pair snapshot; returns the snapshot folder."""
    from omnidiff.stack import apply_env

    apply_env()
    return collect_task(cfg)


if __name__ == "__main__":
    import omnidiff  # noqa: F401  (offline switches)
    from omnidiff.config import load_config

    args = sys.argv[1:]
    print(collect_flow(load_config(CollectConfig, args[0] if args else "configs/collect.yaml", args[1:])))
