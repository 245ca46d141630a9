"""Keep Ray's log quiet where it repeats itself: a filter for a Ray Train warning that floods the log.

Ray Train 2.x starts a detached ``PlacementGroupCleaner`` actor per run that asks the state API
every second whether the train controller is alive. Our Ray runs without the dashboard
(omnidiff/stack.py), which serves that API, so every check fails and logs "Failed to query Ray
Train Controller actor state" (ray/train/v2/_internal/execution/controller/placement_group_cleaner.py):
hundreds of lines per training run, forwarded to the driver's console and log. The check is only a
safety net (it frees the run's placement group if the controller dies uncleanly); the warning says
nothing we can act on, so it is dropped in every Ray worker process through Ray's documented hook
for worker logging, ``runtime_env={"worker_process_setup_hook": ...}`` (ensure_ray passes
:data:`SETUP_HOOK`).
"""

from __future__ import annotations

import logging

CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
FLOOD = "Failed to query Ray Train Controller actor state"
SETUP_HOOK = "omnidiff.ray_logging.quiet_ray_workers"


class DropMessage(logging.Filter):
    """Drops records whose message starts with ``prefix``; passes every other record."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_ray_workers() -> None:
    """Ray's ``worker_process_setup_hook``: install the filter in this process (idempotent)."""
    logger = logging.getLogger(CLEANER_LOGGER)
    if not any(isinstance(f, DropMessage) and f.prefix == FLOOD for f in logger.filters):
        logger.addFilter(DropMessage(FLOOD))
