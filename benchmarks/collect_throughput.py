"""Images/s of the whole collect stage against img2dataset alone, on the same url list, in one run.

    .venv/bin/python benchmarks/collect_throughput.py                  # 2000 images of a generated world
    .venv/bin/python benchmarks/collect_throughput.py --images 4000 --repeats 2

A tiny world (32x32 PNGs) is generated in a temporary home and served on 127.0.0.1.
Then, alternating ``--repeats`` times:

* baseline: the ``img2dataset`` command on the url list (url + caption), the
  settings of configs/collect.yaml (parquet output, 16 px, png, 2 processes,
  16 threads, 1000-row shards) into an empty folder;
* stage: ``data_prep.collect.build_snapshot`` on the same list into an empty home:
  reading, caption checks, language detection, img2dataset (plus its checked
  resizer), dedup, aesthetic scores, split, snapshot + manifest. Not logged to
  MLflow (that is a constant few seconds per run, not per image).

Both include their process start-up, as a user would see it. Printed: images/s
of each (successful images / wall seconds, median over repeats) and the ratio
stage/baseline; the stage's time is also split into download and the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_baseline(url_list: Path, out: Path, processes: int, threads: int) -> tuple[int, float]:
    """img2dataset alone (its CLI); returns (successful images, wall seconds)."""
    cmd = [str(Path(sys.executable).with_name("img2dataset")), f"--url_list={url_list}", "--input_format=parquet",
           "--url_col=url", "--caption_col=caption", "--output_format=parquet", f"--output_folder={out}",
           "--image_size=16", "--resize_mode=border", "--encode_format=png", "--encode_quality=9",
           f"--processes_count={processes}", f"--thread_count={threads}", "--number_sample_per_shard=1000",
           "--extract_exif=False", "--timeout=10", "--retries=1", "--enable_wandb=False"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return ok, seconds


def run_stage(url_list: Path, home: Path, processes: int, threads: int) -> tuple[int, float, float, dict]:
    """The collect stage; returns (images downloaded, wall seconds, of which img2dataset, quarantine reasons)."""
    os.environ["OMNIDIFF_HOME"] = str(home)
    from data_prep.collect import build_snapshot
    from data_prep.config import CollectConfig, DownloadConfig

    cfg = CollectConfig(name="bench", url_lists=(url_list,), track=False,
                        download=DownloadConfig(processes=processes, threads=threads))
    start = time.perf_counter()
    result = build_snapshot(cfg)
    seconds = time.perf_counter() - start
    counts = result.manifest["counts"]["pairs"]
    # downloaded = kept + rows quarantined after a successful download (repeats of an image+caption)
    downloaded = counts["kept"] + counts["quarantined_by_reason"].get("duplicate", 0)
    return downloaded, seconds, result.stats["download_seconds"], counts["quarantined_by_reason"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="images in the generated world (even)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    args = p.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="collect-bench-"))
    os.environ["OMNIDIFF_HOME"] = str(root / "home0")
    import omnidiff  # noqa: F401  (offline switches, before the heavy imports)
    from omnidiff.world import WorldConfig, generate_world, serve_world, write_url_list

    try:
        world = generate_world(WorldConfig(out_dir=root / "world", num_captions=args.images // 2, images_per_caption=2,
                                           num_parallel=0))  # fmt: skip
        base_rates, stage_rates, download_share = [], [], []
        with serve_world(world) as base_url:
            url_list = write_url_list(world, base_url, out_path=root / "urls.parquet")
            for i in range(args.repeats):
                ok, s = run_baseline(url_list, root / f"baseline{i}", args.processes, args.threads)
                base_rates.append(ok / s)
                print(f"baseline (img2dataset alone) run {i}: {ok} images in {s:.1f}s = {ok / s:.1f} images/s",
                      flush=True)
                ok, s, dl, reasons = run_stage(url_list, root / f"home{i + 1}", args.processes, args.threads)
                stage_rates.append(ok / s)
                download_share.append(dl / s)
                print(f"stage (collect) run {i}: {ok} images in {s:.1f}s = {ok / s:.1f} images/s "
                      f"(img2dataset {dl:.1f}s, the rest {s - dl:.1f}s; quarantined {reasons})", flush=True)
        base, stage = statistics.median(base_rates), statistics.median(stage_rates)
        print(f"\nimages: {args.images}, processes {args.processes}, threads {args.threads}, cpus {os.cpu_count()}")
        print(f"img2dataset alone: {base:.1f} images/s")
        print(f"collect stage:     {stage:.1f} images/s  (img2dataset is {statistics.median(download_share):.0%} of it)")
        print(f"ratio stage / img2dataset alone: {stage / base:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
