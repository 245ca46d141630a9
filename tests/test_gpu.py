"""The SD 1.5 and SDXL paths on a CUDA GPU: bf16, DeepSpeed ZeRO-2, half-precision sampling (issue 16 item 9).

    .venv/bin/pytest -m gpu tests/test_gpu.py -x -q      # skipped where torch.cuda.is_available() is False
    benchmarks/gpu_check.sh                               # these tests, then a stage-2 throughput figure

The CPU equivalents are tests/test_base_stage1.py, tests/test_base_latent.py and tests/test_base_pipeline.py;
here the same tiny published-layout folders (tests/fixtures_bases.py) train with ``dist.use_gpu=true``,
``dist.precision=bf16`` and ZeRO stage 2 (the keys configs/gpu/train_stage*_sdxl.yaml set), one local rank,
and the export samples on ``cuda`` in bfloat16 and float16 through ``load_any_pipeline`` (serve's loader).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures_latent import run_stage2
from tests.test_base_stage1 import _config, embedded  # noqa: F401  (the module-scoped fixture: sd15 and sdxl)

pytestmark = pytest.mark.gpu

GPU = {"dist.use_gpu": True, "dist.precision": "bf16", "dist.zero_stage": 2}


def _falls(result: dict) -> dict[int, float]:
    val = {int(k): v for k, v in result["val_loss"].items()}
    assert np.isfinite(list(val.values())).all(), val
    assert val[max(val)] < val[0], f"val loss {val}"
    return val


def test_stage1_bf16_zero2_on_cuda(embedded, tiny_llm):  # noqa: F811
    """Stage 1 through the real loop on the GPU: the engine runs bf16 ZeRO-2 on cuda, the loss falls."""
    from omnidiff.contracts.base_folder import open_base_folder
    from omnidiff.models.adapter import OmniAdapter
    from train.inputs import resolve_inputs
    from train.job import build_job
    from train.launch import launch

    name, folder, _, _, _ = embedded
    cfg = _config(embedded, tiny_llm, "gpu-loop", max_steps=16, **GPU)
    assert (cfg.dist.use_gpu, cfg.dist.precision, cfg.dist.zero_stage) == (True, "bf16", 2)
    ckpt = Path(cfg.checkpoint.dir)
    ckpt.mkdir(parents=True)
    launch(cfg, build_job(cfg, resolve_inputs(cfg), ckpt, None))
    result = json.loads((ckpt / "result.json").read_text())
    _falls(result)
    adapter = OmniAdapter.from_pretrained(Path(result["final_dir"]) / "adapter")
    assert adapter.shape.out_dim == open_base_folder(folder).cross_attention_dim, name


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_stage2_bf16_zero2_on_cuda_then_half_precision_sampling(arch, request, train_snapshot, tiny_llm,
                                                               latent_caches, latent_cache_root, tmp_path):
    """Stage 2 on the base's latents in bf16 under ZeRO-2 on cuda (loss finite and falling); the export
    loads on cuda in bfloat16 and float16 (serve's loader) and draws RGB images that depend on the prompt."""
    from omnidiff.pipeline import OmniDiffusionPipeline, load_any_pipeline

    base = request.getfixturevalue(f"{arch}_base")
    result = run_stage2(base, f"{arch}-gpu-s2", train_snapshot, tiny_llm, latent_caches, latent_cache_root,
                        tmp_path, **GPU)
    _falls(result)
    export = Path(result["export_dir"])
    for dtype in (torch.bfloat16, torch.float16):
        pipe = load_any_pipeline(export, device="cuda", dtype=dtype)
        assert isinstance(pipe, OmniDiffusionPipeline)
        assert next(pipe.unet.parameters()).dtype == dtype and next(pipe.unet.parameters()).is_cuda
        draw = dict(num_inference_steps=4, guidance_scale=3.0, seed=0, output_type="np")
        red, blue = pipe(["a red circle"], **draw), pipe(["a blue square"], **draw)  # same noise, other prompt
        assert red.dtype == np.uint8 and red.shape[0] == 1 and red.shape[-1] == 3
        assert red.std() > 0, f"{arch} {dtype}: a flat image (NaN latents decode to one colour)"
        assert not np.array_equal(red, blue), f"{arch} {dtype}: the prompt does not reach the UNet"
        del pipe
        torch.cuda.empty_cache()


def test_half_precision_is_refused_on_the_cpu_and_taken_on_cuda(sd15_base):
    """Serve's loader: float16 on the published base folder itself runs on cuda (the CPU refuses it)."""
    from omnidiff.pipeline import load_any_pipeline

    with pytest.raises(ValueError, match="half precision runs on a GPU only"):
        load_any_pipeline(sd15_base, device="cpu", dtype=torch.float16)
    pipe = load_any_pipeline(sd15_base, device="cuda", dtype=torch.float16)
    images = pipe(["a red circle"], num_inference_steps=2, output_type="np")
    assert images.dtype == np.uint8 and images.shape[-1] == 3 and images.std() > 0
