"""The layering: stages meet only in the core's contracts (import-linter contracts in pyproject.toml).

    .venv/bin/pytest tests/test_layering.py -q        # or: .venv/bin/lint-imports

The stages data_prep, embed_cache, train and serve never import each other; the core (omnidiff) imports
no stage and not flows; nothing but flows imports serve; serve never imports train.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_layering_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.is_file(), f"{lint} is missing: install the test extra (pip install -e '.[test]')"
    # This checkout's packages first (an editable install may point at another checkout).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"lint-imports failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
