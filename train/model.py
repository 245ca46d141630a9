"""The one builder of a stage's modules, for training, sampling and export (STYLE.md 3: builders).

Every adapter and UNet train/ uses is made here: ``build_stage_model`` (what the DeepSpeed engine
wraps), ``build_modules`` (fresh modules holding given weights, for sample grids and the final
weights) and ``load_modules`` (a saved ``adapter/`` + ``unet/`` folder, for the export). The
adapter's shape comes from ``cfg.adapter`` and the job's dimensions only here.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn


class StageModel(nn.Module):
    """What the DeepSpeed engine wraps: the adapter (+ UNet) with the family's loss as ``forward``.

    Composition only: ``loss_fn(batch, self) -> (loss, metrics)`` is train.losses'
    ``compute_align_loss`` or ``compute_diffusion_loss`` with its settings bound.
    """

    def __init__(self, adapter: nn.Module, unet: nn.Module | None, loss_fn):
        super().__init__()
        self.adapter = adapter
        self.unet = unet
        self.loss_fn = loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(batch, self)

    def __getitem__(self, name: str) -> nn.Module:
        return getattr(self, name)


def unet_trainable(name: str, part: str) -> bool:
    """Whether UNet parameter ``name`` trains under ``train_unet=part``.

    ``attention``: every transformer block; ``cross_attention``: the blocks that read the text
    (``attn2``, cross-attention) and the pooled-text (class) embedding.
    """
    if part == "all":
        return True
    if part == "attention":
        return ".attentions." in name or name.startswith("class_embedding.")
    if part == "cross_attention":
        return ".attn2." in name or name.startswith("class_embedding.")
    return False


def initial_adapter(cfg, job):
    """The adapter a stage starts from: the parent export's (``job.init_from``), else a fresh one of
    ``cfg.adapter``'s shape whose input statistics (``input_norm``) come from the driver's cache scan."""
    from omnidiff.models.adapter import OmniAdapter

    if job.init_from is not None and (Path(job.init_from) / "adapter").is_dir():
        return OmniAdapter.from_pretrained(Path(job.init_from) / "adapter")
    a = cfg.adapter
    adapter = OmniAdapter(job.llm_dim, a.width, job.out_dim, a.num_queries, a.encoder_layers, a.decoder_layers,
                          a.heads, a.dropout, input_norm=a.input_norm, length_head=a.length_head,
                          pooled_query=a.pooled_query, pooled_dim=job.pooled_dim)
    if a.input_norm:
        if job.llm_stats is None:
            raise ValueError("adapter.input_norm needs the LLM cache's per-dimension statistics (job.llm_stats)")
        mean, std = job.llm_stats
        adapter.set_input_stats(torch.as_tensor(mean), torch.as_tensor(std))
    return adapter


def unet_folder(cfg, job) -> Path:
    """The pipeline folder whose ``unet/`` a stage starts from: stage 3 continues the stage-2 UNet
    (its ``init_from``); stages 1-2 start from the base model's."""
    return Path(job.init_from) if (cfg.stage == 3 and job.init_from is not None) else Path(job.base_model)


def weights_variant(folder: Path) -> dict:
    """``{"variant": "fp16"}`` for a component folder that ships only ``*.fp16.safetensors`` (fp16-only
    mirrors of published bases), else ``{}``."""
    files = [p.name for p in Path(folder).glob("*.safetensors")]
    return {"variant": "fp16"} if files and all(".fp16." in f for f in files) else {}


def load_unet(folder: Path):
    """``folder/unet`` (safetensors only; the fp16 variant where that is all there is), in float32."""
    from diffusers import UNet2DConditionModel

    unet_dir = Path(folder) / "unet"
    return UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True, **weights_variant(unet_dir)).float()


def load_vae(base_model: Path):
    """The base model's ``vae/`` (``AutoencoderKL``, eval mode), or ``None`` for a pixel-space base."""
    vae_dir = Path(base_model) / "vae"
    if not vae_dir.is_dir():
        return None
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, **weights_variant(vae_dir)).float().eval()


def load_noise_scheduler(base_model: Path):
    """The base model's training noise schedule: a ``DDPMScheduler`` from ``scheduler/``'s config, whatever
    sampler class the folder names (SD ships PNDM, SDXL Euler), so the betas, ``num_train_timesteps`` and
    ``prediction_type`` (epsilon or v_prediction) are the folder's."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(DDPMScheduler.load_config(Path(base_model) / "scheduler"))


def build_stage_model(cfg, job) -> StageModel:
    """The stage's modules, initialised as the config says, with frozen parts' ``requires_grad`` off."""
    from train.losses import compute_align_loss, compute_diffusion_loss

    torch.manual_seed(cfg.seed)  # adapter init is part of "a run is a function of (config, seed)"
    adapter = initial_adapter(cfg, job)
    adapter.requires_grad_(cfg.diffusion is None or cfg.diffusion.train_adapter)
    if adapter.length_head is not None and cfg.stage != 1:
        adapter.length_head.requires_grad_(False)  # stage 1 taught it; the UNet's mask stays what it learned
    if cfg.family == "align":
        return StageModel(adapter, None, partial(compute_align_loss, norm_weight=cfg.align.norm_weight,
                                                 length_weight=cfg.align.length_weight))
    unet = load_unet(unet_folder(cfg, job))
    for name, p in unet.named_parameters():
        p.requires_grad_(unet_trainable(name, cfg.diffusion.train_unet))
    if cfg.diffusion.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return StageModel(adapter, unet, partial(compute_diffusion_loss, noise_scheduler=load_noise_scheduler(job.base_model),
                                             min_snr_gamma=cfg.diffusion.min_snr_gamma))


def set_train_mode(model: StageModel, cfg) -> None:
    """Training mode where weights train; frozen parts stay in eval (no dropout noise from them)."""
    model.train()
    if cfg.diffusion is not None and not cfg.diffusion.train_adapter:
        model.adapter.eval()
    if model.unet is not None and cfg.diffusion.train_unet == "none":
        model.unet.eval()


def build_modules(cfg, job, weights: dict[str, torch.Tensor]):
    """Fresh ``(adapter, unet)`` holding ``weights`` (a StageModel state dict) for sampling / export,
    apart from the engine's modules.

    Stage 1 has no UNet in training: the base model's UNet is used (the stage-1 export pairs the
    aligned adapter with the unchanged base UNet).
    """
    adapter = initial_adapter(cfg, job)
    adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in weights.items() if k.startswith("adapter.")})
    unet = load_unet(unet_folder(cfg, job))
    unet_weights = {k.removeprefix("unet."): v for k, v in weights.items() if k.startswith("unet.")}
    if unet_weights:
        unet.load_state_dict(unet_weights)
    return adapter.eval(), unet.eval()


def save_modules(folder: Path, adapter, unet) -> None:
    """``folder/adapter`` and ``folder/unet`` (safetensors): what :func:`load_modules` reads back."""
    adapter.save_pretrained(Path(folder) / "adapter")
    unet.save_pretrained(Path(folder) / "unet", safe_serialization=True)


def load_modules(folder: Path):
    """``(adapter, unet)`` saved by :func:`save_modules` (the final weights the export packs)."""
    from omnidiff.models.adapter import OmniAdapter

    return OmniAdapter.from_pretrained(Path(folder) / "adapter"), load_unet(folder)
