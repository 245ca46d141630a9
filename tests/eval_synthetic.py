"""Synthetic evaluation results for the claims and report tests: every model answers the same
prompts, and ``right[(model, lang, length)]`` says which prompts it draws right (every asked
attribute right or every one wrong), so each score is known exactly before any bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd

from omnidiff.scoring import LONG, SHORT, Faithfulness, judge, summarise

ATTRS = ("shape", "colour", "position")
VALUES = {"shape": ["circle", "square", "triangle"], "colour": ["red", "blue", "green"],
          "position": ["left", "centre", "right"]}


def prompts(langs=("en", "zh", "fr", "ko"), zero_shot=("ko",), n_short=24, n_long=8, spec_ids=True) -> pd.DataFrame:
    """Prompt i of a length bucket is spec i in every language (a ``spec_id`` column, as the world's eval
    prompts have, unless ``spec_ids`` is false); short specs are held out by reason none / combo / none /
    phrasing in turn, as the world's."""
    rows = []
    for lang in langs:
        for is_long, n in ((False, n_short), (True, n_long)):
            for i in range(n):
                attrs = {a: VALUES[a][(i + k) % 3] for k, a in enumerate(ATTRS)}
                words = f"{lang} prompt {i}: a {attrs['colour']} {attrs['shape']} on the {attrs['position']}"
                rows.append({"prompt": words + (" " + "and so on " * 30 if is_long else ""), "lang": lang,
                             "is_long": is_long, "zero_shot": lang in zero_shot, **attrs,
                             "heldout_reason": ("none", "combo", "none", "phrasing")[i % 4],
                             **({"spec_id": i + n_short * is_long} if spec_ids else {})})
    return pd.DataFrame(rows)


def results(table: pd.DataFrame, right: dict[tuple[str, str, str], int | float], models: list[str],
            resolution: int = 16) -> dict[str, Faithfulness]:
    """label -> Faithfulness; ``right[(model, lang, length)]``: how many of the group's prompts are drawn
    right (an int: the first k; a float: that share, the first ones); groups not listed: all right."""
    rng = np.random.default_rng(0)
    lengths = np.where(table["is_long"], LONG, SHORT)
    out = {}
    for model in models:
        predicted = {a: table[a].tolist() for a in ATTRS}
        for (lang, length), idx in table.groupby([table["lang"], lengths]).groups.items():
            k = right.get((model, lang, length), len(idx))
            k = round(k * len(idx)) if isinstance(k, float) else k
            for i in list(idx)[k:]:
                for a in ATTRS:
                    predicted[a][i] = "wrong"
        per_prompt = judge(table, predicted)
        images = rng.integers(0, 256, size=(len(table), resolution, resolution, 3), dtype=np.uint8)
        out[model] = Faithfulness(per_prompt, summarise(per_prompt), images)
    return out
