"""Where the project keeps its state, and the switches that keep it offline.

Every path the project writes lives under one working directory, ``OMNIDIFF_HOME``
(default: ``./.omnidiff`` relative to the current directory), never in ``~``.
Importing :mod:`omnidiff` calls :func:`setup_offline` once, so every entry point
(CLI, Prefect flow, Ray worker, test) runs with the same switches.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "OMNIDIFF_HOME"


def home() -> Path:
    """The project's working directory (created on first use)."""
    path = Path(os.environ.get(HOME_ENV) or (Path.cwd() / ".omnidiff")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def subdir(*parts: str) -> Path:
    """A directory under :func:`home`, created on first use."""
    path = home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# Usage reporting of every library the project and its stack run, off (issue 15). The stack's
# servers get these whatever the caller's environment says (omnidiff/stack_services.py).
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "1",  # the convention several libraries read
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow's client and server, and its UI (/ajax-api/3.0/mlflow/ui-telemetry)
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the server's start-up report, and the UI's Amplitude events
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray's usage stats (also `ray start --disable-usage-stats`)
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations' version check
    # wandb is installed (a dependency of a dependency) and never used: no run of it may phone home.
    "WANDB_MODE": "disabled",
}

# Switches from ../shared/NOTES.md: no telemetry, no hub downloads, no state in ~.
_OFFLINE_SWITCHES = {
    **TELEMETRY_OFF,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}


def setup_offline() -> None:
    """Set the offline switches and point every tool's state dir into :func:`home`.

    Values the user already set win (``setdefault``), so a real deployment can
    point ``PREFECT_HOME`` or ``HF_HOME`` elsewhere.
    """
    for key, value in _OFFLINE_SWITCHES.items():
        os.environ.setdefault(key, value)
    # Ray reads this once, when it is imported: a local (loopback) Ray must be single-node, or the
    # driver swaps 127.0.0.1 for the machine's address and cannot reach a head bound to loopback
    # (omnidiff/stack.py starts it so). A remote cluster address leaves Ray's default alone.
    address = os.environ.get("RAY_ADDRESS", "")
    if not address or address.split("://")[-1].startswith(("127.", "localhost")):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    root = home()
    state_dirs = {
        "PREFECT_HOME": root / "prefect",
        "HF_HOME": root / "hf",
        "TORCH_EXTENSIONS_DIR": root / "torch_extensions",
        "MPLCONFIGDIR": root / "matplotlib",
        "TRITON_CACHE_DIR": root / "triton",
        "XDG_CACHE_HOME": root / "xdg_cache",
    }
    for key, path in state_dirs.items():
        if key not in os.environ:
            path.mkdir(parents=True, exist_ok=True)
            os.environ[key] = str(path)


def models_dir() -> Path:
    """Cached model weights (LLM conversion, base model, evaluator).

    ``$OMNIDIFF_MODELS`` overrides it, so tests with a throw-away home can still
    share the expensive conversions.
    """
    path = Path(os.environ.get("OMNIDIFF_MODELS") or (home() / "models")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
