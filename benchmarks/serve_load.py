"""Serving load test: throughput and latency at 1, 4 and 16 clients, batching on vs off, and overload.

    .venv/bin/python benchmarks/serve_load.py                         # random weights, the tiny world's shapes
    .venv/bin/python benchmarks/serve_load.py --model omnidiff-tiny@production --seconds 30
    .venv/bin/python benchmarks/serve_load.py port=8123 torch_threads=2   # serve-config overrides

One run, one machine, one model: the app from configs/serve.yaml is deployed twice side by
side, batching on (/on) and off (/off), and their measurements alternate (``--repeats`` rounds),
so drifting load on a shared box hits both alike; then the batching app is overloaded. Points
use closed-loop clients (send, wait for the answer, send again) calling POST /v1/generate;
images/s counts successful images over the time until the last answer. The overload phase sends
open-loop Poisson arrivals (``--overload-rate``, far above what the server makes) with no
retries, so the bounded queue fills and stays full; its figures are the latency of the 503
answers and of /healthz meanwhile. The load average is recorded with each figure: on a shared
2-core box other work moves these numbers, so read ratios, not absolutes. Clients run in a
child process, apart from the Ray driver that streams the replicas' logs.

Issue 7 goals: batched images/s at 16 clients >= 2x unbatched; 503 p99 < 100 ms.
Without ``--model`` the served model has random weights in the shapes of the tiny world's model
(16x16 pixel UNet (32, 64, 64), adapter 128 wide with 231 queries, Gemma 3 270M if converted,
else the tiny test LLM): serving cost does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on a blue background", "蓝色背景上的红色圆形", "un triangle vert en haut à gauche",
           "ein gelbes Quadrat unten rechts", "赤い背景に白い星", "una estrella blanca sobre fondo negro",
           "a small purple square in the bottom left corner of a grey background, drawn plainly"]


def build_benchmark_model(folder: Path, llm: str) -> Path:
    """A random-weight llm_adapter pipeline in the tiny world's shapes (see the module docstring)."""
    import torch
    from diffusers import DDPMScheduler

    from omnidiff.env import models_dir
    from omnidiff.models.adapter import OmniAdapter
    from omnidiff.models.llm import LLMTextEncoder
    from omnidiff.models.llm_folders import build_tiny_llm, gemma_folder
    from omnidiff.models.unet import build_unet
    from omnidiff.pipeline import OmniDiffusionPipeline

    if llm == "gemma" or (llm == "auto" and gemma_folder().is_dir()):
        llm_path = gemma_folder()
        if not llm_path.is_dir():
            raise SystemExit(f"--llm gemma: {llm_path} is not converted yet (run `omnidiff llm convert`)")
    else:
        llm_path = build_tiny_llm(models_dir() / "llm" / "tiny-gemma3-h64-seed0", seed=0)
    torch.manual_seed(0)
    encoder = LLMTextEncoder(llm_path)
    adapter = OmniAdapter(llm_dim=encoder.hidden_size, width=128, out_dim=128, num_queries=231, encoder_layers=1,
                          decoder_layers=2, heads=4, input_norm=False, length_head=False, pooled_query=False)
    unet = build_unet(16, 3, 3, (32, 64, 64), cross_attention_dim=128, layers_per_block=1, attention_head_dim=8,
                      pooled_dim=128)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    pipe = OmniDiffusionPipeline(unet, scheduler, "llm_adapter", adapter=adapter, llm=encoder)
    return pipe.save_pretrained(folder, lineage={"benchmark": "random weights", "llm": llm_path.name})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def drive(url: str, seconds: float, steps: int, clients: int = 0, rate: float = 0.0,
                seed: int = 0) -> tuple[list[tuple], list[float]]:
    """Load for ``seconds``: ``clients`` closed loops (send, await, send again), or open-loop Poisson
    arrivals at ``rate`` requests/s (each its own request, whatever the server's state: the overload
    case). Returns (records ``(status, latency_s, images)``, /healthz latencies probed 4x a second,
    seconds until the last answer).
    """
    import httpx

    records: list[tuple[int, float, int]] = []
    health: list[float] = []
    start = time.monotonic()
    deadline = start + seconds
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=clients + 64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def request(tag: str, i: int) -> None:
            body = {"prompt": f"{PROMPTS[i % len(PROMPTS)]} #{tag}", "steps": steps, "seed": i}
            t0 = time.perf_counter()
            answer = await client.post(f"{url}/v1/generate", json=body)
            latency = time.perf_counter() - t0
            records.append((answer.status_code, latency,
                            len(answer.json().get("images", [])) if answer.status_code == 200 else 0))

        async def loop(worker: int) -> None:
            i = 0
            while time.monotonic() < deadline:
                await request(f"{worker}-{i}", worker * 100_000 + i)
                i += 1

        async def arrivals() -> None:
            pending, i = [], 0
            while time.monotonic() < deadline:
                pending.append(asyncio.create_task(request(f"open-{i}", i)))
                i += 1
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*pending)

        async def probe() -> None:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                answer = await client.get(f"{url}/healthz")
                if answer.status_code == 200:
                    health.append(time.perf_counter() - t0)
                await asyncio.sleep(0.25)

        drivers = [loop(w) for w in range(clients)] + ([arrivals()] if rate else [])
        await asyncio.gather(*drivers, probe())
    # Until the last answer: requests sent before the deadline count, and so does their time.
    return records, health, time.monotonic() - start


def load_point(url: str, seconds: float, steps: int, clients: int = 0, rate: float = 0.0):
    """:func:`drive` in this process (the benchmark runs it in a child: see ``main``)."""
    return asyncio.run(drive(url, seconds, steps, clients, rate))


def summarise(records: list[tuple], seconds: float) -> dict:
    """Counts, images/s over ``seconds``, latency percentiles of the 200s and of the 503s."""
    ok = [lat for status, lat, _ in records if status == 200]
    rejected = [lat for status, lat, _ in records if status == 503]
    other = [status for status, _, _ in records if status not in (200, 503)]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {"requests": len(records), "ok": len(ok), "rejected_503": len(rejected), "other_errors": len(other),
            "images_per_s": round(sum(n for _, _, n in records) / seconds, 2),
            "p50_ms": ms(_percentile(ok, 50)), "p99_ms": ms(_percentile(ok, 99)),
            "p50_503_ms": ms(_percentile(rejected, 50)), "p99_503_ms": ms(_percentile(rejected, 99))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="registry ref or pipeline folder (default: random, see above)")
    parser.add_argument("--llm", choices=("auto", "gemma", "tiny"), default="auto",
                        help="LLM of the random model (auto: Gemma 3 270M if converted)")
    parser.add_argument("--config", default=str(REPO / "configs" / "serve.yaml"))
    parser.add_argument("--clients", default="1,4,16", help="client counts to measure")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds of load per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per (batching, clients) point")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per request")
    parser.add_argument("--overload-rate", type=float, default=20.0,
                        help="Poisson arrivals per second in the overload phase (far above what is served)")
    parser.add_argument("--phases", default="points,overload", help="what to run: points, overload or both")
    parser.add_argument("--out", default=None, help="JSON results (default $OMNIDIFF_HOME/reports/serve_load.json)")
    parser.add_argument("overrides", nargs="*", help="serve-config overrides, e.g. torch_threads=2")
    args = parser.parse_args(argv)

    import omnidiff  # noqa: F401  (offline switches)
    from omnidiff.config import load_config, replace
    from omnidiff.env import subdir
    from omnidiff.progress import Progress
    from serve import app as serve_app
    from serve.config import ServeConfig

    os.environ.pop("OMNIDIFF_SERVE_TOKEN", None)  # a benchmark without auth: no token in the way
    phases = set(args.phases.split(","))
    levels = [int(c) for c in args.clients.split(",")] if "points" in phases else []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        if args.model is None:  # built in a throw-away process: the LLM's memory leaves with it
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as builder:
                model = str(builder.submit(build_benchmark_model, Path(tmp) / "model", args.llm).result())
        else:
            model = args.model
        base = load_config(ServeConfig, args.config, [f"model={model}", f"port={_free_port()}", *args.overrides])
        # Both apps side by side (one replica each, same model): measurements of the two alternate,
        # so a change in the machine's load hits both alike instead of one whole series.
        apps = {batching: replace(base, app_name=f"serve-load-{'on' if batching else 'off'}",
                                  route_prefix=f"/{'on' if batching else 'off'}",
                                  batching=replace(base.batching, enabled=batching))
                for batching in (True, False)}
        results: dict = {"model": model if args.model else f"random ({args.llm} LLM)", "steps": args.steps,
                         "seconds_per_measurement": args.seconds, "repeats": args.repeats, "config": {
                             "max_batch_size": base.batching.max_batch_size,
                             "batch_wait_timeout_s": base.batching.batch_wait_timeout_s,
                             "max_ongoing_requests": base.max_ongoing_requests,
                             "max_queued_requests": base.max_queued_requests,
                             "cpus_per_replica": base.cpus_per_replica, "torch_threads": base.torch_threads},
                         "points": [], "cpu_count": os.cpu_count()}
        # Clients in a child process: the Ray driver here streams the replicas' logs, and that must
        # not share a GIL (or a core's time slices) with the clocks that measure latency.
        clients_process = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            urls = {batching: serve_app.run(cfg, wait_ready_s=600)["url"] for batching, cfg in apps.items()}
            for url in urls.values():
                clients_process.submit(load_point, url, 3.0, args.steps, 2).result()  # warm-up
            total = len(levels) * args.repeats * 2 + ("overload" in phases)
            with Progress("serve_load", total=total, unit="measurement", every_s=0) as progress:
                for clients in levels:
                    runs: dict[bool, list] = {True: [], False: []}
                    for _ in range(args.repeats):
                        for batching in (True, False):
                            runs[batching].append(clients_process.submit(
                                load_point, urls[batching], args.seconds, args.steps, clients).result())
                            progress.update()
                    for batching in (True, False):
                        records = [r for recs, _, _ in runs[batching] for r in recs]
                        elapsed = sum(e for _, _, e in runs[batching])
                        point = {"batching": batching, "clients": clients, **summarise(records, elapsed),
                                 "loadavg_1m": round(os.getloadavg()[0], 1)}
                        results["points"].append(point)
                        print(json.dumps(point), flush=True)
                if "overload" in phases:
                    # Batching on (the production setting), arrivals far above what it serves.
                    records, health, elapsed = clients_process.submit(
                        load_point, urls[True], args.seconds, args.steps, 0, args.overload_rate).result()
                    results["overload"] = {"arrivals_per_s": args.overload_rate, **summarise(records, elapsed),
                                           "healthz_p50_ms": round((_percentile(health, 50) or 0) * 1000, 1),
                                           "healthz_p99_ms": round((_percentile(health, 99) or 0) * 1000, 1),
                                           "healthz_probes": len(health), "loadavg_1m": round(os.getloadavg()[0], 1)}
                    print(json.dumps(results["overload"]), flush=True)
                    progress.update()
        finally:
            clients_process.shutdown()
            for cfg in apps.values():
                serve_app.shutdown(cfg)

    by = {(p["batching"], p["clients"]): p for p in results["points"]}
    top = max(levels, default=0)
    if (True, top) in by and (False, top) in by and by[(False, top)]["images_per_s"]:
        results["batched_over_unbatched_at_max_clients"] = round(
            by[(True, top)]["images_per_s"] / by[(False, top)]["images_per_s"], 2)
    print("\nbatching clients  images/s   p50 ms   p99 ms   503s  loadavg")
    for p in results["points"]:
        print(f"{'on' if p['batching'] else 'off':>8} {p['clients']:>7} {p['images_per_s']:>9} {p['p50_ms']!s:>8} "
              f"{p['p99_ms']!s:>8} {p['rejected_503']:>6} {p['loadavg_1m']:>8}")
    if "overload" in results:
        o = results["overload"]
        print(f"overload ({o['arrivals_per_s']} requests/s): {o['rejected_503']} x 503, p50 {o['p50_503_ms']} ms, "
              f"p99 {o['p99_503_ms']} ms; {o['ok']} served; /healthz p50 {o['healthz_p50_ms']} ms, "
              f"p99 {o['healthz_p99_ms']} ms; load average {o['loadavg_1m']}")
    if "batched_over_unbatched_at_max_clients" in results:
        print(f"batched / unbatched images/s at {top} clients: {results['batched_over_unbatched_at_max_clients']}x")
    out = Path(args.out) if args.out else subdir("reports") / "serve_load.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
