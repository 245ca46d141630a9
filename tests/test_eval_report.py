"""The evaluate stage's report (train/eval_report.py) rendered from a small synthetic evaluation:
it fits a 1280-px window and every sample image carries the prompt it answers (issue 15 item 11);
it shows every score's interval and every claim's verdict (issue 18 item 1).

    .venv/bin/pytest tests/test_eval_report.py -x -q

The browser test measures the page in headless chromium at a 1280-px window (skipped without it).
"""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

import pytest
from PIL import Image

from omnidiff.config import load_config
from tests import eval_synthetic
from train.eval_config import EvalConfig
from train.eval_report import CHART_MAX_WIDTH_PX, PAGE_MAX_WIDTH_PX, write_report
from train.evaluate import assemble

# The wide case: the demo's 8 languages (2 zero-shot) and 4 models made the per-language chart 1760 px.
LANGS = ("de", "en", "es", "fr", "ja", "ko", "ru", "zh")
MODELS = ["base", "stage1", "stage2", "stage3"]


class _Page(HTMLParser):
    """The report's images (attributes), its sample rows' prompt texts, its <style> and its table cells."""

    def __init__(self):
        super().__init__()
        self.images, self.prompts, self.cells, self.style = [], [], [], ""
        self._in = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "div" and attrs.get("class") == "prompt":
            self._in, self._text = "prompt", ""
        elif tag in ("td", "style"):
            self._in, self._text = tag, ""

    def handle_data(self, data):
        if self._in:
            self._text += data

    def handle_endtag(self, tag):
        if self._in == "prompt" and tag == "div":
            self.prompts.append(self._text)
        elif self._in == "td" and tag == "td":
            self.cells.append(self._text)
        elif self._in == "style" and tag == "style":
            self.style = self._text
        else:
            return
        self._in = None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    table = eval_synthetic.prompts(langs=LANGS, zero_shot=("ko", "ru"))
    right = {("base", lang, length): 3 for lang in LANGS if lang != "en" for length in ("<=77", ">77")}
    right |= {("stage1", "fr", "<=77"): 18, ("stage2", "de", "<=77"): 0.5}
    results = eval_synthetic.results(table, right, MODELS)
    cfg = load_config(EvalConfig, None, ["bootstrap_resamples=500", "track=false", "require_fit_evaluator=false"])
    rep = assemble(results, {m: 100.0 * k for k, m in enumerate(MODELS)}, {"ko", "ru"}, cfg, out, "base")
    command = "omnidiff evaluate " + " ".join(f"{m}=/a/very/long/path/to/exports/{m}/" + "x" * 120 for m in MODELS)
    write_report(rep, cfg, command, 12.0)
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    return rep, table, page


def _png_size(data_uri: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))).size


def test_report_fits_a_1280_px_window(report):
    rep, _, page = report
    body = re.search(r"body\{[^}]*max-width:(\d+)px", page.style)
    assert body and int(body.group(1)) == PAGE_MAX_WIDTH_PX <= 1280 - 2 * 16
    assert re.search(r"img\.chart\{[^}]*max-width:100%", page.style)
    assert re.search(r"table\{[^}]*overflow-x:auto", page.style)  # a wide table scrolls inside itself
    charts = [img for img in page.images if img.get("class") == "chart"]
    assert len(charts) == 2
    for img in charts:
        width, height = _png_size(img["src"])
        assert width <= CHART_MAX_WIDTH_PX <= PAGE_MAX_WIDTH_PX - 32, img["alt"]
    for name in ("by_language", "by_length"):
        assert Image.open(rep.report_dir / f"{name}.png").size[0] <= CHART_MAX_WIDTH_PX


def test_every_sample_carries_its_prompt(report):
    rep, table, page = report
    samples = [img for img in page.images if "sample" in img.get("class", "")]
    per_lang = table.groupby("lang").size().clip(upper=32)
    assert len(samples) == len(MODELS) * per_lang.sum()
    shown = [p for lang in sorted(LANGS) for p in table[table["lang"] == lang]["prompt"].head(32)]
    # each row: the prompt, then one image per model, each with that prompt as its alt text
    assert [p.removesuffix(" (>77 tokens)").strip() for p in page.prompts] == [p.strip() for p in shown]
    assert [img["alt"] for img in samples] == [p for p in shown for _ in MODELS]
    assert all(img["title"].split(": ", 1)[1].startswith(img["alt"]) for img in samples)
    assert all(_png_size(img["src"]) == (16, 16) for img in samples)
    # the border says whether the evaluator found every asked attribute: stage2 draws half of de wrong
    de_stage2 = [img["class"] for img in samples[2::4]][: int(per_lang["de"])]
    assert de_stage2.count("sample wrong") == 12 and de_stage2.count("sample ok") == int(per_lang["de"]) - 12


def test_report_shows_intervals_and_verdicts(report):
    rep, _, page = report
    intervals = [c for c in page.cells if re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", c)]
    assert len(intervals) == len(rep.scores)  # every score in the table with its interval
    verdicts = [c for c in page.cells if c in ("pass", "fail", "inconclusive", "reported")]
    assert len(verdicts) == len(rep.claims) and {"pass", "fail", "reported"} <= set(verdicts)
    data = json.loads((rep.report_dir / "report.json").read_text())
    assert {"low", "high"} <= set(data["scores"][0]) and {"verdict", "low", "high"} <= set(data["claims"][0])
    assert data["baseline"] == "base" and len(data["pooled"]) == 2 * len(MODELS)


def test_report_in_a_1280_px_browser_window(report, browser):
    rep, _, _ = report
    browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
    browser.call("Page.enable")
    browser.call("Page.navigate", url=(rep.report_dir / "report.html").as_uri())
    browser.wait_for("document.readyState === 'complete' && [...document.images].every(i => i.complete)")
    assert browser.evaluate("window.innerWidth") == 1280
    scroll = browser.evaluate("document.documentElement.scrollWidth")
    assert scroll <= 1280, f"the page is {scroll} px wide in a 1280-px window"
    # nothing inside sticks out either (a wide table scrolls within itself)
    widest = browser.evaluate("Math.max(...[...document.body.querySelectorAll('*')].filter(e => "
                              "!e.closest('table')).map(e => e.getBoundingClientRect().right))")
    assert widest <= 1280
    assert browser.evaluate("[...document.querySelectorAll('img.sample')].every(i => i.alt && i.naturalWidth === 16)")


def test_evaluate_writes_the_report_from_real_models(tiny_world, tiny_evaluator, tmp_path):
    """evaluate() end to end on two random tiny base models (real pipelines, real evaluator), no MLflow."""
    import pandas as pd

    from omnidiff.models.evaluator import load_evaluator
    from tests.fixtures_train import build_tiny_base
    from train.evaluate import EvalInputs, evaluate, format_table, real_world_images, select_prompts

    evaluator = load_evaluator(tiny_evaluator, require_fit=False)
    prompts = select_prompts(pd.read_parquet(tiny_world / "eval_prompts.parquet"), 2, ("en", "zh"), seed=0)
    inputs = EvalInputs(tiny_world, prompts, evaluator, str(build_tiny_base(tmp_path / "base", seed=0)),
                        real_world_images(tiny_world, 16, evaluator.resolution, 0))
    cfg = load_config(EvalConfig, None, ["steps=2", "track=false", "require_fit_evaluator=false",
                                         "bootstrap_resamples=200", f"report_dir={tmp_path / 'report'}"])
    other = build_tiny_base(tmp_path / "other", seed=1)
    report = evaluate({"other": str(other)}, cfg, inputs=inputs)
    assert list(report.images) == ["base", "other"] and report.images["other"].shape[0] == len(prompts)
    assert set(report.claims["model_label"]) == {"other"} and report.claims["verdict"].notna().all()
    page = _Page()
    page.feed((tmp_path / "report" / "report.html").read_text(encoding="utf-8"))
    samples = [img for img in page.images if "sample" in img.get("class", "")]
    assert sorted(img["alt"] for img in samples) == sorted(prompts["prompt"].tolist() * 2)
    text = format_table(report)
    assert all(f"{r.claim}: {r.kind}" in text for r in report.claims.itertuples())
    assert (tmp_path / "report" / "report.json").is_file() and (tmp_path / "report" / "grid_other_zh.png").is_file()


def test_the_demo_console_prints_each_claims_verdict_and_interval(report):
    from flows.cli import format_demo_report

    rep, _, _ = report
    out = json.loads(json.dumps({"evaluate": rep.to_dict(), "timings_s": {"evaluate": 3.0}}, default=str))
    text = format_demo_report({"url": "http://127.0.0.1/run"}, out, 3.0)
    stage3 = rep.claims[rep.claims["model_label"] == "stage3"]
    for c in stage3.itertuples():
        assert f"[{c.verdict.upper():>12}] {c.claim}: {c.kind} {c.estimate:.2f} [{c.low:.2f}, {c.high:.2f}]" in text
