"""Prompt faithfulness: does a generated image show what its prompt asked for?

Issue 2 defines it and issue 6 (``omnidiff evaluate``) builds on it:

    result = prompt_faithfulness(pipe, prompts, evaluator, seed=0, steps=20, guidance=3.0)
    result.per_prompt   # one row per prompt: what it asked, what the evaluator saw, ok_<attribute>
    result.summary      # attribute x lang x length bucket -> share of images that match
    frechet_distance(evaluator.features(result.images), evaluator.features(real_images))
    image_grids(result.per_prompt, result.images)   # {lang: PIL grid}
    point, reps = bootstrap_scores(per_prompt_of_every_model, ("shape", "colour"), unit="spec",
                                   strata=("length",))  # 95% intervals, paired across models and languages

``prompts`` follows the schema of the world's ``eval_prompts.parquet``: a
``prompt`` text, its ``lang``, and one column per attribute holding the value
the prompt asks for (empty when the prompt does not mention it). The length
bucket is ``<=77`` or ``>77`` CLIP tokens, read from ``clip_tokens`` when the
table has it, else from ``is_long``. Everything but :func:`generate_images`
and :func:`prompt_faithfulness` is a pure function of tables and arrays, so it
is tested on hand-built frames. From the command line:
``omnidiff base score --config configs/base.yaml``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from omnidiff.progress import Progress

CLIP_WINDOW = 77
SHORT, LONG = f"<={CLIP_WINDOW}", f">{CLIP_WINDOW}"
ALL = "all"  # pseudo-attribute: every attribute the prompt asked for is right
SUMMARY_COLUMNS = ["attribute", "lang", "length", "n", "correct", "faithfulness"]


class Faithfulness(NamedTuple):
    per_prompt: pd.DataFrame
    summary: pd.DataFrame
    images: np.ndarray  # uint8 (N, H, W, 3), row i belongs to per_prompt row i


def _asked(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value) != ""


def length_buckets(prompts: pd.DataFrame) -> pd.Series:
    """``<=77`` / ``>77`` per prompt, from ``clip_tokens`` (preferred) or ``is_long``."""
    if "clip_tokens" in prompts.columns:
        return prompts["clip_tokens"].map(lambda n: LONG if int(n) > CLIP_WINDOW else SHORT)
    if "is_long" in prompts.columns:
        return prompts["is_long"].map(lambda b: LONG if bool(b) else SHORT)
    raise ValueError(
        f"prompts: need a 'clip_tokens' or 'is_long' column for the length bucket; columns are {list(prompts.columns)}"
    )


def check_prompts(prompts: pd.DataFrame, attributes: list[str]) -> None:
    """Clear errors for a prompt table that cannot be scored."""
    missing = [c for c in ("prompt", "lang") if c not in prompts.columns]
    if missing:
        raise ValueError(f"prompts: missing column(s) {missing}; columns are {list(prompts.columns)}")
    present = [a for a in attributes if a in prompts.columns]
    if not present:
        raise ValueError(f"prompts: no attribute column; expected some of {attributes}")
    if len(prompts) == 0:
        raise ValueError("prompts: the table is empty")


def judge(prompts: pd.DataFrame, predicted: dict[str, list[str]]) -> pd.DataFrame:
    """Per-prompt verdicts: ``pred_<a>`` and ``ok_<a>`` (True/False, or NA where ``a`` was not asked), ``ok_all``.

    ``predicted`` maps attribute -> one predicted value per prompt row.
    """
    attributes = [a for a in predicted if a in prompts.columns]
    check_prompts(prompts, list(predicted))
    out = prompts.reset_index(drop=True).copy()
    out["length"] = length_buckets(out).to_numpy()
    all_ok = pd.Series(True, index=out.index, dtype="boolean")
    any_asked = pd.Series(False, index=out.index)
    for attr in attributes:
        preds = list(predicted[attr])
        if len(preds) != len(out):
            raise ValueError(f"predicted[{attr!r}]: {len(preds)} values for {len(out)} prompts")
        out[f"pred_{attr}"] = preds
        asked = out[attr].map(_asked)
        ok = pd.Series(pd.NA, index=out.index, dtype="boolean")
        ok[asked] = out.loc[asked, attr].astype(str).to_numpy() == out.loc[asked, f"pred_{attr}"].astype(str).to_numpy()
        out[f"ok_{attr}"] = ok
        all_ok = all_ok & ok.fillna(True)
        any_asked |= asked
    out[f"ok_{ALL}"] = all_ok.where(any_asked, pd.NA)
    return out


def summarise(per_prompt: pd.DataFrame) -> pd.DataFrame:
    """attribute x lang x length -> n prompts that asked for it, how many are right, the share.

    Only prompts that asked for an attribute count towards it; ``attribute == "all"`` is the share
    of images where every asked attribute is right.
    """
    rows = []
    ok_cols = [c for c in per_prompt.columns if c.startswith("ok_")]
    if not ok_cols:
        raise ValueError("per_prompt: no ok_<attribute> columns; build it with judge()")
    for (lang, length), group in per_prompt.groupby(["lang", "length"], sort=True):
        for col in ok_cols:
            verdicts = group[col].dropna()
            if len(verdicts) == 0:
                continue
            correct = int(verdicts.astype(bool).sum())
            rows.append(
                {
                    "attribute": col[3:],
                    "lang": lang,
                    "length": length,
                    "n": len(verdicts),
                    "correct": correct,
                    "faithfulness": correct / len(verdicts),
                }
            )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def pivot(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows (lang, length), columns attribute: a readable table of the summary."""
    return summary.pivot_table(index=["lang", "length"], columns="attribute", values="faithfulness")


def lookup(summary: pd.DataFrame, attribute: str, lang: str | None = None, length: str | None = None) -> float:
    """Pooled faithfulness of ``attribute`` over the rows matching ``lang`` / ``length`` (None = any)."""
    rows = summary[summary["attribute"] == attribute]
    if lang is not None:
        rows = rows[rows["lang"] == lang]
    if length is not None:
        rows = rows[rows["length"] == length]
    n = rows["n"].sum()
    return float(rows["correct"].sum() / n) if n else float("nan")


def spec_keys(prompts: pd.DataFrame) -> pd.Series:
    """A language-independent key of each eval prompt's spec (the world renders one spec in every eval
    language): ``spec_id`` where the table has it, else ``prompt_en`` with ``is_long``. Raises when it has neither."""
    if "spec_id" in prompts.columns:
        return prompts["spec_id"].map(lambda s: f"spec{int(s)}")
    if "prompt_en" in prompts.columns and "is_long" in prompts.columns:
        return prompts["prompt_en"].astype(str) + prompts["is_long"].map(lambda b: " [long]" if bool(b) else "")
    raise ValueError(f"prompts: need a 'spec_id' column, or 'prompt_en' and 'is_long', to pair languages by spec; "
                     f"columns are {list(prompts.columns)}")


def bootstrap_scores(
    per_prompt: pd.DataFrame,
    attributes: tuple[str, ...] | list[str],
    resamples: int = 2000,
    seed: int = 0,
    unit: str = "prompt",
    strata: tuple[str, ...] | list[str] = ("lang", "length"),
) -> tuple[dict[tuple[str, str, str], float], dict[tuple[str, str, str], np.ndarray]]:
    """Point scores and bootstrap replicates per (model, lang, length), resampling units (prompts).

    ``per_prompt`` is :func:`judge`'s table of every model stacked, with a ``model`` column. A
    group's score is the mean over ``attributes`` of each attribute's share of right images among
    the units that asked for it (what :func:`summarise` and the evaluate stage's score table give).
    Rows with the same ``unit`` value in a group are one unit (one prompt drawn with several seeds:
    its images are averaged first), so seeds of a prompt stay together.

    ``strata``: the columns (of ``lang``, ``length``) whose values are resampled independently.
    Each stratum draws one set of ``resamples`` index vectors over the units it holds, shared by
    every model and every group in it: model-vs-model differences are always paired. The default,
    ``("lang", "length")``, resamples each language's prompts on its own. ``("length",)`` with a
    language-independent ``unit`` (:func:`spec_keys`: the eval prompts render the same specs in
    every language) resamples specs jointly across languages, so "language vs English" statistics
    are paired too; a unit a language lacks counts as not asked there. Deterministic for a given
    ``seed``. Returns ``(point, replicates)``, replicates shaped ``(resamples,)``.
    """
    if resamples < 1:
        raise ValueError(f"resamples={resamples}: must be >= 1")
    bad = [s for s in strata if s not in ("lang", "length")]
    if bad or len(set(strata)) != len(strata):
        raise ValueError(f"strata={list(strata)}: expected distinct columns among ['lang', 'length']")
    missing = [c for c in ("model", "lang", "length", unit) if c not in per_prompt.columns]
    if missing:
        raise ValueError(f"per_prompt: missing column(s) {missing}; columns are {list(per_prompt.columns)}")
    ok_cols = [f"ok_{a}" for a in attributes if f"ok_{a}" in per_prompt.columns]
    if not ok_cols:
        raise ValueError(f"per_prompt: no ok_<attribute> column for any of {list(attributes)}")
    rng = np.random.default_rng(seed)
    point: dict[tuple[str, str, str], float] = {}
    replicates: dict[tuple[str, str, str], np.ndarray] = {}
    strata_groups = per_prompt.groupby(list(strata), sort=True) if strata else [((), per_prompt)]
    for _, stratum in strata_groups:
        units = pd.Index(sorted(set(stratum[unit])))
        idx = rng.integers(0, len(units), size=(resamples, len(units)))  # (B, U), shared by the stratum's groups
        for (lang, length), group in stratum.groupby(["lang", "length"], sort=True):
            first: tuple[str, pd.Index] | None = None
            for model, rows in group.groupby("model", sort=False):
                ok = rows[ok_cols].astype("Float64").to_numpy(dtype=float, na_value=np.nan)  # (rows, A), nan: not asked
                per_unit = pd.DataFrame(ok, columns=ok_cols).groupby(rows[unit].to_numpy(), sort=True).mean()
                if first is None:
                    first = (str(model), per_unit.index)
                elif not per_unit.index.equals(first[1]):
                    raise ValueError(f"per_prompt: model {model!r} scored other prompts than {first[0]!r} in "
                                     f"({lang}, {length}); paired intervals need the same prompt set for every model")
                m = per_unit.reindex(units).to_numpy()  # (U, A); a unit this group lacks: nan, not asked
                asked = ~np.isnan(m)
                values = np.where(asked, m, 0.0)
                present = asked.any(axis=0)  # attributes some unit of the group asked for
                if not present.any():
                    continue
                key = (str(model), str(lang), str(length))
                point[key] = float((values.sum(0)[present] / asked.sum(0)[present]).mean())
                sums, counts = values[idx].sum(axis=1), asked[idx].sum(axis=1)  # (B, A)
                with np.errstate(invalid="ignore", divide="ignore"):
                    shares = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)[:, present]
                with warnings.catch_warnings():  # a resample whose units asked none of them: nan, dropped later
                    warnings.simplefilter("ignore", RuntimeWarning)
                    replicates[key] = np.nanmean(shares, axis=1)
    return point, replicates


def percentile_interval(replicates: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The bootstrap percentile interval of ``replicates`` (no interpolation, so +-inf ratios stay usable)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must be between 0 and 1")
    reps = np.asarray(replicates, dtype=float)
    reps = reps[~np.isnan(reps)]
    if reps.size == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2
    low, high = np.quantile(reps, [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D): the FID formula.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``; the symmetric form keeps
    every square root on a positive semi-definite matrix, so no complex parts appear.
    """
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features: expected (N, D) arrays with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"features: need at least 2 rows each for a covariance, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def psd_sqrt(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root_a = psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def image_grids(
    per_prompt: pd.DataFrame, images: np.ndarray, per_lang: int = 32, columns: int = 8, scale: int = 4
) -> dict[str, Image.Image]:
    """{lang: grid of its first ``per_lang`` images}, upscaled ``scale`` x with a border per image:
    green when every asked attribute is right, red otherwise, grey when unjudged."""
    if len(per_prompt) != len(images):
        raise ValueError(f"per_prompt has {len(per_prompt)} rows but there are {len(images)} images")
    grids = {}
    per_prompt = per_prompt.reset_index(drop=True)
    for lang, group in per_prompt.groupby("lang", sort=True):
        idx = group.index[:per_lang]
        h, w = images.shape[1] * scale, images.shape[2] * scale
        pad = 2
        rows = math.ceil(len(idx) / columns)
        grid = Image.new("RGB", (columns * (w + 2 * pad), rows * (h + 2 * pad)), (255, 255, 255))
        draw = ImageDraw.Draw(grid)
        for k, i in enumerate(idx):
            x0, y0 = (k % columns) * (w + 2 * pad), (k // columns) * (h + 2 * pad)
            ok = group.at[i, f"ok_{ALL}"] if f"ok_{ALL}" in group.columns else pd.NA
            colour = (128, 128, 128) if pd.isna(ok) else ((40, 170, 60) if ok else (210, 40, 40))
            draw.rectangle([x0, y0, x0 + w + 2 * pad - 1, y0 + h + 2 * pad - 1], fill=colour)
            tile = Image.fromarray(images[i]).resize((w, h), Image.NEAREST)
            grid.paste(tile, (x0 + pad, y0 + pad))
        grids[str(lang)] = grid
    return grids


def generate_images(
    pipe,
    prompts: list[str],
    seed: int = 0,
    steps: int = 20,
    guidance: float = 3.0,
    batch_size: int = 32,
    name: str = "generate",
    seeds: list[int] | None = None,
) -> np.ndarray:
    """Run ``pipe`` over ``prompts`` in batches -> uint8 (N, H, W, 3).

    Batch k is sampled with seed ``seed + k * batch_size`` (its first row's index), so a run is
    reproducible for a given (seed, batch_size). ``seeds``: one seed per prompt instead (the
    pipeline's list form), so an image's noise is chosen by its caller (the evaluate stage gives a
    spec the same noise in every language and model).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"seeds: {len(seeds)} seeds for {len(prompts)} prompts")
    out: list[np.ndarray] = []
    with Progress(name, total=len(prompts), unit="img") as progress:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            batch_seed = seed + start if seeds is None else [int(s) for s in seeds[start : start + batch_size]]
            pil = pipe(batch, num_inference_steps=steps, guidance_scale=guidance, seed=batch_seed)
            out.extend(np.asarray(im.convert("RGB"), dtype=np.uint8) for im in pil)
            progress.update(len(batch))
    return np.stack(out)


def prompt_faithfulness(
    pipe, prompts: pd.DataFrame, evaluator, seed: int = 0, steps: int = 20, guidance: float = 3.0, batch_size: int = 32
) -> Faithfulness:
    """Generate one image per prompt row with ``pipe``, read it with ``evaluator``, compare with the prompt.

    A ``seed`` column gives each row its own image seed (``seed`` is then unused)."""
    attributes = list(evaluator.labels)
    check_prompts(prompts, attributes)
    prompts = prompts.reset_index(drop=True)
    seeds = prompts["seed"].tolist() if "seed" in prompts.columns else None
    images = generate_images(pipe, prompts["prompt"].tolist(), seed, steps, guidance, batch_size, name="score",
                             seeds=seeds)
    per_prompt = judge(prompts, evaluator.predict(images))
    return Faithfulness(per_prompt, summarise(per_prompt), images)


def select_prompts(
    prompts: pd.DataFrame,
    langs: tuple[str, ...] | list[str] = (),
    max_per_group: int = 0,
    images_per_prompt: int = 1,
    seed: int = 0,
) -> pd.DataFrame:
    """The prompt rows to score: only ``langs`` (empty = all), at most ``max_per_group`` per
    (lang, length) chosen by ``seed`` (0 = all), each repeated ``images_per_prompt`` times with a
    ``sample`` index (every repeat gets its own image seed)."""
    out = prompts.reset_index(drop=True).copy()
    out["length"] = length_buckets(out).to_numpy()
    if langs:
        unknown = sorted(set(langs) - set(out["lang"]))
        if unknown:
            raise ValueError(f"langs={list(langs)}: {unknown} not in the prompts (have {sorted(set(out['lang']))})")
        out = out[out["lang"].isin(list(langs))]
    if max_per_group:
        out = out.groupby(["lang", "length"], group_keys=False, sort=True).apply(
            lambda g: g.sample(n=min(len(g), max_per_group), random_state=seed).sort_index()
        )
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt={images_per_prompt}: must be >= 1")
    reps = [out.assign(sample=k) for k in range(images_per_prompt)]
    return pd.concat(reps, ignore_index=True).drop(columns=["length"])


def load_real_images(world_dir, n: int, resolution: int, seed: int = 0) -> np.ndarray:
    """``n`` of the world's images (seeded pick), box-resized to ``resolution``: uint8 (n, R, R, 3)."""
    from pathlib import Path

    world_dir = Path(world_dir)
    rel = pd.read_parquet(world_dir / "pairs.parquet", columns=["image"])["image"]
    pick = np.random.default_rng(seed).permutation(len(rel))[: min(n, len(rel))]
    out = np.empty((len(pick), resolution, resolution, 3), dtype=np.uint8)
    for k, i in enumerate(sorted(pick)):
        with Image.open(world_dir / rel.iloc[i]) as im:
            out[k] = np.asarray(im.convert("RGB").resize((resolution, resolution), Image.Resampling.BOX))
    return out


def faithfulness_figure(summary: pd.DataFrame, title: str = "prompt faithfulness"):
    """Bars per language, one panel per length bucket, one bar per attribute (matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [x for x in (SHORT, LONG) if x in set(summary["length"])]
    attributes = list(dict.fromkeys(summary["attribute"]))
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 3.8), squeeze=False, sharey=True)
    for ax, length in zip(axes[0], lengths, strict=True):
        part = summary[summary["length"] == length]
        langs = sorted(set(part["lang"]))
        width = 0.8 / max(1, len(attributes))
        for k, attr in enumerate(attributes):
            values = [lookup(part, attr, lang) for lang in langs]
            ax.bar(np.arange(len(langs)) + k * width, values, width, label=attr)
        ax.set_xticks(np.arange(len(langs)) + 0.4 - width / 2, langs)
        ax.set(ylim=(0, 1), title=f"{length} CLIP tokens", ylabel="share of images that match")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
