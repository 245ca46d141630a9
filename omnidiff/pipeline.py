"""``OmniDiffusionPipeline``: text -> images for the base model (CLIP-style) and for ours (LLM + adapter).

One idea in one file (a little over 400 lines): the folder format, its loader and its sampler are
read together whenever one of them changes; a split would only add imports between them.

A diffusers-style folder (docs/architecture.md "Pipeline folder"), safetensors and JSON only (plus, for
``llm_adapter``, three one-import files through which diffusers itself loads it: omnidiff/pipeline_diffusers.py):

    model_index.json        _class_name, conditioning: "clip" | "llm_adapter", component classes,
                            force_zeros_for_empty_prompt (SDXL bases: the unconditional embedding is zeros)
    unet/                   diffusers UNet2DConditionModel (SDXL's reads text_embeds + time_ids too)
    scheduler/              DPMSolverMultistepScheduler (Karras sigmas; thresholding in pixel space only)
    vae/                    optional diffusers AutoencoderKL (SD-class models); absent = pixel space
    text_encoder/ tokenizer/            conditioning "clip": the base model's CLIP-style encoder
    adapter/ text_encoder/encoder.json  conditioning "llm_adapter": the adapter + a portable reference to
                                        the LLM (model id, folder name, weights digest, layer, ...;
                                        resolved by find_llm), or the LLM itself copied into text_encoder/
    lineage.json            optional: MLflow run ids and input digests (written by train/)

Loading needs only ``omnidiff.models`` and this module, never the training code:

    pipe = OmniDiffusionPipeline.from_pretrained("exports/stage2")
    images = pipe(["一个红色的圆在左边"], num_inference_steps=20, guidance_scale=3.0, seed=0)
    pipe = DiffusionPipeline.from_pretrained("exports/stage2", trust_remote_code=True)  # diffusers' own loader
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from omnidiff.contracts.encoders import vae_scale_factor
from omnidiff.models.adapter import OmniAdapter
from omnidiff.models.clip_text import ClipTextEncoder
from omnidiff.models.llm import LLMTextEncoder
from omnidiff.models.unet import add_coord_channels, coord_channels
from omnidiff.text import normalise_caption

log = logging.getLogger("omnidiff")

MODEL_INDEX = "model_index.json"
ENCODER_REF = "encoder.json"
LINEAGE = "lineage.json"
CONDITIONINGS = ("clip", "llm_adapter")


def sampling_scheduler(config: dict, num_inference_steps: int = 20, latent: bool = False):
    """DPM-Solver++ for a training noise schedule ``config`` (any diffusers scheduler's config).

    Karras sigmas as in the release (PAPER.md). In pixel space (the tiny base) thresholding is on:
    with noise prediction the first step magnifies the model's error ~100x and clamping the
    predicted image fixes it (NOTES.md "Sampling pitfall"). For a latent model (``latent=True``: SD,
    SDXL) it stays off: diffusers documents dynamic thresholding as unsuitable for latent-space
    models, whose latents are not bounded by +-1 (issue 16). Exception: on a cosine schedule
    (sigma_max ~2e4) Karras spacing puts about half the steps at the same integer timestep 998, so
    the UNet would see one timestep for many noise levels; then the timesteps are spaced linearly
    instead (logged), "trailing" so the first one is the training's noisiest. The schedule's
    ``prediction_type`` (epsilon or v_prediction) is kept.
    """
    from diffusers import DPMSolverMultistepScheduler

    keep = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    keep.update(algorithm_type="dpmsolver++", thresholding=not latent, use_karras_sigmas=True)
    scheduler = DPMSolverMultistepScheduler.from_config(keep)
    scheduler.set_timesteps(num_inference_steps)
    steps = scheduler.timesteps.tolist()
    if len(set(steps)) < len(steps) - 1:
        log.warning(
            "Karras sigmas give %d distinct of %d timesteps on this noise schedule (%s); using linear spacing",
            len(set(steps)),
            len(steps),
            keep.get("beta_schedule"),
        )
        # "trailing": the first step is the training's last timestep (999 of 1000), where the sample really is
        # pure noise. The training scheduler's default "leading" starts 20 steps at t=940 (alpha 0.09), so
        # the model reads the noise's low frequencies as a faint image there: it decided the corner a shape
        # went to, not the prompt (issue 18 item 2, benchmarks/base_position.py).
        keep.update(use_karras_sigmas=False, timestep_spacing="trailing")
        scheduler = DPMSolverMultistepScheduler.from_config(keep)
    return scheduler


def sdxl_time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    """SDXL's added time ids ``(B, 6)`` = original (height, width) + crop (top, left) + target (height, width).

    The order of diffusers' ``StableDiffusionXLPipeline._get_add_time_ids`` and of its SDXL training
    script (``compute_time_ids``). Each argument is a pair or a ``(B, 2)`` array; int64, so no
    compute dtype rounds a size (the UNet's sinusoidal projection takes them as they are).
    """
    parts = [torch.as_tensor(np.asarray(x), dtype=torch.long).reshape(-1, 2) for x in (original_size, crop_top_left, target_size)]
    n = max(p.shape[0] for p in parts)
    return torch.cat([p.expand(n, 2) for p in parts], dim=1)  # (B, 6)


def pooled_width(unet) -> int | None:
    """The width of the pooled text embedding the UNet reads: SDXL's ``text_embeds`` (its projection input
    minus 6 time ids), the tiny base's class-embedding projection input, or ``None`` (SD 1.5 reads none)."""
    cfg = unet.config
    if cfg.addition_embed_type == "text_time":
        return int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
    if cfg.class_embed_type == "projection":
        return int(cfg.projection_class_embeddings_input_dim)
    return None


def predict_noise(unet, sample, timesteps, tokens, pooled, mask, time_ids=None):
    """The one way the UNet is conditioned, shared by training and sampling so they cannot drift.

    ``sample (B, C, H, W)``, ``timesteps (B,)`` or scalar, ``tokens (B, T, D)``, ``pooled (B, Dp)``,
    ``mask bool (B, T)`` (False = padding: no cross-attention to it), ``time_ids (B, 6)`` (SDXL:
    :func:`sdxl_time_ids`) -> the UNet's prediction ``(B, C, H, W)``. ``pooled`` goes in as the tiny
    base's class embedding (``class_embed_type`` "projection") or as SDXL's ``text_embeds`` with the
    time ids (``addition_embed_type`` "text_time", diffusers' ``added_cond_kwargs``); SD 1.5 reads neither.
    A UNet with two more inputs than outputs also gets the pixel coordinates (omnidiff/models/unet.py).
    """
    class_labels = pooled if unet.config.class_embed_type == "projection" else None
    added = None
    if unet.config.addition_embed_type == "text_time":
        if time_ids is None:
            raise ValueError("this UNet (SDXL, addition_embed_type 'text_time') needs time_ids: original size, "
                             "crop and target size per image (omnidiff.pipeline.sdxl_time_ids)")
        width = pooled_width(unet)
        if pooled is None or pooled.shape[-1] != width:
            raise ValueError(f"pooled text embedding of width {None if pooled is None else pooled.shape[-1]}, but this "
                             f"SDXL UNet reads text_embeds of width {width} (the base folder's pooled_dim)")
        added = {"text_embeds": pooled, "time_ids": time_ids.to(sample.device)}
    # Text positions that no row reads (trailing padding: CLIP windows a caption does not use, adapter
    # queries past the longest predicted length) are cut: masked keys change nothing but cost attention.
    if mask is not None and mask.ndim == 2 and not mask.all():
        used = mask.any(0).nonzero()
        keep = int(used.max()) + 1 if len(used) else 1
        tokens, mask = tokens[:, :keep], mask[:, :keep]
    if coord_channels(unet):  # a CoordConv UNet (omnidiff/models/unet.py): y and x after the sample
        sample = add_coord_channels(sample)
    return unet(
        sample,
        timesteps,
        encoder_hidden_states=tokens,
        encoder_attention_mask=mask,
        class_labels=class_labels,
        added_cond_kwargs=added,
    ).sample


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents ``(B, C, h, w)`` (scaled by the VAE's ``scaling_factor``) -> images ``(B, 3, H, W)`` in about [-1, 1].

    In float32 where the VAE's config says ``force_upcast`` (SDXL's VAE overflows in fp16), as
    diffusers' SDXL pipeline does; otherwise in the VAE's own dtype.
    """
    dtype = next(vae.parameters()).dtype
    if getattr(vae.config, "force_upcast", False) and dtype != torch.float32:
        vae = vae.to(torch.float32)
        dtype = torch.float32
    scale = getattr(vae.config, "scaling_factor", 1.0)
    return vae.decode(latents.to(dtype) / scale).sample


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, floor: float = 0.0) -> torch.Tensor:
    """Per-example Min-SNR-gamma loss weights ``(B,)`` for the schedule's ``prediction_type`` (Hang et al. 2023).

    ``min(SNR, gamma) / SNR`` for noise prediction, ``min(SNR, gamma) / (SNR + 1)`` for v-prediction;
    all ones when ``gamma`` is 0. Measured on the tiny world: without it the base model never learned
    colour (omnidiff/base/pretrain.py), and stage 2's colour faithfulness stalled the same way.
    ``floor`` > 0 clamps ``SNR`` from below as well (``clamp(SNR, floor, gamma)``, the image-space weight;
    "truncated SNR", Salimans & Ho 2022): plain Min-SNR weights the noisiest steps by about SNR, ~0 there,
    and those are the steps where an image's layout, where the shape goes, is decided (issue 18 item 2).
    """
    from diffusers.training_utils import compute_snr

    if gamma <= 0:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    if floor < 0 or floor > gamma:
        raise ValueError(f"floor={floor}: must be in [0, gamma={gamma}]")
    snr = compute_snr(scheduler, timesteps)  # (B,): alpha_bar / (1 - alpha_bar)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    return torch.clamp(snr, min=floor, max=gamma) / (snr + 1 if v_pred else snr)


class OmniDiffusionPipeline:
    """Text -> images with classifier-free guidance; the text side is either the base model's
    CLIP-style encoder (``conditioning="clip"``) or the frozen LLM + adapter (``"llm_adapter"``).

    Build one in memory (training, export) with the components, or load a folder with
    :meth:`from_pretrained`. Prompts are normalised like the training captions
    (omnidiff.text.normalise_caption) before encoding.
    """

    def __init__(
        self,
        unet,
        scheduler,
        conditioning: Literal["clip", "llm_adapter"],
        text_encoder: ClipTextEncoder | None = None,
        adapter: OmniAdapter | None = None,
        llm: LLMTextEncoder | None = None,
        vae=None,
        clip_max_windows: int = 1,
        force_zeros_for_empty_prompt: bool = False,
    ):
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning={conditioning!r}: expected one of {CONDITIONINGS}")
        if conditioning == "clip" and text_encoder is None:
            raise ValueError("conditioning='clip' needs text_encoder (a ClipTextEncoder)")
        if conditioning == "llm_adapter" and (adapter is None or llm is None):
            raise ValueError("conditioning='llm_adapter' needs adapter (OmniAdapter) and llm (LLMTextEncoder)")
        cross = unet.config.cross_attention_dim
        if conditioning == "clip" and text_encoder.hidden_size != cross:
            raise ValueError(f"text_encoder hidden size {text_encoder.hidden_size} != unet cross_attention_dim {cross}")
        if conditioning == "llm_adapter":
            if adapter.shape.out_dim != cross:
                raise ValueError(f"adapter out_dim {adapter.shape.out_dim} != unet cross_attention_dim {cross}")
            if adapter.shape.llm_dim != llm.hidden_size:
                raise ValueError(f"adapter llm_dim {adapter.shape.llm_dim} != LLM hidden size {llm.hidden_size}")
            expected = pooled_width(unet)
            if expected is not None and adapter.shape.pooled_dim != expected:
                raise ValueError(f"adapter pooled_dim {adapter.shape.pooled_dim} != the width of the pooled embedding "
                                 f"the unet reads ({expected}: SDXL's text_embeds or the class-embedding projection)")
        from diffusers import DPMSolverMultistepScheduler

        self.unet = unet.eval()
        # A training scheduler (DDPM) from the training code becomes the sampler it implies.
        if not isinstance(scheduler, DPMSolverMultistepScheduler):
            scheduler = sampling_scheduler(scheduler.config, latent=vae is not None)
        self.scheduler = scheduler
        self.conditioning = conditioning
        self.text_encoder = text_encoder.eval() if text_encoder is not None else None
        self.adapter = adapter.eval() if adapter is not None else None
        self.llm = llm
        self.vae = vae.eval() if vae is not None else None
        self.clip_max_windows = int(clip_max_windows)
        # SDXL's model_index.json flag: the unconditional branch of an empty negative prompt is all zeros
        # (tokens and pooled), as diffusers' StableDiffusionXLPipeline.encode_prompt feeds it; stage 1
        # trains no "" example for such a base, so the adapter's output for "" means nothing.
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.lineage: dict | None = None

    # -- devices ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device) -> OmniDiffusionPipeline:
        for module in (self.unet, self.text_encoder, self.adapter, self.vae):
            if module is not None:
                module.to(device)
        if self.llm is not None:
            self.llm.model.to(device)
            self.llm.device = torch.device(device)
        return self

    # -- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str] | str):
        """``prompts`` -> ``(tokens (B, T, D), pooled (B, D), mask bool (B, T))`` on the UNet's device.

        clip: T = 77 * clip_max_windows, mask False on padding. llm_adapter: T = the adapter's
        number of queries, the mask its length head's prefix (every position without one).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a str or a list of str")
        texts = [normalise_caption(p) for p in prompts]
        if self.conditioning == "clip":
            tokens, mask, pooled = self.text_encoder.encode(texts, max_windows=self.clip_max_windows)
        else:
            states, llm_mask = self.llm.encode(texts)  # (B, T, Dl), (B, T)
            dev = self.device
            tokens, pooled, mask = self.adapter.condition(states.to(dev), llm_mask.to(dev))  # (B, Q, D), (B, D), (B, Q)
        return tokens.to(self.device), pooled.to(self.device), mask.to(self.device)

    def _encode_once(self, prompts: list[str]):
        """:meth:`encode_prompt` with each distinct prompt encoded once (a prompt drawn with several seeds,
        the guidance branch's ""), then repeated to one row per prompt: the same tensors, less LLM time."""
        unique = list(dict.fromkeys(prompts))
        encoded = self.encode_prompt(unique)
        if len(unique) == len(prompts):
            return encoded
        row = {p: i for i, p in enumerate(unique)}
        index = torch.tensor([row[p] for p in prompts], device=encoded[0].device)
        return tuple(t.index_select(0, index) for t in encoded)

    # -- sampling -----------------------------------------------------------------------------
    def _image_size(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        """(height, width, down): pixel size and the latent downsampling factor."""
        down = vae_scale_factor(self.vae.config) if self.vae is not None else 1
        default = int(self.unet.config.sample_size) * down
        height, width = height or default, width or default
        multiple = down * 2 ** (len(self.unet.config.block_out_channels) - 1)
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < multiple or value % multiple:
                raise ValueError(f"{name}={value!r}: must be a positive multiple of {multiple} for this model")
        return height, width, down

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str] | str,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        seed: int | list[int] = 0,
        height: int | None = None,
        width: int | None = None,
        output_type: Literal["pil", "np"] = "pil",
    ):
        """Images for ``prompts``: a list of PIL images, or uint8 ``(N, H, W, 3)`` with ``output_type="np"``.

        ``seed``: one int (image i uses ``seed + i``) or one seed per prompt, so an image depends on
        its own prompt and seed only, never on what else is in the batch. Classifier-free guidance
        runs the unconditional branch (``negative_prompt``, default "") in the same batch; with
        ``force_zeros_for_empty_prompt`` (SDXL bases) and no negative prompt that branch is all zeros.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = len(prompts)
        if n == 0:
            raise ValueError("prompts: empty list")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: must be an int >= 1")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r}: must be >= 0")
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"seed: {len(seeds)} seeds for {n} prompts")
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * n
        if len(negatives) != n:
            raise ValueError(f"negative_prompt: {len(negatives)} for {n} prompts")
        height, width, down = self._image_size(height, width)
        dev = self.device
        dtype = next(self.unet.parameters()).dtype

        tokens, pooled, mask = self._encode_once(prompts)
        guided = guidance_scale != 1.0
        if guided:  # one UNet batch: [unconditional; conditional]
            if self.force_zeros_for_empty_prompt and all(not (neg or "").strip() for neg in negatives):
                # diffusers' SDXL encode_prompt: zeros, not the encoding of "" (every position read: mask all True)
                u_tokens, u_pooled = torch.zeros_like(tokens), torch.zeros_like(pooled)
                u_mask = torch.ones_like(mask)
            else:
                u_tokens, u_pooled, u_mask = self._encode_once(negatives)
            tokens, pooled, mask = (
                torch.cat(pair) for pair in ((u_tokens, tokens), (u_pooled, pooled), (u_mask, mask))
            )

        channels = int(self.unet.config.out_channels)  # in_channels also counts coordinate channels
        shape = (channels, height // down, width // down)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        latents = torch.stack(noise).to(dev, dtype)  # (B, C, h, w)
        # A fresh scheduler per call: its step state must not be shared by concurrent calls (serve).
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=dev)
        latents = latents * scheduler.init_noise_sigma
        time_ids = None
        if self.unet.config.addition_embed_type == "text_time":  # SDXL: uncropped, generated at its own size
            time_ids = sdxl_time_ids((height, width), (0, 0), (height, width)).expand(len(tokens), 6).to(dev)
        for t in scheduler.timesteps:
            model_in = torch.cat([latents, latents]) if guided else latents  # (2B or B, C, h, w)
            model_in = scheduler.scale_model_input(model_in, t)
            eps = predict_noise(self.unet, model_in, t, tokens.to(dtype), pooled.to(dtype), mask, time_ids)
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents).prev_sample

        if self.vae is not None:
            images = decode_latents(self.vae, latents)  # (B, 3, H, W) in [-1, 1]
        else:
            images = latents  # pixel space: the tiny world's images live in [-1, 1]
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        array = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        if output_type == "np":
            return array
        from PIL import Image

        return [Image.fromarray(np.ascontiguousarray(a)) for a in array]

    # -- files --------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, lineage: dict | None = None, copy_llm: bool = False) -> Path:
        """Write the pipeline folder (safetensors + JSON only). Returns the folder.

        An ``llm_adapter`` folder also loads with diffusers' ``DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)`` (omnidiff/pipeline_diffusers.py). Its LLM is referenced portably
        (model id, folder name, weights digest: no path of this machine) or, with ``copy_llm``, copied
        into ``text_encoder/`` so the folder stands alone.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        import diffusers

        index = {
            "_class_name": "OmniDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "conditioning": self.conditioning,
            "unet": ["diffusers", type(self.unet).__name__],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "vae": ["diffusers", type(self.vae).__name__] if self.vae is not None else [None, None],
            "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
        }
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        if self.conditioning == "clip":
            self.text_encoder.save_pretrained(folder / "text_encoder", folder / "tokenizer")
            index.update(
                text_encoder=["omnidiff.models.clip_text", "ClipTextEncoder"],
                tokenizer=["transformers", "PreTrainedTokenizerFast"],
                clip_max_windows=self.clip_max_windows,
            )
        else:
            from omnidiff.pipeline_diffusers import write_shims

            self.adapter.save_pretrained(folder / "adapter")
            (folder / "text_encoder").mkdir(exist_ok=True)
            ref = {
                "_class_name": "LLMTextEncoder",
                "model_id": self.llm.model_id,
                "folder_name": self.llm.path.name,
                "weights_digest": self.llm.weights_digest,
                "layer": self.llm.layer,
                "max_length": self.llm.max_length,
                "dtype": self.llm.dtype,
                "fingerprint": self.llm.fingerprint,
                "copied": bool(copy_llm),
            }
            if copy_llm:
                copy_llm_folder(self.llm.path, folder / "text_encoder")
            (folder / "text_encoder" / ENCODER_REF).write_text(json.dumps(ref, indent=2) + "\n")
            index.update(write_shims(folder))
        (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        for config in [*folder.glob("*/config.json"), *folder.glob("*/scheduler_config.json")]:
            _drop_load_path(config)
        lineage = lineage if lineage is not None else self.lineage
        if lineage is not None:
            (folder / LINEAGE).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        llm_path: str | Path | None = None,
        llm: LLMTextEncoder | None = None,
        device: str = "cpu",
    ) -> OmniDiffusionPipeline:
        """Load a pipeline folder. For ``llm_adapter``, the LLM is found at the referenced path, else
        under ``models_dir()/llm/<folder name>``, or at ``llm_path``; an already loaded ``llm`` can be
        shared. Its weights digest must match the reference.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel

        folder = Path(folder)
        if not (folder / MODEL_INDEX).exists():
            raise FileNotFoundError(f"{folder}: no {MODEL_INDEX} (not an OmniDiffusionPipeline folder)")
        index = json.loads((folder / MODEL_INDEX).read_text())
        name = index.get("_class_name")
        name = name[-1] if isinstance(name, list) and name else name  # [file, class]: diffusers' custom pipeline
        if name not in ("OmniDiffusionPipeline", "OmniDiffusersPipeline"):
            raise ValueError(
                f"{folder}/{MODEL_INDEX}: _class_name={index.get('_class_name')!r}, not OmniDiffusionPipeline"
            )
        conditioning = index.get("conditioning")
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"{folder}/{MODEL_INDEX}: conditioning={conditioning!r}, expected one of {CONDITIONINGS}")
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        scheduler = _load_scheduler(scheduler_config, latent=(folder / "vae").is_dir())
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True) if (folder / "vae").is_dir() else None
        lineage = json.loads((folder / LINEAGE).read_text()) if (folder / LINEAGE).exists() else None
        if conditioning == "clip":
            text_encoder = ClipTextEncoder.from_pretrained(folder / "text_encoder", folder / "tokenizer")
            pipe = cls(
                unet,
                scheduler,
                "clip",
                text_encoder=text_encoder,
                vae=vae,
                clip_max_windows=int(index.get("clip_max_windows", 1)),
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
            )
        else:
            ref_path = folder / "text_encoder" / ENCODER_REF
            if not ref_path.exists():
                raise FileNotFoundError(f"{ref_path}: missing (the reference to the LLM of an llm_adapter pipeline)")
            ref = json.loads(ref_path.read_text())
            llm = llm if llm is not None else load_referenced_llm(ref, llm_path, device, folder)
            if llm.weights_digest != ref["weights_digest"]:
                raise ValueError(
                    f"LLM at {llm.path} has weights digest {llm.weights_digest[:12]}..., but {folder.name} was "
                    f"trained with {ref['weights_digest'][:12]}... ({ref['model_id']}): a different model"
                )
            if (llm.layer, llm.max_length) != (ref["layer"], ref["max_length"]):
                raise ValueError(
                    f"LLM encoder layer/max_length {(llm.layer, llm.max_length)} != the pipeline's "
                    f"{(ref['layer'], ref['max_length'])}"
                )
            adapter = OmniAdapter.from_pretrained(folder / "adapter")
            pipe = cls(unet, scheduler, "llm_adapter", adapter=adapter, llm=llm, vae=vae,
                       force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)))
        pipe.lineage = lineage
        return pipe.to(device)



class PublishedBasePipeline:
    """A published Stable Diffusion 1.5 / SDXL folder (``contracts.base_folder``) behind the call of
    :class:`OmniDiffusionPipeline`, run by diffusers' own pipeline: the baseline that evaluate and serve
    compare with. Its CLIP tokenizer reads English only. ``dtype`` (float16 / bfloat16 on a GPU) and the
    VAE switches (``vae_slicing``, ``vae_tiling``: large images in less memory) are diffusers' own.
    """

    conditioning = "base"

    def __init__(self, folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 vae_slicing: bool = False, vae_tiling: bool = False):
        from diffusers import DiffusionPipeline

        from omnidiff.contracts.base_folder import open_base_folder

        self.base = open_base_folder(folder)
        self.pipe = DiffusionPipeline.from_pretrained(self.base.path, torch_dtype=dtype, **self.base.load_kwargs())
        self.pipe.set_progress_bar_config(disable=True)
        if vae_slicing:
            self.pipe.vae.enable_slicing()
        if vae_tiling:
            self.pipe.vae.enable_tiling()
        self.pipe.to(device)
        self.unet, self.vae, self.lineage = self.pipe.unet, self.pipe.vae, None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def native_resolution(self) -> int:
        return self.base.native_resolution

    @torch.no_grad()
    def __call__(self, prompts, negative_prompt=None, num_inference_steps: int = 20, guidance_scale: float = 3.0,
                 seed: int | list[int] = 0, height: int | None = None, width: int | None = None,
                 output_type: Literal["pil", "np"] = "pil"):
        """As :meth:`OmniDiffusionPipeline.__call__`: one generator per image (``seed + i``), so an image
        depends on its own prompt and seed only."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts: empty list")
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else [int(x) for x in seed]
        if len(seeds) != len(prompts):
            raise ValueError(f"seed: {len(seeds)} seeds for {len(prompts)} prompts")
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompts)
        if negative_prompt is not None and all(not (p or "").strip() for p in negative_prompt):
            negative_prompt = None  # diffusers' own default: "" for SD, zeros where force_zeros_for_empty_prompt
        if negative_prompt is not None:
            negative_prompt = [normalise_caption(p or "") for p in negative_prompt]
        size = self.native_resolution
        generators = [torch.Generator().manual_seed(x) for x in seeds]
        images = self.pipe(prompt=[normalise_caption(p) for p in prompts], negative_prompt=negative_prompt,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           height=height or size, width=width or size, generator=generators, output_type="pil").images
        if output_type == "np":
            return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
        return images


def load_any_pipeline(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                      vae_slicing: bool = False, vae_tiling: bool = False):
    """An export (:class:`OmniDiffusionPipeline`) or a published SD / SDXL base folder
    (:class:`PublishedBasePipeline`), by the folder's ``model_index.json``. ``dtype``: the UNet's and
    VAE's (half precision needs a GPU); the VAE switches decode large images in less memory."""
    from omnidiff.contracts.encoders import is_published_base

    if dtype != torch.float32 and torch.device(device).type == "cpu":
        raise ValueError(f"dtype={dtype}: half precision runs on a GPU only (device={device!r}); use float32")
    if is_published_base(folder):
        return PublishedBasePipeline(folder, device=device, dtype=dtype, vae_slicing=vae_slicing,
                                     vae_tiling=vae_tiling)
    pipe = OmniDiffusionPipeline.from_pretrained(folder, device=device)
    pipe.unet.to(dtype)
    if pipe.vae is not None:
        pipe.vae.to(dtype)  # decode_latents upcasts where the VAE's config says force_upcast (SDXL)
        if vae_slicing:
            pipe.vae.enable_slicing()
        if vae_tiling:
            pipe.vae.enable_tiling()
    return pipe

def _load_scheduler(config: dict, latent: bool = False):
    from diffusers import DPMSolverMultistepScheduler

    if config.get("_class_name") == "DPMSolverMultistepScheduler":
        return DPMSolverMultistepScheduler.from_config(config)  # as exported: the sampler settings are saved
    return sampling_scheduler(config, latent=latent)  # a training scheduler's config: derive the sampler


LLM_PATH_ENV = "OMNIDIFF_LLM_PATH"


def _drop_load_path(config_path: Path) -> None:
    """diffusers writes where a model was loaded from (``_name_or_path``) into its config: a path of this
    machine that means nothing where the folder is loaded, so the folder keeps none."""
    config = json.loads(config_path.read_text())
    if "_name_or_path" in config:
        del config["_name_or_path"]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_llm_folder(source: Path, target: Path) -> None:
    """The LLM folder's files (config, tokenizer, safetensors weights) into ``target``; pickles are refused."""
    import shutil

    pickled = [p.name for p in Path(source).rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    if pickled:
        raise ValueError(f"{source}: {', '.join(pickled)}: the export copies safetensors weights only")
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(source).rglob("*")):
        if path.is_file():
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)


def find_llm(ref: dict, folder: Path | None = None, llm_path: str | Path | None = None) -> list[Path]:
    """Where a pipeline's LLM may be, in order: ``llm_path``; the folder's own ``text_encoder/`` (an export
    with ``copy_llm``); ``$OMNIDIFF_LLM_PATH``; ``<models root>/llm/<folder name>`` (``$OMNIDIFF_MODELS``,
    else ``$OMNIDIFF_HOME/models``); the absolute ``path`` older exports recorded."""
    from omnidiff.env import models_dir

    if llm_path:
        return [Path(llm_path)]
    candidates = []
    if folder is not None:
        candidates.append(Path(folder) / "text_encoder")
    if os.environ.get(LLM_PATH_ENV):
        candidates.append(Path(os.environ[LLM_PATH_ENV]))
    candidates.append(models_dir() / "llm" / ref["folder_name"])
    if ref.get("path"):
        candidates.append(Path(ref["path"]))
    return candidates


def load_referenced_llm(ref: dict, llm_path, device: str, folder: Path | None = None) -> LLMTextEncoder:
    """The ``LLMTextEncoder`` ``text_encoder/encoder.json`` names, from the first of :func:`find_llm`'s places
    that holds a model (its weights digest is checked by the caller)."""
    candidates = find_llm(ref, folder, llm_path)
    for path in candidates:
        if (path / "config.json").exists():
            return LLMTextEncoder(
                path, layer=ref["layer"], max_length=ref["max_length"], dtype=ref["dtype"], device=device
            )
    hint = " (run 'omnidiff llm convert')" if ref.get("model_id") == "gemma3-270m" else ""
    raise FileNotFoundError(
        f"the pipeline's LLM {ref['model_id']!r} (folder {ref['folder_name']!r}, weights {ref['weights_digest'][:12]}...) "
        f"is not at {', '.join(os.fspath(p) for p in candidates)}{hint}; put it under $OMNIDIFF_MODELS/llm/, "
        f"set {LLM_PATH_ENV} to its folder, or pass llm_path="
    )
