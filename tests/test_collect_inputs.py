"""Collect stage, the input side (no download): url-list and parallel readers, caption/url checks, language.

    .venv/bin/pytest tests/test_collect_inputs.py -x -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.config import CollectConfig, ColumnsConfig
from data_prep.readers import CollectError, read_parallel_lists, read_url_lists

# ------------------------------------------------------------------------------------------------ readers


def _write(path: Path, rows: list[dict]) -> Path:
    import pyarrow.csv as pa_csv

    table = pa.Table.from_pylist(rows)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix in (".csv", ".tsv"):
        pa_csv.write_csv(table, path, pa_csv.WriteOptions(delimiter="\t" if path.suffix == ".tsv" else ","))
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_laion_and_img2dataset_names_need_no_configuration(tmp_path):
    laion = _write(tmp_path / "laion.parquet", [
        {"URL": "http://h/a.png", "TEXT": "a red circle", "LANGUAGE": "en", "similarity": 0.31, "WIDTH": 64},
    ])  # fmt: skip
    i2d = _write(tmp_path / "i2d.csv", [{"url": "http://h/b.png", "caption": "un carré bleu", "licence": "cc-by"}])
    tsv = _write(tmp_path / "more.tsv", [{"url": "http://h/c.png", "caption": "ein grünes Dreieck"}])
    jsonl = _write(tmp_path / "more.jsonl", [{"url": "http://h/d.png", "caption": "緑の三角形", "caption_en": "a green "
                                              "triangle", "width": 7}])  # fmt: skip
    table, sources = read_url_lists([laion, i2d, tsv, jsonl], ColumnsConfig())
    assert table.column("url").to_pylist() == ["http://h/a.png", "http://h/b.png", "http://h/c.png", "http://h/d.png"]
    assert table.column("caption_raw").to_pylist()[1] == "un carré bleu"
    assert table.column("lang_declared").to_pylist() == ["en", None, None, None]
    assert table.column("caption_en_raw").to_pylist()[3] == "a green triangle"
    # every extra column is kept; one that would collide with a snapshot column is renamed src_<name>
    assert table.column("similarity").to_pylist()[0] == pytest.approx(0.31)
    assert table.column("WIDTH").to_pylist()[0] == 64
    assert table.column("licence").to_pylist()[1] == "cc-by"
    assert table.column("src_width").to_pylist()[3] == 7
    assert table.column("row_id").to_pylist() == [0, 1, 2, 3]
    assert table.column("source").to_pylist() == ["laion.parquet", "i2d.csv", "more.tsv", "more.jsonl"]
    assert [s.format for s in sources] == ["parquet", "csv", "tsv", "jsonl"]
    assert sources[0].columns == {"url": "URL", "caption": "TEXT", "lang": "LANGUAGE"}
    assert all(len(s.sha256) == 64 for s in sources)


def test_configured_column_names(tmp_path):
    path = _write(tmp_path / "custom.csv", [{"image_link": "http://h/a.png", "alt": "a red circle", "l": "en"}])
    table, _ = read_url_lists([path], ColumnsConfig(url="image_link", caption="alt", lang="l"))
    assert table.column("url").to_pylist() == ["http://h/a.png"]
    assert table.column("lang_declared").to_pylist() == ["en"]
    with pytest.raises(CollectError, match=r"column 'nope' \(columns.caption\) not found"):
        read_url_lists([path], ColumnsConfig(url="image_link", caption="nope"))


def test_missing_required_column_is_named(tmp_path):
    path = _write(tmp_path / "nocaption.parquet", [{"url": "http://h/a.png", "title": "x"}])
    with pytest.raises(CollectError) as err:
        read_url_lists([path], ColumnsConfig())
    message = str(err.value)
    assert "nocaption.parquet" in message and "missing required column 'caption'" in message
    assert "columns.caption" in message and "['url', 'title']" in message
    path = _write(tmp_path / "nourl.jsonl", [{"caption": "a red circle"}])
    with pytest.raises(CollectError, match=r"nourl.jsonl.*missing required column 'url'"):
        read_url_lists([path], ColumnsConfig())


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("broken.parquet", b"PAR1 this is not a parquet file at all"),
        ("truncated.parquet", None),  # a real Parquet file cut in half
        ("broken.jsonl", b'{"url": "http://h/a.png", "caption": "ok"}\n{"url": "http://h/b.png", "caption": \n'),
        ("bad-utf8.csv", b"url,caption\nhttp://h/a.png,\xff\xfe not utf-8\n"),
        ("ragged.tsv", b"url\tcaption\nhttp://h/a.png\ta\textra\tfields\n"),
    ],
)
def test_corrupt_input_file_is_named(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        good = _write(tmp_path / "good.parquet", [{"url": f"http://h/{i}.png", "caption": "c" * 50} for i in range(200)])
        content = good.read_bytes()[: good.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CollectError) as err:
        read_url_lists([path], ColumnsConfig())
    assert name in str(err.value) and "corrupt" in str(err.value)


def test_empty_lists(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    header_only = tmp_path / "header.csv"
    header_only.write_text("url,caption\n")
    good = _write(tmp_path / "good.jsonl", [{"url": "http://h/a.png", "caption": "a red circle"}])
    table, sources = read_url_lists([empty, header_only, good], ColumnsConfig())
    assert table.num_rows == 1 and [s.rows for s in sources] == [0, 0, 1]
    # a run whose lists are all empty is an error that names them (before any download starts)
    from data_prep.collect import run

    with pytest.raises(CollectError, match=r"no rows in any url list.*empty.csv.*header.csv"):
        run(CollectConfig(url_lists=(empty, header_only), track=False))


def test_input_paths(tmp_path):
    with pytest.raises(CollectError, match="does not exist"):
        read_url_lists([tmp_path / "missing.parquet"], ColumnsConfig())
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CollectError, match="unsupported file type"):
        read_url_lists([tmp_path / "notes.txt"], ColumnsConfig())
    folder = tmp_path / "lists"
    folder.mkdir()
    _write(folder / "b.csv", [{"url": "http://h/b.png", "caption": "b"}])
    _write(folder / "a.parquet", [{"url": "http://h/a.png", "caption": "a"}])
    table, sources = read_url_lists([folder], ColumnsConfig())
    assert [s.name for s in sources] == ["a.parquet", "b.csv"]
    assert table.column("caption_raw").to_pylist() == ["a", "b"]


def test_parallel_lists(tmp_path):
    path = _write(tmp_path / "par.parquet", [{"lang": "de", "text": "ein roter Kreis", "text_en": "a red circle"}])
    table, sources = read_parallel_lists([path], type("C", (), {"text": None, "text_en": None, "lang": None})())
    assert table.column("text_raw").to_pylist() == ["ein roter Kreis"]
    assert table.column("text_en_raw").to_pylist() == ["a red circle"]
    bad = _write(tmp_path / "noen.csv", [{"text": "ein roter Kreis"}])
    with pytest.raises(CollectError, match=r"parallel list .*noen.csv.*missing required column 'text_en'"):
        read_parallel_lists([bad], type("C", (), {"text": None, "text_en": None, "lang": None})())


# ------------------------------------------------------------------------------------------------ checks


def test_caption_checks():
    from data_prep.normalise import check_caption

    assert check_caption("", 100) == (None, "empty_caption", "caption is null or empty")
    assert check_caption(None, 100)[1] == "empty_caption"
    assert check_caption("  \t\n\u200b \r ", 100)[1] == "whitespace_caption"
    assert check_caption("🙂🎉✨ 🚀", 100)[1] == "no_letters"
    assert check_caption("!!! 123 ...", 100)[1] == "no_letters"
    assert check_caption("  a\tred\u0000 circle\n ", 100) == ("a red circle", None, None)
    # NFC: e + combining acute -> é (one code point)
    assert check_caption("Cafe\u0301 rouge", 100)[0] == "Caf\u00e9 rouge"
    # mixed scripts are kept as they are
    assert check_caption("a red circle 赤い丸 on blue", 100)[0] == "a red circle 赤い丸 on blue"


def test_100kb_caption_quarantined_or_truncated():
    from data_prep.normalise import check_caption

    huge = "a red circle on a blue background. " * 3000  # ~105 KB
    assert len(huge.encode()) > 100_000
    caption, reason, detail = check_caption(huge, 8000)
    assert caption is None and reason == "caption_too_long" and "max_caption_chars=8000" in detail
    caption, reason, _ = check_caption(huge, 8000, long_caption="truncate")
    assert reason is None and len(caption) <= 8000 and huge.startswith(caption)
    with pytest.raises(ValueError, match="long_caption"):
        check_caption("x", 10, long_caption="drop")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (None, "missing_url"), ("", "missing_url"), ("   ", "missing_url"),
        ("notaurl", "malformed_url"), ("http://", "malformed_url"), ("ftp://127.0.0.1/x.png", "malformed_url"),
        ("http://127.0.0.1:99999/x.png", "malformed_url"), ("http://127.0.0.1:abc/x.png", "malformed_url"),
        ("http://exa mple.com/x.png", "malformed_url"), ("javascript:alert(1)", "malformed_url"),
        ("http://127.0.0.1:8000/x.png", None), ("https://example.com/a b.png".replace(" ", "%20"), None),
    ],
)  # fmt: skip
def test_url_checks(url, reason):
    from data_prep.normalise import check_url

    assert check_url(url)[0] == reason


def test_check_rows_caption_first_and_english_side():
    from data_prep.normalise import check_rows

    out = check_rows(["notaurl", "http://h/a.png", "http://h/b.png"], ["", "a red circle", "ein Kreis"],
                     [None, "  ", "a circle\u0000"], 100, "quarantine")  # fmt: skip
    assert out["reason"] == ["empty_caption", None, None]
    assert out["caption_en"] == [None, None, "a circle"]


# ------------------------------------------------------------------------------------------------ language


def test_languages_and_mismatch():
    from data_prep.langid import LanguageDetector, assign_languages, canonical_lang

    assert [canonical_lang(c) for c in ("zh-CN", "EN", "pt_BR", "iw", "", None, "nolang")] == [
        "zh", "en", "pt", "he", None, None, None]
    texts = ["ein roter Kreis auf blauem Hintergrund", "un cercle rouge sur fond bleu", "a red circle 赤い丸 on blue",
             "小粉色圆形，正中间，白色背景", "青い背景に赤い円があります", "a red circle on a blue background"]
    declared = ["fr", "FR", None, "zh", "zh", None]
    out = assign_languages(texts, declared, LanguageDetector(), min_score=0.3)
    assert out["lang_detected"][0] == "de" and out["lang"][0] == "fr" and out["lang_mismatch"][0]  # wrong declared
    assert out["lang"][1] == "fr" and not out["lang_mismatch"][1]
    assert out["lang"][2] in ("ja", "zh", "en") and not out["lang_mismatch"][2]  # mixed scripts: detected, kept
    assert not out["lang_mismatch"][3]  # Han-only zh/ja ambiguity is not a mismatch
    assert out["lang_detected"][4] == "ja" and out["lang_mismatch"][4]  # kana: clearly Japanese, declared zh
    assert out["lang"][5] == "en" and out["lang_detected"][5] == "en"
    # a high threshold flags nothing
    assert not any(assign_languages(texts, declared, LanguageDetector(), min_score=1.0)["lang_mismatch"])


def test_varieties_of_a_macrolanguage_are_no_mismatch():
    """Issue 15: the lite model calls short plain Mandarin captions Wu Chinese ("wuu", ~0.37) and they
    were flagged against their declared "zh"; a variety or a macrolanguage member is the same language."""
    from data_prep.langid import LanguageDetector, assign_languages, canonical_lang, is_mismatch

    assert [canonical_lang(c) for c in ("wuu", "yue", "cmn", "zh-Hant", "nb", "nn", "arz", "pes")] == [
        "zh", "zh", "zh", "zh", "no", "no", "ar", "fa"]
    assert canonical_lang("wuu", macro=False) == "wuu"
    assert not is_mismatch("一张凉鞋的黑白照片", "zh", "wuu", 0.9, 0.3)
    assert not is_mismatch("Et bilde av en rød bil", "nb", "no", 0.9, 0.3)
    assert not is_mismatch("Et bilde av en rød bil", "no", "nn", 0.9, 0.3)
    assert is_mismatch("ein roter Kreis", "zh", "de", 0.9, 0.3)  # other languages still are
    assert is_mismatch("a red circle", "nb", "en", 0.9, 0.3)

    # The caption, through the real detector: it still answers "wuu", and nothing is flagged.
    texts = ["一张凉鞋的黑白照片", "一只红色的猫在桌子上", "一张凉鞋的黑白照片，白色背景"]
    out = assign_languages(texts, ["zh"] * 3, LanguageDetector(), min_score=0.3)
    assert "wuu" in out["lang_detected"], out["lang_detected"]
    assert out["lang"] == ["zh"] * 3 and not any(out["lang_mismatch"]), out
    # Undeclared: the row's language is the macrolanguage, the detector's answer stays in lang_detected.
    out = assign_languages(texts[:1], [None], LanguageDetector(), min_score=0.3)
    assert out["lang"] == ["zh"] and out["lang_detected"] == ["wuu"]
