"""A published SD / SDXL folder as the baseline that evaluate and serve take (issue 16 item 6).

    .venv/bin/pytest tests/test_base_serve_eval.py -x -q -m "not e2e"
    flock /tmp/omnidiff-heavy.lock .venv/bin/pytest tests/test_base_serve_eval.py -x -q   # Serve too

The base folder is run by diffusers' own pipeline (DiffusionPipeline.from_pretrained with the folder's
load kwargs); its images are resized to what the evaluator reads; served, it draws at its native size
(32x32 for the tiny fixture) and refuses other sizes with a 400 naming that one.
"""

from __future__ import annotations

import io
import os
import secrets

import numpy as np
import pytest
import torch

from omnidiff.world.attributes import ATTRIBUTES


def test_the_base_folder_draws_through_diffusers_at_its_native_size(sd15_base):
    from omnidiff.pipeline import PublishedBasePipeline, load_any_pipeline

    pipe = load_any_pipeline(sd15_base)
    assert isinstance(pipe, PublishedBasePipeline) and pipe.native_resolution == 32
    images = pipe(["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=3.0, seed=5,
                  output_type="np")
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    # One seed per image: an image depends on its own prompt and seed, not on its batch.
    alone = pipe(["a blue square"], num_inference_steps=2, guidance_scale=3.0, seed=6, output_type="np")
    # (batched CPU kernels sum in another order: at most one grey level apart)
    assert np.abs(alone[0].astype(int) - images[1]).max() <= 1
    assert not np.array_equal(images[0], images[1])
    with pytest.raises(ValueError, match="half precision runs on a GPU only"):
        load_any_pipeline(sd15_base, dtype=torch.float16)


def test_evaluate_takes_the_published_folder_as_its_baseline(sd15_base, tiny_world, tmp_path):
    from omnidiff.config import load_config
    from omnidiff.models.evaluator import AttributeClassifier, save_evaluator
    from train.eval_config import EvalConfig
    from train.evaluate import evaluate

    torch.manual_seed(0)
    labels = {name: list(ATTRIBUTES[name]) for name in ("shape", "colour", "position")}
    judge = save_evaluator(AttributeClassifier(labels, 16), {name: 0.5 for name in labels}, tmp_path / "judge")
    cfg = load_config(EvalConfig, None, [f"world_dir={tiny_world}", f"evaluator_dir={judge}", f"baseline={sd15_base}",
                                         "require_fit_evaluator=false", "track=false", "max_per_group=1", "steps=2",
                                         "real_images=8", "bootstrap_resamples=100", "langs=[en,zh]",
                                         f"report_dir={tmp_path / 'report'}"])
    report = evaluate({}, cfg)
    scores = report.scores
    assert set(scores["model"]) == {"base"} and set(scores["lang"]) == {"en", "zh"}
    assert scores["score"].between(0, 1).all() and scores["score"].notna().all()
    assert report.images["base"].shape[1:] == (16, 16, 3)  # drawn at 32x32 by the base, read at 16x16
    assert np.isfinite(report.frechet["base"])
    assert (tmp_path / "report" / "report.html").is_file()


@pytest.mark.e2e
def test_serving_the_base_folder_answers_at_its_native_size_only(stack, serve_port, sd15_base):
    import requests

    from omnidiff.config import load_config
    from serve import app as serve_app
    from serve.config import ServeConfig
    from tests.fixtures_serve import REPO

    token_env = "OMNIDIFF_BASE_SERVE_TEST_TOKEN"
    os.environ[token_env] = token = secrets.token_urlsafe(24)
    cfg = load_config(ServeConfig, REPO / "configs" / "serve_test.yaml",
                      [f"model={sd15_base}", f"port={serve_port}", "app_name=omnidiff-base-test",
                       "route_prefix=/base-test", f"auth.token_env={token_env}", "dtype=float32"])
    headers = {"Authorization": f"Bearer {token}"}
    try:
        url = serve_app.run(cfg)["url"]
        card = requests.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]
        assert card["conditioning"] == "base" and card["sizes"] == ["32x32"] and card["native_size"] == "32x32"
        assert card["languages"] == ["en"] and "English prompts only" in card["note"]

        png = requests.post(f"{url}/v1/generate", json={"prompt": "a red circle", "seed": 1, "steps": 2,
                                                        "response_format": "png"}, headers=headers, timeout=120)
        assert png.status_code == 200, png.text
        from PIL import Image

        assert Image.open(io.BytesIO(png.content)).size == (32, 32)

        small = requests.post(f"{url}/v1/generate", json={"prompt": "a red circle", "size": "16x16"},
                              headers=headers, timeout=60)
        assert small.status_code == 400 and "32x32" in small.text, small.text
    finally:
        if serve_app.running(cfg.app_name):
            serve_app.shutdown(cfg)
        os.environ.pop(token_env, None)
