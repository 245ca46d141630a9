"""Session fixtures for the serve stage (loaded as a pytest plugin by conftest).

``serve_pipelines``: two tiny random-weight ``llm_adapter`` pipeline folders (v1, v2) built from
omnidiff.models pieces on the ``tiny_llm`` (serving does not care what the weights learned), each
with a ``card.json`` of example prompts (:data:`EXAMPLE_PROMPTS`) as train/export.py writes one.
``serve_registry``: both registered in the session's MLflow as ``serve-test`` (v1 @production,
v2 @candidate) with lineage tags. ``served``: the Ray Serve app from configs/serve_test.yaml
serving ``serve-test`` (so @production) on a free 127.0.0.1 port with a bearer token; started
once per session, deleted at the end.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "serve-test"
TOKEN_ENV = "OMNIDIFF_SERVE_TEST_TOKEN"
# What the test models' cards say they know (tiny-world captions; none of the playground's old examples).
EXAMPLE_PROMPTS = [
    {"prompt": "a small red circle at the top left on a black background", "lang": "en"},
    {"prompt": "白色背景上右下角的一个大的蓝色正方形", "lang": "zh"},
    {"prompt": "un petit triangle jaune au centre sur fond gris", "lang": "fr"},
]


def build_tiny_pipeline(folder: Path, llm_path: Path, seed: int, lineage: dict, card: dict | None = None) -> Path:
    """A random ``llm_adapter`` pipeline at 16x16 pixels (the pipeline draws multiples of 2; its card lists
    only 16x16, the size it was "trained" at), with ``card`` as its card.json."""
    import json

    import torch
    from diffusers import DDPMScheduler

    from omnidiff.models.adapter import OmniAdapter
    from omnidiff.models.llm import LLMTextEncoder
    from omnidiff.models.unet import build_unet
    from omnidiff.pipeline import OmniDiffusionPipeline

    torch.manual_seed(seed)
    llm = LLMTextEncoder(llm_path)
    adapter = OmniAdapter(llm_dim=llm.hidden_size, width=32, out_dim=32, num_queries=8, encoder_layers=1,
                          decoder_layers=1, heads=2, input_norm=False, length_head=False, pooled_query=False)
    unet = build_unet(16, 3, 3, (16, 32), cross_attention_dim=32, layers_per_block=1, attention_head_dim=8,
                      pooled_dim=32)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    pipe = OmniDiffusionPipeline(unet, scheduler, "llm_adapter", adapter=adapter, llm=llm)
    folder = pipe.save_pretrained(folder, lineage=lineage)
    if card is not None:
        (folder / "card.json").write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def serve_port() -> int:
    """The session's one Serve HTTP port. A Ray cluster has one Serve proxy, so every app the suite
    deploys (this file's and the pipeline flow's) must ask for the same port; a different one is an
    error (serve.app.start_serve)."""
    return free_port()


@pytest.fixture(scope="session")
def serve_pipelines(tmp_path_factory, tiny_llm) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("serve_pipelines")
    return tuple(
        build_tiny_pipeline(root / f"v{i}", tiny_llm, seed=i,
                            lineage={"stage": "3", "runs": {"train": f"run-of-v{i}"}, "snapshot_digest": f"snap{i}",
                                     "cache_fingerprint": f"fp{i}"},
                            card={"example_prompts": EXAMPLE_PROMPTS})
        for i in (1, 2)
    )


@pytest.fixture(scope="session")
def serve_registry(stack, serve_pipelines) -> dict[str, str]:
    """``{"production": "1", "candidate": "2"}``: the registered versions of ``serve-test``."""
    from omnidiff import tracking

    versions = {}
    for folder, alias, i in ((serve_pipelines[0], "production", 1), (serve_pipelines[1], "candidate", 2)):
        with tracking.start_run("serve-test", run_name=f"serve-test-v{i}"):
            versions[alias] = tracking.register_model(
                folder, MODEL_NAME, alias=alias,
                tags={"stage": "3", "snapshot_digest": f"snap{i}", "cache_fingerprint": f"fp{i}",
                      "parent_model": f"{MODEL_NAME}/{i - 1}" if i > 1 else "omnidiff-base/1"},
            )
    return versions


@dataclass
class Served:
    url: str
    cfg: object  # ServeConfig
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="session")
def served(stack, serve_registry, serve_port):
    """The test app, running for the whole session (one Serve start is ~15 s on 2 cores)."""
    from omnidiff.config import load_config
    from serve import app as serve_app
    from serve import cli
    from serve.config import ServeConfig

    saved = os.environ.get(TOKEN_ENV)
    token = secrets.token_urlsafe(24)
    os.environ[TOKEN_ENV] = token
    config = str(REPO / "configs" / "serve_test.yaml")
    overrides = [f"model={MODEL_NAME}", f"port={serve_port}"]
    cfg = load_config(ServeConfig, config, overrides)
    try:
        # Through the command a user runs: `omnidiff serve up` returns once /readyz says ready.
        assert cli.main(["up", "--config", config, *overrides]) == 0
        state = serve_app.running(cfg.app_name)
        yield Served(url=state["url"], cfg=cfg, token=token)
    finally:
        try:
            assert cli.main(["down", "--config", config, *overrides]) == 0
        finally:
            if saved is None:
                os.environ.pop(TOKEN_ENV, None)
            else:
                os.environ[TOKEN_ENV] = saved
