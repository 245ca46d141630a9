"""Test harness: offline switches, a throw-away working directory, the shared local stack.

    .venv/bin/pytest tests/test_stack.py -x -q

Order matters here, so this module does its work at import time, before any
test module is collected (and so before Prefect, MLflow or Ray are imported):

1. Caches that are expensive to rebuild (converted LLM weights, DeepSpeed/torch
   extensions, HF and matplotlib caches) point into ``<repo>/.omnidiff`` so they
   survive between sessions: ``OMNIDIFF_MODELS``, ``TORCH_EXTENSIONS_DIR``, ...
2. ``OMNIDIFF_HOME`` points at a throw-away directory for this session, so state
   (worlds, snapshots, Prefect's local result storage, the stack's databases)
   never leaks from one session into the next.
3. ``import omnidiff`` sets the offline switches (NOTES.md) for the rest.

Fixtures: ``stack`` (session-scoped running Prefect + MLflow + Ray on 127.0.0.1
with MLFLOW_TRACKING_URI, PREFECT_API_URL, RAY_ADDRESS set; a test that uses it
is marked ``e2e`` automatically). Every
``tests/fixtures_*.py`` is loaded as a pytest plugin, so each area keeps its
session fixtures in its own file. Markers: ``gpu`` skips without CUDA.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("OMNIDIFF_CACHE_HOME") or (REPO / ".omnidiff")).resolve()

# (1) caches that survive between sessions; a value the user set wins.
for _key, _path in {
    "OMNIDIFF_MODELS": CACHE / "models",
    "HF_HOME": CACHE / "hf",
    "TORCH_EXTENSIONS_DIR": CACHE / "torch_extensions",
    "TRITON_CACHE_DIR": CACHE / "triton",
    "MPLCONFIGDIR": CACHE / "matplotlib",
    "XDG_CACHE_HOME": CACHE / "xdg_cache",
}.items():
    if not os.environ.get(_key):
        _path.mkdir(parents=True, exist_ok=True)
        os.environ[_key] = str(_path)

# (2) a throw-away home. A short path under the system temp dir on purpose: Ray
# puts unix sockets under $OMNIDIFF_HOME/stack/ray and AF_UNIX paths are limited
# to 107 bytes. Removed when the session ends (kept on failure, for the logs).
SESSION_HOME = Path(tempfile.mkdtemp(prefix="odh-")).resolve()
os.environ["OMNIDIFF_HOME"] = str(SESSION_HOME)
os.environ.pop("PREFECT_HOME", None)  # -> $OMNIDIFF_HOME/prefect (setup_offline)
# Whatever a developer's shell points at must not leak into the tests: the
# `stack` fixture sets these to the session's own stack.
for _key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS"):
    os.environ.pop(_key, None)

# (3) offline switches before anything heavy is imported.
import omnidiff  # noqa: E402,F401

# Every tests/fixtures_*.py is a plugin (other areas add theirs).
pytest_plugins = [f"tests.{p.stem}" for p in sorted(Path(__file__).parent.glob("fixtures_*.py"))]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that needs the real stack is end-to-end, whatever its file says:
    # `-m "not e2e"` (make test-fast) then never starts the servers.
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return  # do not pay for `import torch` when no test asks for a GPU
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


STACK_GRACE_S = 2.0
TEARDOWN_NOTES: list[str] = []


class _TeardownTimes:
    """Where a module's or the session's teardown goes: pytest's --durations gives one figure for a test's whole
    teardown (the session's servers land on the last test); each shared fixture's finalizer is timed here and the
    slow ones (>= 2 s) are listed at the end of the run. A plugin object, not conftest hooks: a conftest's hooks
    are not called for the session node, which lies above tests/."""

    def __init__(self) -> None:
        self.times: list[tuple[float, str]] = []
        self.mark = 0.0

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None):
        import time

        self.mark = time.monotonic()
        yield

    def pytest_fixture_post_finalizer(self, fixturedef, request) -> None:
        import time

        now = time.monotonic()
        if fixturedef.scope in ("module", "session", "package") and self.mark:
            self.times.append((now - self.mark, f"{fixturedef.scope} {fixturedef.argname}"))
        self.mark = now

    def pytest_terminal_summary(self, terminalreporter, exitstatus: int, config: pytest.Config) -> None:
        slow = sorted((t for t in self.times if t[0] >= 2.0), reverse=True)
        if slow or TEARDOWN_NOTES:
            terminalreporter.write_sep("=", "slowest shared-fixture teardowns")
            for seconds, name in slow[:20]:
                terminalreporter.write_line(f"{seconds:7.2f}s {name}")
            for line in TEARDOWN_NOTES:
                terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_TeardownTimes(), "omnidiff-teardown-times")


@pytest.hookimpl(trylast=True)  # after the runner has torn down session fixtures (the stack)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == 0:
        shutil.rmtree(SESSION_HOME, ignore_errors=True)
    else:
        print(f"\nomnidiff test home kept for inspection: {SESSION_HOME}", file=sys.stderr)


def _refresh_prefect_settings() -> None:
    # Prefect 3 snapshots its settings from the environment when it is first
    # imported; a test module may have imported it before the stack was up.
    if "prefect.context" in sys.modules:
        sys.modules["prefect.context"].refresh_global_settings_context()


@pytest.fixture(scope="session")
def stack():
    """A running Prefect + MLflow + Ray stack on 127.0.0.1 for the whole session.

    Yields the stack state (``omnidiff.stack.up``'s dict: pids, ports, urls).
    The environment of the test process (and so of every subprocess it starts)
    points at it: MLFLOW_TRACKING_URI, PREFECT_API_URL, RAY_ADDRESS and Ray's
    token variables. Always torn down, also when a test or the start-up fails.
    """
    from omnidiff import stack as stack_mod

    applied: dict[str, str] = {}
    saved: dict[str, str | None] = {}
    try:
        state = stack_mod.up(free_ports=True, ray_cpus=4, quiet=True, fate_share=True)
        saved = {key: os.environ.get(key) for key in state["env"]}
        applied = stack_mod.apply_env(state, override=True)
        _refresh_prefect_settings()
        yield state
    finally:
        try:
            if "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()  # disconnect the driver before its head goes away
        finally:
            # A short grace: the session's data need not survive, and every second of it is the suite's. What
            # down found is listed at the end of the run (which servers needed more than SIGTERM).
            stopped = stack_mod.down(quiet=True, grace_s=STACK_GRACE_S)
            TEARDOWN_NOTES.append(f"session stack down: {len(stopped['stopped'])} processes stopped, "
                                  f"{len(stopped['killed'])} of them by SIGKILL (grace {STACK_GRACE_S:.0f} s)"
                                  + "".join(f"\n  SIGKILLed: {name}" for name in stopped["killed_names"]))
            for key in applied:
                if saved.get(key) is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = saved[key]
            _refresh_prefect_settings()
