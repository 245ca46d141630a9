"""configs/gpu/pipeline_sdxl.yaml, the file a GPU user runs, completing on the CPU (issue 16, "Must show").

    flock /tmp/omnidiff-heavy.lock .venv/bin/pytest tests/test_base_pipeline_gpu_yaml.py -x -q

The same YAML and its stage files (collect excepted: see ``cpu_overrides``), with ``base_model`` set to the tiny SDXL folder and overrides that
change only where the data comes from and how big and where things run: the tiny world served over
local HTTP instead of LAION url lists (``world``), the tiny random LLM instead of the 7B, a tiny adapter,
a few steps of small batches, one local rank on the CPU in fp32, embed in-process on the CPU, no deploy.
The same run from a shell (``omnidiff pipeline`` takes the same ``key=value`` overrides; the stack must be up):

    omnidiff pipeline --config configs/gpu/pipeline_sdxl.yaml base_model=<tiny SDXL folder> \\
        $(python -c "from tests.test_base_pipeline_gpu_yaml import cpu_overrides as o; print(' '.join(o('<llm>')))")
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_YAML = REPO / "configs" / "gpu" / "pipeline_sdxl.yaml"


def cpu_overrides(llm: Path | str, port: int = 18766, report_dir: Path | str | None = None) -> list[str]:
    """The size / place overrides that run configs/gpu/pipeline_sdxl.yaml on a CPU box in minutes."""
    out = [
        "world=configs/world_test.yaml", f"world_port={port}", "deploy=false",
        # collect: the LAION file's scorer (my_scorers.laion) and its options exist on the cluster only, and a
        # dotted override merges into a dict rather than emptying it: the whole collect file is swapped for the
        # tests' (32 px world images, one img2dataset process, the built-in image_quality scorer)
        "collect=configs/collect_test.yaml",
        # embed: in-process on the CPU, the tiny LLM in fp32, the base folder's own VAE at its native size
        f"embed.llm.path={llm}", "embed.llm.dtype=float32", "embed.cache_root=null", "embed.executor=local",
        "embed.device=cpu", "embed.num_gpus_per_actor=0", "embed.num_actors=1", "embed.threads_per_actor=1",
        "embed.pixels.vae=null", "embed.pixels.resolution=32", "embed.max_tokens=2048", "embed.max_batch_size=32",
        "embed.shard_tokens=2048", "embed.shard_rows=64", "embed.share_cache_mb=16",
        # evaluate: one prompt per group, two sampler steps
        "evaluate.max_per_group=1", "evaluate.steps=2", "evaluate.real_images=16",
        "evaluate.require_fit_evaluator=false",
    ]
    if report_dir is not None:
        out.append(f"evaluate.report_dir={report_dir}")
    for i in (1, 2, 3):
        out += [f"stage{i}.llm.path={llm}", f"stage{i}.llm.dtype=float32",
                f"stage{i}.adapter.width=32", f"stage{i}.adapter.encoder_layers=1",
                f"stage{i}.adapter.decoder_layers=1", f"stage{i}.adapter.heads=4",
                f"stage{i}.micro_batch_size=8", f"stage{i}.global_batch_size=16", f"stage{i}.max_steps=4",
                f"stage{i}.optim.warmup_steps=2", f"stage{i}.checkpoint.every_steps=4",
                f"stage{i}.samples.per_group=0", f"stage{i}.samples.steps=2",
                f"stage{i}.dist.launcher=local", f"stage{i}.dist.num_workers=1", f"stage{i}.dist.use_gpu=false",
                f"stage{i}.dist.precision=fp32"]
    # stage 3's high-aesthetic subset at the tiny world's scale (its clean images score >= 3.2)
    out.append("stage3.data.aesthetic_min=2.5")
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_gpu_yaml_with_cpu_overrides_validates_and_keeps_its_layout(sdxl_base, tiny_llm, tmp_path):
    """The overrides change sizes and places only: the GPU file's stage names, ZeRO stage, EMA,
    registry name and evaluation stay; the result is a valid PipelineConfig on the SDXL folder."""
    from flows.config import load_pipeline_config

    gpu = load_pipeline_config(GPU_YAML, [f"base_model={sdxl_base}"])
    cfg = load_pipeline_config(GPU_YAML, [f"base_model={sdxl_base}", *cpu_overrides(tiny_llm, _free_port())])
    assert cfg.base_model == sdxl_base and cfg.world is not None and cfg.deploy is False
    for name in ("stage1", "stage2", "stage3"):
        ours, theirs = getattr(cfg, name), getattr(gpu, name)
        assert (ours.name, ours.stage, ours.dist.zero_stage) == (theirs.name, theirs.stage, theirs.dist.zero_stage)
        assert ours.registry.model_name == theirs.registry.model_name == "omnidiff-sdxl"
        assert ours.dist.use_gpu is False and theirs.dist.use_gpu is True and theirs.dist.precision == "bf16"
        assert ours.ema_decay == theirs.ema_decay
    assert cfg.embed.device == "cpu" and gpu.embed.device == "cuda"
    assert cfg.collect.aesthetic_scorer == "image_quality" and gpu.collect.aesthetic_scorer != "image_quality"
    assert cfg.evaluate == gpu.evaluate.model_copy(update={"max_per_group": 1, "steps": 2, "real_images": 16,
                                                           "require_fit_evaluator": False})


@pytest.mark.e2e
def test_the_gpu_pipeline_yaml_completes_on_the_cpu_on_a_tiny_sdxl_folder(stack, tiny_llm, sdxl_base, tmp_path):
    from flows.config import load_pipeline_config
    from flows.pipeline import omnidiff_pipeline
    from omnidiff.pipeline import OmniDiffusionPipeline

    cfg = load_pipeline_config(GPU_YAML, [f"base_model={sdxl_base}",
                                          *cpu_overrides(tiny_llm, _free_port(), tmp_path / "report")])
    out = omnidiff_pipeline(cfg)
    assert out["base"]["base_model"] == str(sdxl_base.resolve())
    assert {"collect", "embed", "stage1", "stage2", "stage3", "evaluate"} <= set(out["timings_s"])
    export = Path(out["stage3"]["export_dir"])
    index = json.loads((export / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True and index["vae"] == ["diffusers", "AutoencoderKL"]
    pipe = OmniDiffusionPipeline.from_pretrained(export, llm_path=tiny_llm)
    assert pipe.force_zeros_for_empty_prompt
    assert pipe.adapter.shape.pooled_dim == 24 and pipe.adapter.shape.out_dim == 96
    assert out["evaluate"].get("report_html")
