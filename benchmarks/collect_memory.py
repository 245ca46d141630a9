"""Peak memory and rows/s of the collect stage's preparation (everything before the download), old against new.

    .venv/bin/python benchmarks/collect_memory.py                        # 25k, 100k, 400k rows
    .venv/bin/python benchmarks/collect_memory.py --rows 50000 --scales 1,4,16 --workers 1,2

The preparation reads the url lists, checks captions and urls, identifies languages, drops exact
(url, caption) repeats and writes img2dataset's input. Synthetic url lists (Parquet, captions from
templates in five languages, 5% repeats, 3% bad rows) of ``rows * scale`` rows are prepared by:

* old: the implementation before issue 17 (``--old-ref``, extracted with ``git archive`` into a
  temporary folder): every list read whole into Arrow and Python lists, a dict of every
  (url, caption), the quarantine as Python lists, language id in the driver;
* new: this checkout (data_prep/pairs.py ``prepare_pairs``): batches of ``--batch-rows``, a
  partitioned dedup of ``--partition-rows`` rows a partition, ``--workers`` worker processes.

Each run is its own Python process (no download, no MLflow); printed per run: rows, seconds, rows/s,
peak resident memory of the driver and of the largest worker (ru_maxrss), and per implementation the
ratio of the largest scale's driver peak to the smallest's (issue 17's goal for 10x rows: at most 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLD_REF = "5292e5f"  # the integration branch before the streaming collect (issue 17)

_TEMPLATES = {
    "en": "a {c} {s} on a {b} background, picture {i}",
    "de": "ein {c} {s} auf {b} Hintergrund, Bild {i}",
    "fr": "un {s} {c} sur un fond {b}, image {i}",
    "es": "un {s} {c} sobre un fondo {b}, imagen {i}",
    "zh": "蓝色背景上的{c}{s}，第{i}张图片",
}
_WORDS = {"c": ["red", "green", "blue", "yellow", "pink"], "s": ["circle", "square", "star", "triangle"],
          "b": ["white", "black", "grey"]}


def write_url_list(path: Path, n_rows: int) -> None:
    """``n_rows`` rows (url, caption, lang): 5% repeat an earlier row, 2% have no caption, 1% a malformed url."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    langs = list(_TEMPLATES)
    with pq.ParquetWriter(path, pa.schema([("url", pa.string()), ("caption", pa.string()),
                                           ("lang", pa.string())])) as writer:  # fmt: skip
        for start in range(0, n_rows, 50_000):
            urls, captions, declared = [], [], []
            for i in range(start, min(start + 50_000, n_rows)):
                lang = langs[i % len(langs)]
                j = i - 7 if i % 20 == 19 else i  # a repeat of row i - 7
                caption = _TEMPLATES[langs[j % len(langs)]].format(
                    c=_WORDS["c"][j % 5], s=_WORDS["s"][j % 4], b=_WORDS["b"][j % 3], i=j)
                url = f"http://127.0.0.1:9/images/{j}.png"
                if i % 50 == 3:
                    caption = ""
                if i % 100 == 5:
                    url = f"notaurl/{i}"
                urls.append(url), captions.append(caption), declared.append(lang)
            writer.write_table(pa.table({"url": urls, "caption": captions, "lang": declared}), row_group_size=10_000)


_CHILD_OLD = """
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from data_prep.config import CollectConfig
from data_prep.download import download_work_dir, write_download_input
from data_prep.langid import LanguageDetector
from data_prep.pairs import prepare_pairs
from data_prep.quarantine import Quarantine
from data_prep.readers import read_url_lists
cfg = CollectConfig(name="bench", url_lists=(sys.argv[1],), track=False)
t1 = time.perf_counter()
urls, _ = read_url_lists(cfg.url_lists, cfg.columns)
quarantine = Quarantine()
prepared = prepare_pairs(urls, cfg, LanguageDetector(), quarantine)
work_dir = download_work_dir(cfg, prepared.download_urls, prepared.download_rows)
write_download_input(work_dir, prepared.download_urls, prepared.download_rows)
seconds = time.perf_counter() - t1
print(json.dumps({"rows": urls.num_rows, "download_rows": len(prepared.download_rows),
                  "quarantined": dict(quarantine.reasons("pairs")), "seconds": seconds,
                  "driver_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "workers_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

_CHILD_NEW = """
import json, resource, sys, tempfile, time
from pathlib import Path
from data_prep.config import CollectConfig
from data_prep.pairs import prepare_pairs
from data_prep.quarantine import Quarantine
from data_prep.readers import scan_url_lists
from data_prep.workers import WorkerPool
cfg = CollectConfig(name="bench", url_lists=(sys.argv[1],), track=False, read_batch_rows=int(sys.argv[2]),
                    dedup_partition_rows=int(sys.argv[3]), workers=int(sys.argv[4]))
t1 = time.perf_counter()
spill = Path(tempfile.mkdtemp())
quarantine = Quarantine(spill / "quarantine", cfg.dedup_partition_rows)
with WorkerPool(cfg.workers) as pool:
    prepared = prepare_pairs(scan_url_lists(cfg.url_lists, cfg.columns), cfg, pool, quarantine, spill)
seconds = time.perf_counter() - t1
print(json.dumps({"rows": prepared.input_rows, "download_rows": prepared.download_rows,
                  "quarantined": dict(quarantine.reasons("pairs")), "seconds": seconds,
                  "driver_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "workers_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def export_old(ref: str, out: Path) -> Path:
    """The old implementation's packages (data_prep, omnidiff) at ``ref``, extracted into ``out``."""
    archive = out / "old.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), ref, "data_prep",
                    "omnidiff"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(out / "old", filter="data")
    return out / "old"


def run_child(code: str, pythonpath: Path, home: Path, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMNIDIFF_HOME=str(home))
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, cwd=home)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=25_000, help="rows at scale 1")
    p.add_argument("--scales", default="1,4,16")
    p.add_argument("--workers", default="1,2", help="worker counts of the new implementation")
    p.add_argument("--batch-rows", type=int, default=4096)
    p.add_argument("--partition-rows", type=int, default=25_000)
    p.add_argument("--old-ref", default=OLD_REF, help="git ref of the old implementation ('' to skip it)")
    args = p.parse_args(argv)
    scales = [int(s) for s in args.scales.split(",")]

    with tempfile.TemporaryDirectory(prefix="collect-mem-") as tmp:
        root = Path(tmp)
        impls = []
        if args.old_ref:
            impls.append(("old", _CHILD_OLD, export_old(args.old_ref, root), []))
        for w in (int(x) for x in args.workers.split(",")):
            impls.append((f"new w={w}", _CHILD_NEW, REPO, [str(args.batch_rows), str(args.partition_rows), str(w)]))
        results: dict[str, list[dict]] = {name: [] for name, *_ in impls}
        print(f"{'impl':10} {'rows':>9} {'seconds':>8} {'rows/s':>8} {'driver MB':>10} {'worker MB':>10}  "
              "download rows, quarantined", flush=True)
        for scale in scales:
            n = args.rows * scale
            url_list = root / f"urls-{n}.parquet"
            write_url_list(url_list, n)
            outputs = {}
            for name, code, path, extra in impls:
                home = root / f"home-{name.replace(' ', '').replace('=', '')}-{n}"
                home.mkdir()
                r = run_child(code, path, home, [str(url_list), *extra])
                results[name].append(r)
                outputs[name] = (r["download_rows"], r["quarantined"])
                print(f"{name:10} {r['rows']:9d} {r['seconds']:8.1f} {r['rows'] / r['seconds']:8.0f} "
                      f"{r['driver_kb'] / 1024:10.0f} {r['workers_kb'] / 1024:10.0f}  "
                      f"{r['download_rows']}, {r['quarantined']}", flush=True)
            if len({json.dumps(o, sort_keys=True) for o in outputs.values()}) != 1:
                raise SystemExit(f"implementations disagree at {n} rows: {outputs}")
            url_list.unlink()
        print(f"\nrows at scale 1: {args.rows}; scales {scales}; batch rows {args.batch_rows}, partition rows "
              f"{args.partition_rows}; cpus {os.cpu_count()}")
        for name, rs in results.items():
            first, last = rs[0], rs[-1]
            print(f"{name:10} driver peak x{scales[-1] // scales[0]} rows: {last['driver_kb'] / first['driver_kb']:.2f}"
                  f" ({first['driver_kb'] / 1024:.0f} -> {last['driver_kb'] / 1024:.0f} MB); rows/s "
                  f"{first['rows'] / first['seconds']:.0f} -> {last['rows'] / last['seconds']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
