"""An exported pipeline folder as diffusers itself loads it (issue 16 item 5).

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("exports/stage2", trust_remote_code=True)
    image = pipe("一个红色的圆在左边", num_inference_steps=20).images[0]

How diffusers (0.42) finds a pipeline class that is not one of its own: ``model_index.json`` names it
as a list, ``"_class_name": ["pipeline_omnidiff", "OmniDiffusersPipeline"]``, and the folder ships
``pipeline_omnidiff.py``; a component that is not a diffusers / transformers class is found the same
way, ``"adapter": ["omnidiff_component", "AdapterComponent"]`` with ``adapter/omnidiff_component.py``.
diffusers executes such files only with ``trust_remote_code=True`` (even from a local folder; the
``custom_pipeline=`` argument goes through the same check, and ``DIFFUSERS_DISABLE_REMOTE_CODE=1``
refuses them all). So the shipped files hold one import line each and no code of their own: what
runs is the installed ``omnidiff`` package (diffusers warns naming it when it is missing), the same
code as ``OmniDiffusionPipeline.from_pretrained(folder)``, which needs no flag at all.

The LLM is not a file of the folder unless the export copied it (``copy_llm``):
``text_encoder/encoder.json`` names it portably (model id, folder name, weights digest) and
:func:`omnidiff.pipeline.find_llm` resolves it (``OMNIDIFF_LLM_PATH``, then
``$OMNIDIFF_MODELS/llm/<folder name>``); the weights digest must match.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

PIPELINE_MODULE = "pipeline_omnidiff"
COMPONENT_MODULE = "omnidiff_component"
SHIM = '''"""Loads this folder's {what} through the installed omnidiff package: no code of its own (omnidiff/pipeline_diffusers.py)."""
from omnidiff.pipeline_diffusers import {name}  # noqa: F401
'''


def write_shims(folder: Path) -> dict[str, list[str]]:
    """The one-import files diffusers loads the pipeline class and the two custom components through;
    returns the ``model_index.json`` entries that name them."""
    folder = Path(folder)
    (folder / f"{PIPELINE_MODULE}.py").write_text(SHIM.format(what="pipeline class", name="OmniDiffusersPipeline"))
    for sub, name in (("adapter", "AdapterComponent"), ("text_encoder", "LLMComponent")):
        (folder / sub / f"{COMPONENT_MODULE}.py").write_text(SHIM.format(what=f"{sub} component", name=name))
    return {
        "_class_name": [PIPELINE_MODULE, "OmniDiffusersPipeline"],
        "adapter": [COMPONENT_MODULE, "AdapterComponent"],
        "text_encoder": [COMPONENT_MODULE, "LLMComponent"],
    }


class AdapterComponent:
    """diffusers' loader of ``adapter/``: ``from_pretrained(folder) -> OmniAdapter``."""

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        from omnidiff.models.adapter import OmniAdapter

        return OmniAdapter.from_pretrained(folder).eval()


class LLMComponent:
    """diffusers' loader of ``text_encoder/``: the referenced (or copied) LLM as an ``LLMTextEncoder``."""

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        from omnidiff.pipeline import ENCODER_REF, load_referenced_llm

        folder = Path(folder)
        ref = json.loads((folder / ENCODER_REF).read_text())
        llm = load_referenced_llm(ref, None, "cpu", folder.parent)
        if llm.weights_digest != ref["weights_digest"]:
            raise ValueError(f"LLM at {llm.path} has weights digest {llm.weights_digest[:12]}..., but this pipeline was "
                             f"trained with {ref['weights_digest'][:12]}... ({ref['model_id']}): a different model")
        return llm


class OmniDiffusersPipeline(DiffusionPipeline):
    """The ``llm_adapter`` pipeline as a ``DiffusionPipeline``: the frozen LLM (``text_encoder``) + the adapter
    condition the base's UNet; sampling is :class:`omnidiff.pipeline.OmniDiffusionPipeline`'s, so both
    loaders give the same images for the same prompt and seed."""

    _optional_components = ["vae"]

    def __init__(self, unet, scheduler, adapter, text_encoder, vae=None, conditioning: str = "llm_adapter",
                 force_zeros_for_empty_prompt: bool = False):
        super().__init__()
        if conditioning != "llm_adapter":
            raise ValueError(f"conditioning={conditioning!r}: OmniDiffusersPipeline loads llm_adapter folders only")
        self.register_modules(unet=unet, scheduler=scheduler, adapter=adapter, text_encoder=text_encoder, vae=vae)
        self.register_to_config(conditioning=conditioning, force_zeros_for_empty_prompt=bool(force_zeros_for_empty_prompt))

    def to(self, *args, **kwargs):
        """diffusers moves the torch modules; the LLM (not an ``nn.Module``) follows the UNet."""
        out = super().to(*args, **kwargs)
        device = next(self.unet.parameters()).device
        self.text_encoder.model.to(device)
        self.text_encoder.device = device
        return out

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        seed: int | list[int] = 0,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """``ImagePipelineOutput(images=...)``: PIL images, or uint8 ``(N, H, W, 3)`` with ``output_type="np"``."""
        from omnidiff.pipeline import OmniDiffusionPipeline

        inner = OmniDiffusionPipeline(self.unet, self.scheduler, "llm_adapter", adapter=self.adapter,
                                      llm=self.text_encoder, vae=self.vae,
                                      force_zeros_for_empty_prompt=self.config.force_zeros_for_empty_prompt)
        images = inner(prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, seed=seed, height=height, width=width,
                       output_type="np" if output_type == "np" else "pil")
        return ImagePipelineOutput(images=images) if return_dict else (images,)
