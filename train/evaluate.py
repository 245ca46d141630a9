"""Evaluate stage (issue 6): does each model draw what its prompt asks, per language and prompt length?

    omnidiff evaluate omnidiff-tiny@candidate                       # vs the base model
    omnidiff evaluate base=base stage1=omnidiff-tiny/1 stage3=omnidiff-tiny/3   # the stage ablation
    omnidiff evaluate --compare omnidiff-tiny/2 omnidiff-tiny/3     # two models side by side

Every model samples the same seeded prompt set (the world's eval prompts: trained and zero-shot
languages, short prompts and prompts whose decisive words come after CLIP's 77th token); the
world's attribute classifier reads each image (omnidiff.scoring). Output: a long table
(model x attribute x language x length), a Fréchet distance on evaluator features against real
world images, bar charts, image grids, the claims of the paper checked against the baseline, and a
self-contained HTML report, all logged to MLflow.

With real weights on disk (an SD-class model plus Inception and CLIP weights) the same command
would compute FID and CLIP score with torchmetrics; this tiny-world build scores with the world's
own evaluator because no such weights exist offline here.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from omnidiff.config import load_config, to_dict
from omnidiff.env import subdir
from omnidiff.scoring import LONG, SHORT, frechet_distance, image_grids, prompt_faithfulness

BASE_LABEL = "base"


@dataclass
class EvalInputs:
    world_dir: Path
    prompts: pd.DataFrame
    evaluator: Any
    baseline_ref: str
    real_images: np.ndarray


@dataclass
class EvalReport:
    summary: pd.DataFrame  # model, attribute, lang, length, n, correct, faithfulness
    scores: pd.DataFrame  # model, lang, length, zero_shot, score (mean over score_attributes)
    frechet: dict[str, float]
    claims: pd.DataFrame
    report_dir: Path
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "report_dir": str(self.report_dir),
            "report_html": str(self.report_dir / "report.html"),
            "frechet": self.frechet,
            "scores": self.scores.to_dict(orient="records"),
            "claims": self.claims.to_dict(orient="records"),
            "run_id": self.run_id,
        }


# ---------------------------------------------------------------- inputs

def _base_config(cfg):
    from omnidiff.base.config import BaseConfig

    return load_config(BaseConfig, cfg.base_config)


def resolve_inputs(cfg) -> EvalInputs:
    """World, eval prompts, evaluator and baseline, from the config (cached builds where needed)."""
    from omnidiff.models.evaluator import load_evaluator

    base_cfg = _base_config(cfg)
    if cfg.world_dir is not None:
        world_dir = Path(cfg.world_dir)
    elif base_cfg.world_dir is not None:
        world_dir = Path(base_cfg.world_dir)
    else:
        from omnidiff.world import WorldConfig, generate_world

        world_dir = generate_world(load_config(WorldConfig, base_cfg.world_config))
    prompts_path = world_dir / "eval_prompts.parquet"
    if not prompts_path.is_file():
        raise FileNotFoundError(f"world {world_dir}: no eval_prompts.parquet (generate the world first)")
    if cfg.evaluator_dir is not None:
        evaluator = load_evaluator(cfg.evaluator_dir, require_fit=cfg.require_fit_evaluator)
    else:
        from omnidiff.base.evaluator_train import ensure_evaluator

        evaluator = ensure_evaluator(base_cfg, require_fit=cfg.require_fit_evaluator)
    if cfg.baseline is not None:
        baseline_ref = cfg.baseline
    else:
        from omnidiff.base.pretrain import pretrain

        baseline_ref = str(pretrain(base_cfg))
    prompts = select_prompts(pd.read_parquet(prompts_path), cfg.max_per_group, cfg.langs, cfg.seed)
    return EvalInputs(world_dir, prompts, evaluator, baseline_ref,
                      real_world_images(world_dir, cfg.real_images, evaluator.resolution, cfg.seed))


def select_prompts(prompts: pd.DataFrame, max_per_group: int, langs: tuple[str, ...] = (), seed: int = 0) -> pd.DataFrame:
    """At most ``max_per_group`` prompts per (lang, is_long), drawn with ``seed``; a fixed set per config."""
    if langs:
        unknown = sorted(set(langs) - set(prompts["lang"]))
        if unknown:
            raise ValueError(f"langs={list(langs)}: no eval prompts in {unknown}; available: {sorted(set(prompts['lang']))}")
        prompts = prompts[prompts["lang"].isin(langs)]
    if max_per_group:
        prompts = (prompts.groupby(["lang", "is_long"], group_keys=False, sort=True)
                   .apply(lambda g: g.sample(n=min(len(g), max_per_group), random_state=seed)))
    return prompts.reset_index(drop=True)


def real_world_images(world_dir: Path, n: int, resolution: int, seed: int) -> np.ndarray:
    """``n`` world images resized to ``resolution``: the real side of the Fréchet distance."""
    from PIL import Image

    pairs = pd.read_parquet(world_dir / "pairs.parquet")
    column = next(c for c in ("image_path", "path", "image") if c in pairs.columns)
    paths = pairs[column].drop_duplicates().sample(n=min(n, pairs[column].nunique()), random_state=seed)
    out = []
    for rel in paths:
        path = Path(rel) if Path(rel).is_absolute() else world_dir / rel
        img = Image.open(path).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        out.append(np.asarray(img, dtype=np.uint8))
    return np.stack(out)


# ---------------------------------------------------------------- scoring

def _load_pipeline(ref: str):
    from omnidiff.pipeline import OmniDiffusionPipeline
    from omnidiff.tracking import resolve_model

    return OmniDiffusionPipeline.from_pretrained(resolve_model(ref))


def score_table(summary: pd.DataFrame, zero_shot_langs: set[str], attributes: tuple[str, ...]) -> pd.DataFrame:
    """model x lang x length -> mean faithfulness over ``attributes`` (pure; tested on hand-built frames)."""
    part = summary[summary["attribute"].isin(attributes)]
    if part.empty:
        raise ValueError(f"summary: none of the score attributes {list(attributes)} was scored")
    scores = part.groupby(["model", "lang", "length"], as_index=False)["faithfulness"].mean()
    scores = scores.rename(columns={"faithfulness": "score"})
    scores["zero_shot"] = scores["lang"].isin(zero_shot_langs)
    return scores


def _score(scores: pd.DataFrame, model: str, lang: str | None, length: str | None, zero_shot: bool | None = None) -> float:
    rows = scores[scores["model"] == model]
    if lang is not None:
        rows = rows[rows["lang"] == lang]
    if length is not None:
        rows = rows[rows["length"] == length]
    if zero_shot is not None:
        rows = rows[rows["zero_shot"] == zero_shot]
    return float(rows["score"].mean()) if len(rows) else float("nan")


def check_claims(scores: pd.DataFrame, model: str, baseline: str = BASE_LABEL) -> pd.DataFrame:
    """The paper's claims (issue 6 "Must show") for ``model`` against ``baseline``, pass or fail, honestly."""
    trained = sorted(set(scores.loc[~scores["zero_shot"], "lang"]) - {"en"})
    zero_shot = sorted(set(scores.loc[scores["zero_shot"], "lang"]))
    en_m, en_b = _score(scores, model, "en", SHORT), _score(scores, baseline, "en", SHORT)
    rows = [{"claim": "short English >= base", "model": en_m, "base": en_b, "target": en_b, "pass": en_m >= en_b}]
    for lang in trained:
        m, b = _score(scores, model, lang, SHORT), _score(scores, baseline, lang, SHORT)
        rows.append({"claim": f"{lang} short >= 3x base", "model": m, "base": b, "target": 3 * b, "pass": m >= 3 * b})
        rows.append({"claim": f"{lang} short within 10 points of English", "model": m, "base": b,
                     "target": en_m - 0.10, "pass": m >= en_m - 0.10})
    long_m, long_b = _score(scores, model, None, LONG, False), _score(scores, baseline, None, LONG, False)
    rows.append({"claim": "long prompts (>77 tokens) >= 3x base", "model": long_m, "base": long_b,
                 "target": 3 * long_b, "pass": long_m >= 3 * long_b})
    for lang in zero_shot:
        m, b = _score(scores, model, lang, SHORT), _score(scores, baseline, lang, SHORT)
        rows.append({"claim": f"{lang} (zero-shot) reported", "model": m, "base": b, "target": float("nan"),
                     "pass": None})
    return pd.DataFrame(rows)


def evaluate(models: dict[str, str] | list[str] | str, cfg, inputs: EvalInputs | None = None,
             command: str | None = None) -> EvalReport:
    """Score every model in ``models`` (label -> reference) plus the baseline under label ``base``."""
    if isinstance(models, str):
        models = [models]
    if isinstance(models, list):
        models = {ref: ref for ref in models}
    inputs = inputs or resolve_inputs(cfg)
    models = dict(models)
    if BASE_LABEL not in models and cfg.baseline != "none":
        models = {BASE_LABEL: inputs.baseline_ref, **models}
    summaries, grids, frechet = [], {}, {}
    real_features = inputs.evaluator.features(inputs.real_images)
    t0 = time.perf_counter()
    for label, ref in models.items():
        print(f"[evaluate] {label}: {ref} on {len(inputs.prompts)} prompts", file=sys.stderr, flush=True)
        pipe = _load_pipeline(ref)
        result = prompt_faithfulness(pipe, inputs.prompts, inputs.evaluator, seed=cfg.seed, steps=cfg.steps,
                                     guidance=cfg.guidance, batch_size=cfg.batch_size)
        summaries.append(result.summary.assign(model=label))
        frechet[label] = frechet_distance(inputs.evaluator.features(result.images), real_features)
        grids[label] = image_grids(result.per_prompt, result.images)
        del pipe
    summary = pd.concat(summaries, ignore_index=True)
    zero_shot_langs = set(inputs.prompts.loc[inputs.prompts.get("zero_shot", False).astype(bool), "lang"])
    scores = score_table(summary, zero_shot_langs, cfg.score_attributes)
    baseline = BASE_LABEL if BASE_LABEL in models else next(iter(models))
    claims = pd.concat([check_claims(scores, label, baseline).assign(model_label=label)
                        for label in models if label != baseline], ignore_index=True) if len(models) > 1 else pd.DataFrame()
    report_dir = Path(cfg.report_dir) if cfg.report_dir else subdir(
        "reports", "evaluate", hashlib.sha256(json.dumps(models, sort_keys=True).encode()).hexdigest()[:12])
    report_dir.mkdir(parents=True, exist_ok=True)
    command = command or "omnidiff evaluate " + " ".join(shlex.quote(f"{k}={v}") for k, v in models.items())
    report = EvalReport(summary, scores, frechet, claims, report_dir)
    write_report(report, grids, cfg, command, time.perf_counter() - t0)
    if cfg.track:
        report.run_id = log_report(report, models, cfg)
    return report


# ---------------------------------------------------------------- pictures and report

def charts(scores: pd.DataFrame) -> dict[str, Any]:
    """Bar charts: score per language (short prompts) and per length, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    models = list(dict.fromkeys(scores["model"]))
    for name, frame, xcol in (
        ("by_language", scores[scores["length"] == SHORT], "lang"),
        ("by_length", scores[~scores["zero_shot"]].groupby(["model", "length"], as_index=False)["score"].mean(), "length"),
    ):
        xs = list(dict.fromkeys(frame.sort_values(xcol)[xcol]))
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(xs) * max(1, len(models)) / 2), 3.6))
        width = 0.8 / max(1, len(models))
        for i, model in enumerate(models):
            vals = [frame[(frame["model"] == model) & (frame[xcol] == x)]["score"].mean() for x in xs]
            ax.bar(np.arange(len(xs)) + i * width, vals, width, label=model)
        ax.set_xticks(np.arange(len(xs)) + width * (len(models) - 1) / 2)
        ax.set_xticklabels(xs)
        ax.set_ylim(0, 1)
        ax.set_ylabel("prompt faithfulness")
        ax.set_title("short prompts, per language" if name == "by_language" else "per prompt length (trained languages)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        figures[name] = fig
    return figures


def _png_b64(image) -> str:
    buf = io.BytesIO()
    if hasattr(image, "savefig"):
        image.savefig(buf, format="png", dpi=100)
    else:
        image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(report: EvalReport, grids: dict[str, dict[str, Any]], cfg, command: str, seconds: float) -> Path:
    """summary.csv, scores.csv, claims.csv, charts, grids and a self-contained report.html."""
    out = report.report_dir
    report.summary.to_csv(out / "summary.csv", index=False)
    report.scores.to_csv(out / "scores.csv", index=False)
    report.claims.to_csv(out / "claims.csv", index=False)
    (out / "frechet.json").write_text(json.dumps(report.frechet, indent=2))
    figures = charts(report.scores)
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=100)
    for model, per_lang in grids.items():
        for lang, grid in per_lang.items():
            grid.save(out / f"grid_{model.replace('/', '_').replace('@', '_')}_{lang}.png")
    table = report.scores.pivot_table(index=["lang", "length"], columns="model", values="score")
    table = table[[m for m in dict.fromkeys(report.scores["model"])]]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>omnidiff evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.pass{color:#070}.fail{color:#a00}"
        "img.grid{image-rendering:pixelated;width:512px}</style>",
        "<h1>Prompt faithfulness per language and prompt length</h1>",
        f"<p>Reproduce: <code>{html.escape(command)}</code> ({seconds:.0f} s). Score = mean faithfulness over "
        f"{', '.join(cfg.score_attributes)}; {cfg.steps} sampling steps, guidance {cfg.guidance}, seed {cfg.seed}.</p>",
        "" if cfg.require_fit_evaluator else
        "<p><b>Smoke run: the evaluator was not required to be fit (>= 95% held-out accuracy); "
        "these numbers do not judge the models.</b></p>",
        "<h2>Scores (model columns)</h2>", table.to_html(float_format=lambda v: f"{v:.3f}"),
        "<h2>Fréchet distance to real images (evaluator features; lower is better)</h2>",
        pd.Series(report.frechet, name="frechet").to_frame().to_html(float_format=lambda v: f"{v:.3f}"),
    ]
    if len(report.claims):
        rows = []
        for r in report.claims.to_dict(orient="records"):
            verdict = "reported" if r["pass"] is None else ("pass" if r["pass"] else "FAIL")
            css = "" if r["pass"] is None else ("pass" if r["pass"] else "fail")
            rows.append(f"<tr><td>{html.escape(str(r['model_label']))}</td><td style='text-align:left'>"
                        f"{html.escape(r['claim'])}</td><td>{r['model']:.3f}</td><td>{r['base']:.3f}</td>"
                        f"<td>{r['target']:.3f}</td><td class='{css}'>{verdict}</td></tr>")
        parts += ["<h2>The paper's claims against the base model</h2>",
                  "<table><tr><th>model</th><th>claim</th><th>model</th><th>base</th><th>target</th><th></th></tr>",
                  *rows, "</table>"]
    parts.append("<h2>Charts</h2>")
    parts += [f"<img src='data:image/png;base64,{_png_b64(fig)}'>" for fig in figures.values()]
    parts.append("<h2>Samples (green border: every asked attribute right)</h2>")
    for model, per_lang in grids.items():
        parts.append(f"<h3>{html.escape(model)}</h3>")
        for lang, grid in per_lang.items():
            parts.append(f"<p>{html.escape(lang)}<br><img class='grid' src='data:image/png;base64,{_png_b64(grid)}'></p>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    import matplotlib.pyplot as plt

    for fig in figures.values():
        plt.close(fig)
    return path


def _model_run_id(ref: str) -> str | None:
    """The training run that produced a model: lineage.json in its folder or the registry's run_id tag."""
    from omnidiff.tracking import resolve_model

    try:
        folder = Path(resolve_model(ref))
    except Exception:
        return None
    lineage = folder / "lineage.json"
    if lineage.is_file():
        data = json.loads(lineage.read_text())
        return data.get("run_id") or data.get("train_run_id")
    return None


def log_report(report: EvalReport, models: dict[str, str], cfg) -> str:
    """An evaluate run with everything; each evaluated model's own run gets its metrics and the report."""
    import mlflow

    from omnidiff.tracking import start_run

    def metrics_for(label: str) -> dict[str, float]:
        rows = report.scores[report.scores["model"] == label]
        out = {f"eval.{r.lang}.{'long' if r.length == LONG else 'short'}": float(r.score) for r in rows.itertuples()}
        out["eval.frechet"] = float(report.frechet[label])
        return out

    with start_run("evaluate", config=cfg, tags={"models": json.dumps(models)}) as run:
        for label in models:
            mlflow.log_metrics({f"{k}.{label.replace('@', '_').replace('/', '_')}": v for k, v in metrics_for(label).items()})
        mlflow.log_artifacts(str(report.report_dir), artifact_path="evaluation")
        eval_run_id = run.info.run_id
    client = mlflow.MlflowClient()
    for label, ref in models.items():
        run_id = _model_run_id(ref) if label != BASE_LABEL else None
        if not run_id:
            continue
        for key, value in metrics_for(label).items():
            client.log_metric(run_id, key, value)
        client.log_artifact(run_id, str(report.report_dir / "report.html"), artifact_path="evaluation")
        client.set_tag(run_id, "evaluation.run_id", eval_run_id)
    return eval_run_id


def format_table(report: EvalReport) -> str:
    table = report.scores.pivot_table(index=["lang", "length"], columns="model", values="score")
    table = table[[m for m in dict.fromkeys(report.scores["model"])]]
    lines = [table.to_string(float_format=lambda v: f"{v:.3f}")]
    lines.append("frechet: " + ", ".join(f"{k}={v:.3f}" for k, v in report.frechet.items()))
    if len(report.claims):
        for r in report.claims.to_dict(orient="records"):
            verdict = "reported" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
            lines.append(f"[{verdict:>8}] {r['model_label']}: {r['claim']}: {r['model']:.3f} (base {r['base']:.3f})")
    lines.append(f"report: {report.report_dir / 'report.html'}")
    return "\n".join(lines)


__all__ = ["EvalReport", "check_claims", "evaluate", "format_table", "resolve_inputs", "score_table", "select_prompts",
           "to_dict"]
