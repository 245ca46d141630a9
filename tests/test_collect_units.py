"""Collect stage, the parts that need no download: reasons, the checking resizer, aesthetic scorer,
snapshot format, split, config, CLI and MLflow metrics (the input side is tests/test_collect_inputs.py).

    .venv/bin/pytest tests/test_collect_units.py -x -q
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.config import CollectConfig
from data_prep.readers import CollectError
from omnidiff.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


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
    from omnidiff.contracts.snapshot import SnapshotWriter

    writer = SnapshotWriter(name, root=root)
    writer.write_shard("pairs", pa.table({"key": [f"k{i}" for i in range(rows)], "caption": ["c"] * rows}))
    writer.write_shard("pairs", pa.table({"key": ["k_last"], "caption": ["d"]}))
    writer.write_shard("parallel", pa.table({"key": ["p"], "text": ["t"], "text_en": ["e"]}))
    writer.write_shard("quarantine", pa.table({"reason": ["empty_caption"]}))
    return writer.finish({"counts": {"pairs": {"kept": rows + 1}}})


def test_snapshot_roundtrip_digest_and_latest(tmp_path):
    from omnidiff.contracts.snapshot import Snapshot, latest_snapshot

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
    from omnidiff.contracts.snapshot import Snapshot, SnapshotError, latest_snapshot

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
    from omnidiff.contracts.snapshot import SnapshotWriter

    stale = tmp_path / "unit" / ".staging-999999999-deadbeef"
    stale.mkdir(parents=True)
    SnapshotWriter("unit", root=tmp_path).abort()
    assert not stale.exists()


def test_split_is_deterministic_by_key():
    from data_prep.tables import split_of
    from omnidiff.contracts.keys import text_key

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
    from data_prep.report import counts_figure, flat_metrics

    counts = {t: {"input_rows": 10, "kept": 7, "quarantined": 3, "lang_mismatch": 1,
                  "quarantined_by_reason": {"http_404": 2, "duplicate": 1}, "by_language": {"en": 4, "zh": 3},
                  "by_split": {"train": 6, "val": 1}} for t in ("pairs", "parallel")}  # fmt: skip
    metrics = flat_metrics(counts)
    assert metrics["pairs.quarantined.http_404"] == 2 and metrics["parallel.lang.zh"] == 3
    assert metrics["pairs.split.val"] == 1
    fig = counts_figure(counts)
    assert len(fig.axes) == 3 and [t.get_text() for t in fig.axes[2].get_xticklabels()] == ["http_404", "duplicate"]

