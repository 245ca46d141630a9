"""Evaluate stage: the pure table logic on hand-built frames, and the CLI's argument handling."""

from __future__ import annotations

import pandas as pd
import pytest

from omnidiff.config import ConfigError, load_config
from omnidiff.scoring import LONG, SHORT
from train.eval_config import EvalConfig
from train.evaluate import check_claims, score_table, select_prompts
from train.evaluate_cli import parse_models


def _summary(rows):
    return pd.DataFrame(rows, columns=["model", "attribute", "lang", "length", "n", "correct", "faithfulness"])


def test_score_table_means_only_the_score_attributes():
    summary = _summary([
        ("base", "shape", "en", SHORT, 10, 9, 0.9),
        ("base", "colour", "en", SHORT, 10, 7, 0.7),
        ("base", "size", "en", SHORT, 10, 0, 0.0),  # not a score attribute: ignored
        ("base", "shape", "ru", SHORT, 10, 1, 0.1),
    ])
    scores = score_table(summary, {"ru"}, ("shape", "colour"))
    en = scores[(scores["lang"] == "en")].iloc[0]
    assert en["score"] == pytest.approx(0.8)
    assert bool(scores[scores["lang"] == "ru"]["zero_shot"].iloc[0]) is True
    with pytest.raises(ValueError, match="score attributes"):
        score_table(summary, set(), ("position",))


def test_check_claims_pass_and_fail():
    rows = []
    for model, en, zh, long_ in (("base", 0.8, 0.1, 0.1), ("ours", 0.85, 0.8, 0.2)):
        rows += [(model, "en", SHORT, False, en), (model, "zh", SHORT, False, zh), (model, "en", LONG, False, long_),
                 (model, "ru", SHORT, True, 0.3)]
    scores = pd.DataFrame(rows, columns=["model", "lang", "length", "zero_shot", "score"])
    claims = check_claims(scores, "ours").set_index("claim")
    assert bool(claims.loc["short English >= base", "pass"]) is True
    assert bool(claims.loc["zh short >= 3x base", "pass"]) is True
    assert bool(claims.loc["zh short within 10 points of English", "pass"]) is True
    assert bool(claims.loc["long prompts (>77 tokens) >= 3x base", "pass"]) is False  # 0.2 < 0.3
    assert claims.loc["ru (zero-shot) reported", "pass"] is None


def test_select_prompts_is_seeded_and_capped():
    prompts = pd.DataFrame({"prompt": [f"p{i}" for i in range(40)], "lang": ["en", "zh"] * 20,
                            "is_long": [False] * 20 + [True] * 20})
    a = select_prompts(prompts, 3, (), seed=1)
    b = select_prompts(prompts, 3, (), seed=1)
    assert a.equals(b)
    assert a.groupby(["lang", "is_long"]).size().max() == 3 and len(a) == 12
    assert set(select_prompts(prompts, 0, ("zh",))["lang"]) == {"zh"}
    with pytest.raises(ValueError, match="no eval prompts in"):
        select_prompts(prompts, 0, ("xx",))


def test_parse_models_and_config_validation():
    assert parse_models(["base=/p", "omnidiff-tiny@candidate"]) == {"base": "/p",
                                                                    "omnidiff-tiny@candidate": "omnidiff-tiny@candidate"}
    with pytest.raises(ValueError, match="given twice"):
        parse_models(["a=x", "a=y"])
    with pytest.raises(ConfigError, match="steps=0"):
        load_config(EvalConfig, None, ["steps=0"])
