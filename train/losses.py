"""The two loss families: one ``compute_*_loss(batch, modules, ...)`` each (STYLE.md 4).

* ``align`` (stage 1, PAPER.md "The three stages" 1): adapter(LLM states of a caption in any
  language) against the cached CLIP states of its English side. Per token 1 - cosine + a small
  norm-matching term (the release's default), averaged over the target positions the base UNet
  reads, then over captions: the tiny base masks CLIP's padding, so its cache holds real tokens
  only; a published SD / SDXL UNet reads all 77 positions of a window, padding included, so its
  cache holds (and stage 1 fits) every position of each used window. The pooled embedding gets the
  same loss against CLIP's pooled state, so stage 1 and stages 2-3 use one pooled head. Which query
  answers which CLIP token: a one-to-one set matching (the release's query i = position i measured
  worse, and was removed with MSE and the output-distillation term in issue 14); the adapter's
  length head learns how many queries are in use.
* ``diffusion`` (stages 2-3): the ordinary diffusion loss (noise or v, Min-SNR weighted) of the UNet
  conditioned on the adapter's tokens (cross-attention, the length head's prefix) and pooled
  embedding, through ``omnidiff.pipeline.predict_noise`` so training and sampling condition the UNet
  the same way.

``modules`` is the ``nn.ModuleDict`` the DeepSpeed engine wraps: ``adapter`` and, for diffusion,
``unet``. Both functions return ``(loss, metrics)`` with metrics as floats for logging.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from omnidiff.pipeline import min_snr_weights, predict_noise


def token_loss(pred: torch.Tensor, target: torch.Tensor, norm_weight: float) -> torch.Tensor:
    """Per-vector loss ``(..., D), (..., D) -> (...)``: 1 - cos + ``norm_weight`` x ((|pred| - |target|) / |target|)^2.

    The norm term is relative, so it means the same whatever the scale of the target space, and
    stays small next to the direction term as the paper's "small norm-matching term" asks.
    """
    cos = F.cosine_similarity(pred, target, dim=-1, eps=1e-6)
    target_norm = target.norm(dim=-1).clamp_min(1e-6)
    rel = (pred.norm(dim=-1) - target_norm) / target_norm
    return 1 - cos + norm_weight * rel.pow(2)


def set_assignment(tokens: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """For each target position, the query that answers it: ``(B, Q, D), (B, Tc, D), bool (B, Tc) -> long (B, Tc)``.

    A caption with n real CLIP tokens is answered by its first n queries, in whatever order a
    minimum-cost one-to-one matching on 1 - cosine picks (Hungarian algorithm, as DETR matches its
    queries to objects). So the set of queries in use is a prefix whose length the length head can
    learn, while their order is free. Padding positions get the queries past n, in order; the loss
    ignores them.
    """
    from scipy.optimize import linear_sum_assignment

    b, q, _ = tokens.shape
    tc = target.shape[1]
    # A caption's n <= Tc real targets go to queries 0..n-1 and its padding to n..Tc-1: no query past Tc is
    # ever chosen, so the costs are computed for the first Tc queries only (a sixth of the 231 on the tiny world).
    tokens = tokens[:, :tc]  # (B, Tc, D)
    cost = 1 - F.normalize(target, dim=-1, eps=1e-6) @ F.normalize(tokens, dim=-1, eps=1e-6).transpose(1, 2)  # (B, Tc, Tc)
    order = torch.empty(b, tc, dtype=torch.long)
    cost_np, mask_np = cost.float().cpu().numpy(), mask.cpu().numpy()
    for i in range(b):
        real = mask_np[i].nonzero()[0]
        n = len(real)
        rows, cols = linear_sum_assignment(cost_np[i, real][:, :n])  # (n, n): targets -> queries 0..n-1
        chosen = np.empty(tc, dtype=np.int64)
        chosen[real[rows]] = cols
        chosen[~mask_np[i]] = np.arange(n, n + tc - n)
        order[i] = torch.from_numpy(chosen)
    return order.to(tokens.device)


def compute_align_loss(batch: dict, modules, norm_weight: float, length_weight: float):
    """Stage 1. ``batch``: llm_states (B,T,Dl), llm_mask (B,T), target (B,Tc,Dc), target_mask (B,Tc), target_pooled (B,Dp).

    ``target_mask`` is True on every stored target position (train.data.clip_target_mask): the real
    tokens for the tiny base, all positions of the used windows for SD / SDXL.

    Each real CLIP token is answered by the query a one-to-one matching assigns it
    (:func:`set_assignment`): the UNet's cross-attention reads its text tokens as a set (no position
    embedding on keys), so this asks for exactly what it reads, without making the adapter
    reproduce English word order from a caption in another language.

    With the adapter's length head, ``length_weight`` x the squared error of the log count teaches
    it how many queries the UNet should read.
    """
    tokens, pooled, log_count = modules["adapter"].forward_all(batch["llm_states"], batch["llm_mask"])
    target, mask = batch["target"], batch["target_mask"].float()  # (B, Tc, Dc), (B, Tc)
    if target.shape[1] > tokens.shape[1]:
        raise ValueError(f"CLIP target has {target.shape[1]} positions but the adapter only {tokens.shape[1]} queries")
    order = set_assignment(tokens.detach(), target, mask.bool())  # (B, Tc): the query answering each target
    pred = torch.gather(tokens, 1, order[..., None].expand(-1, -1, tokens.shape[-1]))  # (B, Tc, Dc)
    per_token = token_loss(pred, target, norm_weight)  # (B, Tc)
    # Mean over each caption's real tokens, then over captions: a long caption weighs as much as a short one.
    per_caption = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)  # (B,)
    pooled_loss = token_loss(pooled, batch["target_pooled"], norm_weight)  # (B,)
    loss = per_caption.mean() + pooled_loss.mean()
    metrics = {}
    if log_count is not None:
        # The queries that answer a real target token form a prefix; the length head learns its
        # length, in log space (2 .. 231 tokens).
        real = torch.zeros(tokens.shape[:2], device=tokens.device)  # (B, Q)
        real.scatter_(1, order, mask)
        count = (real * torch.arange(1, real.shape[1] + 1, device=real.device)).amax(1).clamp_min(1)  # (B,)
        loss = loss + length_weight * F.mse_loss(log_count, count.log())
        with torch.no_grad():
            metrics["count_err"] = float((log_count.exp().round() - count).abs().mean().item())
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


def compute_diffusion_loss(batch: dict, modules, noise_scheduler, min_snr_gamma: float):
    """Stages 2-3. ``batch``: llm_states, llm_mask, pixels (B,C,H,W), noise (B,C,H,W), timesteps (B,),
    and for a latent cache time_ids (B, 6) (read by an SDXL UNet only). ``pixels`` are pixels in
    [-1, 1] (the tiny base) or VAE latents times the folder's scaling factor; the target follows the
    schedule's ``prediction_type`` (epsilon or v_prediction), no clamping anywhere.

    ``min_snr_gamma`` > 0 weights each example by Min-SNR-gamma, as the base model was pretrained.
    """
    # (B, Q, D), (B, D), (B, Q): the queries the UNet reads (all, or the length head's prefix)
    tokens, pooled, mask = modules["adapter"].condition(batch["llm_states"], batch["llm_mask"])
    pixels, noise, timesteps = batch["pixels"], batch["noise"], batch["timesteps"]
    noisy = noise_scheduler.add_noise(pixels, noise, timesteps)  # (B, C, H, W)
    # SDXL: text_embeds = the adapter's pooled output, time_ids from each image's cached size and crop
    pred = predict_noise(modules["unet"], noisy, timesteps, tokens, pooled, mask, batch.get("time_ids"))  # (B, C, H, W)
    target = diffusion_target(noise_scheduler, pixels, noise, timesteps)
    per_example = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))  # (B,)
    loss = (per_example * min_snr_weights(noise_scheduler, timesteps, min_snr_gamma)).mean()
    return loss, {}
