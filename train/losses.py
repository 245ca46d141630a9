"""The two loss families: one ``compute_*_loss(batch, modules, ...)`` each (STYLE.md 4).

* ``align`` (stage 1, PAPER.md "The three stages" 1): adapter(LLM states of a caption in any
  language) against the cached CLIP states of its English side. Per token 1 - cosine + a small
  norm-matching term (the release's default) or MSE, averaged over *real* target tokens only (the
  release also fits CLIP's padding; we don't), then over captions; the pooled embedding gets the
  same loss against CLIP's pooled state, so stage 1 and stages 2-3 use one pooled head.
* ``diffusion`` (stages 2-3): the ordinary noise-prediction loss of the UNet conditioned on the
  adapter's tokens (cross-attention) and pooled embedding, through ``omnidiff.pipeline.predict_noise``
  so training and sampling condition the UNet the same way.

``modules`` is the ``nn.ModuleDict`` the DeepSpeed engine wraps: ``adapter`` and, for diffusion,
``unet``. Both functions return ``(loss, metrics)`` with metrics as floats for logging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnidiff.pipeline import predict_noise


def token_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, norm_weight: float) -> torch.Tensor:
    """Per-vector loss ``(..., D), (..., D) -> (...)``.

    ``cosine``: 1 - cos + ``norm_weight`` x ((|pred| - |target|) / |target|)^2. The norm term is
    relative, so it means the same whatever the scale of the target space, and stays small next to
    the direction term as the paper's "small norm-matching term" asks. ``mse``: mean squared error.
    """
    if kind == "mse":
        return (pred - target).pow(2).mean(-1)
    if kind != "cosine":
        raise ValueError(f"loss={kind!r}: expected 'cosine' or 'mse'")
    cos = F.cosine_similarity(pred, target, dim=-1, eps=1e-6)
    target_norm = target.norm(dim=-1).clamp_min(1e-6)
    rel = (pred.norm(dim=-1) - target_norm) / target_norm
    return 1 - cos + norm_weight * rel.pow(2)


def compute_align_loss(batch: dict, modules, kind: str = "cosine", norm_weight: float = 0.1, mask_weight: float = 0.1):
    """Stage 1. ``batch``: llm_states (B,T,Dl), llm_mask (B,T), target (B,Tc,Dc), target_mask (B,Tc), target_pooled (B,Dc).

    With the adapter's mask head, ``mask_weight`` x binary cross-entropy teaches it which queries are
    real CLIP tokens (``target_mask``, and none past the stored positions).
    """
    tokens, pooled, mask_logits = modules["adapter"].forward_all(batch["llm_states"], batch["llm_mask"])
    target, mask = batch["target"], batch["target_mask"].float()  # (B, Tc, Dc), (B, Tc)
    if target.shape[1] > tokens.shape[1]:
        raise ValueError(f"CLIP target has {target.shape[1]} positions but the adapter only {tokens.shape[1]} queries")
    pred = tokens[:, : target.shape[1]]  # (B, Tc, Dc): query i answers CLIP position i
    per_token = token_loss(pred, target, kind, norm_weight)  # (B, Tc)
    # Mean over each caption's real tokens, then over captions: a long caption weighs as much as a short one.
    per_caption = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)  # (B,)
    pooled_loss = token_loss(pooled, batch["target_pooled"], kind, norm_weight)  # (B,)
    loss = per_caption.mean() + pooled_loss.mean()
    metrics = {}
    if mask_logits is not None:
        real = torch.zeros_like(mask_logits)  # (B, Q)
        real[:, : mask.shape[1]] = mask
        loss = loss + mask_weight * F.binary_cross_entropy_with_logits(mask_logits, real)
        with torch.no_grad():
            metrics["mask_acc"] = float(((mask_logits > 0).float() == real).float().mean().item())
    with torch.no_grad():
        cos = F.cosine_similarity(pred, target, dim=-1, eps=1e-6)  # (B, Tc)
        metrics["token_cos"] = float(((cos * mask).sum() / mask.sum().clamp_min(1)).item())
        metrics["pooled_cos"] = float(F.cosine_similarity(pooled, batch["target_pooled"], dim=-1).mean().item())
    return loss, metrics


def diffusion_target(noise_scheduler, pixels: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet predicts under the schedule's ``prediction_type``."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(pixels, noise, timesteps)
    if kind == "sample":
        return pixels
    raise ValueError(f"scheduler prediction_type={kind!r} is not supported")


def compute_diffusion_loss(batch: dict, modules, noise_scheduler):
    """Stages 2-3. ``batch``: llm_states, llm_mask, pixels (B,C,H,W), noise (B,C,H,W), timesteps (B,)."""
    # (B, Q, D), (B, D), (B, Q): the queries the UNet reads (all, or the mask head's choice)
    tokens, pooled, mask = modules["adapter"].condition(batch["llm_states"], batch["llm_mask"])
    pixels, noise, timesteps = batch["pixels"], batch["noise"], batch["timesteps"]
    noisy = noise_scheduler.add_noise(pixels, noise, timesteps)  # (B, C, H, W)
    pred = predict_noise(modules["unet"], noisy, timesteps, tokens, pooled, mask)  # (B, C, H, W)
    target = diffusion_target(noise_scheduler, pixels, noise, timesteps)
    loss = F.mse_loss(pred.float(), target.float())
    return loss, {}
