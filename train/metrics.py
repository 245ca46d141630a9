"""CLIP score per language and prompt length, FID / KID against reference images (issue 16 item 7).

The evaluate stage's optional ``metrics`` section (train/eval_config.py ``MetricsSection``) runs this
for every evaluated model, the base included when one is configured:

    omnidiff evaluate stage3=path/to/export --config configs/evaluate_metrics.yaml \\
        -o metrics.clip=/models/clip-vit-large-patch14 -o metrics.reference_images=/data/coco-val-5k

1. each model draws ``images_per_prompt`` images for every prompt of the JSONL prompt set
   (omnidiff/contracts/prompt_sets.py), given the prompt in its own language;
2. CLIP score (torchmetrics ``CLIPScore``: ``max(100 * cos(image, text), 0)`` averaged) of each image
   against the prompt's **English reference**, since CLIP reads English; per (language, length), per
   language, per length and overall, each with a bootstrap interval over prompts (omnidiff/scoring.py
   ``bootstrap_scores``: one resample set per group shared by every model, so the difference to the
   base is paired);
3. FID and KID (torchmetrics ``FrechetInceptionDistance`` / ``KernelInceptionDistance``) of each
   model's images against a folder of reference images, on the features of a local vision model
   (``feature_extractor``, default: the CLIP folder's image tower). These are Fréchet / kernel
   distances on CLIP (or DINOv2, ...) features, not the Inception-v3 FID of published tables: the
   standard Inception weights ship only as a pickled ``.pth`` that torch-fidelity downloads, and this
   project loads safetensors only, offline.

Everything is loaded from local folders with ``local_files_only=True``: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from omnidiff.contracts.prompt_sets import load_prompt_set, select_prompt_set
from omnidiff.scoring import bootstrap_scores, generate_images, percentile_interval

ALL = "all"  # the margin of a table: every language, or every length
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLIP_NOTE = ("CLIP reads English: every image is scored against its prompt's English reference (prompt_en), "
             "whatever language the model was given; long references are cut at the CLIP model's text window.")
FEATURE_NOTE = ("FID / KID on the named extractor's features, not Inception-v3's: comparable between the models "
                "of one report, not with published Inception FIDs.")


class MetricsError(ValueError):
    """A metrics input (CLIP folder, feature extractor, reference images) is unusable; the message names it."""


# ---------------------------------------------------------------- local models, never downloaded

def check_local_model(path: Path, role: str) -> Path:
    """``path`` is a local transformers folder with config.json and safetensors weights (``.bin`` is refused)."""
    path = Path(path)
    if not path.is_dir():
        raise MetricsError(f"{role}: {path} is not a folder (expected a local save_pretrained folder; nothing is "
                           "downloaded)")
    if not (path / "config.json").is_file():
        raise MetricsError(f"{role}: {path} has no config.json (expected a save_pretrained folder)")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin"))
        raise MetricsError(f"{role}: {path} has no .safetensors weights" + (f" (found {found}: safetensors only)"
                                                                          if found else ""))
    return path


def _as_tensor(output):
    """transformers >= 5 returns ``BaseModelOutputWithPooling`` from ``get_*_features``; torchmetrics 1.9
    expects the tensor (Lightning-AI/torchmetrics#3407, fixed after 1.9.0): the projection is its pooler_output."""
    import torch

    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _TensorFeaturesCLIP:
    """A CLIPModel whose ``get_image_features`` / ``get_text_features`` return tensors (see :func:`_as_tensor`)."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def to(self, device):
        self.model.to(device)
        return self

    def get_image_features(self, *args, **kwargs):
        return _as_tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _as_tensor(self.model.get_text_features(*args, **kwargs))


def load_clip(folder: Path):
    """``(model, processor)`` from a local CLIP folder (CLIPModel + CLIPProcessor ``save_pretrained`` layout)."""
    from transformers import CLIPModel, CLIPProcessor

    folder = check_local_model(folder, "metrics.clip")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MetricsError(f"metrics.clip: {folder} is not a CLIPModel + CLIPProcessor folder ({exc})") from None
    return _TensorFeaturesCLIP(model), processor


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _chw(images) -> list:
    """uint8 (N, H, W, 3) arrays -> a list of (3, H, W) uint8 tensors on the metrics device."""
    import torch

    device = _device()
    return [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).to(device) for im in images]


class ClipScorer:
    """torchmetrics' CLIPScore on a local CLIP folder, loaded once.

    ``pair_scores`` gives each (image, text) pair's ``100 * cos`` from the function ``CLIPScore.update``
    itself calls (``_clip_score_update``: the metric only keeps their sum); ``CLIPScore.compute`` over a
    group is ``max(mean, 0)`` of them (:func:`clip_score_of`; tests/test_eval_metrics.py checks both agree).
    """

    def __init__(self, folder: Path, batch_size: int = 32):
        # torchmetrics tries a hub download at import when SKIP_SLOW_DOCTEST is set (its doctest switch)
        os.environ.pop("SKIP_SLOW_DOCTEST", None)
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.folder, self.batch_size = Path(folder), int(batch_size)
        self.metric = CLIPScore(model_name_or_path=lambda: load_clip(self.folder))

    def pair_scores(self, images: np.ndarray, texts: list[str]) -> np.ndarray:
        """uint8 (N, H, W, 3) images, N texts -> (N,) CLIP scores (``100 * cos``, not clamped)."""
        import torch
        from torchmetrics.functional.multimodal.clip_score import _clip_score_update

        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts")
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                stop = start + self.batch_size
                score, _ = _clip_score_update(_chw(images[start:stop]), list(texts[start:stop]),
                                              self.metric.model, self.metric.processor)
                out.append(score.detach().float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def clip_score_of(pair_scores) -> float:
    """torchmetrics' CLIPScore of a group from its pairs' scores: ``max(mean, 0)``."""
    values = np.asarray(pair_scores, dtype=float)
    return float(max(values.mean(), 0.0)) if values.size else float("nan")


class ImageFeatures:
    """The image features FID / KID compare: a local transformers vision model, loaded once.

    ``path`` is a folder (config.json + safetensors weights + preprocessor_config.json) or a
    ``.safetensors`` file in such a folder (its weights replace the folder's). Images go through the
    folder's own image processor; the features are ``get_image_features`` where the model has it (CLIP),
    else its ``image_embeds`` / ``pooler_output`` (CLIP vision, DINOv2, ...).
    """

    def __init__(self, path: Path, batch_size: int = 32):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        path = Path(path)
        folder = check_local_model(path.parent if path.suffix == ".safetensors" else path, "metrics.feature_extractor")
        self.path, self.batch_size = path, int(batch_size)
        try:
            if path.suffix == ".safetensors":  # the named weights in place of the folder's, loaded by transformers
                if not path.is_file():
                    raise MetricsError(f"metrics.feature_extractor: no such weights file {path}")
                with tempfile.TemporaryDirectory() as view:
                    for item in folder.iterdir():
                        if item.suffix != ".safetensors" and item.is_file():
                            (Path(view) / item.name).symlink_to(item.resolve())
                    (Path(view) / "model.safetensors").symlink_to(path.resolve())
                    self.model, loading = AutoModel.from_pretrained(view, local_files_only=True, use_safetensors=True,
                                                                    output_loading_info=True)
            else:
                self.model, loading = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                                output_loading_info=True)
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise MetricsError(f"metrics.feature_extractor: {path}: {exc}") from None
        missing = sorted(loading.get("missing_keys") or [])
        if missing:
            raise MetricsError(f"metrics.feature_extractor: {path} does not fit {folder / 'config.json'}: "
                               f"{len(missing)} weights missing ({missing[:3]}...)")
        self.model = self.model.eval().to(_device())
        with torch.inference_mode():
            self.num_features = int(self(np.zeros((1, 8, 8, 3), dtype=np.uint8)).shape[-1])

    def __call__(self, images) -> Any:
        """uint8 images (a (N, H, W, 3) array or a list of (H, W, 3) arrays) -> float64 (N, D) features (a tensor)."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = [np.asarray(im) for im in images[start:start + self.batch_size]]
                pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(_device())
                if hasattr(self.model, "get_image_features"):
                    feats = _as_tensor(self.model.get_image_features(pixel_values=pixels))
                else:
                    result = self.model(pixel_values=pixels)
                    feats = getattr(result, "image_embeds", None)
                    if feats is None:
                        feats = result.pooler_output if result.pooler_output is not None else result.last_hidden_state[:, 0]
                out.append(feats.double().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


def load_reference_images(folder: Path, max_images: int, seed: int = 0) -> list[np.ndarray]:
    """At most ``max_images`` images of ``folder`` (recursively; a seeded pick), as uint8 (H, W, 3) RGB arrays."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise MetricsError(f"metrics.reference_images: {folder} is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(paths) < 2:
        raise MetricsError(f"metrics.reference_images: {folder} holds {len(paths)} image(s) ({', '.join(IMAGE_SUFFIXES)}); "
                           "FID / KID need at least 2")
    if len(paths) > max_images:
        pick = np.random.default_rng(seed).permutation(len(paths))[:max_images]
        paths = [paths[i] for i in sorted(pick)]
    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except OSError as exc:
            raise MetricsError(f"metrics.reference_images: cannot read {path} ({exc})") from None
    return out


def _given_features(num_features: int):
    """torchmetrics' ``feature`` module when the features are already extracted (each image set is read
    once by :class:`ImageFeatures`, the reference set once for every model): the identity, with its width."""
    import torch

    module = torch.nn.Identity()
    module.num_features = int(num_features)
    return module


def fid_kid(real, fake, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """FID and KID (mean, std) of two feature sets (N, D) with torchmetrics, in float64; KID's subsets are
    seeded and their size capped at the smaller set."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features: expected (N, D) sets of one width, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID / KID need at least 2 images a side, got {len(real)} reference and {len(fake)} generated")
    fid = FrechetInceptionDistance(feature=_given_features(real.shape[1])).set_dtype(torch.float64)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    size = min(kid_subset_size, len(real), len(fake))
    kid = KernelInceptionDistance(feature=_given_features(real.shape[1]), subsets=kid_subsets, subset_size=size)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std), "kid_subset_size": size}


# ---------------------------------------------------------------- tables (pure)

def with_margins(per_image: pd.DataFrame) -> pd.DataFrame:
    """``per_image`` plus its rows again with lang = ``all``, length = ``all`` and both: every margin a group."""
    return pd.concat([per_image, per_image.assign(length=ALL), per_image.assign(lang=ALL),
                      per_image.assign(lang=ALL, length=ALL)], ignore_index=True)


def clip_table(per_image: pd.DataFrame, baseline: str | None = None, resamples: int = 2000, seed: int = 0,
               confidence: float = 0.95) -> pd.DataFrame:
    """model x lang x length (margins ``all`` included) -> CLIP score, bootstrap interval, and the paired
    difference to ``baseline`` with its interval.

    ``per_image``: one row per image, columns model, id (the prompt; its images are one unit), lang,
    length, clip_score (the pair's ``100 * cos``). The score is torchmetrics' CLIPScore of the group
    (:func:`clip_score_of`); the interval is the percentile interval of the bootstrap over prompts.
    """
    missing = [c for c in ("model", "id", "lang", "length", "clip_score") if c not in per_image.columns]
    if missing:
        raise ValueError(f"per_image: missing column(s) {missing}; columns are {list(per_image.columns)}")
    stacked = with_margins(per_image).assign(ok_clip=lambda f: f["clip_score"].astype(float))
    _, replicates = bootstrap_scores(stacked, ("clip",), resamples, seed, unit="id")
    rows = []
    for (model, lang, length), group in stacked.groupby(["model", "lang", "length"], sort=False):
        reps = np.maximum(replicates[(str(model), str(lang), str(length))], 0.0)
        low, high = percentile_interval(reps, confidence)
        row = {"model": model, "lang": lang, "length": length, "prompts": int(group["id"].nunique()),
               "images": len(group), "clip_score": clip_score_of(group["clip_score"]), "low": low, "high": high}
        base_key = (str(baseline), str(lang), str(length))
        if baseline is not None and model != baseline and base_key in replicates:
            base = stacked[(stacked["model"] == baseline) & (stacked["lang"] == lang) & (stacked["length"] == length)]
            diff = replicates[(str(model), str(lang), str(length))] - replicates[base_key]
            d_low, d_high = percentile_interval(diff, confidence)
            row |= {"vs_baseline": float(group["clip_score"].mean() - base["clip_score"].mean()),
                    "vs_baseline_low": d_low, "vs_baseline_high": d_high}
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the run

@dataclass
class MetricsResult:
    clip: pd.DataFrame  # clip_table's rows
    per_image: pd.DataFrame  # model, id, lang, length, sample, prompt, prompt_en, clip_score
    distances: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> fid, kid, kid_std
    info: dict[str, Any] = field(default_factory=dict)  # inputs: prompt set + digest, CLIP folder, extractor, ...

    def to_dict(self) -> dict[str, Any]:
        return {**self.info, "clip": self.clip.to_dict(orient="records"), "fid_kid": self.distances}

    def mlflow_metrics(self, label: str) -> dict[str, float]:
        """``metrics.clip.<lang>.<length>`` (+ ``.ci_low`` / ``.ci_high``), ``metrics.fid``, ``metrics.kid`` of ``label``."""
        out: dict[str, float] = {}
        for r in self.clip[self.clip["model"] == label].itertuples():
            key = f"metrics.clip.{r.lang}.{r.length}"
            out |= {key: float(r.clip_score), f"{key}.ci_low": float(r.low), f"{key}.ci_high": float(r.high)}
        for name, value in self.distances.get(label, {}).items():
            if name in ("fid", "kid", "kid_std"):
                out[f"metrics.{name}"] = float(value)
        return out


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_metrics(models: dict[str, str], mcfg, load_pipeline: Callable[[str], Any], *, steps: int, guidance: float,
                seed: int, batch_size: int, baseline: str | None = None, resamples: int = 2000,
                bootstrap_seed: int = 0, confidence: float = 0.95) -> MetricsResult:
    """Draw the prompt set with every model (label -> reference, loaded by ``load_pipeline``) and measure."""
    prompts = select_prompt_set(load_prompt_set(mcfg.prompt_set), mcfg.langs, mcfg.lengths)
    rows = pd.concat([prompts.assign(sample=k) for k in range(mcfg.images_per_prompt)], ignore_index=True)
    scorer = ClipScorer(mcfg.clip, mcfg.feature_batch_size)
    extractor = real = None
    info: dict[str, Any] = {
        "prompt_set": str(mcfg.prompt_set), "prompt_set_sha256": _digest(mcfg.prompt_set),
        "prompts": len(prompts), "images_per_prompt": mcfg.images_per_prompt,
        "langs": sorted(set(prompts["lang"])), "clip_folder": str(mcfg.clip), "clip_note": CLIP_NOTE,
    }
    if mcfg.reference_images is not None:
        extractor = ImageFeatures(mcfg.feature_extractor or mcfg.clip, mcfg.feature_batch_size)
        references = load_reference_images(mcfg.reference_images, mcfg.max_reference_images, seed)
        real = extractor(references)
        info |= {"reference_images": str(mcfg.reference_images), "reference_count": len(references),
                 "feature_extractor": str(mcfg.feature_extractor or mcfg.clip),
                 "feature_width": extractor.num_features, "feature_note": FEATURE_NOTE}
    per_image, distances = [], {}
    for label, ref in models.items():
        print(f"[evaluate] metrics: {label}: {ref} on {len(rows)} images of {mcfg.prompt_set}", file=sys.stderr,
              flush=True)
        pipe = load_pipeline(ref)
        images = generate_images(pipe, rows["prompt"].tolist(), seed, steps, guidance, batch_size, name="metrics")
        del pipe
        scores = scorer.pair_scores(images, rows["prompt_en"].tolist())
        per_image.append(rows.assign(model=label, clip_score=scores))
        if extractor is not None:
            distances[label] = fid_kid(real, extractor(images), mcfg.kid_subsets, mcfg.kid_subset_size, seed)
    table = pd.concat(per_image, ignore_index=True)
    base = baseline if baseline in models else None
    clip = clip_table(table, base, resamples, bootstrap_seed, confidence)
    columns = ["model", "id", "lang", "length", "sample", "prompt", "prompt_en", "clip_score"]
    return MetricsResult(clip, table[columns], distances, info | {"baseline": base})


def write_metrics(result: MetricsResult, out: Path) -> None:
    """metrics_clip.csv, metrics_per_image.csv and metrics_fid_kid.csv in ``out``."""
    result.clip.to_csv(out / "metrics_clip.csv", index=False)
    result.per_image.to_csv(out / "metrics_per_image.csv", index=False)
    pd.DataFrame([{"model": m, **d} for m, d in result.distances.items()]).to_csv(out / "metrics_fid_kid.csv",
                                                                                    index=False)


def metrics_html(result: MetricsResult) -> str:
    """The report page's metrics section: CLIP scores per (lang, length) with intervals, then FID / KID."""
    import html

    cells = result.clip.assign(cell=[f"{r.clip_score:.2f} [{r.low:.2f}, {r.high:.2f}]" for r in result.clip.itertuples()])
    table = cells.pivot(index=["lang", "length"], columns="model", values="cell")
    parts = ["<h2>CLIP score per language and prompt length (torchmetrics; 95% bootstrap interval)</h2>",
             f"<p>{html.escape(CLIP_NOTE)} Prompt set: <code>{html.escape(result.info.get('prompt_set', ''))}</code>.</p>",
             table.to_html(border=0)]
    if result.distances:
        parts += ["<h2>FID / KID against the reference images (lower is better)</h2>",
                  f"<p>{html.escape(FEATURE_NOTE)} Extractor: <code>{html.escape(result.info['feature_extractor'])}</code>; "
                  f"{result.info['reference_count']} reference images.</p>",
                  pd.DataFrame(result.distances).T.to_html(border=0, float_format=lambda v: f"{v:.4f}")]
    return "\n".join(parts)


def format_metrics(result: MetricsResult) -> str:
    """The console view: CLIP score per (lang, length) and model, then FID / KID per model."""
    cells = result.clip.assign(cell=[f"{r.clip_score:.2f} [{r.low:.2f}, {r.high:.2f}]" for r in result.clip.itertuples()])
    lines = ["CLIP score (English references):",
             cells.pivot(index=["lang", "length"], columns="model", values="cell").to_string()]
    for label, d in result.distances.items():
        lines.append(f"{label}: FID {d['fid']:.4f}, KID {d['kid']:.5f} +- {d['kid_std']:.5f}")
    return "\n".join(lines)


__all__ = ["ALL", "ClipScorer", "ImageFeatures", "MetricsError", "MetricsResult", "check_local_model", "clip_score_of",
           "clip_table", "fid_kid", "format_metrics", "load_clip", "load_reference_images", "metrics_html", "run_metrics",
           "with_margins", "write_metrics"]
