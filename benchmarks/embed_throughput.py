"""Embedding throughput: this job vs a pad-to-max transformers loop vs this machine's matmul roofline.

    .venv/bin/python benchmarks/embed_throughput.py                      # Gemma 3 270M, tiny world mix
    .venv/bin/python benchmarks/embed_throughput.py --captions 200 --baseline-captions 32 --llm PATH
    .venv/bin/python benchmarks/embed_throughput.py --set max_tokens=4096 max_batch_size=32   # other settings

In one process (issue 4, "Performance"):
(a) the embed job (Ray Data actor pool, length-sorted token-budget batches, fp32 compute, fp16
    unpadded Parquet) over a sample of the tiny world's distinct texts (captions in every language,
    long ones included, parallel texts): useful tokens/s at steady state (from the first shard's
    compute start to the last shard written: actor start-up and model load excluded) and end to end
    (snapshot read, Ray, actor start, model load and writing included);
(a0) the same job with prefix sharing off (``share_prefixes=0``): what computing every token costs;
(b) a plain transformers loop that pads every caption to a fixed length (227 = three CLIP windows,
    as the method's release and PixArt do), batch 32, on a random subset of the same sample;
(c) back-to-back 2048x2048 fp32 matmuls (median GFLOP/s) with the same thread count: read between
    phases, and probed for ``--probe-s`` right before every shard of (a) (inside the actor:
    ``probing_actor``, the job's actor class with the probe added, passed to ``run``) and every
    batch of (b), untimed; each one's share of the roofline uses its own probes, weighted by compute
    time, so load that comes and goes on a shared machine hits both alike. The roofline-predicted
    tokens/s is that FLOP/s over the model's FLOPs per token (2 x non-embedding parameters +
    attention over the mean length). (b) runs in two halves, before and after (a).
It prints useful (= delivered, unpadded) tokens/s of (a), (a0) and (b) and the ratios, (a) as a
share of the roofline counting the tokens it computed (a shared prefix is delivered to every caption
that starts with it but computed once) and counting what it delivered, bytes on
disk per token against hidden_size x 2, and the incremental claims: a rerun over the unchanged
snapshot computes nothing (its time vs the first run), and a snapshot with 10% new captions costs
about 10% of the first run's compute.
Numbers swing with machine load (the roofline is re-measured for that reason); read them together.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def matmul_gflops(seconds: float, n: int = 2048) -> float:
    """Median GFLOP/s of back-to-back fp32 ``n x n`` matmuls for ``seconds`` on the current torch threads.

    The median of a sustained run, not a best-of burst: on a loaded machine long work sees the
    average contention, not the luckiest slice.
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    rates = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 3:
        t0 = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return float(np.median(rates))


def roofline_reading(threads: int, seconds: float = 3.0) -> float:
    """Sustained fp32 matmul GFLOP/s (median of 2048^3 products for ``seconds``) with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    return matmul_gflops(seconds)


def probing_actor(probe_s: float) -> type:
    """The job's actor class, sampling the matmul roofline for ``probe_s`` seconds before each shard.

    Each shard's compute is judged against the machine's matmul rate right then, on the actor's own
    threads (a shared machine's rate swings with load). The probe runs after the model load and
    before the compute, both timed apart from it; the report row gains ``roofline_gflops`` and
    ``probe_s``, which the job's stats turn into ``roofline_gflops`` (compute-time-weighted) and
    take out of the busy span (embed_cache/report.py). A class built here, not a module-level
    one, so Ray ships it by value with its ``probe_s``.
    """
    from embed_cache.actor import EncodeShardActor

    class RooflineProbingActor(EncodeShardActor):
        def __call__(self, batch):
            start = time.perf_counter()
            self.encoder(str(batch["kind"].iloc[0]))  # the model load (first shard of a kind), timed as load_s
            load_s = time.perf_counter() - start
            roofline = matmul_gflops(probe_s) if probe_s > 0 else 0.0
            probed_s = time.perf_counter() - start - load_s
            report = EncodeShardActor.__call__(self, batch)
            return report.assign(load_s=report["load_s"] + load_s, roofline_gflops=roofline, probe_s=probed_s)

    return RooflineProbingActor


def world_texts(world_config: Path) -> list[str]:
    """Distinct normalised texts of the world: what the LLM cache holds (captions + parallel texts)."""
    import pandas as pd

    from omnidiff.config import load_config
    from omnidiff.text import normalise_caption
    from omnidiff.world import WorldConfig, generate_world

    world = generate_world(load_config(WorldConfig, world_config))
    pairs = pd.read_parquet(world / "pairs.parquet", columns=["caption"])
    parallel = pd.read_parquet(world / "parallel.parquet", columns=["text"])
    return sorted({normalise_caption(t) for t in list(pairs.caption) + list(parallel.text)})


def write_text_snapshot(name: str, texts: list[str], root: Path) -> Path:
    """A pair snapshot holding ``texts`` as captions (one 1x1 image each; only the llm kind is embedded)."""
    import io

    import pyarrow as pa
    from PIL import Image

    from omnidiff.contracts.keys import digest_bytes, pair_key
    from omnidiff.contracts.snapshot import SnapshotWriter

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    image = buf.getvalue()
    digest = digest_bytes(image)
    rows = [{"key": pair_key(digest, t), "caption": t, "caption_en": None, "lang": "xx", "image": image,
             "image_digest": digest, "split": "train"} for t in texts]  # fmt: skip
    writer = SnapshotWriter(name, root=root)
    writer.write_shard("pairs", pa.Table.from_pylist(rows))
    return writer.finish({"source": "benchmarks/embed_throughput.py"})


def job_config(snapshot: Path, cache_root: Path, llm: Path, args, *extra: str):
    """configs/embed.yaml (what users run) on the benchmark's snapshot, LLM kind only, plus ``--set``."""
    from embed_cache.config import EmbedConfig
    from omnidiff.config import load_config

    return load_config(EmbedConfig, args.config, [
        f"snapshots=[{snapshot}]", "kinds=[llm]", f"cache_root={cache_root}", "include_parallel=false",
        f"llm.path={llm}", "track=false", *args.set, *extra,
    ])  # fmt: skip


def run_job(snapshot: Path, cache_root: Path, llm: Path, args, *extra: str) -> dict:
    from embed_cache.job import run

    cfg = job_config(snapshot, cache_root, llm, args, *extra)
    t0 = time.perf_counter()
    summary = run(cfg, actor=probing_actor(args.probe_s))
    stats = summary["kinds"]["llm"]
    stats["wall_s"] = time.perf_counter() - t0
    print(f"    ({stats['computed']} computed, {stats['tokens']} tokens ({100 * stats['shared_fraction']:.0f}% from "
          f"shared prefixes), executor {stats.get('executor')}, "
          f"{stats['wall_s']:.1f}s wall, compute {stats['compute_seconds']:.1f}s)", flush=True)
    return stats


def padded_loop(llm: Path, texts: list[str], pad_to: int, batch_size: int, threads: int, probe_s: float) -> dict:
    """(b): the peers' way: every caption padded (and cut) to ``pad_to`` tokens, fixed batches, no sorting.

    Like the job's actors, it samples the matmul roofline before each batch (not timed), so both are
    judged against the machine's rate at the moment they ran.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    model = AutoModel.from_pretrained(llm, dtype=torch.float32).eval()  # decoder body only: no LM head
    useful, seconds, weighted = 0, 0.0, 0.0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            roofline = matmul_gflops(probe_s)
            t0 = time.perf_counter()
            batch = tokenizer(texts[start : start + batch_size], padding="max_length", truncation=True,
                              max_length=pad_to, return_tensors="pt")  # fmt: skip
            model(**batch, use_cache=False)  # (B, pad_to, D) last_hidden_state
            dt = time.perf_counter() - t0
            seconds += dt
            weighted += roofline * dt
            useful += int(batch["attention_mask"].sum())
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {"useful_tokens": useful, "seconds": seconds, "tokens_per_s": useful / seconds, "slots": len(texts) * pad_to,
            "roofline_gflops": weighted / seconds, "non_embedding_params": params, "num_layers": cfg.num_hidden_layers,
            "attn_dim": cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
            "hidden_size": cfg.hidden_size}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, default=REPO / "configs" / "world.yaml", help="world config (caption mix)")
    parser.add_argument("--llm", type=Path, default=None, help="LLM folder (default: converted Gemma 3 270M)")
    parser.add_argument("--captions", type=int, default=1200, help="distinct texts embedded by (a)")
    parser.add_argument("--baseline-captions", type=int, default=64, help="texts run through (b)")
    parser.add_argument("--pad-to", type=int, default=227, help="(b)'s fixed length (3 CLIP windows)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "embed.yaml",
                        help="(a)'s job config; its batch budget, actors and threads are what is measured")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of (a)'s config, e.g. --set num_actors=2 threads_per_actor=1 max_tokens=4096")
    parser.add_argument("--probe-s", type=float, default=0.3,
                        help="seconds of matmul before each shard / batch sampling the roofline under current load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    import omnidiff  # noqa: F401  (offline switches)
    from omnidiff.models.llm_folders import ensure_gemma

    llm = (args.llm or ensure_gemma()).resolve()
    texts = world_texts(args.world)
    rng = np.random.default_rng(args.seed)
    sample = [texts[i] for i in rng.choice(len(texts), size=min(args.captions, len(texts)), replace=False)]
    extra = [texts[i] for i in rng.choice(len(texts), size=len(texts), replace=False) if texts[i] not in set(sample)]
    new = extra[: max(1, len(sample) // 10)]
    baseline_texts = sample[: args.baseline_captions]
    work = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    cfg = job_config(work / "snapshots", work / "cache", llm, args)  # the settings (a) runs with
    print(f"LLM {llm.name}; {len(texts)} distinct world texts, sample {len(sample)} (+{len(new)} new), "
          f"baseline {len(baseline_texts)}; (a): {args.config.name}, {cfg.num_actors} actor(s) x "
          f"{cfg.threads_per_actor} thread(s), batches of <= {cfg.max_tokens} token slots / {cfg.max_batch_size} "
          f"captions, shards of {cfg.shard_tokens} tokens, executor {cfg.executor}", flush=True)
    cores = cfg.num_actors * cfg.threads_per_actor  # (b) and the phase readings use every core the actors use
    readings: list[float] = []

    def reading() -> None:
        readings.append(roofline_reading(cores))
        print(f"(c) matmul roofline: {readings[-1]:.1f} GFLOP/s (sustained median)", flush=True)

    # (b) runs in two halves, before and after (a); every shard of (a) and every batch of (b) is
    # preceded by a short roofline probe, so load that comes and goes on a shared machine is
    # accounted for in each one's share.
    reading()
    base1 = padded_loop(llm, baseline_texts[: len(baseline_texts) // 2], args.pad_to, 32, cores, args.probe_s)
    print(f"(b) first half: {base1['tokens_per_s']:.1f} useful tok/s", flush=True)
    reading()
    snap_a = write_text_snapshot("bench", sample, work / "snapshots")
    first = run_job(snap_a, work / "cache", llm, args)
    unshared = run_job(snap_a, work / "cache-unshared", llm, args, "share_prefixes=0")
    reading()
    second = run_job(snap_a, work / "cache", llm, args)
    snap_b = write_text_snapshot("bench", sample + new, work / "snapshots")
    grown = run_job(snap_b, work / "cache", llm, args)
    reading()
    base2 = padded_loop(llm, baseline_texts[len(baseline_texts) // 2 :], args.pad_to, 32, cores, args.probe_s)
    print(f"(b) second half: {base2['tokens_per_s']:.1f} useful tok/s", flush=True)
    reading()
    seconds_b = base1["seconds"] + base2["seconds"]
    base = {**base2, "useful_tokens": base1["useful_tokens"] + base2["useful_tokens"], "seconds": seconds_b,
            "slots": base1["slots"] + base2["slots"],
            "roofline_gflops": (base1["roofline_gflops"] * base1["seconds"]
                                + base2["roofline_gflops"] * base2["seconds"]) / seconds_b}  # fmt: skip
    base["tokens_per_s"] = base["useful_tokens"] / seconds_b

    steady = first["compute_tokens_per_s"]  # busy span: first shard's compute start -> last shard done
    end_to_end = first["tokens"] / first["wall_s"]
    mean_len = first["tokens"] / max(1, first["computed"])
    flops_per_token = 2 * base["non_embedding_params"] + 4 * base["num_layers"] * mean_len * base["attn_dim"]
    # Each actor probes its own threads; the actors run side by side, so their rooflines add up.
    a_predicted = cfg.num_actors * first["roofline_gflops"] * 1e9 / flops_per_token
    a0_predicted = cfg.num_actors * unshared["roofline_gflops"] * 1e9 / flops_per_token
    steady0 = unshared["compute_tokens_per_s"]
    # Tokens (a) ran through the model per second of its busy span: what the roofline bounds.
    computed_rate = first["computed_tokens"] / first["compute_span_s"] if first["compute_span_s"] else 0.0
    b_predicted = base["roofline_gflops"] * 1e9 / flops_per_token
    raw = base["hidden_size"] * 2
    padded_bytes = args.pad_to * raw * first["computed"] / first["tokens"]
    out = {
        "llm": llm.name, "captions": len(sample), "mean_tokens": mean_len, "pad_to": args.pad_to,
        "a_tokens_per_s_steady": steady, "a_tokens_per_s_end_to_end": end_to_end,
        "a_padding_fraction": first["padding_fraction"], "a_load_s": first["load_seconds"],
        "b_tokens_per_s": base["tokens_per_s"], "ratio_a_over_b": steady / base["tokens_per_s"],
        "ratio_a_end_to_end_over_b": end_to_end / base["tokens_per_s"],
        "roofline_readings_gflops": readings, "a_roofline_gflops": first["roofline_gflops"],
        "b_roofline_gflops": base["roofline_gflops"], "flops_per_token": flops_per_token,
        "a_roofline_tokens_per_s": a_predicted, "b_roofline_tokens_per_s": b_predicted,
        "a_share_of_roofline": computed_rate / a_predicted, "a_delivered_share_of_roofline": steady / a_predicted,
        "b_share_of_roofline": base["tokens_per_s"] / b_predicted,
        "a_shared_fraction": first["shared_fraction"], "a_computed_tokens_per_s": computed_rate,
        "a0_tokens_per_s_steady": steady0, "a0_share_of_roofline": steady0 / a0_predicted,
        "ratio_a0_over_b": steady0 / base["tokens_per_s"], "sharing_gain": steady / steady0,
        "sharing_gain_load_normalised": (steady / a_predicted) / (steady0 / a0_predicted),
        "bytes_per_token": first["bytes_per_token"], "hidden_size_x2": raw, "padded_bytes_per_useful_token": padded_bytes,
        "first_run_s": first["wall_s"], "first_compute_s": first["compute_seconds"],
        "rerun_s": second["wall_s"], "rerun_computed": second["computed"],
        "grown_s": grown["wall_s"], "grown_computed": grown["computed"], "grown_compute_s": grown["compute_seconds"],
    }  # fmt: skip
    print()
    print(f"(a) this job:        {steady:8.1f} useful tok/s steady ({end_to_end:.1f} end to end incl. Ray, actor "
          f"start, model load {first['load_seconds']:.1f}s); {100 * first['shared_fraction']:.0f}% of the tokens from shared "
          f"prefixes, {computed_rate:.1f} tok/s computed; padding {100 * first['padding_fraction']:.1f}% of slots")
    print(f"(a0) no sharing:     {steady0:8.1f} useful tok/s steady; padding {100 * unshared['padding_fraction']:.1f}% "
          f"of slots; sharing gains {out['sharing_gain']:.2f}x ({out['sharing_gain_load_normalised']:.2f}x load-normalised)")
    print(f"(b) pad-to-{args.pad_to} loop: {base['tokens_per_s']:8.1f} useful tok/s "
          f"({100 * (1 - base['useful_tokens'] / base['slots']):.0f}% of slots are padding)")
    print(f"    (a)/(b) = {out['ratio_a_over_b']:.1f}x steady, {out['ratio_a_end_to_end_over_b']:.1f}x end to end; "
          f"(a0)/(b) = {out['ratio_a0_over_b']:.1f}x")
    print(f"(c) roofline: (a) ran at {first['roofline_gflops']:.0f} GFLOP/s, (b) at {base['roofline_gflops']:.0f} "
          f"(probes before each shard/batch; phase readings {', '.join(f'{g:.0f}' for g in readings)}); "
          f"{flops_per_token / 1e6:.0f} MFLOP/token -> (a) computes at {100 * out['a_share_of_roofline']:.0f}% of "
          f"{a_predicted:.0f} tok/s (delivers {100 * out['a_delivered_share_of_roofline']:.0f}%), (a0) "
          f"{100 * out['a0_share_of_roofline']:.0f}%, (b) = {100 * out['b_share_of_roofline']:.0f}% of {b_predicted:.0f} tok/s; "
          f"load-normalised (a)/(b) = {out['a_delivered_share_of_roofline'] / out['b_share_of_roofline']:.1f}x")
    print(f"disk: {first['bytes_per_token']:.0f} bytes/token vs hidden_size x 2 = {raw} "
          f"({first['bytes_per_token'] / raw:.2f}x); padded to {args.pad_to} it would be {padded_bytes:.0f} per useful token")
    print(f"incremental: first run {first['wall_s']:.1f}s ({first['computed']} computed); unchanged rerun "
          f"{second['wall_s']:.2f}s ({second['computed']} computed, {100 * second['wall_s'] / first['wall_s']:.1f}% of the "
          f"first); +{len(new)} new captions: {grown['computed']} computed, {grown['wall_s']:.1f}s wall "
          f"({100 * grown['wall_s'] / first['wall_s']:.0f}%), compute {grown['compute_seconds']:.1f}s "
          f"({100 * grown['compute_seconds'] / first['compute_seconds']:.0f}% of the first run's)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMNIDIFF_HOME", str(REPO / ".omnidiff"))
    raise SystemExit(main())
