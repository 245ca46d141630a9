"""Train the tiny world's evaluator: a CNN that reads shape, colour, position, size and background.

    omnidiff base evaluator --config configs/base.yaml

Training images are fresh world renders (omnidiff.world.render) at the model
resolution, with random jitter and random clean/degraded quality, so the
evaluator sees the same variety the world's images have. A share of the
attribute *combinations* is held out: the reported accuracy is on combinations
the classifier never saw, so it measures reading attributes, not remembering
images. The evaluator is fit to judge only at >= 95% on every attribute
(issue 2); :func:`train_evaluator` reports and flags it, and
``load_evaluator`` refuses an unfit one.

Cached at ``models_dir()/evaluator/<hash>/`` where the hash covers the
evaluator config, the resolution, the attribute lists and a digest of probe
renders (so a change in how the world draws makes a new evaluator).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omnidiff.base.config import BaseConfig, EvaluatorConfig
from omnidiff.config import to_dict
from omnidiff.env import models_dir
from omnidiff.models.evaluator import FIT_THRESHOLD, AttributeClassifier, load_evaluator, save_evaluator
from omnidiff.progress import Progress
from omnidiff.world.attributes import ATTRIBUTES, PROMPT_ATTRIBUTES
from omnidiff.world.render import MAX_JITTER, render

log = logging.getLogger("omnidiff.base")
DEGRADED_SHARE = 0.3  # share of degraded-quality renders in training and held-out sets
EVALUATOR_VERSION = 2  # bump when the classifier or its training changes what a config produces


def all_combinations() -> list[dict[str, str]]:
    """Every combination of the prompt attributes (shape x colour x position x size x background)."""
    values = [ATTRIBUTES[name] for name in PROMPT_ATTRIBUTES]
    return [dict(zip(PROMPT_ATTRIBUTES, combo, strict=True)) for combo in itertools.product(*values)]


def split_combinations(heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) combinations: a seeded ``heldout_fraction`` never used for training."""
    combos = all_combinations()
    order = np.random.default_rng(seed).permutation(len(combos))
    n_held = max(1, round(heldout_fraction * len(combos)))
    return [combos[i] for i in order[n_held:]], [combos[i] for i in order[:n_held]]


def render_set(combos: list[dict[str, str]], n: int, resolution: int, seed: int) -> tuple[np.ndarray, dict]:
    """``n`` renders of random ``combos`` with random jitter and quality.

    Returns uint8 images (n, R, R, 3) and {attribute: int64 label indices (n,)}.
    """
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(combos), size=n)
    jitter = rng.uniform(-MAX_JITTER, MAX_JITTER, size=(n, 2))
    degraded = rng.random(n) < DEGRADED_SHARE
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    labels = {name: np.empty(n, dtype=np.int64) for name in PROMPT_ATTRIBUTES}
    for i in range(n):
        attrs = dict(combos[picks[i]], quality="degraded" if degraded[i] else "clean")
        images[i] = np.asarray(
            render(attrs, resolution, jitter=(jitter[i, 0], jitter[i, 1]), seed=seed * 1_000_003 + i)
        )
        for name in PROMPT_ATTRIBUTES:
            labels[name][i] = ATTRIBUTES[name].index(attrs[name])
    return images, labels


def render_digest(resolution: int) -> str:
    """Digest of a few fixed renders: changes whenever the world draws differently."""
    h = hashlib.sha256()
    for i, attrs in enumerate(all_combinations()[::97]):
        for quality in ATTRIBUTES["quality"]:
            h.update(render(dict(attrs, quality=quality), resolution, jitter=(0.05, -0.05), seed=i).tobytes())
    return h.hexdigest()


def evaluator_hash(cfg: EvaluatorConfig, resolution: int) -> str:
    payload = {
        "evaluator": to_dict(cfg),
        "resolution": resolution,
        "attributes": {k: list(ATTRIBUTES[k]) for k in PROMPT_ATTRIBUTES},
        "render": render_digest(resolution),
        "degraded_share": DEGRADED_SHARE,
        "version": EVALUATOR_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def evaluator_dir(cfg: BaseConfig) -> Path:
    """Where the evaluator for ``cfg`` is (or will be) cached."""
    return models_dir() / "evaluator" / evaluator_hash(cfg.evaluator, cfg.resolution)


@torch.no_grad()
def accuracy(model: AttributeClassifier, images: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-attribute accuracy of ``model`` on uint8 ``images`` with integer ``labels``."""
    model.eval()
    correct = {name: 0 for name in labels}
    for start in range(0, len(images), 1024):
        out = model(model.to_input(images[start : start + 1024]))
        for name in labels:
            correct[name] += int((out[name].argmax(1).numpy() == labels[name][start : start + 1024]).sum())
    return {name: correct[name] / len(images) for name in labels}


def fit_classifier(cfg: EvaluatorConfig, resolution: int) -> tuple[AttributeClassifier, dict[str, float], dict]:
    """Render the data, train the classifier, return (model, held-out accuracy, extra metrics)."""
    torch.manual_seed(cfg.seed)
    train_combos, held_combos = split_combinations(cfg.heldout_fraction, cfg.seed)
    t0 = time.perf_counter()
    train_x, train_y = render_set(train_combos, cfg.train_images, resolution, seed=cfg.seed * 2 + 1)
    held_x, held_y = render_set(held_combos, cfg.heldout_images, resolution, seed=cfg.seed * 2 + 2)
    render_s = time.perf_counter() - t0
    labels = {name: list(ATTRIBUTES[name]) for name in PROMPT_ATTRIBUTES}
    model = AttributeClassifier(labels, resolution, cfg.width, cfg.feature_dim)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    x_all = model.to_input(train_x)  # (N, 3, R, R)
    y_all = {name: torch.from_numpy(v) for name, v in train_y.items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    t0 = time.perf_counter()
    model.train()
    with Progress("evaluator", total=cfg.steps, unit="step") as progress:
        for _ in range(cfg.steps):
            idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
            out = model(x_all[idx])  # {attr: (B, n_values)}
            loss = sum(F.cross_entropy(out[name], y_all[name][idx]) for name in out)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
            progress.update()
    train_s = time.perf_counter() - t0
    held = accuracy(model, held_x, held_y)
    extra = {
        "train_accuracy": accuracy(model, train_x[:3000], {k: v[:3000] for k, v in train_y.items()}),
        "render_s": render_s,
        "train_s": train_s,
        "final_loss": float(np.mean(losses[-20:])),
        "heldout_combinations": len(held_combos),
        "train_combinations": len(train_combos),
    }
    return model.eval(), held, {**extra, "losses": losses}


def train_evaluator(cfg: BaseConfig) -> Path:
    """Train (or reuse the cached) evaluator for ``cfg``; returns its folder.

    The folder is written even when the evaluator is unfit (so its accuracy can be inspected); the
    returned metrics say ``fit_to_judge`` and a warning is logged. Loading it for judging raises.
    """
    out_dir = evaluator_dir(cfg)
    if (out_dir / "metrics.json").is_file() and not cfg.force:
        log.info("evaluator cached at %s", out_dir)
        return out_dir
    if not cfg.force:
        from omnidiff.base import shipped

        manifest = shipped.install("evaluator", out_dir.name, out_dir)
        if manifest is not None:
            print(f"evaluator: installed the shipped copy {out_dir.name} (sha256 verified; built at commit "
                  f"{str(manifest.get('built_at_commit'))[:12]}; force=true retrains it) -> {out_dir}")
            with _run(cfg, "base-evaluator") as run:
                if run is not None:
                    import mlflow

                    mlflow.set_tags({"evaluator_dir": str(out_dir), "shipped": "true",
                                     "shipped_commit": str(manifest.get("built_at_commit"))})
            return out_dir
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with _run(cfg, "base-evaluator") as run:
        model, held, extra = fit_classifier(cfg.evaluator, cfg.resolution)
        losses = extra.pop("losses")
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        save_evaluator(model, held, tmp, extra)
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
        tmp.rename(out_dir)  # readers never see a half-written folder
        fit = all(a >= FIT_THRESHOLD for a in held.values())
        summary = ", ".join(f"{k} {v:.1%}" for k, v in held.items())
        print(
            f"evaluator held-out accuracy: {summary} -> {'fit' if fit else 'NOT FIT'} to judge "
            f"(threshold {FIT_THRESHOLD:.0%}); {out_dir}"
        )
        if not fit:
            log.warning("evaluator below %.0f%% held-out accuracy on some attribute: %s", 100 * FIT_THRESHOLD, held)
        if run is not None:
            _log_evaluator(run, held, extra, losses, out_dir, fit)
    return out_dir


def _log_evaluator(run, held: dict, extra: dict, losses: list[float], out_dir: Path, fit: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    from omnidiff import tracking

    mlflow.log_metrics({f"heldout_accuracy.{k}": v for k, v in held.items()})
    mlflow.log_metrics({"evaluator.train_s": extra["train_s"], "evaluator.fit_to_judge": float(fit)})
    mlflow.set_tag("evaluator_dir", str(out_dir))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8)
    ax.set(xlabel="step", ylabel="sum of cross-entropies", yscale="log", title="evaluator training loss")
    fig.tight_layout()
    tracking.log_figure(fig, "evaluator_loss.png")
    plt.close(fig)
    tracking.log_json({"heldout_accuracy": held, **extra}, "evaluator_metrics.json")


@contextlib.contextmanager
def _run(cfg: BaseConfig, stage: str):
    """An MLflow run when ``cfg.track`` (yields the run), else nothing (yields None)."""
    if not cfg.track:
        yield None
        return
    from omnidiff import tracking

    with tracking.start_run(stage, config=cfg) as run:
        yield run


def ensure_evaluator(cfg: BaseConfig, require_fit: bool = True):
    """The loaded evaluator for ``cfg``, training it first if it is not cached."""
    return load_evaluator(train_evaluator(cfg), require_fit=require_fit)
