"""Collect stage end to end: real img2dataset against HTTP servers on 127.0.0.1.

    .venv/bin/pytest tests/test_collect_e2e.py -x -q

* every bad input of issue 3 in one run over three lists (Parquet with LAION names,
  CSV and JSONL with img2dataset names), each row's outcome checked;
* the tiny world collected end to end (``tiny_snapshot``), counts by language in
  the manifest, aesthetic scores that separate clean from degraded images;
* the Prefect flow with MLflow logging (``stack``): a rerun downloads nothing and
  lands in the same snapshot folder; the MLflow run has the counts, the dataset
  inputs, the manifest and the chart;
* a run killed halfway (SIGKILL to img2dataset's process group) resumes without
  duplicates or gaps (on img2dataset's Ray distributor), with the same pairs as an
  uninterrupted run.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import tenacity
from PIL import Image

from tests.fixtures_collect import COLLECT_TEST_CONFIG, collect_test_config

pytestmark = pytest.mark.e2e


class RecordingServer:
    """A threaded HTTP server on 127.0.0.1 that counts requests per path; ``routes(path) -> (status, body, ctype)``."""

    def __init__(self, routes, delay_s: float = 0.0):
        self.requests: Counter = Counter()
        lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                with lock:
                    owner.requests[self.path] += 1
                if delay_s:
                    time.sleep(delay_s)
                status, body, ctype = routes(self.path)
                if status == "drop":  # promise 5000 bytes, send 100, hang up
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", "5000")
                    self.end_headers()
                    self.wfile.write(body[:100])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if status != 200:
                    self.send_error(status)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> RecordingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _shape_png(k: int, side: int = 32) -> bytes:
    """A distinct picture per k: a coloured square on a contrasting background."""
    rng = np.random.default_rng(k)
    array = np.full((side, side, 3), rng.integers(0, 256, 3), np.uint8)
    array[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = rng.integers(0, 256, 3)
    return _png(array)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bad_routes():
    noisy = _png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg_buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg_buf, "JPEG")
    jpeg = jpeg_buf.getvalue()
    green = _png(np.full((32, 32, 3), (0, 160, 0), np.uint8))
    files = {
        "/html": (b"<!DOCTYPE html><html><body>Not the image you wanted</body></html>", "text/html"),
        "/trunc.png": (noisy[: len(noisy) // 2], "image/png"),
        "/trunc.jpg": (jpeg[: len(jpeg) * 2 // 3], "image/jpeg"),
        "/huge-pixels.png": (_png(np.zeros((7000, 7000, 3), np.uint8)), "image/png"),  # 49M px > 40M
        "/huge-bytes.png": (_shape_png(99) + b"\0" * 1_500_000, "image/png"),  # 1.5 MB > 1 MB
        "/same-a.png": (green, "image/png"),
        "/same-b.png": (green, "image/png"),
    }

    def routes(path: str):
        if path in files:
            return 200, *files[path]
        if m := re.fullmatch(r"/img/(\d+)\.png", path):
            return 200, _shape_png(int(m.group(1))), "image/png"
        if path == "/e500":
            return 500, b"", ""
        if path == "/drop.png":
            return "drop", _shape_png(98), "image/png"
        return 404, b"", ""

    return routes


def _bad_lists(base: str, folder: Path) -> tuple[list[Path], dict[tuple[str, int], str]]:
    """Three url lists covering every bad input; expected outcome per (source, row_index)."""
    refused = f"http://127.0.0.1:{_closed_port()}/x.png"
    laion = [  # LAION names: URL, TEXT, LANGUAGE (+ an extra column)
        (f"{base}/img/0.png", "a red circle on a blue background", "en", "kept"),
        (f"{base}/nope.png", "a green square", "en", "http_404"),
        (f"{base}/e500", "a blue star", "en", "http_500"),
        (refused, "a yellow cross", "en", "connection_refused"),
        (f"{base}/html", "a purple diamond", "en", "not_an_image"),
        (f"{base}/trunc.png", "an orange circle", "en", "truncated_image"),
        (f"{base}/trunc.jpg", "a pink square", "en", "truncated_image"),
        (f"{base}/huge-pixels.png", "a big black square", "en", "too_large"),
        (f"{base}/huge-bytes.png", "a black circle", "en", "too_large"),
        (f"{base}/drop.png", "a grey star", "en", "incomplete_download"),
        (None, "a brown triangle", "en", "missing_url"),
        (f"{base}/img/1.png", "ein roter Kreis auf blauem Hintergrund", "fr", "kept"),  # wrong declared language
    ]
    csv_rows = [  # img2dataset names: url, caption (+ lang)
        ("notaurl", "a red square", "en", "malformed_url"),
        ("http://", "a red square", "en", "malformed_url"),
        ("ftp://127.0.0.1/x.png", "a red square", "en", "malformed_url"),
        (f"{base}/img/2.png", "", "en", "empty_caption"),
        (f"{base}/img/3.png", "  \t \n  ", "en", "whitespace_caption"),
        (f"{base}/img/4.png", "🙂🎉✨ 🚀", "en", "no_letters"),
        (f"{base}/img/5.png", "a red circle on a blue background. " * 3000, "en", "caption_too_long"),  # ~105 KB
        (f"{base}/img/6.png", "a red circle 赤い丸 on blue", "en", "kept"),  # mixed scripts
        (f"{base}/img/7.png", "Cafe\u0301 rouge, un cercle sur fond bleu", "fr", "kept"),  # NFD -> NFC
    ]
    jsonl_rows = [
        {"url": f"{base}/img/8.png", "caption": "a blue square", "expect": "kept"},
        {"url": f"{base}/img/8.png", "caption": "a blue square", "expect": "duplicate"},  # same url + caption
        {"url": f"{base}/same-a.png", "caption": "a green triangle", "expect": "kept"},
        {"url": f"{base}/same-b.png", "caption": "a green triangle", "expect": "duplicate"},  # same bytes + caption
        {"url": f"{base}/same-a.png", "caption": "un triangle vert", "caption_en": "a green triangle",
         "expect": "kept"},  # same image, another caption: a different pair
        {"url": None, "caption": "a white circle", "expect": "missing_url"},
        {"url": f"{base}/img/9.png", "caption": " a\u0000 red\u200b circle ", "expect": "kept"},
    ]
    p1 = folder / "laion.parquet"
    pq.write_table(pa.table({"URL": [r[0] for r in laion], "TEXT": [r[1] for r in laion],
                             "LANGUAGE": [r[2] for r in laion], "expect": [r[3] for r in laion],
                             "similarity": [0.3] * len(laion)}), p1)  # fmt: skip
    p2 = folder / "plain.csv"
    pa_csv.write_csv(pa.table({"url": [r[0] for r in csv_rows], "caption": [r[1] for r in csv_rows],
                               "lang": [r[2] for r in csv_rows], "expect": [r[3] for r in csv_rows]}), p2)  # fmt: skip
    p3 = folder / "more.jsonl"
    p3.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in jsonl_rows), encoding="utf-8")
    expected = {("laion.parquet", i): r[3] for i, r in enumerate(laion)}
    expected |= {("plain.csv", i): r[3] for i, r in enumerate(csv_rows)}
    expected |= {("more.jsonl", i): r["expect"] for i, r in enumerate(jsonl_rows)}
    return [p1, p2, p3], expected


def test_every_bad_input_is_quarantined_with_its_reason(tmp_path):
    from data_prep.collect import run
    from omnidiff.contracts.snapshot import Snapshot

    with RecordingServer(_bad_routes()) as server:
        lists, expected = _bad_lists(server.base, tmp_path)
        cfg = collect_test_config(lists, overrides=["name=bad", "download.shard_rows=10", "download.timeout_s=5",
                                                    "download.max_image_bytes=1000000"])  # fmt: skip
        snap = Snapshot.open(run(cfg))
    pairs = snap.pairs().to_pylist()
    quarantine = snap.quarantine().to_pylist()
    outcome = {(r["source"], r["row_index"]): "kept" for r in pairs}
    outcome |= {(r["source"], r["row_index"]): r["reason"] for r in quarantine}
    assert outcome == expected  # every row accounted for, each with the reason we meant to provoke

    counts = snap.counts["pairs"]
    want = Counter(v for v in expected.values() if v != "kept")
    assert counts["quarantined_by_reason"] == dict(want)
    assert counts["input_rows"] == len(expected) == counts["kept"] + counts["quarantined"]
    assert counts["by_source"]["laion.parquet"] == {"input_rows": 12, "kept": 2}

    by_key = {(r["source"], r["row_index"]): r for r in pairs}
    wrong_lang = by_key[("laion.parquet", 11)]
    assert wrong_lang["lang"] == "fr" and wrong_lang["lang_detected"] == "de" and wrong_lang["lang_mismatch"]
    assert by_key[("plain.csv", 7)]["caption"] == "a red circle 赤い丸 on blue"
    assert by_key[("plain.csv", 8)]["caption"] == "Caf\u00e9 rouge, un cercle sur fond bleu"
    assert by_key[("more.jsonl", 6)]["caption"] == "a red circle"
    assert by_key[("more.jsonl", 4)]["caption_en"] == "a green triangle"
    assert by_key[("more.jsonl", 2)]["image_digest"] == by_key[("more.jsonl", 4)]["image_digest"]
    assert by_key[("laion.parquet", 0)]["similarity"] == pytest.approx(0.3)  # extra columns kept
    assert all(Image.open(io.BytesIO(r["image"])).size == (16, 16) for r in pairs)

    q = {(r["source"], r["row_index"]): r for r in quarantine}
    assert len(q[("plain.csv", 6)]["caption"]) > 100_000  # the evidence is kept as it came
    assert json.loads(q[("laion.parquet", 1)]["extra"])["expect"] == "http_404"
    assert "same url and caption as more.jsonl row 0" in q[("more.jsonl", 1)]["detail"]
    assert "same image and caption as more.jsonl row 2" in q[("more.jsonl", 3)]["detail"]
    assert "404" in q[("laion.parquet", 1)]["detail"]
    # rejected by the checks before download: no request was made for them
    assert "/img/2.png" not in server.requests and "/img/5.png" not in server.requests
    assert server.requests["/img/8.png"] == 1


def test_tiny_world_end_to_end(tiny_snapshot, tiny_world, tiny_world_lists):
    from omnidiff.contracts.io import sha256_file
    from omnidiff.contracts.snapshot import Snapshot, latest_snapshot
    from omnidiff.world import load_world_meta

    snap = Snapshot.open(tiny_snapshot)
    assert latest_snapshot("test") == tiny_snapshot and tiny_snapshot.name == snap.digest[:16]
    meta = load_world_meta(tiny_world)["counts"]
    counts = snap.counts["pairs"]
    assert counts["input_rows"] == counts["kept"] == meta["images"] == 150 and counts["quarantined"] == 0
    assert counts["by_language"] == meta["pairs_by_lang"]
    assert set(counts["by_split"]) == {"train", "val"} and sum(counts["by_split"].values()) == 150
    par = snap.counts["parallel"]
    assert par["kept"] == par["input_rows"] == meta["parallel"] and par["by_language"] == meta["parallel_by_lang"]
    url_list, parallel_list = tiny_world_lists
    sources = snap.manifest["sources"]
    assert sources["url_lists"][0]["sha256"] == sha256_file(url_list)
    assert sources["parallel_lists"][0]["sha256"] == sha256_file(parallel_list)
    assert [s["rows"] for s in snap.manifest["shards"]["pairs"]] == [64, 64, 22]

    pairs = snap.pairs().to_pandas()
    assert pairs["key"].is_unique and len(pairs) == 150
    world = pq.read_table(tiny_world / "pairs.parquet").to_pandas()
    assert sorted(pairs["caption"]) == sorted(world["caption"])
    assert all(Image.open(io.BytesIO(b)).size == (16, 16) for b in pairs["image"])
    # the aesthetic scorer ranks every clean image above every degraded one (ground truth kept as an extra)
    clean = pairs.loc[pairs["quality"] == "clean", "aesthetic"]
    degraded = pairs.loc[pairs["quality"] == "degraded", "aesthetic"]
    assert len(degraded) > 0 and clean.min() > degraded.max()
    assert set(pairs.columns) >= {"key", "caption", "caption_en", "lang", "lang_detected", "lang_mismatch", "image",
                                  "image_digest", "width", "height", "aesthetic", "split", "url", "source"}
    parallel = snap.parallel().to_pandas()
    assert parallel["key"].is_unique and set(parallel["split"]) <= {"train", "val"}


def test_flow_logs_to_mlflow_and_rerun_downloads_nothing(stack, tiny_snapshot, tiny_world_lists):
    import mlflow
    from mlflow import MlflowClient

    from flows.collect import collect_flow
    from omnidiff.contracts.snapshot import Snapshot

    url_list, parallel_list = tiny_world_lists
    cfg = collect_test_config([url_list], [parallel_list], overrides=["track=true"])
    path = collect_flow(cfg)
    assert Path(path) == tiny_snapshot  # same lists, same content -> the same folder
    snap = Snapshot.open(path)

    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string=f"tags.stage = 'collect' and tags.snapshot_digest = '{snap.digest}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags.get("prefect.flow_run_id")
    metrics = run.data.metrics
    assert metrics["download.shards_new"] == 0 and metrics["download.shards"] == 3  # nothing downloaded again
    assert metrics["pairs.kept"] == 150 and metrics["parallel.kept"] == snap.counts["parallel"]["kept"]
    for lang, n in snap.counts["pairs"]["by_language"].items():
        assert metrics[f"pairs.lang.{lang}"] == n
    contexts = Counter({t.key: t.value for t in i.tags}["mlflow.data.context"] for i in run.inputs.dataset_inputs)
    assert contexts == {"pair_snapshot": 1, "url_list": 1, "parallel_list": 1}
    snapshot_input = [i for i in run.inputs.dataset_inputs if i.dataset.name == "pairs:test"][0]
    assert snapshot_input.dataset.digest == snap.digest[:16]
    assert json.loads(snapshot_input.dataset.profile)["num_rows"] == 150
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "snapshot")}
    assert artifacts == {"snapshot/manifest.json", "snapshot/counts.png"}
    manifest = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                   artifact_path="snapshot/manifest.json")).read_text())
    assert manifest["digest"] == snap.digest and manifest["counts"] == snap.counts
    assert json.loads(run.data.tags["sources"])[0]["sha256"] == snap.manifest["sources"]["url_lists"][0]["sha256"]


def _world_routes(world: Path):
    def routes(path: str):
        file = world / path.lstrip("/")
        if re.fullmatch(r"/images/\w+\.png", path) and file.is_file():
            return 200, file.read_bytes(), "image/png"
        return 404, b"", ""

    return routes


def test_killed_run_resumes_without_duplicates_or_gaps(stack, tiny_world, tiny_snapshot, tmp_path, capsys):
    """Killed under img2dataset's multiprocessing distributor, resumed under its Ray distributor (the stack's Ray)."""
    from data_prep.cli import main
    from data_prep.collect import run
    from data_prep.download import DownloadError
    from omnidiff.contracts.snapshot import Snapshot
    from omnidiff.env import home
    from omnidiff.world import write_url_list

    n_shards = 15  # 150 rows / download.shard_rows=10
    overrides = ["name=resume", "download.processes=1", "download.threads=2", "download.shard_rows=10"]
    with RecordingServer(_world_routes(tiny_world), delay_s=0.03) as server:
        url_list = write_url_list(tiny_world, server.base, out_path=tmp_path / "urls.parquet")
        lists = [f"url_lists=[{json.dumps(str(url_list))}]",
                 f"parallel_lists=[{json.dumps(str(tiny_world / 'parallel.parquet'))}]"]
        cfg = collect_test_config([url_list], [tiny_world / "parallel.parquet"], overrides)
        errors: list[BaseException] = []

        def first_run():
            try:
                run(cfg)
            except BaseException as exc:  # noqa: BLE001  (the test inspects it)
                errors.append(exc)

        thread = threading.Thread(target=first_run)
        thread.start()
        downloads = home() / "data" / "collect" / "resume" / "downloads"
        tenacity.Retrying(  # until img2dataset has finished a shard (then kill it halfway)
            stop=tenacity.stop_after_delay(240), wait=tenacity.wait_fixed(0.05),
            retry=tenacity.retry_if_result(lambda done: not done), retry_error_callback=lambda _: None,
        )(lambda: list(downloads.glob("*/shards/*_stats.json")))
        pid_files = list(downloads.glob("*/download.pid"))
        assert pid_files, "img2dataset never started"
        os.killpg(int(pid_files[0].read_text()), signal.SIGKILL)  # the subprocess and its workers
        thread.join(timeout=60)
        assert len(errors) == 1 and isinstance(errors[0], DownloadError) and "signal 9" in str(errors[0])
        shards_dir = pid_files[0].parent / "shards"
        done_before = sorted(int(p.name.split("_")[0]) for p in shards_dir.glob("*_stats.json"))
        assert 1 <= len(done_before) < n_shards, f"not killed halfway: {len(done_before)} shards done"
        assert not list((home() / "data" / "snapshots" / "resume").glob("[0-9a-f]*"))  # nothing published
        requests_before = sum(server.requests.values())

        # resume through the command line, on Ray this time (the shards are the same unit of work)
        assert main(["--config", str(COLLECT_TEST_CONFIG), *lists, *overrides, "download.distributor=ray"]) == 0
        path = Path(capsys.readouterr().out.strip().splitlines()[-1])
        # finished shards were not fetched again; every url at least once
        urls = pq.read_table(url_list, columns=["url"]).column("url").to_pylist()
        paths = ["/" + u.split("/", 3)[3] for u in urls]
        for shard in done_before:
            for p in paths[shard * 10 : shard * 10 + 10]:
                assert server.requests[p] == 1, p
        assert all(server.requests[p] >= 1 for p in paths)
        assert sum(server.requests.values()) - requests_before == 150 - 10 * len(done_before)

        # a third run: nothing to download, the same snapshot
        before = sum(server.requests.values())
        assert run(cfg) == path
        assert sum(server.requests.values()) == before

    snap = Snapshot.open(path)
    pairs = snap.pairs(columns=["key", "row_index", "image_digest", "aesthetic", "caption"]).to_pandas()
    assert sorted(pairs["row_index"]) == list(range(150))  # no gaps
    assert pairs["key"].is_unique  # no duplicates
    assert snap.counts["pairs"]["kept"] == 150 and snap.counts["pairs"]["quarantined"] == 0
    # the same pairs as the uninterrupted tiny_snapshot (keys hash image bytes + caption, not the url)
    reference = Snapshot.open(tiny_snapshot).pairs(columns=["key", "image_digest", "aesthetic"]).to_pandas()
    merged = pairs.merge(reference, on="key", suffixes=("", "_ref"), validate="one_to_one")
    assert len(merged) == 150
    assert (merged["image_digest"] == merged["image_digest_ref"]).all()
    assert np.allclose(merged["aesthetic"], merged["aesthetic_ref"])


def test_served_world_writes_a_url_list_for_its_server(tiny_world, tmp_path):
    import urllib.request

    from data_prep.cli import served_world

    with served_world(tiny_world, port=0, list_dir=tmp_path) as (url_list, parallel_list):
        assert url_list == tmp_path / "urls.parquet"
        urls = pq.read_table(url_list, columns=["url"]).column("url").to_pylist()
        assert len(urls) == 150 and parallel_list.is_file()
        with urllib.request.urlopen(urls[0], timeout=10) as response:
            assert response.read() == (tiny_world / "images" / urls[0].rsplit("/", 1)[1]).read_bytes()
