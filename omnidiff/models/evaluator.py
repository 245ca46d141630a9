"""The tiny world's judge: a small CNN that reads an image and predicts its attributes.

One classification head per attribute (shape, colour, position, size,
background; whatever :data:`omnidiff.world.ATTRIBUTES` lists). Prompt
faithfulness (omnidiff/scoring.py) compares these predictions with what the
prompt asked for; its penultimate features give the Fréchet distance between
generated and real images.

An evaluator folder holds ``config.json`` (architecture, label lists,
resolution, held-out accuracy), ``model.safetensors`` and ``metrics.json``. It
is fit to judge only if every attribute's held-out accuracy is at least
:data:`FIT_THRESHOLD` (issue 2); :func:`load_evaluator` refuses an unfit one
unless asked not to. Train one with ``omnidiff base evaluator --config configs/base.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

FIT_THRESHOLD = 0.95
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class EvaluatorUnfitError(RuntimeError):
    """The evaluator's held-out accuracy is below :data:`FIT_THRESHOLD` on some attribute."""


class AttributeClassifier(nn.Module):
    """Conv trunk -> (flattened map, global max) -> ``feature_dim`` features -> one linear head per attribute.

    The trunk halves the resolution twice; the spatial map is kept (flattened)
    because position is one of the attributes to read.
    """

    def __init__(self, labels: dict[str, list[str]], resolution: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"resolution={resolution}: must be a multiple of 4 (the trunk halves it twice)")
        if not labels or any(len(v) < 2 for v in labels.values()):
            raise ValueError(f"labels={labels!r}: need at least one attribute with at least two values each")
        self.labels = {k: list(v) for k, v in labels.items()}
        self.resolution, self.width, self.feature_dim = resolution, width, feature_dim

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(
            *block(3, width),
            *block(width, width),
            nn.MaxPool2d(2),  # (B, w, R/2, R/2)
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.MaxPool2d(2),  # (B, 2w, R/4, R/4)
        )
        # The flattened map says where things are; its global max says what they are wherever they
        # are (shape and colour learn far faster from a translation-invariant summary).
        flat = 2 * width * (resolution // 4) ** 2 + 2 * width
        self.features = nn.Sequential(nn.Dropout(0.1), nn.Linear(flat, feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(values)) for name, values in self.labels.items()})

    def config(self) -> dict:
        return {
            "labels": self.labels,
            "resolution": self.resolution,
            "width": self.width,
            "feature_dim": self.feature_dim,
        }

    @staticmethod
    def to_input(images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the same scale the diffusion model uses."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) in [-1, 1] -> (N, feature_dim) penultimate features."""
        fmap = self.trunk(x)  # (N, 2w, R/4, R/4)
        summary = torch.cat([fmap.flatten(1), fmap.amax(dim=(2, 3))], dim=1)  # (N, 2w*(R/4)^2 + 2w)
        return self.features(summary)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, 3, R, R) -> {attribute: logits (N, n_values)}."""
        feats = self.embed(x)
        return {name: head(feats) for name, head in self.heads.items()}


class Evaluator:
    """A loaded, frozen :class:`AttributeClassifier` plus its held-out accuracy.

    ``predict(images)`` and ``features(images)`` take uint8 (N, H, W, 3) at the
    evaluator's resolution and run in eval mode, in batches, without gradients.
    """

    def __init__(self, model: AttributeClassifier, accuracy: dict[str, float], path: Path | None = None):
        self.model = model.eval()
        self.accuracy = dict(accuracy)
        self.path = path

    @property
    def labels(self) -> dict[str, list[str]]:
        return self.model.labels

    @property
    def resolution(self) -> int:
        return self.model.resolution

    @property
    def fit(self) -> bool:
        """Fit to judge: every attribute at or above :data:`FIT_THRESHOLD` held-out accuracy."""
        return bool(self.accuracy) and all(a >= FIT_THRESHOLD for a in self.accuracy.values())

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:3] != (self.resolution, self.resolution):
            raise ValueError(
                f"images: shape {images.shape} does not match the evaluator's resolution {self.resolution}x"
                f"{self.resolution}; score images at the resolution the evaluator was trained on"
            )
        return images

    @torch.no_grad()
    def logits(self, images: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
        images = self._check(images)
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.labels}
        for start in range(0, len(images), batch_size):
            out = self.model(self.model.to_input(images[start : start + batch_size]))
            for name, value in out.items():
                chunks[name].append(value.numpy())
        return {name: np.concatenate(v) if v else np.zeros((0, len(self.labels[name]))) for name, v in chunks.items()}

    def predict(self, images: np.ndarray, batch_size: int = 512) -> dict[str, list[str]]:
        """uint8 (N, H, W, 3) -> {attribute: N predicted values}."""
        return {
            name: [self.labels[name][i] for i in logit.argmax(1)]
            for name, logit in self.logits(images, batch_size).items()
        }

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float64 (N, feature_dim), the features the Fréchet distance uses."""
        images = self._check(images)
        out = [
            self.model.embed(self.model.to_input(images[s : s + batch_size])).double().numpy()
            for s in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.model.feature_dim))


def save_evaluator(
    model: AttributeClassifier, accuracy: dict[str, float], out_dir: str | Path, extra: dict | None = None
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``metrics.json``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME))
    fit = all(a >= FIT_THRESHOLD for a in accuracy.values())
    config = {**model.config(), "heldout_accuracy": accuracy, "fit_threshold": FIT_THRESHOLD, "fit_to_judge": fit}
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "metrics.json").write_text(
        json.dumps({"heldout_accuracy": accuracy, "fit_to_judge": fit, **(extra or {})}, indent=2), encoding="utf-8"
    )
    return out_dir


def load_evaluator(path: str | Path, require_fit: bool = True) -> Evaluator:
    """Load an evaluator folder; with ``require_fit`` refuse one below :data:`FIT_THRESHOLD` on any attribute."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{path}: not an evaluator folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
            "train one with `omnidiff base evaluator`"
        )
    config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    model = AttributeClassifier(config["labels"], config["resolution"], config["width"], config["feature_dim"])
    model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
    evaluator = Evaluator(model, config.get("heldout_accuracy", {}), path)
    if require_fit and not evaluator.fit:
        low = {k: round(v, 4) for k, v in evaluator.accuracy.items() if v < FIT_THRESHOLD}
        raise EvaluatorUnfitError(
            f"{path}: evaluator is not fit to judge: held-out accuracy below {FIT_THRESHOLD:.0%} on {low}; "
            "train longer (evaluator.steps) or pass require_fit=False to inspect it anyway"
        )
    return evaluator


def predict(evaluator: Evaluator, images: np.ndarray) -> dict[str, list[str]]:
    """Functional form of :meth:`Evaluator.predict` (interfaces.md)."""
    return evaluator.predict(images)
