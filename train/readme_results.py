"""The README's results block, regenerated from an evaluation's output, never edited by hand (issue 18 item 6).

    python -m train.readme_results ~/.omnidiff/reports/evaluate/<id>/report.json      # rewrite README.md
    python -m train.readme_results pipeline_outputs.json --check                        # exit 1 when stale

RESULT is the evaluate stage's ``report.json`` (in its report folder) or the pipeline's
``pipeline_outputs.json`` (the demo's MLflow parent run: ``mlflow artifacts download``), which adds
the per-stage times. Only the text between the two marker lines of README.md is replaced; a README
without exactly one pair of markers is an error that names them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

BEGIN = "<!-- results:begin (python -m train.readme_results RESULT; generated, do not edit by hand) -->"
END = "<!-- results:end -->"
SHORT, LONG = "<=77", ">77"


def load_result(path: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """(the evaluate report, the per-stage times or {}) from a report.json or a pipeline_outputs.json."""
    data = json.loads(Path(path).read_text())
    report = data.get("evaluate", data)
    if not isinstance(report, dict) or not report.get("scores"):
        raise ValueError(f"{path}: no evaluation scores (expected an evaluate report.json or a pipeline_outputs.json)")
    if "low" not in report["scores"][0]:
        raise ValueError(f"{path}: the scores have no intervals; it comes from an evaluate stage older than issue 18")
    return report, dict(data.get("timings_s", {}))


def _num(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _cell(row: dict[str, Any] | None) -> str:
    return "" if row is None else f"{_num(row['score'])} [{_num(row['low'])}, {_num(row['high'])}]"


def render_block(report: dict[str, Any], timings: dict[str, float] | None = None, model: str | None = None) -> str:
    """Markdown: scores per model and language with 95% intervals, the claims of ``model``
    (default: the last model judged), the Fréchet distances and, when given, the stage times."""
    scores = report["scores"]
    models = list(dict.fromkeys(r["model"] for r in scores))
    zero_shot = {r["lang"] for r in scores if r.get("zero_shot")}
    langs = list(dict.fromkeys(r["lang"] for r in scores))
    langs = sorted(langs, key=lambda lang: (lang in zero_shot, lang != "en", lang))
    by_key = {(r["model"], r["lang"], r["length"]): r for r in scores}
    pooled = {(r["model"], r["length"]): r for r in report.get("pooled", [])}
    has_long = any(length == LONG for _, length in pooled)
    counts = sorted({(r["length"], r.get("prompts")) for r in scores if r.get("prompts")})
    per_group = ", ".join(f"{n} {'short' if length == SHORT else 'long'}" for length, n in counts)
    images = {r["images"] // r["prompts"] for r in scores if r.get("images") and r.get("prompts")}
    if per_group and len(images) == 1 and min(images) > 1:
        per_group += f" prompts per language and model, {min(images)} images (seeds) each;"
    elif per_group:
        per_group += " prompts per language and model;"
    paired = (report.get("bootstrap") or {}).get("unit") == "spec"
    over = ("over specs (each resample draws the same specs in every language and model)" if paired
            else "over prompts")
    commit = str(report.get("commit") or "unknown")
    commit = commit.split("+")[0][:12] + ("+dirty" if commit.endswith("+dirty") else "")
    lines = [
        f"Evaluation at commit `{commit}`: prompt faithfulness (mean of the score attributes), "
        f"short prompts per language{', and long prompts of the trained languages' if has_long else ''}; "
        f"{per_group + ' ' if per_group else ''}"
        f"bootstrap 95% intervals {over} in brackets.",
        "",
        "| | " + " | ".join(f"{lang} (zero-shot)" if lang in zero_shot else lang for lang in langs)
        + (" | long, trained langs |" if has_long else " |"),
        "|---" * (len(langs) + 1 + has_long) + "|",
    ]
    for m in models:
        cells = [_cell(by_key.get((m, lang, SHORT))) for lang in langs]
        if has_long:
            cells.append(_cell(pooled.get((m, LONG))))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    claims = report.get("claims", [])
    judged = [c.get("model_label") for c in claims]
    model = model or (judged[-1] if judged else None)
    if model is not None and model not in judged:
        raise ValueError(f"model {model!r}: no claims for it; claims exist for {sorted(set(judged))}")
    if model is not None:
        lines += ["", f"Claims for {model} against {report.get('baseline') or 'the baseline'} (pass: the whole "
                  "interval clears the threshold; fail: it misses it entirely; inconclusive: it straddles it):", "",
                  "| claim | statistic [95% interval] | threshold | verdict |", "|---|---|---|---|"]
        for c in (c for c in claims if c.get("model_label") == model):
            threshold = c.get("threshold")
            shown = "" if threshold is None or math.isnan(threshold) else (
                f">= {threshold:g}" if c["kind"] == "ratio" else f"> {threshold:g}")
            lines.append(f"| {c['claim']} | {c['kind']} {_num(c['estimate'])} [{_num(c['low'])}, {_num(c['high'])}] "
                         f"| {shown} | {c['verdict']} |")
    if report.get("frechet"):
        lines += ["", "Fréchet distance to real images (evaluator features): "
                  + ", ".join(f"{k} {_num(v, 0)}" for k, v in report["frechet"].items()) + "."]
    if timings:
        lines += ["", "Stage times (s): " + ", ".join(f"{k} {_num(v, 0)}" for k, v in timings.items())
                  + f"; total {_num(sum(timings.values()), 0)}."]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the BEGIN and END lines replaced by ``block``; nothing else changes."""
    begins, ends = text.count(BEGIN), text.count(END)
    if begins != 1 or ends != 1:
        raise ValueError(f"README: expected the marker lines {BEGIN!r} and {END!r} once each, "
                         f"found {begins} and {ends}")
    if text.index(END) < text.index(BEGIN) or not text.split(BEGIN, 1)[1].startswith("\n"):
        raise ValueError(f"README: {BEGIN!r} must end its line and come before {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block.strip()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.readme_results", description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, help="an evaluate report.json or a pipeline_outputs.json")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--model", help="whose claims to list (default: the last model judged)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when the block is stale")
    args = parser.parse_args(argv)
    try:
        report, timings = load_result(args.result)
        text = args.readme.read_text(encoding="utf-8")
        new = replace_block(text, render_block(report, timings, args.model))
    except (OSError, ValueError) as exc:
        print(f"readme_results: {exc}", file=sys.stderr)
        return 2
    if args.check:
        stale = new != text
        print(f"{args.readme}: results block {'is stale' if stale else 'is up to date'}", file=sys.stderr)
        return 1 if stale else 0
    args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme}: results block rewritten from {args.result}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
