"""The tiny world generator: determinism, languages, long captions, held-out data, url lists, server.

    .venv/bin/pytest tests/test_world.py -x -q
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from omnidiff.config import ConfigError, load_config
from omnidiff.world import (
    ATTRIBUTES,
    LANGUAGES,
    TRAINED_LANGUAGES,
    ZERO_SHOT_LANGUAGES,
    CaptionSpec,
    WorldConfig,
    caption,
    clip_token_count,
    clip_tokens,
    english_vocabulary,
    generate_world,
    load_world_meta,
    pairs_digest,
    render,
    world_digest,
    write_url_list,
)
from omnidiff.world.attributes import BACKGROUND_RGB, COLOUR_RGB
from omnidiff.world.captions import CLIP_WINDOW, FILLERS, NUM_TEMPLATES, attribute_words_en, paraphrase
from omnidiff.world.generate import plan_captions, plan_parallel
from tests.fixtures_world import REPO, WORLD_TEST_CONFIG

HELDOUT_TEMPLATE = "/t4"  # configs/world_test.yaml: heldout_templates [4]


def _pairs(world: Path) -> pd.DataFrame:
    return pq.read_table(world / "pairs.parquet").to_pandas()


def _parallel(world: Path) -> pd.DataFrame:
    return pq.read_table(world / "parallel.parquet").to_pandas()


def _eval(world: Path) -> pd.DataFrame:
    return pq.read_table(world / "eval_prompts.parquet").to_pandas()


def _test_cfg(out: Path, *overrides: str) -> WorldConfig:
    return load_config(WorldConfig, WORLD_TEST_CONFIG, [f"out_dir={out}", *overrides])


# --- determinism and layout -------------------------------------------------


def test_same_seed_gives_byte_identical_world(tiny_world: Path, tmp_path: Path) -> None:
    again = generate_world(_test_cfg(tmp_path / "again"))
    assert world_digest(again) == world_digest(tiny_world) == load_world_meta(tiny_world)["digest"]
    for name in ("world.json", "pairs.parquet", "parallel.parquet", "eval_prompts.parquet", "images/000007.png"):
        assert (again / name).read_bytes() == (tiny_world / name).read_bytes(), name
    other = generate_world(_test_cfg(tmp_path / "other", "seed=1"))
    assert world_digest(other) != world_digest(tiny_world)


def test_layout_and_counts(tiny_world: Path) -> None:
    meta = load_world_meta(tiny_world)
    pairs = _pairs(tiny_world)
    assert len(pairs) == meta["counts"]["images"] == 150
    assert sorted(p.name for p in (tiny_world / "images").glob("*.png")) == sorted(Path(p).name for p in pairs["image"])
    assert pairs["image_id"].is_unique
    assert set(pairs["quality"]) == {"clean", "degraded"}
    assert meta["counts"]["degraded_images"] == (pairs["quality"] == "degraded").sum() == 45
    assert meta["config"]["seed"] == 0 and "out_dir" not in meta["config"]
    # Every image of a caption shows what the caption says.
    for _, group in pairs.groupby("caption_id"):
        assert group[["caption", "shape", "colour", "position", "size", "background"]].nunique().max() == 1


def test_existing_world_is_reused_not_rewritten(tiny_world: Path) -> None:
    stamp = (tiny_world / "pairs.parquet").stat().st_mtime_ns
    assert generate_world(_test_cfg(tiny_world)) == tiny_world
    assert (tiny_world / "pairs.parquet").stat().st_mtime_ns == stamp


def test_refuses_to_replace_a_folder_that_is_not_a_world(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tiny world"):
        generate_world(_test_cfg(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --- languages --------------------------------------------------------------


def test_every_trained_language_in_pairs_and_parallel(tiny_world: Path) -> None:
    pairs, parallel = _pairs(tiny_world), _parallel(tiny_world)
    assert set(pairs["lang"]) == set(TRAINED_LANGUAGES)
    counts = pairs["lang"].value_counts()
    assert counts.idxmax() == "en"
    assert set(pairs.loc[pairs["is_long"], "lang"]) == set(TRAINED_LANGUAGES)
    assert set(parallel["lang"]) == set(TRAINED_LANGUAGES) - {"en"}
    english = pairs[pairs["lang"] == "en"]
    assert (english["caption"] == english["caption_en"]).all()
    foreign = pairs[pairs["lang"] != "en"]
    assert (foreign["caption"] != foreign["caption_en"]).all()


def test_no_zero_shot_language_in_training_data(tiny_world: Path) -> None:
    pairs, parallel = _pairs(tiny_world), _parallel(tiny_world)
    assert not set(pairs["lang"]) & set(ZERO_SHOT_LANGUAGES)
    assert not set(parallel["lang"]) & set(ZERO_SHOT_LANGUAGES)
    cyrillic_or_hangul = re.compile(r"[\u0400-\u04ff\uac00-\ud7af]")
    training_texts = [*pairs["caption"], *pairs["caption_en"], *parallel["text"], *parallel["text_en"]]
    assert not [t for t in training_texts if cyrillic_or_hangul.search(t)]
    evals = _eval(tiny_world)
    assert set(evals.loc[evals["zero_shot"], "lang"]) == set(ZERO_SHOT_LANGUAGES)
    assert set(evals.loc[~evals["zero_shot"], "lang"]) == set(TRAINED_LANGUAGES)
    with pytest.raises(ConfigError, match=r"languages\.ru.*zero-shot"):
        WorldConfig(languages={"en": 0.5, "ru": 0.5})


def test_captions_in_every_language_differ_and_share_the_english() -> None:
    spec = CaptionSpec("diamond", "pink", "bottom-right", "small", "grey", template=1)
    texts = {lang: caption(spec, lang) for lang in LANGUAGES}
    assert len(set(texts.values())) == len(LANGUAGES)
    assert texts["en"] == "small pink diamond, in the bottom right corner, grey background"
    assert texts["de"] == "kleine rosa Raute, unten rechts, Hintergrund grau"
    assert texts["zh"] == "小粉色菱形，右下角，灰色背景"


# --- long captions and the English vocabulary -------------------------------


def test_long_captions_put_attributes_after_clip_window(tiny_world: Path) -> None:
    pairs, parallel, evals = _pairs(tiny_world), _parallel(tiny_world), _eval(tiny_world)
    attribute_words = attribute_words_en()
    long_texts = [*pairs.loc[pairs["is_long"], "caption_en"], *parallel.loc[parallel["is_long"], "text_en"],
                  *evals.loc[evals["is_long"], "prompt_en"]]  # fmt: skip
    assert long_texts and len(pairs[pairs["is_long"]]) == 32  # 20% of the captions, per language
    for text in long_texts:
        tokens = clip_tokens(text)
        assert clip_token_count(text) == len(tokens) > CLIP_WINDOW
        assert not set(tokens[:CLIP_WINDOW]) & attribute_words, text
    for row in pairs[pairs["is_long"]].itertuples():
        tail = clip_tokens(row.caption_en)[CLIP_WINDOW:]
        assert row.shape in tail and row.colour in tail and row.size in tail and row.background in tail
    short = [*pairs.loc[~pairs["is_long"], "caption_en"], *evals.loc[~evals["is_long"], "prompt_en"]]
    assert max(clip_token_count(t) for t in short) < CLIP_WINDOW - 2
    # Long captions in every language start with the same filler, not with the attributes.
    long_zh = pairs[pairs["is_long"] & (pairs["lang"] == "zh")]
    assert all(any(text.startswith(f["zh"]) for f in FILLERS) for text in long_zh["caption"])


def test_english_vocabulary_covers_every_english_text(tiny_world: Path) -> None:
    vocab = set(english_vocabulary())
    pairs, parallel, evals = _pairs(tiny_world), _parallel(tiny_world), _eval(tiny_world)
    for text in [*pairs["caption_en"], *parallel["text_en"], *evals["prompt_en"]]:
        missing = set(clip_tokens(text)) - vocab
        assert not missing, (text, missing)
    assert all(re.fullmatch(r"[a-z]+|[^\w\s]", w) for w in vocab)
    assert {"circle", "cyan", "corner", "background", ",", "."} <= vocab
    assert clip_tokens("A large, red Circle.") == ["a", "large", ",", "red", "circle", "."]


def test_the_parallel_lexicon_lists_every_attribute_word_alone(tiny_world: Path, tmp_path: Path) -> None:
    """``parallel_lexicon``: beside the parallel sentences, each non-English trained language's attribute words with
    their English, in the dictionary's form (German's undeclined "rot", which the training phrasings decline)."""
    from omnidiff.world.attributes import ATTRIBUTES, PROMPT_ATTRIBUTES
    from omnidiff.world.captions import lexicon

    assert not _parallel(tiny_world)["template_id"].str.endswith("/lexicon").any()  # off by default
    world = generate_world(_test_cfg(tmp_path / "lexicon", "parallel_lexicon=true"))
    parallel = _parallel(world)
    words = parallel[parallel["template_id"].str.endswith("/lexicon")]
    english_words = {en for _, en in lexicon("en")}
    assert len(english_words) == sum(len(ATTRIBUTES[name]) for name in PROMPT_ATTRIBUTES)  # one per value
    for lang in sorted(set(TRAINED_LANGUAGES) - {"en"}):
        mine = words[words["lang"] == lang]
        assert sorted(zip(mine["text"], mine["text_en"], strict=True)) == lexicon(lang)
        assert set(mine["text_en"]) == english_words, lang  # every attribute value, in every language
        assert (mine["template_id"] == f"{lang}/lexicon").all() and not mine["is_long"].any()
    german = dict(lexicon("de"))
    assert german["rot"] == "red" and german["türkis"] == "cyan" and german["groß"] == "large"
    cfg = _test_cfg(tiny_world)
    captions = plan_captions(cfg)
    german_words = {w for spec, lang in captions if lang == "de" for w in caption(spec, lang).split()}
    assert german_words & {"rote", "roter", "rotes"} and "rot" not in german_words  # only declined in training
    # The sentence pairs are the same rows, drawn from the same random stream, with or without the words ...
    assert parallel.drop(words.index).reset_index(drop=True).equals(_parallel(tiny_world))
    # ... and the images and training pairs are the same bytes: the base model (named by them) is the same one
    assert world_digest(world) != world_digest(tiny_world)
    assert pairs_digest(world) == pairs_digest(tiny_world) == load_world_meta(tiny_world)["pairs_digest"]


def test_paraphrases_are_stage_one_text_in_phrasings_no_caption_or_prompt_uses(tiny_world: Path, tmp_path: Path) -> None:
    """``num_paraphrases``: more parallel pairs, English included, each a translation of an English paraphrase that
    is none of the caption templates (so none is the held-out phrasing); the base tokenizer knows every English word."""
    from omnidiff.world.captions import NUM_PARAPHRASES, short_caption

    assert not _parallel(tiny_world)["template_id"].str.contains("/p").any()  # off by default
    world = generate_world(_test_cfg(tmp_path / "para", "num_paraphrases=90"))
    parallel = _parallel(world)
    para = parallel[parallel["template_id"].str.contains("/p")]
    assert len(para) == 90
    trained = set(_test_cfg(tiny_world).languages)
    assert set(para["lang"]) == trained  # English too: its text is its own English side
    english = para[para["lang"] == "en"]
    assert (english["text"] == english["text_en"]).all()
    vocab = set(english_vocabulary())
    for text in para["text_en"]:
        assert set(clip_tokens(text)) <= vocab, text
    # No paraphrase is a template: render one spec every way and compare the phrasings word for word.
    spec = CaptionSpec("cross", "blue", "top-left", "small", "white", template=0)
    for lang in TRAINED_LANGUAGES:
        templates = {short_caption(dataclasses.replace(spec, template=t), lang) for t in range(NUM_TEMPLATES)}
        paraphrases = {paraphrase(spec, lang, k) for k in range(NUM_PARAPHRASES)}
        assert len(paraphrases) == NUM_PARAPHRASES and not paraphrases & templates, lang
    # German paraphrases decline after "einem" / "einer" (dative) and keep "rosa" whole.
    assert paraphrase(spec, "de", 1) == "weißer Hintergrund mit einem kleinen blauen Kreuz oben links"
    assert "einer großen rosa Raute" in paraphrase(dataclasses.replace(spec, shape="diamond", colour="pink",
                                                                       size="large"), "de", 1)
    # Paraphrases never name a held-out combination, and the other rows and the images are the same.
    held = {tuple(c.split("/")) for c in _test_cfg(tiny_world).heldout_combos}
    for text in para["text_en"]:
        assert not any(f"{colour} {shape}" in text or f"{shape}, {colour}" in text for shape, colour in held), text
    assert parallel.drop(para.index).reset_index(drop=True).equals(_parallel(tiny_world))
    assert pairs_digest(world) == pairs_digest(tiny_world)
    long = para[para["is_long"]]
    assert len(long) and all(text.endswith((".", "。")) for text in long["text"])  # the sentence after the filler


# --- held-out phrasings and combinations ------------------------------------


def test_heldout_combos_and_phrasings_only_in_eval(tiny_world: Path) -> None:
    cfg = _test_cfg(tiny_world)
    held = {tuple(c.split("/")) for c in cfg.heldout_combos}
    pairs, parallel, evals = _pairs(tiny_world), _parallel(tiny_world), _eval(tiny_world)
    assert not set(zip(pairs["shape"], pairs["colour"], strict=True)) & held
    assert not pairs["template_id"].str.endswith(HELDOUT_TEMPLATE).any()
    assert not parallel["template_id"].str.endswith(HELDOUT_TEMPLATE).any()
    for text in parallel["text_en"]:  # parallel rows carry no attributes: read them off the English
        tail = clip_tokens(text)[-25:]
        assert not any(shape in tail and colour in tail for shape, colour in held), text

    combo = evals[evals["heldout_reason"] == "combo"]
    assert combo.size and set(zip(combo["shape"], combo["colour"], strict=True)) <= held
    phrasing = evals[evals["heldout_reason"] == "phrasing"]
    assert phrasing.size and phrasing["template_id"].str.endswith(HELDOUT_TEMPLATE).all()
    seen = evals[evals["heldout_reason"] == "none"]
    assert seen.size and not set(zip(seen["shape"], seen["colour"], strict=True)) & held
    assert not seen["template_id"].str.endswith(HELDOUT_TEMPLATE).any()


def test_eval_prompts_are_a_fixed_set_over_every_language(tiny_world: Path) -> None:
    evals = _eval(tiny_world)
    assert list(evals.columns) == ["prompt", "lang", "prompt_en", "shape", "colour", "position", "size",
                                   "background", "is_long", "template_id", "heldout_reason", "zero_shot",
                                   "spec_id"]  # fmt: skip
    assert set(evals["lang"]) == set(LANGUAGES)
    assert set(evals["is_long"]) == {True, False}
    assert (evals.groupby("lang")["is_long"].sum() == 2).all()  # 8 specs x 25% long
    # Each spec is asked in every language with the same English parallel and ground truth.
    per_spec = evals.groupby("spec_id")
    assert (per_spec["lang"].nunique() == len(LANGUAGES)).all()
    assert (per_spec[["prompt_en", "shape", "colour", "heldout_reason"]].nunique() == 1).all().all()
    assert (evals.loc[evals["lang"] == "en", "prompt"] == evals.loc[evals["lang"] == "en", "prompt_en"]).all()


def test_shipped_world_is_sized_for_five_minutes_and_cheap_embedding() -> None:
    cfg = load_config(WorldConfig, REPO / "configs" / "world.yaml")
    assert 2500 <= cfg.num_images <= 3500 and cfg.num_parallel == 2000
    captions = plan_captions(cfg)
    langs = pd.Series([lang for _, lang in captions])
    assert langs.value_counts().idxmax() == "en" and set(langs) == set(TRAINED_LANGUAGES)
    assert abs(np.mean([spec.is_long for spec, _ in captions]) - 0.2) < 0.01
    parallel = plan_parallel(cfg, captions)
    texts = {caption(s, lang) for s, lang in captions} | {caption(s, "en") for s, _ in captions}
    texts |= {r["text"] for r in parallel} | {r["text_en"] for r in parallel}
    assert len(texts) < 6500  # 6189 with the 1200 paraphrases (embed: ~60 s more on 2 cores)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="long_min_prefix_tokens=50"):
        WorldConfig(long_min_prefix_tokens=50)
    with pytest.raises(ConfigError, match=r"heldout_combos\[0\]='circle/mauve'"):
        WorldConfig(heldout_combos=("circle/mauve",))
    with pytest.raises(ConfigError, match="languages"):
        WorldConfig(languages={"en": 0.5, "zh": 0.2})
    with pytest.raises(ConfigError, match="num_parallel"):
        WorldConfig(num_captions=10, num_parallel=500)


# --- rendering --------------------------------------------------------------


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_render_draws_the_asked_colour_at_the_asked_place(resolution: int) -> None:
    for position, (qx, qy) in {"top-left": (0, 0), "bottom-right": (1, 1), "top-right": (1, 0)}.items():
        for colour in ("cyan", "red"):
            attrs = {"shape": "square", "colour": colour, "position": position, "size": "large", "background": "grey"}
            pixels = np.asarray(render(attrs, resolution)).astype(int)  # (H, W, 3)
            assert pixels.shape == (resolution, resolution, 3)
            on_shape = np.abs(pixels - COLOUR_RGB[colour]).sum(-1) < 30
            on_bg = np.abs(pixels - BACKGROUND_RGB["grey"]).sum(-1) < 30
            assert on_shape.sum() > 0.1 * resolution**2 and on_bg.sum() > 0.4 * resolution**2
            ys, xs = np.nonzero(on_shape)
            assert (xs.mean() > resolution / 2) == bool(qx) and (ys.mean() > resolution / 2) == bool(qy)


def test_shapes_differ_and_degraded_is_seeded() -> None:
    base = {"colour": "blue", "position": "centre", "size": "small", "background": "white"}
    masks = [np.asarray(render({**base, "shape": s}, 16)).tobytes() for s in ATTRIBUTES["shape"]]
    assert len(set(masks)) == len(ATTRIBUTES["shape"])
    attrs = {**base, "shape": "cross", "quality": "degraded"}
    clean = np.asarray(render({**attrs, "quality": "clean"}, 32)).astype(float)
    a, b, c = (np.asarray(render(attrs, 32, seed=s)).astype(float) for s in (1, 1, 2))
    assert (a == b).all() and not (a == c).all()
    assert np.abs(a - clean).mean() > 8  # visibly worse, which an aesthetic scorer can pick up
    with pytest.raises(ValueError, match="attrs\\['colour'\\]='mauve'"):
        render({**base, "shape": "circle", "colour": "mauve"}, 16)


# --- url lists and the HTTP server ------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_url_list_formats_are_readable(tiny_world: Path, tmp_path: Path, fmt: str) -> None:
    path = write_url_list(tiny_world, "http://127.0.0.1:9/", fmt, out_path=tmp_path / f"urls.{fmt}")
    if fmt == "parquet":
        table = pq.read_table(path).to_pandas()
    elif fmt == "csv":
        table = pacsv.read_csv(path).to_pandas()
    elif fmt == "tsv":
        table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t")).to_pandas()
    else:
        table = pd.read_json(path, lines=True, dtype=False)
    pairs = _pairs(tiny_world)
    assert list(table.columns[:4]) == ["url", "caption", "lang", "caption_en"]
    assert {"shape", "colour", "position", "size", "background", "is_long", "template_id"} <= set(table.columns)
    assert len(table) == len(pairs)
    assert list(table["caption"]) == list(pairs["caption"])  # commas, quotes, CJK survive the round trip
    assert list(table["url"]) == [f"http://127.0.0.1:9/{p}" for p in pairs["image"]]
    assert list(table["is_long"].astype(bool)) == list(pairs["is_long"])
    with pytest.raises(ValueError, match="fmt='xml'"):
        write_url_list(tiny_world, "http://127.0.0.1:9", "xml")


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, b"", ""


def test_server_serves_the_png_bytes(tiny_world: Path, world_server: str) -> None:
    rel = _pairs(tiny_world)["image"].iloc[3]
    status, body, ctype = _get(f"{world_server}/{rel}")
    assert (status, ctype) == (200, "image/png")
    assert body == (tiny_world / rel).read_bytes()
    for bad in ("/pairs.parquet", "/images/../world.json", "/images/nope.png", "/"):
        assert _get(world_server + bad)[0] == 404, bad


def test_standalone_server_process(tiny_world: Path, tmp_path: Path) -> None:
    url_file = tmp_path / "url"
    cmd = [sys.executable, "-m", "omnidiff.cli", "world", "serve", "--world-dir", str(tiny_world), "--port", "0",
           "--url-file", str(url_file)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not url_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert url_file.exists(), proc.stdout.read() if proc.poll() is not None else "server did not start"
        base = url_file.read_text().strip()
        assert _get(base + "/healthz")[0] == 200
        assert _get(f"{base}/images/000000.png")[1] == (tiny_world / "images" / "000000.png").read_bytes()
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_cli_generate_and_urls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from omnidiff.world.cli import main

    out = tmp_path / "w"
    assert main(["generate", "--config", str(WORLD_TEST_CONFIG), f"out_dir={out}", "num_captions=10",
                 "num_parallel=8", "eval_specs=2"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["world_dir"] == str(out.resolve()) and printed["images"] == 20
    assert main(["urls", "--world-dir", str(out), "--base-url", "http://127.0.0.1:1", "--format", "csv"]) == 0
    assert (out / "urls.csv").is_file()
    assert main(["generate", "--config", str(WORLD_TEST_CONFIG), "languages.ko=0.1"]) == 2
    assert "zero-shot" in capsys.readouterr().err
