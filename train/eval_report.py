"""The evaluate stage's report: charts with 95% error bars, the claims with their verdicts, and the
samples, each image labelled with the prompt it answers; one self-contained report.html.

The page fits a 1280-px window (issue 15 item 11): the body is at most ``PAGE_MAX_WIDTH_PX`` wide,
charts are drawn at most ``CHART_MAX_WIDTH_PX`` wide and shrink with the page, wide tables scroll
inside themselves, and long words wrap. tests/test_eval_report.py checks this on a rendered report,
and in headless chromium at a 1280-px window where chromium is installed.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np
import pandas as pd

from omnidiff.scoring import ALL, LONG, SHORT, image_grids

PAGE_MAX_WIDTH_PX = 1200
CHART_DPI = 100
CHART_MAX_WIDTH_PX = 1100
SAMPLES_PER_LANG = 32  # as omnidiff.scoring.image_grids: the first prompts of each language
TILE_PX = 48

CSS = (
    "*{box-sizing:border-box}"
    f"body{{font-family:sans-serif;max-width:{PAGE_MAX_WIDTH_PX}px;margin:1em auto;padding:0 16px}}"
    "table{border-collapse:collapse;display:inline-block;vertical-align:top;max-width:100%;overflow-x:auto}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td.text{text-align:left}"
    "code{overflow-wrap:anywhere}"
    ".pass{color:#070;font-weight:bold}.fail{color:#a00;font-weight:bold}.inconclusive{color:#a60}"
    "img.chart{display:block;max-width:100%;height:auto;margin:0.5em 0}"
    ".samples{display:grid;gap:4px 8px;align-items:center;margin-bottom:1em}"
    ".samples .head{font-weight:bold;font-size:12px;overflow-wrap:anywhere}"
    ".samples .prompt{font-size:12px;overflow-wrap:anywhere}"
    f".samples img{{width:{TILE_PX}px;height:{TILE_PX}px;image-rendering:pixelated;border:3px solid #888}}"
    ".samples img.ok{border-color:#28aa3c}.samples img.wrong{border-color:#d22828}"
)

VERDICTS_EXPLAINED = (
    "Each claim is decided on the bootstrap {conf:.0%} interval of its statistic ({unit}s resampled "
    "{resamples} times, seed {seed}; {shared} shares each resample, so {paired} paired): "
    "<b>pass</b> when the whole interval clears the threshold, <b>fail</b> when the whole interval misses it, "
    "<b>inconclusive</b> when the interval straddles it (more prompts or seeds would decide). "
    "&ldquo;At least 0.95x&rdquo; therefore passes only when the interval's lower bound is at least 0.95; "
    "&ldquo;above its base&rdquo; needs the difference's interval above 0; zero-shot languages are reported, not judged."
)


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def _interval(row: dict, digits: int = 3) -> str:
    return f"{_fmt(row['score'], digits)} [{_fmt(row['low'], digits)}, {_fmt(row['high'], digits)}]"


def charts(scores: pd.DataFrame, pooled: pd.DataFrame) -> dict[str, Any]:
    """Bar charts with 95% error bars: score per language (short prompts) and per length (trained languages)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    models = list(dict.fromkeys(scores["model"]))
    for name, frame, xcol, title in (
        ("by_language", scores[scores["length"] == SHORT], "lang", "short prompts, per language"),
        ("by_length", pooled, "length", "per length, trained languages"),
    ):
        xs = list(dict.fromkeys(frame.sort_values(xcol)[xcol]))
        # 0.3 inch a bar, never wider than the page (issue 15 item 11: 1760 px for 8 languages x 4 models)
        width_in = min(CHART_MAX_WIDTH_PX / CHART_DPI, max(6.0, 1.5 + 0.3 * len(xs) * max(1, len(models))))
        fig, ax = plt.subplots(figsize=(width_in, 3.6))
        width = 0.8 / max(1, len(models))
        for i, model in enumerate(models):
            part = frame[frame["model"] == model].set_index(xcol).reindex(xs)
            vals = part["score"].to_numpy(dtype=float)
            err = np.stack([vals - part["low"].to_numpy(dtype=float), part["high"].to_numpy(dtype=float) - vals])
            ax.bar(np.arange(len(xs)) + i * width, vals, width, label=model,
                   yerr=np.nan_to_num(np.clip(err, 0, None)), capsize=2, error_kw={"elinewidth": 0.8})
        ax.set_xticks(np.arange(len(xs)) + width * (len(models) - 1) / 2)
        ax.set_xticklabels(xs)
        ax.set_ylim(0, 1)
        ax.set_ylabel("prompt faithfulness")
        ax.set_title(f"{title} (error bars: 95% interval)", fontsize=10)
        # below the axes: bars near 1.0 would hide under a legend inside them
        ax.legend(fontsize=8, ncol=min(6, max(1, len(models))), loc="upper center", bbox_to_anchor=(0.5, -0.12),
                  frameon=False)
        fig.tight_layout()
        figures[name] = fig
    return figures


def _png_b64(image) -> str:
    buf = io.BytesIO()
    if hasattr(image, "savefig"):
        image.savefig(buf, format="png", dpi=CHART_DPI)
    else:
        image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _tile_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sample_rows(per_prompt: pd.DataFrame, per_lang: int = SAMPLES_PER_LANG) -> dict[str, list[int]]:
    """{lang: row positions of its first ``per_lang`` prompts} in one model's per-prompt table (a prompt drawn
    with several seeds shows its first image)."""
    table = per_prompt.reset_index(drop=True)
    if "sample" in table.columns:
        table = table[table["sample"] == 0]
    return {str(lang): list(group.index[:per_lang]) for lang, group in table.groupby("lang", sort=True)}


def samples_html(per_prompt: pd.DataFrame, images: dict[str, np.ndarray], per_lang: int = SAMPLES_PER_LANG) -> list[str]:
    """Per language, one row per prompt: each model's image for it (alt and title: the prompt), then the prompt."""
    models = list(images)
    tables = {m: per_prompt[per_prompt["model"] == m].reset_index(drop=True) for m in models}
    first = tables[models[0]]
    for m in models[1:]:
        if tables[m]["prompt"].tolist() != first["prompt"].tolist():
            raise ValueError(f"samples: model {m!r} answered other prompts than {models[0]!r}")
    pred_cols = [c for c in first.columns if c.startswith("pred_")]
    columns = f"grid-template-columns:repeat({len(models)},{TILE_PX + 8}px) minmax(0,1fr)"
    parts = []
    for lang, rows in sample_rows(first, per_lang).items():
        parts.append(f"<h3>{html.escape(lang)}</h3><div class='samples' style='{columns}'>")
        parts.append("".join(f"<div class='head'>{html.escape(m)}</div>" for m in models) + "<div class='head'>prompt</div>")
        for i in rows:
            prompt = str(first.at[i, "prompt"])
            length = first.at[i, "length"] if "length" in first.columns else ""
            tag = " <i>(&gt;77 tokens)</i>" if length == LONG else ""
            for m in models:
                row = tables[m].iloc[i]
                ok = row.get(f"ok_{ALL}", pd.NA)
                css = "na" if pd.isna(ok) else ("ok" if bool(ok) else "wrong")
                saw = ", ".join(f"{c[5:]} {row[c]}" for c in pred_cols)
                title = f"{m}: {prompt}\nthe evaluator saw: {saw}"
                parts.append(f"<img class='sample {css}' alt='{html.escape(prompt, quote=True)}' "
                             f"title='{html.escape(title, quote=True)}' src='data:image/png;base64,"
                             f"{_tile_b64(images[m][i])}'>")
            parts.append(f"<div class='prompt'>{html.escape(prompt)}{tag}</div>")
        parts.append("</div>")
    return parts


def claims_html(claims: pd.DataFrame) -> list[str]:
    rows = []
    for r in claims.to_dict(orient="records"):
        kind = "ratio" if r["kind"] == "ratio" else "difference"
        threshold = "" if np.isnan(r["threshold"]) else (f"&ge; {r['threshold']:g}" if kind == "ratio" else "&gt; 0")
        rows.append(f"<tr><td class='text'>{html.escape(str(r['model_label']))}</td><td class='text'>"
                    f"{html.escape(r['claim'])}</td><td>{_fmt(r['model'])}</td><td>{_fmt(r['base'])}</td>"
                    f"<td>{kind} {_fmt(r['estimate'])} [{_fmt(r['low'])}, {_fmt(r['high'])}]</td><td>{threshold}</td>"
                    f"<td class='{r['verdict']}'>{r['verdict']}</td></tr>")
    return ["<table><tr><th>model</th><th>claim</th><th>score</th><th>compared with</th>"
            "<th>statistic [95% interval]</th><th>threshold</th><th>verdict</th></tr>", *rows, "</table>"]


def render_html(report, cfg, command: str, seconds: float, figures: dict[str, Any]) -> str:
    """The report page (self-contained: every image inline)."""
    scores = report.scores.to_dict(orient="records")
    unit = (getattr(report, "bootstrap", None) or {}).get("unit", "prompt")  # spec: paired across languages
    models = list(dict.fromkeys(report.scores["model"]))
    table = pd.DataFrame(
        [{"lang": r["lang"], "length": r["length"], "model": r["model"], "cell": _interval(r)} for r in scores]
    ).pivot(index=["lang", "length"], columns="model", values="cell")[models]
    parts = [
        "<!doctype html><html lang='en'><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'><title>omnidiff evaluation</title>",
        f"<style>{CSS}</style>",
        "<h1>Prompt faithfulness per language and prompt length</h1>",
        f"<p>Reproduce: <code>{html.escape(command)}</code> ({seconds:.0f} s). Score = mean faithfulness over "
        f"{', '.join(cfg.score_attributes)}; {getattr(cfg, 'images_per_prompt', 1)} image(s) per prompt, "
        f"{cfg.steps} sampling steps, guidance {cfg.guidance}, seed {cfg.seed}. "
        f"Brackets: bootstrap {cfg.confidence:.0%} interval over {unit}s ({cfg.bootstrap_resamples} resamples, "
        f"seed {cfg.bootstrap_seed}).</p>",
        "" if cfg.require_fit_evaluator else
        "<p><b>Smoke run: the evaluator was not required to be fit (>= 95% held-out accuracy); "
        "these numbers do not judge the models.</b></p>",
        "<h2>Scores (model columns)</h2>", table.to_html(border=0),
        "<h2>Fréchet distance to real images (evaluator features; lower is better)</h2>",
        pd.Series(report.frechet, name="frechet").to_frame().to_html(border=0, float_format=lambda v: f"{v:.3f}"),
    ]
    if getattr(report, "metrics", None) is not None:  # the config's metrics section (train/metrics.py)
        from train.metrics import metrics_html

        parts.append(metrics_html(report.metrics))
    if len(report.claims):
        parts += ["<h2>The paper's claims against the base model</h2>",
                  "<p>" + VERDICTS_EXPLAINED.format(
                      conf=cfg.confidence, resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed, unit=unit,
                      shared="every language and model" if unit == "spec" else "the model and its base",
                      paired="model-vs-base and language-vs-English differences are" if unit == "spec"
                      else "their difference is") + "</p>",
                  *claims_html(report.claims)]
    parts.append("<h2>Charts</h2>")
    parts += [f"<img class='chart' alt='{name.replace('_', ' ')}' src='data:image/png;base64,{_png_b64(fig)}'>"
              for name, fig in figures.items()]
    if report.images:
        parts.append("<h2>Samples (green border: every asked attribute right; red: something wrong; "
                     "hover an image for what the evaluator saw)</h2>")
        parts += samples_html(report.per_prompt, report.images)
    return "\n".join(parts) + "\n</html>\n"


def write_report(report, cfg, command: str, seconds: float) -> None:
    """report.html, report.json, summary / scores / claims / per-prompt CSVs, charts and grid PNGs in report_dir."""
    import matplotlib.pyplot as plt

    out = report.report_dir
    report.summary.to_csv(out / "summary.csv", index=False)
    report.scores.to_csv(out / "scores.csv", index=False)
    report.pooled.to_csv(out / "pooled.csv", index=False)
    report.claims.to_csv(out / "claims.csv", index=False)
    report.per_prompt.to_csv(out / "per_prompt.csv", index=False)  # grid_*.png order: its rows per model and lang
    (out / "frechet.json").write_text(json.dumps(report.frechet, indent=2))
    (out / "report.json").write_text(json.dumps({**report.to_dict(), "command": command, "seconds": seconds},
                                                indent=1, default=str))
    figures = charts(report.scores, report.pooled)
    try:
        for name, fig in figures.items():
            fig.savefig(out / f"{name}.png", dpi=CHART_DPI)
        for model, images in report.images.items():
            rows = report.per_prompt[report.per_prompt["model"] == model]
            for lang, grid in image_grids(rows, images).items():
                grid.save(out / f"grid_{model.replace('/', '_').replace('@', '_')}_{lang}.png")
        (out / "report.html").write_text(render_html(report, cfg, command, seconds, figures), encoding="utf-8")
    finally:
        for fig in figures.values():
            plt.close(fig)


__all__ = ["CHART_MAX_WIDTH_PX", "PAGE_MAX_WIDTH_PX", "charts", "render_html", "samples_html", "write_report"]
