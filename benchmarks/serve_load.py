"""Serving load test: batched vs unbatched throughput, and cost-aware admission under a burst.

    .venv/bin/python benchmarks/serve_load.py                         # random weights, the tiny world's shapes
    .venv/bin/python benchmarks/serve_load.py --model omnidiff-tiny@production --seconds 30
    .venv/bin/python benchmarks/serve_load.py port=8123 torch_threads=2   # serve-config overrides

One run, one machine, one model: the app from configs/serve.yaml is deployed twice side by
side, batching on (/on) and off (/off), as ``omnidiff serve up`` deploys it (serve.app.run).
Throughput points (``--clients``, 16 by default) use closed-loop clients (send, wait for the
answer, send again) calling POST /v1/generate, the two apps' measurements alternating
(``--repeats`` rounds) so drifting load on a shared box hits both alike; images/s counts
successful images over the time until the last answer, and the ratio batched / unbatched is
printed. The burst phase (issue 15) sends ``--waves`` waves of ``--burst-clients`` requests at
once to the batching app, every ``--heavy-every``-th one cost-heavy (the largest n, steps and size
the config allows), each wave on connections opened beforehand with a minimal HTTP client (so the
clock measures the server, not a client library); its figures are the latency of the 503s, their
Retry-After values, and the latency and queue wait (latency - sampling seconds) of the admitted
requests. The load average is recorded: on a shared 2-core box other work moves these numbers,
so read ratios, not absolutes. Clients run in a child process, apart from the Ray driver that
streams the replicas' logs.

Goals (issues 7 and 15): batched images/s at 16 clients >= 2x unbatched; 503 p99 < 100 ms.
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


async def drive(url: str, seconds: float, steps: int, clients: int) -> tuple[list[tuple], float]:
    """``clients`` closed loops (send, await, send again) for ``seconds``. Returns (records
    ``(status, latency_s, images)``, seconds until the last answer)."""
    import httpx

    records: list[tuple[int, float, int]] = []
    start = time.monotonic()
    deadline = start + seconds
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def loop(worker: int) -> None:
            i = 0
            while time.monotonic() < deadline:
                body = {"prompt": f"{PROMPTS[i % len(PROMPTS)]} #{worker}-{i}", "steps": steps, "seed": i}
                t0 = time.perf_counter()
                answer = await client.post(f"{url}/v1/generate", json=body)
                records.append((answer.status_code, time.perf_counter() - t0,
                                len(answer.json().get("images", [])) if answer.status_code == 200 else 0))
                i += 1

        await asyncio.gather(*[loop(w) for w in range(clients)])
    # Until the last answer: requests sent before the deadline count, and so does their time.
    return records, time.monotonic() - start


def load_point(url: str, seconds: float, steps: int, clients: int):
    """:func:`drive` in this process (the benchmark runs it in a child: see ``main``)."""
    return asyncio.run(drive(url, seconds, steps, clients))


async def _http_post(reader, writer, host: str, path: str, body: bytes) -> tuple[float, int, dict, bytes]:
    """One POST on an open connection with a minimal HTTP/1.1 client: the clock measures the server,
    not a client library's work for 99 other requests. Returns (seconds, status, headers, body)."""
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    t0 = time.perf_counter()
    writer.write(request)
    await writer.drain()
    status_line = await reader.readline()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        payload = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        payload = b""
        while size := int((await reader.readline()).strip() or b"0", 16):
            payload += await reader.readexactly(size)
            await reader.readline()
        await reader.readline()
    else:
        payload = await reader.read()
    seconds = time.perf_counter() - t0
    return seconds, int(status_line.split()[1]), headers, payload


async def burst_waves(url: str, waves: int, clients: int, heavy_every: int, heavy: dict, pause_s: float) -> list[dict]:
    """``waves`` bursts of ``clients`` requests at once, every ``heavy_every``-th one cost-heavy: all
    connections are open before a wave's requests go out together. Returns one record per request:
    wave, heavy, status, latency, Retry-After, sampling seconds (200s)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port, prefix = parts.hostname, parts.port, parts.path.rstrip("/")
    records: list[dict] = []
    for wave in range(waves):
        conns = await asyncio.gather(*[asyncio.open_connection(host, port) for _ in range(clients)])

        async def one(wave: int, i: int, reader, writer) -> None:
            is_heavy = heavy_every > 0 and i % heavy_every == heavy_every // 2  # not the first: see --heavy-every
            body = heavy if is_heavy else {"prompt": f"{PROMPTS[i % len(PROMPTS)]} #{wave}-{i}", "seed": i}
            try:
                seconds, status, headers, payload = await _http_post(reader, writer, f"{host}:{port}",
                                                                     f"{prefix}/v1/generate", json.dumps(body).encode())
            finally:
                writer.close()
            record = {"wave": wave, "heavy": is_heavy, "status": status, "latency_s": seconds,
                      "retry_after": int(headers["retry-after"]) if "retry-after" in headers else None}
            if status == 200:
                record["sampling_s"] = float(json.loads(payload)["seconds"])
            elif status != 503:
                record["error"] = payload[:300].decode("utf-8", "replace")
            records.append(record)

        await asyncio.gather(*[one(wave, i, r, w) for i, (r, w) in enumerate(conns)])
        await asyncio.sleep(pause_s)
    return records


def run_burst(url: str, waves: int, clients: int, heavy_every: int, heavy: dict, pause_s: float) -> list[dict]:
    return asyncio.run(burst_waves(url, waves, clients, heavy_every, heavy, pause_s))


def summarise(records: list[tuple], seconds: float) -> dict:
    """Counts, images/s over ``seconds``, latency percentiles of the 200s and of the 503s."""
    ok = [lat for status, lat, _ in records if status == 200]
    rejected = [lat for status, lat, _ in records if status == 503]
    other = [status for status, _, _ in records if status not in (200, 503)]
    return {"requests": len(records), "ok": len(ok), "rejected_503": len(rejected), "other_errors": len(other),
            "images_per_s": round(sum(n for _, _, n in records) / seconds, 2),
            "p50_ms": _ms(_percentile(ok, 50)), "p99_ms": _ms(_percentile(ok, 99))}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def summarise_burst(records: list[dict]) -> dict:
    """503 latency, Retry-After values, admitted latency and queue wait (latency - sampling time)."""
    rejected = [r for r in records if r["status"] == 503]
    admitted = [r for r in records if r["status"] == 200]
    waits = [r["latency_s"] - r["sampling_s"] for r in admitted]
    retry = sorted(r["retry_after"] for r in rejected if r["retry_after"] is not None)
    return {
        "requests": len(records), "heavy": sum(r["heavy"] for r in records),
        "admitted": len(admitted), "admitted_heavy": sum(r["heavy"] for r in admitted),
        "rejected_503": len(rejected), "rejected_heavy": sum(r["heavy"] for r in rejected),
        "other": sorted({(r["status"], r.get("error", "")[:120]) for r in records if r["status"] not in (200, 503)}),
        "p50_503_ms": _ms(_percentile([r["latency_s"] for r in rejected], 50)),
        "p99_503_ms": _ms(_percentile([r["latency_s"] for r in rejected], 99)),
        "max_503_ms": _ms(max((r["latency_s"] for r in rejected), default=None)),
        "retry_after_s": {"min": retry[0] if retry else None, "p50": _percentile(retry, 50),
                          "max": retry[-1] if retry else None, "values": sorted(set(retry))},
        "admitted_p50_ms": _ms(_percentile([r["latency_s"] for r in admitted], 50)),
        "admitted_p99_ms": _ms(_percentile([r["latency_s"] for r in admitted], 99)),
        "admitted_max_ms": _ms(max((r["latency_s"] for r in admitted), default=None)),
        "wait_p50_ms": _ms(_percentile(waits, 50)), "wait_max_ms": _ms(max(waits, default=None)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="registry ref or pipeline folder (default: random, see above)")
    parser.add_argument("--llm", choices=("auto", "gemma", "tiny"), default="auto",
                        help="LLM of the random model (auto: Gemma 3 270M if converted)")
    parser.add_argument("--config", default=str(REPO / "configs" / "serve.yaml"))
    parser.add_argument("--clients", default="16", help="client counts of the throughput points")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds of load per throughput measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per (batching, clients) point")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per request of the throughput points")
    parser.add_argument("--waves", type=int, default=3, help="bursts in the admission phase")
    parser.add_argument("--burst-clients", type=int, default=100, help="requests sent at once in each burst")
    parser.add_argument("--heavy-every", type=int, default=5,
                        help="every k-th request of a burst is cost-heavy (max n, max steps, largest size), "
                             "from the (k//2)-th on: a heavy request first into an idle server is admitted and runs alone")
    parser.add_argument("--heavy-size", default=None, help="size of the heavy requests (default: largest allowed)")
    parser.add_argument("--wave-pause-s", type=float, default=2.0, help="pause after each burst's last answer")
    parser.add_argument("--phases", default="points,burst", help="what to run: points, burst or both")
    parser.add_argument("--out", default=None, help="JSON results (default $OMNIDIFF_HOME/reports/serve_load.json)")
    parser.add_argument("overrides", nargs="*", help="serve-config overrides, e.g. torch_threads=2")
    args = parser.parse_args(argv)

    import omnidiff  # noqa: F401  (offline switches)
    from omnidiff.config import load_config, replace
    from omnidiff.env import subdir
    from omnidiff.progress import Progress
    from serve import app as serve_app
    from serve.config import ServeConfig, parse_size

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
        limits = base.limits
        from serve.models import pin_model

        sizes = limits.sizes or pin_model(base)["sizes"]  # null: the sizes the model's card lists
        heavy_size = args.heavy_size or "{}x{}".format(*max((parse_size(s) for s in sizes),
                                                             key=lambda wh: wh[0] * wh[1]))
        heavy = {"prompt": "a red circle on a blue background, drawn carefully", "n": limits.max_n,
                 "steps": limits.max_steps, "size": heavy_size, "seed": 1}
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
                             "max_queued_work": base.admission.max_queued_work,
                             "cpus_per_replica": base.cpus_per_replica, "torch_threads": base.torch_threads},
                         "heavy_request": heavy, "points": [], "cpu_count": os.cpu_count()}
        # Clients in a child process: the Ray driver here streams the replicas' logs, and that must
        # not share a GIL (or a core's time slices) with the clocks that measure latency.
        clients_process = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            urls = {batching: serve_app.run(cfg, wait_ready_s=600)["url"] for batching, cfg in apps.items()}
            for url in urls.values():
                clients_process.submit(load_point, url, 3.0, args.steps, 2).result()  # warm-up
            total = len(levels) * args.repeats * 2 + ("burst" in phases)
            with Progress("serve_load", total=total, unit="measurement", every_s=0) as progress:
                for clients in levels:
                    runs: dict[bool, list] = {True: [], False: []}
                    for _ in range(args.repeats):
                        for batching in (True, False):
                            runs[batching].append(clients_process.submit(
                                load_point, urls[batching], args.seconds, args.steps, clients).result())
                            progress.update()
                    for batching in (True, False):
                        records = [r for recs, _ in runs[batching] for r in recs]
                        elapsed = sum(e for _, e in runs[batching])
                        point = {"batching": batching, "clients": clients, **summarise(records, elapsed),
                                 "loadavg_1m": round(os.getloadavg()[0], 1)}
                        results["points"].append(point)
                        print(json.dumps(point), flush=True)
                if "burst" in phases:
                    # Batching on (the production setting): waves of simultaneous requests, some heavy.
                    records = clients_process.submit(run_burst, urls[True], args.waves, args.burst_clients,
                                                     args.heavy_every, heavy, args.wave_pause_s).result()
                    results["burst"] = {"waves": args.waves, "clients": args.burst_clients,
                                        "heavy_every": args.heavy_every, **summarise_burst(records),
                                        "per_wave": [summarise_burst([r for r in records if r["wave"] == w])
                                                     for w in range(args.waves)],
                                        "loadavg_1m": round(os.getloadavg()[0], 1)}
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
    if results["points"]:
        print("\nbatching clients  images/s   p50 ms   p99 ms   503s  loadavg")
    for p in results["points"]:
        print(f"{'on' if p['batching'] else 'off':>8} {p['clients']:>7} {p['images_per_s']:>9} {p['p50_ms']!s:>8} "
              f"{p['p99_ms']!s:>8} {p['rejected_503']:>6} {p['loadavg_1m']:>8}")
    if "burst" in results:
        b = results["burst"]
        print(f"\nburst: {b['waves']} waves of {b['clients']} requests at once, every {b['heavy_every']}th heavy "
              f"(n={heavy['n']}, steps={heavy['steps']}, {heavy['size']}); budget {base.admission.max_queued_work} "
              "pixel-steps")
        print("wave  admitted(heavy)  503(heavy)  503 p50/p99/max ms   Retry-After s (values)   "
              "admitted p50/p99/max ms   wait p50/max ms")
        for i, w in enumerate([*b["per_wave"], b]):
            print(f"{'all' if i == len(b['per_wave']) else i:>4}  {w['admitted']:>6} ({w['admitted_heavy']:>2})    "
                  f"{w['rejected_503']:>5} ({w['rejected_heavy']:>2})  {w['p50_503_ms']}/{w['p99_503_ms']}/"
                  f"{w['max_503_ms']}   {w['retry_after_s']['values']}   {w['admitted_p50_ms']}/"
                  f"{w['admitted_p99_ms']}/{w['admitted_max_ms']}   {w['wait_p50_ms']}/{w['wait_max_ms']}")
        if b["other"]:
            print(f"other answers: {b['other']}")
        p99 = b["p99_503_ms"]
        print(f"goal 503 p99 < 100 ms: {p99} ms -> {'met' if p99 is not None and p99 < 100 else 'NOT met'}")
    if "batched_over_unbatched_at_max_clients" in results:
        ratio = results["batched_over_unbatched_at_max_clients"]
        print(f"goal batched / unbatched images/s at {top} clients >= 2x: {ratio}x -> "
              f"{'met' if ratio >= 2 else 'NOT met'}")
    out = Path(args.out) if args.out else subdir("reports") / "serve_load.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
