"""Collect stage, the parts that need no download: readers, caption/url checks, language, reasons,
aesthetic scorer, snapshot format, config.

    .venv/bin/pytest tests/test_collect_units.py -x -q
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.config import CollectConfig, ColumnsConfig
from data_prep.readers import CollectError, read_parallel_lists, read_url_lists
from omnidiff.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------------------------------------ reasons


@pytest.mark.parametrize(
    ("status", "message", "reason"),
    [
        ("success", None, None),
        ("failed_to_download", "HTTP Error 404: Not Found", "http_404"),
        ("failed_to_download", "HTTP Error 500: Internal Server Error", "http_500"),
        ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection_refused"),
        ("failed_to_download", "unknown url type: 'notaurl'", "malformed_url"),
        ("failed_to_download", "<urlopen error no host given>", "malformed_url"),
        ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", "dns_error"),
        ("failed_to_download", "The read operation timed out", "timeout"),
        ("failed_to_download", "IncompleteRead(100 bytes read, 4900 more expected)", "incomplete_download"),
        ("failed_to_download", "Remote end closed connection without response", "connection_error"),
        ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "disallowed_by_robots"),
        ("failed_to_resize", "Image decoding error", "decode_error"),
        ("failed_to_resize", "image area too large", "too_large"),
        ("failed_to_resize", "image too large: 3000000 bytes > max_image_bytes=1000000", "too_large"),
        ("failed_to_resize", "image too small", "too_small"),
        ("failed_to_resize", "not an image: 30 bytes starting b'<html>'", "not_an_image"),
        ("failed_to_resize", "decode error: OSError: image file is truncated", "truncated_image"),
        ("failed_to_resize", "something new", "resize_error"),
        ("failed_to_download", "something new", "download_error"),
    ],
)
def test_reason_for(status, message, reason):
    from data_prep.download import reason_for

    assert reason_for(status, message) == reason


def _png(size=(32, 32), noise=False, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8) if noise else np.full((size[1], size[0], 3), 200,
                                                                                              np.uint8)  # fmt: skip
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(size=(64, 64)) -> bytes:
    array = np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_checking_resizer_names_what_is_wrong():
    """The resizer img2dataset runs in its workers, called directly on payloads."""
    from data_prep.download import reason_for
    from data_prep.resizer import CheckingResizer

    resizer = CheckingResizer(image_size=16, resize_mode="border", resize_only_if_bigger=False, encode_format="png",
                              encode_quality=9, max_image_area=1_000_000, max_image_bytes=200_000,
                              verify_images=True)  # fmt: skip

    def reason(data: bytes) -> str | None:
        *_, error = resizer(io.BytesIO(data))
        return reason_for("failed_to_resize" if error else "success", error)

    good = _png()
    img, width, height, *_rest, error = resizer(io.BytesIO(good))
    assert error is None and (width, height) == (16, 16) and Image.open(io.BytesIO(img)).size == (16, 16)
    assert reason(b"<!DOCTYPE html><html><body>not found</body></html>") == "not_an_image"
    assert reason(b"") == "not_an_image"
    assert reason(_png(noise=True)[:300]) == "truncated_image"
    jpeg = _jpeg()
    assert reason(jpeg[: len(jpeg) * 2 // 3]) == "truncated_image"
    assert reason(_png(size=(2000, 1000))) == "too_large"  # 2M pixels > 1M, refused before decoding
    assert reason(good + b"\0" * 300_000) == "too_large"  # bytes over max_image_bytes
    # without verification, img2dataset's own decoder decides (and calls a non-image a decoding error)
    plain = CheckingResizer(image_size=16, resize_mode="border", resize_only_if_bigger=False, encode_format="png",
                            encode_quality=9, max_image_bytes=200_000, verify_images=False)  # fmt: skip
    assert plain(io.BytesIO(b"<html></html>"))[-1] == "Image decoding error"


# ------------------------------------------------------------------------------------------------ aesthetic


def test_image_quality_separates_the_worlds_clean_and_degraded_images(tiny_world):
    import cv2

    from data_prep.aesthetic import ImageQualityScorer

    pairs = pq.read_table(tiny_world / "pairs.parquet", columns=["image", "quality"]).to_pylist()
    images = []
    for row in pairs:  # as img2dataset stores them: area-downscaled to 16x16
        rgb = np.asarray(Image.open(tiny_world / row["image"]).convert("RGB"))
        images.append(cv2.resize(rgb, (16, 16), interpolation=cv2.INTER_AREA))
    scores = ImageQualityScorer()(images)
    assert scores.shape == (len(pairs),) and scores.dtype == np.float32
    quality = np.array([r["quality"] for r in pairs])
    assert {"clean", "degraded"} <= set(quality)
    assert scores[quality == "clean"].min() > scores[quality == "degraded"].max()
    assert np.array_equal(scores, ImageQualityScorer()(images))  # deterministic


def test_build_scorer(tmp_path, monkeypatch):
    from data_prep.aesthetic import ImageQualityScorer, build_scorer

    assert isinstance(build_scorer("image_quality"), ImageQualityScorer)
    assert build_scorer("data_prep.aesthetic:ImageQualityScorer", {"noise_scale": 5.0}).noise_scale == 5.0
    with pytest.raises(ValueError, match="aesthetic_scorer='laion'.*unknown"):
        build_scorer("laion")
    with pytest.raises(ValueError, match="cannot import"):
        build_scorer("no_such_module_xyz:Scorer")


# ------------------------------------------------------------------------------------------------ snapshot


def _write_snapshot(root: Path, rows: int = 5, name: str = "unit") -> Path:
    from data_prep.snapshot import SnapshotWriter

    writer = SnapshotWriter(name, root=root)
    writer.write_shard("pairs", pa.table({"key": [f"k{i}" for i in range(rows)], "caption": ["c"] * rows}))
    writer.write_shard("pairs", pa.table({"key": ["k_last"], "caption": ["d"]}))
    writer.write_shard("parallel", pa.table({"key": ["p"], "text": ["t"], "text_en": ["e"]}))
    writer.write_shard("quarantine", pa.table({"reason": ["empty_caption"]}))
    return writer.finish({"counts": {"pairs": {"kept": rows + 1}}})


def test_snapshot_roundtrip_digest_and_latest(tmp_path):
    from data_prep.snapshot import Snapshot, latest_snapshot

    path = _write_snapshot(tmp_path)
    snap = Snapshot.open(path)
    assert path.name == snap.digest[:16] and len(snap.digest) == 64
    assert snap.pairs().column("key").to_pylist() == ["k0", "k1", "k2", "k3", "k4", "k_last"]
    assert snap.parallel().num_rows == 1 and snap.quarantine().num_rows == 1
    assert latest_snapshot("unit", root=tmp_path) == path
    assert not list(path.parent.glob(".staging-*")) and not list(path.rglob(".*.tmp"))
    # the same content twice: same folder; different content: new folder and LATEST moves
    assert _write_snapshot(tmp_path) == path
    other = _write_snapshot(tmp_path, rows=6)
    assert other != path and latest_snapshot("unit", root=tmp_path) == other


def test_corrupt_or_missing_snapshot_is_named(tmp_path):
    from data_prep.snapshot import Snapshot, SnapshotError, latest_snapshot

    path = _write_snapshot(tmp_path)
    shard = path / "pairs" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=r"shard pairs/part-00001.parquet is corrupt"):
        Snapshot.open(path)
    shard.unlink()
    with pytest.raises(SnapshotError, match=r"shard pairs/part-00001.parquet is missing"):
        Snapshot.open(path)
    with pytest.raises(SnapshotError, match="no manifest.json"):
        Snapshot.open(tmp_path)
    with pytest.raises(SnapshotError, match="no snapshot named 'nope'"):
        latest_snapshot("nope", root=tmp_path)


def test_dead_writers_staging_is_removed(tmp_path):
    from data_prep.snapshot import SnapshotWriter

    stale = tmp_path / "unit" / ".staging-999999999-deadbeef"
    stale.mkdir(parents=True)
    SnapshotWriter("unit", root=tmp_path).abort()
    assert not stale.exists()


def test_split_is_deterministic_by_key():
    from data_prep.collect import split_of
    from omnidiff.text import text_key

    keys = [text_key(str(i)) for i in range(4000)]
    splits = [split_of(k, 0.1) for k in keys]
    assert splits == [split_of(k, 0.1) for k in keys]
    assert 0.08 < splits.count("val") / len(keys) < 0.12
    assert all(split_of(k, 0.0) == "train" for k in keys)


# ------------------------------------------------------------------------------------------------ config


def test_config_validation_names_key_and_value():
    with pytest.raises(ConfigError, match=r"url_lists=\[\]: give at least one url list"):
        CollectConfig()
    with pytest.raises(ConfigError, match=r"download.encode_quality=95: png compression level"):
        CollectConfig(url_lists=("a.parquet",), download={"encode_quality": 95})
    with pytest.raises(ConfigError, match=r"val_fraction=1.5"):
        load_config(CollectConfig, None, ["url_lists=[a.csv]", "val_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"long_caption='drop'"):
        load_config(CollectConfig, None, ["url_lists=[a.csv]", "long_caption=drop"])
    with pytest.raises(ConfigError, match=r"name='a/b'"):
        CollectConfig(name="a/b", url_lists=("a.parquet",))


@pytest.mark.parametrize("name", ["collect.yaml", "collect_test.yaml"])
def test_shipped_configs_load(name):
    from omnidiff.config import load_any

    cfg = load_any(REPO / "configs" / name)
    assert isinstance(cfg, CollectConfig) and cfg.download.image_size == 16


def test_flow_retries_only_transient_failures():
    from data_prep.download import DownloadError
    from flows.collect import is_transient

    assert is_transient(DownloadError("killed")) and is_transient(ConnectionRefusedError()) and is_transient(
        TimeoutError())  # fmt: skip
    assert not is_transient(CollectError("missing column")) and not is_transient(ConfigError("bad"))


def test_cli_bad_config_exits_2_and_names_it(tmp_path, capsys):
    from data_prep.cli import main

    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["--config", str(REPO / "configs" / "collect_test.yaml"), f"url_lists=[{tmp_path}/none.parquet]"]) == 2
    err = capsys.readouterr().err
    assert "none.parquet" in err and "does not exist" in err
    assert main(["show", "no-such-snapshot"]) == 2
    assert "no snapshot named 'no-such-snapshot'" in capsys.readouterr().err


def test_flat_metrics_and_chart():
    from data_prep.collect import counts_figure, flat_metrics

    counts = {t: {"input_rows": 10, "kept": 7, "quarantined": 3, "lang_mismatch": 1,
                  "quarantined_by_reason": {"http_404": 2, "duplicate": 1}, "by_language": {"en": 4, "zh": 3},
                  "by_split": {"train": 6, "val": 1}} for t in ("pairs", "parallel")}  # fmt: skip
    metrics = flat_metrics(counts)
    assert metrics["pairs.quarantined.http_404"] == 2 and metrics["parallel.lang.zh"] == 3
    assert metrics["pairs.split.val"] == 1
    fig = counts_figure(counts)
    assert len(fig.axes) == 3 and [t.get_text() for t in fig.axes[2].get_xticklabels()] == ["http_404", "duplicate"]

