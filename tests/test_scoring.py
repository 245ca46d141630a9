"""Prompt-faithfulness scoring on hand-built tables (omnidiff/scoring.py).

.venv/bin/pytest tests/test_scoring.py -x -q
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from omnidiff import scoring


def _prompts() -> pd.DataFrame:
    # Two languages x two length buckets; the zh long prompt does not ask for a size.
    return pd.DataFrame(
        {
            "prompt": ["a red circle", "a blue square", "long en", "红色圆形", "蓝色正方形", "long zh"],
            "lang": ["en", "en", "en", "zh", "zh", "zh"],
            "is_long": [False, False, True, False, False, True],
            "shape": ["circle", "square", "cross", "circle", "square", "diamond"],
            "colour": ["red", "blue", "green", "red", "blue", "pink"],
            "size": ["small", "large", "small", "small", "large", None],
        }
    )


def _predicted() -> dict[str, list[str]]:
    return {
        "shape": ["circle", "square", "circle", "circle", "circle", "diamond"],
        "colour": ["red", "red", "green", "blue", "blue", "red"],
        "size": ["small", "large", "large", "large", "small", "small"],
    }


def test_judge_marks_each_attribute_and_all():
    per = scoring.judge(_prompts(), _predicted())
    assert per["ok_shape"].tolist() == [True, True, False, True, False, True]
    assert per["ok_colour"].tolist() == [True, False, True, False, True, False]
    # size not asked by the last prompt: unjudged, not wrong
    assert per["ok_size"].tolist()[:5] == [True, True, False, False, False]
    assert pd.isna(per["ok_size"].iloc[5])
    assert per["ok_all"].tolist() == [True, False, False, False, False, False]
    assert per["length"].tolist() == ["<=77", "<=77", ">77", "<=77", "<=77", ">77"]
    assert per["pred_shape"].tolist() == _predicted()["shape"]


def test_summary_per_attribute_language_and_length():
    summary = scoring.summarise(scoring.judge(_prompts(), _predicted()))
    got = {(r.attribute, r.lang, r.length): (r.n, r.correct, r.faithfulness) for r in summary.itertuples()}
    assert got[("shape", "en", "<=77")] == (2, 2, 1.0)
    assert got[("colour", "en", "<=77")] == (2, 1, 0.5)
    assert got[("all", "en", "<=77")] == (2, 1, 0.5)
    assert got[("shape", "en", ">77")] == (1, 0, 0.0)
    assert got[("shape", "zh", "<=77")] == (2, 1, 0.5)
    assert got[("colour", "zh", "<=77")] == (2, 1, 0.5)
    assert got[("size", "zh", "<=77")] == (2, 0, 0.0)
    assert ("size", "zh", ">77") not in got  # nobody asked
    assert got[("shape", "zh", ">77")] == (1, 1, 1.0)
    assert set(summary.columns) == set(scoring.SUMMARY_COLUMNS)
    # pooled lookups weight groups by their prompt counts
    assert scoring.lookup(summary, "shape", "en") == pytest.approx(2 / 3)
    assert scoring.lookup(summary, "colour", None, "<=77") == pytest.approx(2 / 4)
    assert np.isnan(scoring.lookup(summary, "colour", "ko"))
    table = scoring.pivot(summary)
    assert table.loc[("en", "<=77"), "colour"] == pytest.approx(0.5)


def test_length_bucket_prefers_clip_token_counts():
    prompts = _prompts().assign(clip_tokens=[5, 77, 78, 3, 3, 3])
    assert scoring.length_buckets(prompts).tolist() == ["<=77", "<=77", ">77", "<=77", "<=77", "<=77"]
    with pytest.raises(ValueError, match="clip_tokens"):
        scoring.length_buckets(prompts.drop(columns=["clip_tokens", "is_long"]))


def test_bad_tables_are_named():
    with pytest.raises(ValueError, match="lang"):
        scoring.judge(_prompts().drop(columns=["lang"]), _predicted())
    with pytest.raises(ValueError, match="3 values for 6 prompts"):
        scoring.judge(_prompts(), {**_predicted(), "shape": ["circle"] * 3})
    with pytest.raises(ValueError, match="ok_"):
        scoring.summarise(_prompts())


def test_frechet_distance_matches_the_scipy_formula():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 1.0
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert scoring.frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)
    assert scoring.frechet_distance(b, a) == pytest.approx(reference, rel=1e-6)
    assert scoring.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # a pure shift by d in every one of D dims costs D * d^2
    assert scoring.frechet_distance(a, a + 2.0) == pytest.approx(6 * 4.0, rel=1e-6)
    with pytest.raises(ValueError, match="same D"):
        scoring.frechet_distance(a, b[:, :3])


def test_image_grids_one_per_language_with_verdict_borders():
    per = scoring.judge(_prompts(), _predicted())
    images = np.zeros((6, 16, 16, 3), dtype=np.uint8)
    grids = scoring.image_grids(per, images, columns=2, scale=2)
    assert set(grids) == {"en", "zh"}
    tile = 16 * 2 + 4
    assert grids["en"].size == (2 * tile, 2 * tile)  # 3 images in 2 columns -> 2 rows
    assert grids["en"].getpixel((0, 0)) == (40, 170, 60)  # first en prompt: all right
    assert grids["en"].getpixel((tile, 0)) == (210, 40, 40)  # second: colour wrong
    with pytest.raises(ValueError, match="rows"):
        scoring.image_grids(per, images[:3])


def test_select_prompts_caps_groups_and_repeats():
    prompts = pd.concat([_prompts()] * 5, ignore_index=True)  # 10 short + 5 long per language
    chosen = scoring.select_prompts(prompts, langs=["en"], max_per_group=3, images_per_prompt=2, seed=0)
    assert set(chosen["lang"]) == {"en"}
    assert len(chosen) == (3 + 3) * 2
    assert chosen["sample"].tolist() == [0] * 6 + [1] * 6
    assert chosen[chosen["sample"] == 0]["prompt"].tolist() == chosen[chosen["sample"] == 1]["prompt"].tolist()
    again = scoring.select_prompts(prompts, langs=["en"], max_per_group=3, images_per_prompt=2, seed=0)
    pd.testing.assert_frame_equal(chosen, again)
    with pytest.raises(ValueError, match="ko"):
        scoring.select_prompts(prompts, langs=["ko"])


class _RenderPipe:
    """A stand-in text-to-image model that draws exactly what each prompt row asks (omnidiff.world.render)."""

    def __init__(self, table: pd.DataFrame, wrong_colour: bool = False):
        self.table = table.set_index("prompt")
        self.wrong_colour = wrong_colour
        self.calls = []

    def __call__(self, prompts, num_inference_steps=20, guidance_scale=3.0, seed=0):
        from omnidiff.world import ATTRIBUTES, render

        self.calls.append((len(prompts), seed))
        out = []
        for p in prompts:
            attrs = {k: self.table.at[p, k] for k in ("shape", "colour", "position", "size", "background")}
            if self.wrong_colour:
                colours = ATTRIBUTES["colour"]
                attrs["colour"] = colours[(colours.index(attrs["colour"]) + 4) % len(colours)]
            out.append(render(attrs, 16))
        return out


def test_prompt_faithfulness_end_to_end_with_a_drawing_pipe(tiny_world, tiny_evaluator):
    from omnidiff.models.evaluator import load_evaluator

    evaluator = load_evaluator(tiny_evaluator, require_fit=False)
    prompts = pd.read_parquet(tiny_world / "eval_prompts.parquet")
    prompts = prompts[prompts["lang"].isin(["en", "zh"])].reset_index(drop=True)
    right = _RenderPipe(prompts)
    result = scoring.prompt_faithfulness(right, prompts, evaluator, seed=5, steps=2, batch_size=7)
    assert [c[1] for c in right.calls] == list(range(5, 5 + len(prompts), 7))  # seed + first row of each batch
    assert result.images.shape == (len(prompts), 16, 16, 3)
    assert result.per_prompt["pred_colour"].tolist() == evaluator.predict(result.images)["colour"]
    assert result.summary.groupby(["attribute"])["n"].sum()["shape"] == len(prompts)
    wrong = scoring.prompt_faithfulness(_RenderPipe(prompts, wrong_colour=True), prompts, evaluator, batch_size=16)
    # The same drawings but in the wrong colour: colour faithfulness collapses, shape does not move.
    assert scoring.lookup(wrong.summary, "colour") < scoring.lookup(result.summary, "colour") - 0.4
    assert scoring.lookup(wrong.summary, "shape") == pytest.approx(scoring.lookup(result.summary, "shape"), abs=0.15)


# ---------------------------------------------------------------- bootstrap intervals (issue 18 item 1)

def _stacked(right, models, **kw):
    from tests import eval_synthetic

    res = eval_synthetic.results(eval_synthetic.prompts(**kw), right, models)
    return pd.concat([r.per_prompt.assign(model=m) for m, r in res.items()], ignore_index=True), res


def test_bootstrap_point_scores_are_the_summary_scores():
    per_prompt, res = _stacked({("a", "en", "<=77"): 10, ("a", "zh", "<=77"): 0.5, ("a", "en", ">77"): 3}, ["a"])
    # one attribute of one prompt wrong on its own: the score is a mean over attributes, not over all-right images
    per_prompt.loc[0, "ok_colour"] = False
    point, reps = scoring.bootstrap_scores(per_prompt, ("shape", "colour", "position"), resamples=200)
    summary = scoring.summarise(per_prompt)
    for (model, lang, length), value in point.items():
        expected = np.mean([scoring.lookup(summary, a, lang, length) for a in ("shape", "colour", "position")])
        assert value == pytest.approx(expected), (model, lang, length)
        assert reps[(model, lang, length)].shape == (200,)
    assert point[("a", "en", "<=77")] == pytest.approx((10 / 24 * 2 + 9 / 24) / 3)
    assert point[("a", "zh", "<=77")] == pytest.approx(0.5)


def test_bootstrap_a_known_difference_excludes_zero_and_a_tie_includes_it():
    # "good" draws all 24 short English prompts right, "poor" 8 of them; "even" draws the other half
    # of the prompts right than "half" does: the same score, a paired difference that is not always 0.
    per_prompt, _ = _stacked({("poor", "en", "<=77"): 8, ("half", "en", "<=77"): 12}, ["good", "poor", "half", "even"],
                             langs=("en",), zero_shot=())
    even = per_prompt["model"] == "even"
    first_half = even & (per_prompt.groupby("model").cumcount() < 12)
    for a in ("shape", "colour", "position"):
        per_prompt.loc[even, f"ok_{a}"] = ~first_half[even]
    point, reps = scoring.bootstrap_scores(per_prompt, ("shape", "colour", "position"), resamples=2000, seed=0)
    key = lambda m: (m, "en", "<=77")  # noqa: E731
    assert point[key("half")] == pytest.approx(point[key("even")]) == pytest.approx(0.5)
    low, high = scoring.percentile_interval(reps[key("good")] - reps[key("poor")])
    assert 0 < low < point[key("good")] - point[key("poor")] < high
    low, high = scoring.percentile_interval(reps[key("half")] - reps[key("even")])
    assert low < 0 < high
    # the same model twice: every resample ties exactly
    same = pd.concat([per_prompt[per_prompt["model"] == "poor"], per_prompt[per_prompt["model"] == "poor"].assign(model="twin")])
    _, reps2 = scoring.bootstrap_scores(same, ("shape",), resamples=300)
    assert np.array_equal(reps2[("poor", "en", "<=77")], reps2[("twin", "en", "<=77")])


def test_bootstrap_is_deterministic_under_its_seed():
    per_prompt, _ = _stacked({("a", "en", "<=77"): 0.5, ("a", "zh", ">77"): 0.25}, ["a"])
    _, one = scoring.bootstrap_scores(per_prompt, ("shape", "colour"), resamples=500, seed=7)
    _, two = scoring.bootstrap_scores(per_prompt, ("shape", "colour"), resamples=500, seed=7)
    _, other = scoring.bootstrap_scores(per_prompt, ("shape", "colour"), resamples=500, seed=8)
    assert one.keys() == two.keys() == other.keys()
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert not np.array_equal(one[("a", "en", "<=77")], other[("a", "en", "<=77")])


def test_bootstrap_keeps_a_prompts_seeds_together():
    # Each prompt drawn with 3 seeds that agree: the unit is the prompt, so the replicates are exactly
    # those of one image per prompt (the same number of units, the same draws).
    per_prompt, _ = _stacked({("a", "en", "<=77"): 0.5}, ["a"], langs=("en",), zero_shot=())
    repeated = pd.concat([per_prompt.assign(sample=k) for k in range(3)], ignore_index=True)
    _, once = scoring.bootstrap_scores(per_prompt, ("shape",), resamples=400, seed=3)
    _, thrice = scoring.bootstrap_scores(repeated, ("shape",), resamples=400, seed=3)
    assert all(np.allclose(once[k], thrice[k]) for k in once)


def test_bootstrap_refuses_unpaired_prompt_sets_and_bad_input():
    per_prompt, _ = _stacked({}, ["a", "b"], langs=("en",), zero_shot=())
    shifted = per_prompt.copy()
    shifted.loc[shifted["model"] == "b", "prompt"] += " (another)"
    with pytest.raises(ValueError, match="other prompts"):
        scoring.bootstrap_scores(shifted, ("shape",))
    with pytest.raises(ValueError, match="model"):
        scoring.bootstrap_scores(per_prompt.drop(columns=["model"]), ("shape",))
    with pytest.raises(ValueError, match="ok_<attribute>"):
        scoring.bootstrap_scores(per_prompt, ("size",))


def test_percentile_interval():
    low, high = scoring.percentile_interval(np.linspace(0, 1, 1001))
    assert low == pytest.approx(0.025, abs=1e-3) and high == pytest.approx(0.975, abs=1e-3)
    assert scoring.percentile_interval(np.array([1.0, np.inf, 2.0, 3.0] * 100), 0.5)[1] == 3.0
    with pytest.raises(ValueError, match="confidence"):
        scoring.percentile_interval(np.zeros(3), 1.5)


# ---------------------------------------------------------------- paired across languages (issue 18 item 1)

def test_spec_keys_from_spec_id_or_the_english_prompt():
    table = pd.DataFrame({"spec_id": [3, 3, 4], "prompt_en": ["a", "a", "b"], "is_long": [False, False, True]})
    assert scoring.spec_keys(table).tolist() == ["spec3", "spec3", "spec4"]
    keys = scoring.spec_keys(table.drop(columns=["spec_id"]))
    assert keys[0] == keys[1] != keys[2]
    with pytest.raises(ValueError, match="spec_id"):
        scoring.spec_keys(table[["is_long"]])


def _two_languages_that_agree_per_spec():
    """en and zh drawn right on the same 12 of 24 short specs (and all 8 long ones): the same score, and a
    zh/en ratio of exactly 1 in every resample that keeps the specs paired."""
    per_prompt, _ = _stacked({("a", "en", "<=77"): 12, ("a", "zh", "<=77"): 12}, ["a"], langs=("en", "zh"),
                             zero_shot=())
    return per_prompt.assign(spec=scoring.spec_keys(per_prompt).to_numpy())


def test_paired_resampling_gives_a_known_ratio_and_narrower_intervals_than_independent_draws():
    per_prompt = _two_languages_that_agree_per_spec()
    attrs = ("shape", "colour", "position")
    _, paired = scoring.bootstrap_scores(per_prompt, attrs, resamples=2000, seed=0, unit="spec", strata=("length",))
    _, apart = scoring.bootstrap_scores(per_prompt, attrs, resamples=2000, seed=0, unit="spec")
    en, zh = ("a", "en", "<=77"), ("a", "zh", "<=77")
    # paired: every resample draws the same specs in both languages, so the ratio is exactly 1 (a known answer)
    assert np.array_equal(paired[zh], paired[en])
    assert scoring.percentile_interval(paired[zh] / paired[en]) == (1.0, 1.0)
    # independent draws per language: the same per-language intervals, but a wide one for the ratio
    low, high = scoring.percentile_interval(apart[zh] / apart[en])
    assert low < 0.75 and high > 1.3
    width = lambda r: np.subtract(*scoring.percentile_interval(r)[::-1])  # noqa: E731
    assert width(paired[en]) == pytest.approx(width(apart[en]), abs=0.05)
    # a language that differs on some specs still gets a paired interval narrower than the independent one
    worse = per_prompt.copy()
    zh_rows = worse.index[(worse["lang"] == "zh") & (worse["length"] == "<=77")]
    for a in attrs:
        worse.loc[zh_rows[10:12], f"ok_{a}"] = False  # 10 of the 12 specs en draws right
    _, paired = scoring.bootstrap_scores(worse, attrs, resamples=2000, seed=0, unit="spec", strata=("length",))
    _, apart = scoring.bootstrap_scores(worse, attrs, resamples=2000, seed=0, unit="spec")
    assert width(paired[zh] / paired[en]) < 0.5 * width(apart[zh] / apart[en])
    assert scoring.percentile_interval(paired[zh] / paired[en])[1] <= 1.0  # never better than English here


def test_paired_resampling_is_deterministic_and_refuses_bad_strata():
    per_prompt = _two_languages_that_agree_per_spec()
    one = scoring.bootstrap_scores(per_prompt, ("shape",), resamples=300, seed=5, unit="spec", strata=("length",))[1]
    two = scoring.bootstrap_scores(per_prompt, ("shape",), resamples=300, seed=5, unit="spec", strata=("length",))[1]
    assert all(np.array_equal(one[k], two[k]) for k in one)
    with pytest.raises(ValueError, match="strata"):
        scoring.bootstrap_scores(per_prompt, ("shape",), unit="spec", strata=("model",))
    # a spec one language lacks counts as not asked there: its score is over the specs it has
    fewer = per_prompt.drop(per_prompt.index[(per_prompt["lang"] == "zh") & (per_prompt["spec"] == "spec0")])
    point, reps = scoring.bootstrap_scores(fewer, ("shape",), resamples=300, unit="spec", strata=("length",))
    assert point[("a", "zh", "<=77")] == pytest.approx(11 / 23)
    assert reps[("a", "zh", "<=77")].shape == (300,)


def test_generate_images_takes_one_seed_per_prompt():
    class Recorder:
        def __init__(self):
            self.seeds = []

        def __call__(self, prompts, num_inference_steps, guidance_scale, seed):
            self.seeds.append(seed)
            return [Image.new("RGB", (4, 4)) for _ in prompts]

    pipe = Recorder()
    scoring.generate_images(pipe, ["a", "b", "c"], seed=9, batch_size=2, seeds=[5, 5, 7])
    assert pipe.seeds == [[5, 5], [7]]
    pipe = Recorder()
    scoring.generate_images(pipe, ["a", "b", "c"], seed=9, batch_size=2)
    assert pipe.seeds == [9, 11]  # batch k: seed + its first row's index
    with pytest.raises(ValueError, match="seeds"):
        scoring.generate_images(pipe, ["a", "b"], seeds=[1])
