"""The evaluate stage's metrics beyond the tiny world (issue 16 item 7): torchmetrics' CLIP score per
language and prompt length, FID / KID against reference images, from local folders only.

The CLIP and feature-extractor folders are tiny ones built with transformers' own classes
(tests/fixtures_metrics.py); the CLIP one is trained for a few seconds to tell colours apart.
"""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pandas as pd
import pytest
import torch

from tests.fixtures_metrics import COLOURS, colour_images, write_images
from train.metrics import (
    ALL,
    ClipScorer,
    ImageFeatures,
    MetricsError,
    clip_score_of,
    clip_table,
    fid_kid,
    load_clip,
    load_reference_images,
)

NAMES = list(COLOURS)


def _manual_clip_scores(folder, images, texts) -> np.ndarray:
    """100 * cos(image, text) straight from transformers' CLIPModel, without torchmetrics."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        tokens = processor(text=list(texts), return_tensors="pt", padding=True)
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    return (100 * (image * text).sum(-1)).numpy()


def test_pair_scores_are_clip_cosines_and_their_mean_is_torchmetrics_clipscore(clip_folder):
    from torchmetrics.multimodal.clip_score import CLIPScore

    images = colour_images(NAMES * 2, seed=7)
    matched = [f"a {n} picture" for n in NAMES * 2]
    shuffled = matched[3:] + matched[:3]
    scorer = ClipScorer(clip_folder, batch_size=5)  # batches that do not divide the 12 pairs
    for texts in (matched, shuffled):
        np.testing.assert_allclose(scorer.pair_scores(images, texts), _manual_clip_scores(clip_folder, images, texts),
                                   atol=1e-3)
    metric = CLIPScore(model_name_or_path=lambda: load_clip(clip_folder))
    metric.update([torch.from_numpy(im).permute(2, 0, 1) for im in images], matched)
    assert clip_score_of(scorer.pair_scores(images, matched)) == pytest.approx(float(metric.compute()), abs=1e-3)


def test_an_image_scores_higher_with_its_own_caption_than_with_anothers(clip_folder):
    images = colour_images(NAMES, seed=11)
    scorer = ClipScorer(clip_folder)
    matched = scorer.pair_scores(images, [f"a {n} picture" for n in NAMES])
    for shift in range(1, len(NAMES)):
        other = scorer.pair_scores(images, [f"a {n} picture" for n in NAMES[shift:] + NAMES[:shift]])
        assert (matched > other).all(), (shift, matched, other)
    assert clip_score_of(matched) > 30


def _per_image() -> pd.DataFrame:
    """2 models x (en: 3 short + 2 long prompts, de: 2 short), 2 images a prompt; ours = base + 5."""
    rows = []
    rng = np.random.default_rng(0)
    for lang, length, count in (("en", "short", 3), ("en", "long", 2), ("de", "short", 2)):
        for k in range(count):
            for sample in range(2):
                value = float(rng.uniform(10, 40))
                rows.append({"id": f"{lang}-{length}-{k}", "lang": lang, "length": length, "sample": sample,
                             "clip_score": value})
    base = pd.DataFrame(rows).assign(model="base")
    return pd.concat([base, base.assign(model="ours", clip_score=base["clip_score"] + 5)], ignore_index=True)


def test_clip_table_groups_per_language_and_length_with_margins_and_paired_differences():
    per_image = _per_image()
    table = clip_table(per_image, baseline="base", resamples=500, seed=0).set_index(["model", "lang", "length"])
    expected = {("en", "short"): (3, 6), ("en", "long"): (2, 4), ("de", "short"): (2, 4), ("en", ALL): (5, 10),
                ("de", ALL): (2, 4), (ALL, "short"): (5, 10), (ALL, "long"): (2, 4), (ALL, ALL): (7, 14)}
    for model in ("base", "ours"):
        assert {k[1:] for k in table.index if k[0] == model} == set(expected)
        for (lang, length), (prompts, images) in expected.items():
            row = table.loc[(model, lang, length)]
            assert (row["prompts"], row["images"]) == (prompts, images)
            mask = (per_image["model"] == model) & (per_image["lang"] == lang if lang != ALL else True) & (
                per_image["length"] == length if length != ALL else True)
            assert row["clip_score"] == pytest.approx(per_image.loc[mask, "clip_score"].mean())
            assert row["low"] <= row["clip_score"] <= row["high"] and row["low"] < row["high"]
    ours = table.xs("ours")
    assert np.allclose(ours["vs_baseline"], 5) and np.allclose(ours["vs_baseline_low"], 5)
    assert np.allclose(ours["vs_baseline_high"], 5)  # paired: every resample shifts by exactly 5
    assert table.xs("base")["vs_baseline"].isna().all()


def test_clip_score_of_a_group_is_clamped_at_zero_as_torchmetrics_does():
    assert clip_score_of([-10.0, 4.0]) == 0.0
    assert clip_score_of([10.0, 4.0]) == 7.0


def test_fid_and_kid_are_zero_for_identical_sets_and_grow_with_the_difference(dinov2_folder):
    from omnidiff.scoring import frechet_distance

    extractor = ImageFeatures(dinov2_folder)
    assert extractor.num_features == 48
    mixed = extractor(colour_images(NAMES * 4, seed=1))  # (24, 48)
    again = extractor(colour_images(NAMES * 4, seed=2))  # the same colours, other noise
    reds = extractor(colour_images(["red"] * 24, seed=3))
    same = fid_kid(mixed, mixed, kid_subsets=20, kid_subset_size=12)
    near = fid_kid(mixed, again, kid_subsets=20, kid_subset_size=12)
    far = fid_kid(mixed, reds, kid_subsets=20, kid_subset_size=12)
    assert abs(same["fid"]) < 1e-6 * far["fid"]
    assert far["fid"] > 10 * near["fid"] > 0
    assert far["kid"] > 10 * abs(same["kid"]) and far["kid"] > near["kid"]
    assert far["fid"] == pytest.approx(frechet_distance(mixed.numpy(), reds.numpy()), rel=1e-6)
    assert far["kid_subset_size"] == 12 and fid_kid(mixed, reds[:5], 5, 1000)["kid_subset_size"] == 5
    with pytest.raises(ValueError, match="at least 2 images a side"):
        fid_kid(mixed, reds[:1])


def test_the_feature_extractor_loads_from_its_folder_or_its_safetensors_file_only(dinov2_folder, clip_folder, tmp_path):
    images = colour_images(NAMES, seed=4)
    from_folder = ImageFeatures(dinov2_folder)(images)
    assert torch.allclose(ImageFeatures(dinov2_folder / "model.safetensors")(images), from_folder)
    assert ImageFeatures(clip_folder).num_features == 16  # default extractor: the CLIP folder's image tower
    pickled = tmp_path / "pickled"
    shutil.copytree(dinov2_folder, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(MetricsError, match=r"no \.safetensors weights \(found \['pytorch_model.bin'\]: safetensors only"):
        ImageFeatures(pickled)
    with pytest.raises(MetricsError, match="has no config.json"):
        ImageFeatures(tmp_path)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(dinov2_folder, mismatched)
    shutil.copy(clip_folder / "model.safetensors", mismatched / "clip.safetensors")
    with pytest.raises(MetricsError, match="does not fit"):
        ImageFeatures(mismatched / "clip.safetensors")
    with pytest.raises(MetricsError, match="metrics.clip: .* is not a folder"):
        ClipScorer(tmp_path / "absent")


def test_nothing_reaches_the_network(clip_folder, dinov2_folder, monkeypatch):
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"network refused in this test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    images = colour_images(NAMES, seed=5)
    assert len(ClipScorer(clip_folder).pair_scores(images, [f"a {n} picture" for n in NAMES])) == len(NAMES)
    assert ImageFeatures(dinov2_folder)(images).shape == (len(NAMES), 48)
    assert attempts == []


def test_reference_images_are_read_recursively_with_a_seeded_pick(tmp_path):
    write_images(tmp_path / "refs" / "a", NAMES)
    write_images(tmp_path / "refs" / "b", NAMES[:2])
    (tmp_path / "refs" / "notes.txt").write_text("not an image")
    assert len(load_reference_images(tmp_path / "refs", 100)) == 8
    first, second = load_reference_images(tmp_path / "refs", 3, seed=1), load_reference_images(tmp_path / "refs", 3, seed=1)
    assert len(first) == 3 and all((a == b).all() for a, b in zip(first, second, strict=True))
    write_images(tmp_path / "one", ["red"])
    with pytest.raises(MetricsError, match="holds 1 image"):
        load_reference_images(tmp_path / "one", 10)


def test_the_config_needs_a_metrics_section_without_the_world_judge():
    from omnidiff.config import ConfigError, load_config
    from train.eval_config import EvalConfig

    with pytest.raises(ConfigError, match="judge='none': with no world judge there is nothing to measure"):
        load_config(EvalConfig, None, ["judge=none"])
    demo = load_config(EvalConfig, "configs/evaluate.yaml")
    assert demo.judge == "world" and demo.metrics is None  # the demo is unchanged
    shipped = load_config(EvalConfig, "configs/evaluate_metrics.yaml")
    assert shipped.judge == "none" and str(shipped.metrics.prompt_set) == "configs/prompts/multilingual_v1.jsonl"
    with pytest.raises(ConfigError, match=r"metrics.lengths\[0\]='medium'"):
        load_config(EvalConfig, "configs/evaluate_metrics.yaml", ["metrics.lengths=[medium]"])


def test_one_command_measures_a_published_sd_folder(sd15_base, clip_folder, tmp_path, capsys):
    """``omnidiff evaluate`` with configs/evaluate_metrics.yaml on a tiny SD 1.5 folder: the report and
    MLflow hold CLIP score per language and length and FID / KID, the base compared with itself."""
    import mlflow

    from omnidiff.cli import main
    from omnidiff.tracking import tracking_uri

    refs = write_images(tmp_path / "refs", NAMES * 2)
    out = tmp_path / "report"
    argv = ["evaluate", f"sd15={sd15_base}", "--config", "configs/evaluate_metrics.yaml",
            "-o", f"baseline={sd15_base}", "-o", f"metrics.clip={clip_folder}", "-o", f"metrics.reference_images={refs}",
            "-o", "metrics.langs=[en,de,zh]", "-o", "metrics.images_per_prompt=1", "-o", "metrics.kid_subsets=10",
            "-o", "steps=2", "-o", "batch_size=8", "-o", "bootstrap_resamples=200", "-o", f"report_dir={out}"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    assert metrics["prompts"] == 15 and metrics["langs"] == ["de", "en", "zh"] and metrics["baseline"] == "base"
    assert "English reference" in metrics["clip_note"]
    clip = pd.DataFrame(metrics["clip"]).set_index(["model", "lang", "length"])
    for lang in ("en", "de", "zh", ALL):
        for length in ("short", "long", ALL):
            for model in ("base", "sd15"):
                row = clip.loc[(model, lang, length)]
                assert 0 <= row["low"] <= row["clip_score"] <= row["high"] <= 100
    assert clip.loc[("sd15", ALL, ALL), "prompts"] == 15 and clip.loc[("sd15", "de", "long"), "prompts"] == 2
    # the model is the base folder itself, drawn with the same seeds: the same images, no difference
    assert clip.xs("sd15")["vs_baseline"].abs().max() < 1e-4
    distances = metrics["fid_kid"]
    assert set(distances) == {"base", "sd15"} and distances["sd15"]["fid"] == pytest.approx(distances["base"]["fid"])
    assert distances["sd15"]["fid"] > 0 and metrics["reference_count"] == 12
    assert {"metrics_clip.csv", "metrics_per_image.csv", "metrics_fid_kid.csv", "report.html"} <= {
        p.name for p in out.iterdir()}
    assert "CLIP score" in capsys.readouterr().out
    client = mlflow.MlflowClient(tracking_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string=f"params.report_dir = '{out}' and tags.stage = 'evaluate'")
    assert run.data.metrics["metrics.clip.de.long.sd15"] == pytest.approx(clip.loc[("sd15", "de", "long"), "clip_score"])
    assert run.data.metrics["metrics.fid.base"] == pytest.approx(distances["base"]["fid"])



def test_the_world_judge_and_the_metrics_section_share_one_report(sd15_base, tiny_world, clip_folder, tmp_path):
    """judge: world (the demo's) plus a metrics section: both in report.json, the CLIP table in report.html."""
    from omnidiff.config import load_config
    from omnidiff.models.evaluator import AttributeClassifier, save_evaluator
    from omnidiff.world.attributes import ATTRIBUTES
    from train.eval_config import EvalConfig
    from train.evaluate import evaluate, format_table

    torch.manual_seed(0)
    labels = {name: list(ATTRIBUTES[name]) for name in ("shape", "colour", "position")}
    judge = save_evaluator(AttributeClassifier(labels, 16), {name: 0.5 for name in labels}, tmp_path / "judge")
    out = tmp_path / "report"
    cfg = load_config(EvalConfig, "configs/evaluate.yaml", [
        f"world_dir={tiny_world}", f"evaluator_dir={judge}", f"baseline={sd15_base}", "require_fit_evaluator=false",
        "track=false", "max_per_group=1", "steps=2", "real_images=8", "bootstrap_resamples=100", "langs=[en]",
        f"report_dir={out}", "metrics.prompt_set=configs/prompts/multilingual_v1.jsonl", f"metrics.clip={clip_folder}",
        "metrics.langs=[ko]", "metrics.lengths=[short]"])
    report = evaluate({}, cfg)
    saved = json.loads((out / "report.json").read_text())
    assert {r["lang"] for r in saved["scores"]} == {"en"}  # the world judge's table
    clip = pd.DataFrame(saved["metrics"]["clip"])
    assert set(zip(clip["lang"], clip["length"], strict=True)) == {("ko", "short"), ("ko", ALL), (ALL, "short"),
                                                                   (ALL, ALL)}
    assert (clip["prompts"] == 3).all() and saved["metrics"]["fid_kid"] == {}
    assert "CLIP score per language and prompt length" in (out / "report.html").read_text()
    assert "CLIP score (English references)" in format_table(report)
