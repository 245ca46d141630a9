"""How wide are the claims' intervals, and what would narrow them? Read from evaluate report folders.

    .venv/bin/python benchmarks/eval_intervals.py REPORT_DIR [REPORT_DIR2] [--model stage3] [--baseline base]

REPORT_DIR is what ``omnidiff evaluate`` writes (its ``per_prompt.csv`` and ``claims.csv``), from a run
with ``images_per_prompt`` >= 2 on the world's parallel eval prompts (issue 18 items 1-2). Nothing is
generated; everything comes from the run's verdicts, so the table costs seconds. It prints:

- every judged ratio claim of ``--model`` recomputed on the run's first K images per prompt (K = 1, 2,
  4, ...), with each language's prompts resampled on their own ("unpaired", the bootstrap before issue
  18) and with specs resampled jointly across languages and models ("paired", the evaluate stage's):
  estimate and interval half-width. Within one run the noise is shared across languages, so K=1 here
  is what 1 image per prompt would give under the current seeding;
- variance components of each paired per-spec difference (language minus English, model minus base,
  short prompts): between specs and within a spec (across seeds), and the 95% half-width they predict
  for K seeds and S short specs. More seeds shrink only the within part: where between dominates, more
  specs (``eval_specs``) are the lever;
- with a second REPORT_DIR (another ``seed`` / ``bootstrap_seed``): the two runs' claims side by side
  and whether each verdict agrees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnidiff.scoring import SHORT, bootstrap_scores, summarise  # noqa: E402
from train.claims import check_claims  # noqa: E402
from train.evaluate import score_table  # noqa: E402

ATTRIBUTES = ("shape", "colour", "position")


def load_per_prompt(report_dir: Path) -> pd.DataFrame:
    table = pd.read_csv(report_dir / "per_prompt.csv")
    for column in [c for c in table.columns if c.startswith("ok_")]:
        table[column] = table[column].astype("boolean")
    missing = [c for c in ("spec", "sample", "model") if c not in table.columns]
    if missing:
        raise SystemExit(f"{report_dir}/per_prompt.csv: no {missing} column(s); evaluate with images_per_prompt "
                         "on the world's eval prompts (issue 18) first")
    return table


def widths(per_prompt: pd.DataFrame, model: str, baseline: str, seed: int) -> pd.DataFrame:
    """Judged ratio claims: 'estimate ±half-width' per (K images, unpaired / paired)."""
    zero_shot = set(per_prompt.loc[per_prompt["zero_shot"].astype(bool), "lang"])
    ks = [k for k in (1, 2, 4, 8, 16) if k <= per_prompt["sample"].nunique()]
    out: dict[str, dict[str, str]] = {}
    for k in ks:
        part = per_prompt[per_prompt["sample"] < k]
        summary = pd.concat([summarise(rows.drop(columns="model")).assign(model=m)
                             for m, rows in part.groupby("model", sort=False)], ignore_index=True)
        scores = score_table(summary, zero_shot, ATTRIBUTES)
        for name, design in (("unpaired", {"unit": "prompt"}), ("paired", {"unit": "spec", "strata": ("length",)})):
            _, reps = bootstrap_scores(part, ATTRIBUTES, 2000, seed, **design)
            claims = check_claims(scores, reps, model, baseline)
            for r in claims[(claims["kind"] == "ratio") & (claims["verdict"] != "reported")].itertuples():
                out.setdefault(r.claim, {})[f"K={k} {name}"] = f"{r.estimate:.2f} ±{(r.high - r.low) / 2:.3f}"
    return pd.DataFrame(out).T


def components(per_prompt: pd.DataFrame, model: str, baseline: str) -> pd.DataFrame:
    """Between-spec and within-spec variance of paired per-image differences (short prompts)."""
    table = per_prompt[per_prompt["length"] == SHORT].copy()
    ok = [f"ok_{a}" for a in ATTRIBUTES if f"ok_{a}" in table.columns]
    table["value"] = table[ok].astype(float).mean(axis=1)  # one image: mean over the attributes asked
    wide = table.pivot_table(index=["spec", "sample"], columns=["model", "lang"], values="value")
    k_run = table["sample"].nunique()
    pairs = [((model, lang), (model, "en"), f"{model} {lang} - en")
             for lang in sorted(set(table["lang"]) - {"en"}) if not table.loc[table["lang"] == lang, "zero_shot"].any()]
    pairs.append(((model, "en"), (baseline, "en"), f"{model} en - {baseline} en"))
    rows = []
    for a, b, name in pairs:
        if a not in wide.columns or b not in wide.columns:
            continue
        diff = (wide[a] - wide[b]).unstack("sample")  # (specs, K)
        specs = len(diff)
        within = float(diff.var(axis=1, ddof=1).mean())
        between = max(float(diff.mean(axis=1).var(ddof=1)) - within / k_run, 0.0)
        row = {"difference": name, "mean": float(diff.to_numpy().mean()), "between": between, "within": within}
        for k, s in ((1, specs), (k_run, specs), (16, specs), (k_run, 2 * specs), (k_run, 4 * specs)):
            row[f"±95% K={k} S={s}"] = 1.96 * np.sqrt(between / s + within / (k * s))
        rows.append(row)
    return pd.DataFrame(rows).set_index("difference")


def agreement(first: Path, second: Path, model: str) -> tuple[pd.DataFrame, str]:
    a, b = (pd.read_csv(d / "claims.csv") for d in (first, second))
    a, b = (c[c["model_label"] == model].set_index("claim") for c in (a, b))
    cell = lambda r: f"{r['kind']} {r['estimate']:.2f} [{r['low']:.2f}, {r['high']:.2f}] {r['verdict']}"  # noqa: E731
    table = pd.DataFrame({"run 1": [cell(a.loc[c]) for c in a.index], "run 2": [cell(b.loc[c]) for c in a.index],
                          "agree": [a.loc[c, "verdict"] == b.loc[c, "verdict"] for c in a.index]}, index=a.index)
    judged = a["verdict"] != "reported"
    decided = [(x.loc[judged, "verdict"] != "inconclusive").sum() for x in (a, b.loc[a.index])]
    return table, (f"verdicts agree on {int(table['agree'].sum())} of {len(table)} claims; decided (pass/fail) "
                   f"{decided[0]} and {decided[1]} of {int(judged.sum())} judged")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="one or two evaluate report folders")
    parser.add_argument("--model", default="stage3")
    parser.add_argument("--baseline", default="base")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    args = parser.parse_args(argv)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    pd.set_option("display.max_colwidth", 70)
    per_prompt = load_per_prompt(args.reports[0])
    print(f"# {args.reports[0]}: claim interval half-widths by images per prompt and bootstrap design\n")
    print(widths(per_prompt, args.model, args.baseline, args.bootstrap_seed).to_string(), "\n")
    print("# variance components of paired per-spec differences (short prompts) and predicted half-widths\n")
    print(components(per_prompt, args.model, args.baseline).to_string(float_format=lambda v: f"{v:.4f}"), "\n")
    if len(args.reports) > 1:
        table, line = agreement(args.reports[0], args.reports[1], args.model)
        print(f"# {args.reports[0]} against {args.reports[1]}\n")
        print(table.to_string(), f"\n\n{line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
