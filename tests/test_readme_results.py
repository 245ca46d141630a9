"""The README's results block is regenerated from an evaluation's output (train/readme_results.py):
only the marked block changes, and a README without exactly one pair of markers is refused.

    .venv/bin/pytest tests/test_readme_results.py -x -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnidiff.config import load_config
from tests import eval_synthetic
from train.eval_config import EvalConfig
from train.evaluate import assemble
from train.readme_results import BEGIN, END, main, render_block, replace_block

HEAD = "# omnidiff\n\nSome text a person wrote.\n\n"
TAIL = "\n\n## Commands\n| a | b |\n|---|---|\n| table outside the block | stays |\n"


@pytest.fixture(scope="module")
def report_json(tmp_path_factory) -> Path:
    langs = ("en", "zh", "fr", "ko")
    results = eval_synthetic.results(eval_synthetic.prompts(langs=langs, zero_shot=("ko",)),
                                     {("base", lang, length): 2 for lang in ("zh", "fr", "ko") for length in ("<=77", ">77")}
                                     | {("stage3", "fr", "<=77"): 20}, ["base", "stage3"])
    cfg = load_config(EvalConfig, None, ["bootstrap_resamples=300", "track=false"])
    out = tmp_path_factory.mktemp("eval")
    report = assemble(results, {"base": 1508.4, "stage3": 519.2}, {"ko"}, cfg, out, "base")
    report.commit = "0123456789ab"
    path = out / "report.json"
    path.write_text(json.dumps(report.to_dict(), default=str))
    return path


def _readme(tmp_path: Path, inside: str = "| old | hand-written | table |\n") -> Path:
    path = tmp_path / "README.md"
    path.write_text(f"{HEAD}{BEGIN}\n{inside}{END}{TAIL}", encoding="utf-8")
    return path


def test_rewrites_only_the_marked_block(report_json, tmp_path):
    readme = _readme(tmp_path)
    assert main([str(report_json), "--readme", str(readme), "--check"]) == 1  # stale
    assert main([str(report_json), "--readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(HEAD + BEGIN + "\n") and text.endswith("\n" + END + TAIL)
    block = text[len(HEAD + BEGIN):-len(END + TAIL)]
    assert "hand-written" not in block
    assert "`0123456789ab`" in block
    header = next(line for line in block.splitlines() if line.startswith("| | "))
    assert header == "| | en | fr | zh | ko (zero-shot) | long, trained langs |"
    base_row = next(line for line in block.splitlines() if line.startswith("| base |"))
    assert base_row.startswith("| base | 1.00 [1.00, 1.00] | 0.08 [")  # 2 of 24 French prompts right
    claims = [c for c in json.loads(report_json.read_text())["claims"] if c["model_label"] == "stage3"]
    # English; zh and fr (vs English, vs base); long (2); ko reported; English above the base, short and long (2),
    # and its short subsets by held-out reason (3, reported)
    assert len(claims) == 1 + 2 * 2 + 2 + 1 + 2 + 3
    for c in claims:  # one row per claim, with its verdict
        row = next(line for line in block.splitlines() if line.startswith(f"| {c['claim']} |"))
        assert row.endswith(f"| {c['verdict']} |")
    assert "| fr short >= 0.95x English | ratio 0.83 [" in block  # 20 of 24 French prompts against all English
    assert "| zh short above its base | difference 0.92 [" in block
    assert "base 1508, stage3 519" in block
    assert main([str(report_json), "--readme", str(readme), "--check"]) == 0  # up to date: nothing to do
    assert main([str(report_json), "--readme", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == text  # idempotent


def test_pipeline_outputs_add_the_stage_times(report_json, tmp_path):
    outputs = tmp_path / "pipeline_outputs.json"
    outputs.write_text(json.dumps({"evaluate": json.loads(report_json.read_text()),
                                   "timings_s": {"collect": 12.0, "stage1": 587.4}}))
    readme = _readme(tmp_path)
    assert main([str(outputs), "--readme", str(readme), "--model", "stage3"]) == 0
    assert "Stage times (s): collect 12, stage1 587; total 599." in readme.read_text(encoding="utf-8")


def test_bad_readmes_and_results_are_named(report_json, tmp_path, capsys):
    block = render_block(json.loads(report_json.read_text()))
    with pytest.raises(ValueError, match="once each, found 0 and 0"):
        replace_block("no markers here", block)
    with pytest.raises(ValueError, match="found 2 and 1"):
        replace_block(f"{BEGIN}\nx\n{BEGIN}\n{END}\n", block)
    with pytest.raises(ValueError, match="before"):
        replace_block(f"{END}\n{BEGIN}\n", block)
    readme = tmp_path / "README.md"
    readme.write_text("# nothing marked\n")
    assert main([str(report_json), "--readme", str(readme)]) == 2
    assert "results:begin" in capsys.readouterr().err and readme.read_text() == "# nothing marked\n"
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"scores": [{"model": "base", "lang": "en", "length": "<=77", "score": 0.7}]}))
    assert main([str(old), "--readme", str(_readme(tmp_path))]) == 2
    assert "no intervals" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no claims for it"):
        render_block(json.loads(report_json.read_text()), model="stage9")


def test_the_projects_readme_has_one_marked_block():
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = replace_block(text, "regenerated")
    assert new.split(BEGIN)[0] == text.split(BEGIN)[0] and new.split(END)[1] == text.split(END)[1]


def test_the_block_says_how_many_images_each_prompt_had_and_what_was_resampled(report_json):
    report = json.loads(report_json.read_text())
    first = render_block(report).splitlines()[0]
    assert "24 short, 8 long prompts per language and model; bootstrap 95% intervals over specs (" in first
    for row in report["scores"]:  # as an evaluation with images_per_prompt=3 records them
        row["images"] = 3 * row["prompts"]
    assert "8 long prompts per language and model, 3 images (seeds) each; " in render_block(report).splitlines()[0]
    old = {**report, "bootstrap": None, "scores": [{k: v for k, v in r.items() if k != "images"}
                                                   for r in report["scores"]]}
    # a report from before the paired bootstrap renders as it did
    assert "8 long prompts per language and model; bootstrap 95% intervals over prompts in brackets." in (
        render_block(old).splitlines()[0])
