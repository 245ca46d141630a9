"""Session fixtures for the model building blocks (loaded as a pytest plugin by conftest).

``tiny_llm``: a random hidden-64 Gemma 3 text model with a byte-level tokenizer, built once under
``$OMNIDIFF_MODELS/llm/`` (shared between sessions; conftest points it at ``<repo>/.omnidiff/models``)
or a session temp dir. ``gemma_llm``: the real converted Gemma 3 270M folder (converts on first use,
about a minute); only ``slow`` tests should ask for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    from omnidiff.models.llm_folders import build_tiny_llm

    root = (
        Path(os.environ["OMNIDIFF_MODELS"]) if os.environ.get("OMNIDIFF_MODELS") else tmp_path_factory.mktemp("models")
    )
    return build_tiny_llm(root / "llm" / "tiny-gemma3-h64-seed0", seed=0)


@pytest.fixture(scope="session")
def gemma_llm() -> Path:
    from omnidiff.models.llm_folders import ensure_gemma

    return ensure_gemma()
