"""The paper's claims, each decided on a bootstrap 95% interval (issue 18 items 1 and 4).

    per_prompt, unit, strata = train.evaluate.bootstrap_design(per_prompt)   # pair languages by spec
    point, reps = omnidiff.scoring.bootstrap_scores(per_prompt, ("shape", "colour", "position"), unit=unit,
                                                    strata=strata)
    scores = with_intervals(score_table, reps)       # adds low / high to every (model, lang, length)
    claims = check_claims(scores, reps, "stage3")    # one row per claim, with its interval and verdict
    claims += english_claims(*english_subset_scores(per_prompt, attributes, unit=unit), "stage3", "base")

Every claim compares a statistic (a ratio of two scores, or a difference) with a threshold, on its
bootstrap replicates. The eval prompts are parallel (the world renders each spec in every language),
so the evaluate stage resamples spec ids jointly: one draw per length bucket, shared by every
language and every model. Model-vs-base and language-vs-English statistics are therefore paired
(the same specs in every replicate; and the evaluate stage gives a spec's k-th image the same noise
in every language and model); long against short compares different specs, resampled independently.
Tables without spec ids fall back to resampling each language's prompts on its own.

- pass: the whole interval clears the threshold (shown, at the stated confidence);
- fail: the whole interval misses it (shown not to hold);
- inconclusive: the interval straddles the threshold; more prompts or seeds would decide.

"At least 0.95x" is judged on the ratio's interval: pass needs its lower bound at or above 0.95,
so a claim passes only when the data show it, never merely because noise cannot rule it out.
"Above its base" needs the paired difference's interval above 0. "Short English not below the
base" is a non-inferiority claim with the same 5% margin: the ratio model/base at least 0.95.
"English above the base" (item 4: an LLM should read prompts better than CLIP) needs the paired
difference above 0, on all short English prompts and on the long English ones; the short English
subsets by ``heldout_reason`` (attribute combinations or phrasings held out of training, or
neither) are reported with their intervals and judged by nothing (a handful of specs each).
Zero-shot languages are reported (their ratio to English, with its interval) and judged by nothing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from omnidiff.scoring import LONG, SHORT, percentile_interval

PASS, FAIL, INCONCLUSIVE, REPORTED = "pass", "fail", "inconclusive", "reported"
CLAIM_COLUMNS = ["claim", "kind", "model", "base", "estimate", "low", "high", "threshold", "verdict", "pass"]

Replicates = dict[tuple[str, str, str], np.ndarray]


def with_intervals(scores: pd.DataFrame, replicates: Replicates, confidence: float = 0.95) -> pd.DataFrame:
    """``scores`` (model, lang, length, score, ...) with the ``low`` / ``high`` of each score's interval."""
    bounds = [percentile_interval(replicates[key], confidence) if key in replicates else (np.nan, np.nan)
              for key in zip(scores["model"], scores["lang"], scores["length"], strict=True)]
    out = scores.copy()
    out["low"] = [b[0] for b in bounds]
    out["high"] = [b[1] for b in bounds]
    return out


def verdict(low: float, high: float, threshold: float, strictly_above: bool = False) -> str:
    """pass when the interval [low, high] clears ``threshold``, fail when it misses it entirely, else inconclusive."""
    if np.isnan(low) or np.isnan(high):
        return INCONCLUSIVE
    clears = low > threshold if strictly_above else low >= threshold
    misses = high <= threshold if strictly_above else high < threshold
    return PASS if clears else (FAIL if misses else INCONCLUSIVE)


def ratio(numerator: np.ndarray | float, denominator: np.ndarray | float) -> np.ndarray:
    """numerator / denominator with 0/0 = 1 (both nothing: equal) and x/0 = inf."""
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den == 0, np.where(num == 0, 1.0, np.inf), num / np.where(den == 0, 1.0, den))


class _Groups:
    """Point scores and replicates of one model's groups, pooled over languages where asked."""

    def __init__(self, scores: pd.DataFrame, replicates: Replicates):
        self.point = {(r.model, r.lang, r.length): float(r.score) for r in scores.itertuples()}
        self.reps = replicates

    def has(self, model: str, langs: list[str], length: str) -> bool:
        return bool(langs) and all((model, lang, length) in self.point and (model, lang, length) in self.reps
                                   for lang in langs)

    def get(self, model: str, langs: list[str], length: str) -> tuple[float, np.ndarray]:
        """The mean over ``langs`` (each language weighs the same, as the score table's pooled rows)."""
        point = float(np.mean([self.point[(model, lang, length)] for lang in langs]))
        reps = np.mean([self.reps[(model, lang, length)] for lang in langs], axis=0)
        return point, reps


def pooled_scores(scores: pd.DataFrame, replicates: Replicates, confidence: float = 0.95) -> pd.DataFrame:
    """model x length -> the mean score over the trained languages (each weighing the same), with its interval."""
    g = _Groups(scores, replicates)
    trained = sorted(set(scores.loc[~scores["zero_shot"].astype(bool), "lang"]))
    rows = []
    for model in dict.fromkeys(scores["model"]):
        for length in (SHORT, LONG):
            # the languages with both lengths, as the long-prompt claim compares them (all of them without long ones)
            both = [lang for lang in trained if g.has(model, [lang], SHORT) and g.has(model, [lang], LONG)]
            langs = both or [lang for lang in trained if g.has(model, [lang], length)]
            if not g.has(model, langs, length):
                continue
            point, reps = g.get(model, langs, length)
            low, high = percentile_interval(reps, confidence)
            rows.append({"model": model, "length": length, "langs": ",".join(langs), "score": point, "low": low,
                         "high": high})
    return pd.DataFrame(rows, columns=["model", "length", "langs", "score", "low", "high"])


def claim_row(claim: str, kind: str, a: tuple[float, np.ndarray], b: tuple[float, np.ndarray], threshold: float,
              judged: bool = True, confidence: float = 0.95) -> dict:
    """One row of :data:`CLAIM_COLUMNS`: the ``kind`` statistic ("ratio" a / b, or "difference" a - b) of two
    (point score, replicates) pairs, its interval, and its verdict against ``threshold`` (difference: strictly
    above), or ``reported`` when not ``judged``."""
    if kind == "ratio":
        estimate, reps = float(ratio(a[0], b[0])), ratio(a[1], b[1])
    else:
        estimate, reps = a[0] - b[0], a[1] - b[1]
    low, high = percentile_interval(reps, confidence)
    v = verdict(low, high, threshold, strictly_above=kind == "difference") if judged else REPORTED
    return {"claim": claim, "kind": kind, "model": a[0], "base": b[0], "estimate": estimate, "low": low,
            "high": high, "threshold": threshold if judged else float("nan"), "verdict": v,
            "pass": True if v == PASS else (False if v == FAIL else None)}


def check_claims(scores: pd.DataFrame, replicates: Replicates, model: str, baseline: str = "base",
                 min_ratio: float = 0.95, confidence: float = 0.95) -> pd.DataFrame:
    """The claims for ``model`` against ``baseline`` (module docstring), one row each.

    ``scores``: model, lang, length, zero_shot, score (the evaluate stage's score table).
    ``replicates``: (model, lang, length) -> bootstrap replicates (omnidiff.scoring.bootstrap_scores).
    Columns: claim, kind (ratio / difference), model and base (the two scores compared, or the
    model's score and English's for the ratio claims), estimate, low, high (the statistic and its
    interval), threshold, verdict (pass / fail / inconclusive / reported) and pass (True / False,
    None when inconclusive or reported).
    """
    g = _Groups(scores, replicates)
    trained = sorted(set(scores.loc[~scores["zero_shot"].astype(bool), "lang"]))
    zero_shot = sorted(set(scores.loc[scores["zero_shot"].astype(bool), "lang"]))
    rows: list[dict] = []

    def add(claim: str, kind: str, a: tuple[float, np.ndarray], b: tuple[float, np.ndarray], threshold: float,
            judged: bool = True) -> None:
        rows.append(claim_row(claim, kind, a, b, threshold, judged, confidence))

    x = f"{min_ratio:g}x"
    if g.has(model, ["en"], SHORT) and g.has(baseline, ["en"], SHORT):
        add(f"short English not below the base (>= {x} the base)", "ratio", g.get(model, ["en"], SHORT),
            g.get(baseline, ["en"], SHORT), min_ratio)
    for lang in (lang for lang in trained if lang != "en"):
        if not g.has(model, [lang], SHORT):
            continue
        if g.has(model, ["en"], SHORT):
            add(f"{lang} short >= {x} English", "ratio", g.get(model, [lang], SHORT), g.get(model, ["en"], SHORT),
                min_ratio)
        if g.has(baseline, [lang], SHORT):
            add(f"{lang} short above its base", "difference", g.get(model, [lang], SHORT),
                g.get(baseline, [lang], SHORT), 0.0)
    long_langs = [lang for lang in trained if g.has(model, [lang], LONG) and g.has(model, [lang], SHORT)]
    if long_langs:
        add(f"long prompts (>77 tokens) >= {x} short ({', '.join(long_langs)})", "ratio",
            g.get(model, long_langs, LONG), g.get(model, long_langs, SHORT), min_ratio)
        if g.has(baseline, long_langs, LONG):
            add(f"long prompts (>77 tokens) above the base ({', '.join(long_langs)})", "difference",
                g.get(model, long_langs, LONG), g.get(baseline, long_langs, LONG), 0.0)
    for lang in zero_shot:
        if g.has(model, [lang], SHORT) and g.has(model, ["en"], SHORT):
            add(f"{lang} (zero-shot) short / English", "ratio", g.get(model, [lang], SHORT),
                g.get(model, ["en"], SHORT), min_ratio, judged=False)
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


ENGLISH = "en"
HELDOUT_SUBSETS = {"combo": "attribute combinations held out of training",
                   "phrasing": "phrasings held out of training", "none": "training combinations and phrasings"}


def english_subset_scores(per_prompt: pd.DataFrame, attributes: tuple[str, ...] | list[str], resamples: int = 2000,
                          seed: int = 0, unit: str = "prompt") -> tuple[pd.DataFrame, Replicates]:
    """Scores of the English prompts, all of them and by ``heldout_reason``, with paired replicates.

    Returns ``(scores, replicates)``: scores has model, lang (``en`` or ``en/<heldout_reason>``),
    length, score and units (how many ``unit`` values the group holds); replicates as
    omnidiff.scoring.bootstrap_scores (each subset resampled on its own, shared by every model).
    """
    from omnidiff.scoring import bootstrap_scores

    en = per_prompt[per_prompt["lang"] == ENGLISH]
    if en.empty:
        return pd.DataFrame(columns=["model", "lang", "length", "score", "units"]), {}
    parts = [en]
    if "heldout_reason" in en.columns:
        parts.append(en.assign(lang=ENGLISH + "/" + en["heldout_reason"].astype(str)))
    table = pd.concat(parts, ignore_index=True)
    point, reps = bootstrap_scores(table, attributes, resamples, seed, unit=unit, strata=("lang", "length"))
    units = table.groupby(["model", "lang", "length"])[unit].nunique()
    rows = [{"model": m, "lang": lang, "length": length, "score": value, "units": int(units[(m, lang, length)])}
            for (m, lang, length), value in point.items()]
    return pd.DataFrame(rows, columns=["model", "lang", "length", "score", "units"]), reps


def english_claims(scores: pd.DataFrame, replicates: Replicates, model: str, baseline: str = "base",
                   confidence: float = 0.95) -> pd.DataFrame:
    """Item 4, "English above the base": ``model`` minus ``baseline`` on English prompts (paired), from
    :func:`english_subset_scores`. Judged (> 0): all short English prompts, all long ones. Reported: the
    short ones by held-out reason. Columns as :func:`check_claims`."""
    point = {(r.model, r.lang, r.length): float(r.score) for r in scores.itertuples()}
    units = {(r.model, r.lang, r.length): int(r.units) for r in scores.itertuples()}
    rows: list[dict] = []

    def add(claim: str, lang: str, length: str, judged: bool) -> None:
        a, b = (model, lang, length), (baseline, lang, length)
        if not all(k in point and k in replicates for k in (a, b)):
            return
        rows.append(claim_row(f"{claim} ({units[a]} prompts)", "difference", (point[a], replicates[a]),
                              (point[b], replicates[b]), 0.0, judged, confidence))

    add("short English above the base", ENGLISH, SHORT, True)
    add("long English (>77 tokens) above the base", ENGLISH, LONG, True)
    for reason, words in HELDOUT_SUBSETS.items():
        add(f"short English above the base: {words}", f"{ENGLISH}/{reason}", SHORT, False)
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


__all__ = ["CLAIM_COLUMNS", "FAIL", "HELDOUT_SUBSETS", "INCONCLUSIVE", "PASS", "REPORTED", "check_claims", "claim_row",
           "english_claims", "english_subset_scores", "pooled_scores", "ratio", "verdict", "with_intervals"]
