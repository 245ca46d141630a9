"""The embed job: pair snapshots -> LLM / CLIP / pixel caches, with Ray Data actors.

    omnidiff embed --config configs/embed.yaml            # or: embed_cache.job.run(cfg)

What it computes (docs/architecture.md "Embedding cache"):
* ``llm``:    per-token states of every distinct normalised caption, every parallel text (the
  language side) and "" (the unconditional prompt), keyed by ``text_key``;
* ``clip``:   the base model's CLIP text states of the English side (``caption_en``, else the caption
  when ``lang == "en"``; the parallel ``text_en``) in up to ``clip.max_windows`` stitched 77-token
  windows, with the pooled vector: the stage-1 target;
* ``pixels``: each distinct image (by ``image_digest``) as float16 (C, H, W) in [-1, 1], or its VAE
  latents when ``pixels.vae`` is set: what stages 2-3 train on.

How (each step is why the cache beats padded per-file caches):
1. The driver gathers the distinct keys, opens the cache directory named by the fingerprint
   (omnidiff/contracts/encoders.py) as its only writer and subtracts what is cached: a caption that is
   in ten snapshots is computed once, and a rerun computes only what is new.
2. The missing work is sorted by token length and cut into shards balanced by tokens
   (embed_cache/batching.py); each shard is one Ray Data block (so a small input still spreads over
   every actor, NOTES.md).
3. ``map_batches`` over an ``ActorPoolStrategy(size=num_actors)``: each actor loads its model once,
   packs its shard into compute batches under a token-slot budget (no compute on padding), computes
   in fp32, rejects NaN/inf rows by key, and writes the shard itself (temp name + atomic rename).
4. The driver lists every finished shard in the manifest (atomic rewrite) as it arrives and prints
   progress in tokens/s with an ETA. Killed at any point, a rerun adopts finished shards and
   computes the rest (embed_cache/writer.py "Crash safety").
5. The run is logged to MLflow: fingerprints, counts computed/skipped/rejected, throughput, cache
   locations, manifests.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from embed_cache import batching
from embed_cache.config import EmbedConfig
from embed_cache.writer import CacheWriter, write_shard_file
from omnidiff.config import to_dict
from omnidiff.contracts.cache import CacheStore, NonFiniteStatesError, cache_dir, pixels_table, states_table
from omnidiff.contracts.encoders import clip_spec, fingerprint, llm_folder, llm_spec, pixels_spec
from omnidiff.contracts.keys import cache_key, english_side
from omnidiff.progress import Progress

log = logging.getLogger("omnidiff.embed")

UNIT = {"llm": "tok", "clip": "tok", "pixels": "img"}


# ---------------------------------------------------------------------------------------- inputs


@dataclass
class EmbedInputs:
    """Distinct work per cache kind, gathered from snapshots (or built in memory by tests/benchmarks).

    texts: llm key -> normalised text; english: clip key -> normalised English text;
    images: image digest -> encoded image bytes; references: rows that pointed at each kind
    (so "a caption in ten snapshots is embedded once" shows as references >> distinct).
    """

    texts: dict[str, str] = field(default_factory=dict)
    english: dict[str, str] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)
    references: dict[str, int] = field(default_factory=lambda: {"llm": 0, "clip": 0, "pixels": 0})
    snapshots: list[dict[str, str]] = field(default_factory=list)

    def add_text(self, text: str | None) -> None:
        if text is None:
            return
        normalised, key = cache_key(text)
        self.texts.setdefault(key, normalised)
        self.references["llm"] += 1

    def add_english(self, text: str | None) -> None:
        if text is None or (isinstance(text, float) and np.isnan(text)):
            return
        normalised, key = cache_key(text)
        self.english.setdefault(key, normalised)
        self.references["clip"] += 1

    def add_image(self, digest: str, data: bytes) -> None:
        self.images.setdefault(digest, data)
        self.references["pixels"] += 1

    def work(self, kind: str) -> dict[str, Any]:
        return {"llm": self.texts, "clip": self.english, "pixels": self.images}[kind]


def resolve_snapshots(names: Iterable[str]) -> list[Path]:
    """Snapshot names -> their newest snapshot directory (``LATEST``); existing paths stay as they are."""
    out = []
    for name in names:
        path = Path(name)
        if path.is_dir() and (path / "manifest.json").exists():
            out.append(path.resolve())
            continue
        from omnidiff.contracts.snapshot import SnapshotError, latest_snapshot

        try:
            out.append(Path(latest_snapshot(name)).resolve())
        except (SnapshotError, FileNotFoundError) as exc:
            raise FileNotFoundError(
                f"snapshots: {name!r} is neither a snapshot directory nor a collected snapshot name: {exc}"
            ) from None
    return out


def _frame(obj: Any) -> pd.DataFrame:
    """A snapshot accessor's result (Arrow table, DataFrame, or an iterable of either) as one DataFrame."""
    import pyarrow as pa

    if isinstance(obj, pd.DataFrame):
        return obj
    if isinstance(obj, (pa.Table, pa.RecordBatch)):
        return obj.to_pandas()
    if hasattr(obj, "to_table"):  # a pyarrow dataset
        return obj.to_table().to_pandas()
    parts = [_frame(part) for part in obj]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _read(snapshot: Any, accessor: str, columns: list[str]) -> pd.DataFrame:
    method = getattr(snapshot, accessor)
    try:
        wants_columns = "columns" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        wants_columns = False
    frame = _frame(method(columns=columns) if wants_columns else method())
    missing = [c for c in columns if c not in frame.columns]
    if missing and len(frame):
        raise ValueError(f"snapshot {accessor}() has no column(s) {missing} (has {list(frame.columns)})")
    return frame


def gather_inputs(snapshot_dirs: Iterable[Path], cfg: EmbedConfig) -> EmbedInputs:
    """Distinct texts / English texts / images of the snapshots' chosen splits, plus ""."""
    from omnidiff.contracts.snapshot import Snapshot

    inputs = EmbedInputs()
    inputs.add_text("")  # the unconditional embedding (PAPER.md "Release hyper-parameters")
    if "clip" in cfg.kinds:
        inputs.add_english("")
    splits = set(cfg.splits)
    for path in snapshot_dirs:
        snap = Snapshot.open(path)
        inputs.snapshots.append({"path": str(path), "digest": str(getattr(snap, "digest", ""))})
        columns = ["caption", "caption_en", "lang", "split"]
        if "pixels" in cfg.kinds:
            columns += ["image_digest", "image"]
        pairs = _read(snap, "pairs", columns)
        if "split" in pairs.columns:
            pairs = pairs[pairs["split"].isin(splits)]
        for row in pairs.itertuples(index=False):
            inputs.add_text(row.caption)
            if "clip" in cfg.kinds:
                inputs.add_english(english_side(row.caption, row.lang, row.caption_en))
            if "pixels" in cfg.kinds:
                inputs.add_image(row.image_digest, row.image)
        if cfg.include_parallel and snap.manifest.get("shards", {}).get("parallel"):
            parallel = _read(snap, "parallel", ["text", "lang", "text_en", "split"])
            if "split" in parallel.columns:
                parallel = parallel[parallel["split"].isin(splits)]
            for row in parallel.itertuples(index=False):
                inputs.add_text(row.text)
                if "clip" in cfg.kinds:
                    inputs.add_english(english_side(row.text, row.lang, row.text_en, parallel=True))
    return inputs


# ---------------------------------------------------------------------------------------- kinds


def llm_path(cfg: EmbedConfig) -> Path:
    return llm_folder(cfg.llm.path)


def llm_token_lengths(path: Path, texts: list[str], max_length: int) -> list[int]:
    """Token counts as ``LLMTextEncoder.token_lengths`` gives them, from the tokenizer alone (no weights)."""
    from omnidiff.models.llm import load_tokenizer

    ids = load_tokenizer(path)(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return [max(1, len(x)) for x in ids]


def newest_base_model() -> Path:
    """The most recently pretrained base model under ``models_dir()/base`` (``omnidiff base pretrain``)."""
    from omnidiff.env import models_dir

    found = [
        p
        for p in (models_dir() / "base").glob("*/")
        if (p / "model_index.json").is_file() and (p / "text_encoder").is_dir() and (p / "tokenizer").is_dir()
    ]
    if not found:
        raise FileNotFoundError(
            "clip.base_model is not set and no pretrained base model exists under "
            f"{models_dir() / 'base'}: run 'omnidiff base pretrain', set clip.base_model to the base model's "
            "pipeline folder (it holds text_encoder/ and tokenizer/), or drop 'clip' from kinds"
        )
    return max(found, key=lambda p: (p / "model_index.json").stat().st_mtime)


def clip_folders(cfg: EmbedConfig) -> tuple[Path, Path]:
    """``(text_encoder/, tokenizer/)`` of the base model's pipeline folder (a path or a registry reference)."""
    base = cfg.clip.base_model
    if base is None:
        base = newest_base_model()
        log.info("embed clip: clip.base_model not set, using the newest base model %s", base)
    base = Path(base)
    if not base.is_dir() and ("@" in str(base) or str(base).count("/") == 1):
        from omnidiff.tracking import resolve_model  # e.g. omnidiff-base@production

        base = Path(resolve_model(str(base)))
    text_encoder, tokenizer = base / "text_encoder", base / "tokenizer"
    for folder in (text_encoder, tokenizer):
        if not folder.is_dir():
            raise FileNotFoundError(f"clip.base_model={str(cfg.clip.base_model)!r}: {folder} does not exist")
    return text_encoder.resolve(), tokenizer.resolve()


def load_clip(text_encoder: Path, tokenizer: Path):
    from omnidiff.models.clip_text import ClipTextEncoder

    return ClipTextEncoder.from_pretrained(text_encoder, tokenizer_folder=tokenizer)


@dataclass
class KindPlan:
    """Everything the generic driver loop needs for one cache kind."""

    kind: str
    inputs: dict[str, Any]
    value_shape: tuple[int, ...]
    encoder: dict[str, Any]  # keyword arguments of the kind's *ShardEncoder
    lengths: Callable[[list[str], list[Any]], list[int]]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)


def plan_kind(kind: str, cfg: EmbedConfig) -> KindPlan:
    """Fingerprint inputs, value shape, actor class and cost function of ``kind`` under ``cfg``."""
    if kind == "llm":
        path = llm_path(cfg)
        spec = llm_spec(path, cfg.llm.layer, cfg.llm.max_length, cfg.llm.dtype)
        return KindPlan(
            kind,
            spec.inputs,
            spec.value_shape,
            {
                "path": str(path),
                "layer": cfg.llm.layer,
                "max_length": cfg.llm.max_length,
                "dtype": cfg.llm.dtype,
                "device": cfg.device,
                "expected_inputs": spec.inputs["encoder"],
                "share_prefixes": cfg.share_prefixes,
                "share_cache_mb": cfg.share_cache_mb,
            },
            lambda keys, texts: llm_token_lengths(path, list(texts), cfg.llm.max_length),
        )
    if kind == "clip":
        text_encoder, tokenizer = clip_folders(cfg)
        windows = cfg.clip.max_windows
        spec = clip_spec(text_encoder, tokenizer, windows)  # named from the files: no model loaded here
        return KindPlan(
            kind,
            spec.inputs,
            spec.value_shape,
            {
                "text_encoder": str(text_encoder),
                "tokenizer": str(tokenizer),
                "max_windows": windows,
                "device": cfg.device,
                "expected_inputs": spec.inputs["encoder"],
            },
            # The driver loads the (small) CLIP text tower only when there is something to compute.
            lambda keys, texts: load_clip(text_encoder, tokenizer).token_lengths(list(texts), windows),
        )
    if kind == "pixels":
        res = cfg.pixels.resolution
        spec = pixels_spec(res, cfg.pixels.vae)
        return KindPlan(
            kind,
            spec.inputs,
            spec.value_shape,
            {
                "resolution": res,
                "vae": str(cfg.pixels.vae) if cfg.pixels.vae else None,
                "batch_size": cfg.pixels.batch_size,
                "device": cfg.device,
            },
            lambda keys, payloads: [1] * len(keys),
        )
    raise ValueError(f"kind={kind!r}: expected llm, clip or pixels")


def cache_dirs(cfg: EmbedConfig) -> dict[str, Path]:
    """The cache directory of every kind in ``cfg`` (what train reads), without computing anything."""
    return {kind: cache_dir(kind, plan_kind(kind, cfg).fingerprint, cfg.cache_root) for kind in cfg.kinds}


# ---------------------------------------------------------------------------------------- actors


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


class EncodeShardActor:
    """The Ray Data callable class: one call = one shard of one cache kind.

    Each model (LLM, CLIP, VAE) is loaded once per actor, on the first shard of its kind, so one
    actor pool serves every kind of a run. A call packs its (length-sorted) shard into compute
    batches under the token-slot budget, computes them, rejects non-finite rows by key (reported as
    data; the rest is still written) and writes the shard itself: the driver only lists finished
    shards in the manifest.
    """

    def __init__(
        self,
        caches: dict[str, str],
        run_tokens: dict[str, str],
        encoders: dict[str, dict[str, Any]],
        threads: int,
        max_tokens: int,
        max_batch_size: int,
        roofline_probe_s: float = 0.0,
        batch_overhead: float | None = None,
    ):
        import torch
        import transformers

        torch.set_num_threads(int(threads))
        self.roofline_probe_s = float(roofline_probe_s)
        transformers.utils.logging.disable_progress_bar()  # no per-actor "Loading weights" bars in the log
        self.caches, self.run_tokens, self.encoder_kwargs = caches, run_tokens, encoders
        self.max_tokens, self.max_batch_size = int(max_tokens), int(max_batch_size)
        self.batch_overhead = batch_overhead
        self.encoders: dict[str, Any] = {}

    def encoder(self, kind: str):
        if kind not in self.encoders:
            builders = {"llm": LLMShardEncoder, "clip": ClipShardEncoder, "pixels": PixelShardEncoder}
            self.encoders[kind] = builders[kind](**self.encoder_kwargs[kind], max_batch_size=self.max_batch_size)
        return self.encoders[kind]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        start = time.perf_counter()
        kind = str(batch["kind"].iloc[0])
        encoder = self.encoder(kind)
        load_s = time.perf_counter() - start
        # The machine's matmul rate right now, on this actor's threads: the shard's compute that follows
        # is judged against it (a shared machine's rate swings with load).
        roofline = matmul_gflops(self.roofline_probe_s) if self.roofline_probe_s > 0 else 0.0
        probe_s = time.perf_counter() - start - load_s
        start = time.perf_counter()
        order = np.argsort(batch["length"].to_numpy(), kind="stable")  # the driver sorted already
        keys = [batch["key"].iloc[i] for i in order]
        payloads = [decode_payload(kind, batch["payload"].iloc[i]) for i in order]
        lengths = batch["length"].to_numpy()[order]
        batch_limit = min(self.max_batch_size, getattr(encoder, "batch_size", self.max_batch_size))
        if hasattr(encoder, "compute_shard"):  # plans its own batches (the LLM: shared prefixes)
            values, counts = encoder.compute_shard(payloads, self.max_tokens, batch_limit, self.batch_overhead)
        else:
            values, counts = [], {"padded_slots": 0, "computed_tokens": int(lengths.sum()), "shared_tokens": 0}
            for sl in batching.pack_batches(lengths, self.max_tokens, batch_limit, self.batch_overhead):
                values.extend(encoder.compute(payloads[sl]))
                counts["padded_slots"] += (sl.stop - sl.start) * int(lengths[sl.stop - 1])
        compute_s = time.perf_counter() - start
        rejected: dict[str, str] = {}
        try:
            table = encoder.table(keys, values)
        except NonFiniteStatesError as exc:  # report the bad rows as data, keep the good ones
            rejected = exc.rejected
            good = [i for i, k in enumerate(keys) if k not in rejected]
            keys = [keys[i] for i in good]
            values = [values[i] for i in good]
            table = encoder.table(keys, values) if keys else None
        entry: dict[str, Any] = {"name": None, "rows": 0, "sha256": None, "bytes": 0, "stale": False}
        if table is not None:
            entry.update(write_shard_file(self.caches[kind], str(batch["shard"].iloc[0]), table, self.run_tokens[kind]))
        entry.setdefault("tokens", len(keys))
        return pd.DataFrame([{
            "kind": kind,
            "entry": json.dumps(entry),
            "shard_keys": json.dumps(keys),
            "rejected": json.dumps(rejected),
            "planned_tokens": int(lengths.sum()),
            "padded_slots": counts["padded_slots"],
            "computed_tokens": counts["computed_tokens"],
            "shared_tokens": counts["shared_tokens"],
            "compute_s": compute_s,
            "load_s": load_s,
            "roofline_gflops": roofline,
            "probe_s": probe_s,
            "pid": os.getpid(),
        }])  # fmt: skip


def encode_payload(kind: str, payload: Any) -> bytes:
    """Every unit's payload column is binary (one Arrow schema for all kinds): texts go as UTF-8."""
    return payload if kind == "pixels" else str(payload).encode("utf-8")


def decode_payload(kind: str, payload: bytes) -> Any:
    return payload if kind == "pixels" else bytes(payload).decode("utf-8")


class LLMShardEncoder:
    """LLM per-token states: fp32 compute, unpadded rows, fp16 storage, shared prefixes computed once."""

    def __init__(
        self,
        path: str,
        layer: int,
        max_length: int,
        dtype: str,
        device: str,
        expected_inputs: dict,
        max_batch_size: int,
        share_prefixes: int = 0,
        share_cache_mb: float = 2048,
    ):
        from omnidiff.models.llm import LLMTextEncoder

        self.model = LLMTextEncoder(
            path, layer=layer, max_length=max_length, dtype=dtype, device=device, batch_size=max_batch_size
        )
        self.share_prefixes = int(share_prefixes)
        if self.share_prefixes and not self.model.causal:  # a bidirectional model's prefix states depend on the rest
            log.warning("embed llm: %s is not a causal LM: share_prefixes=%d ignored", path, self.share_prefixes)
            self.share_prefixes = 0
        self.max_kept = int(share_cache_mb * 2**20 // self.model.kv_bytes_per_token)
        got = self.model.fingerprint_inputs()
        if got != expected_inputs:  # the cache directory was named from these: never write under a wrong name
            raise RuntimeError(f"LLM fingerprint inputs differ between driver {expected_inputs} and actor {got}")

    def compute(self, texts: list[str]) -> list[np.ndarray]:
        states, mask = self.model.encode(list(texts))  # (B, T, D) float32, (B, T) bool
        states, mask = states.numpy(), mask.numpy()
        return [states[i][mask[i]] for i in range(len(texts))]  # (L_i, D) each

    def compute_shard(self, texts: list[str], max_tokens: int, max_batch_size: int, batch_overhead: float | None = None):
        """A whole shard at once, each shared token prefix computed once (``batching.plan_prefix_sharing``).

        Run by run (the keys/values kept for later rows stay under ``share_cache_mb``), wave by wave
        (a row runs after the row whose prefix it continues), each wave's rows are packed by
        continuation length (``batching.pack_batches``). Returns ``(values, counts)``:
        ``(L_i, D)`` float32 states per text and ``{"padded_slots", "computed_tokens", "shared_tokens"}``.
        """
        ids = self.model.tokenize(list(texts))
        limit = self.model.share_limit
        plan = batching.plan_prefix_sharing(ids, self.share_prefixes, limit, self.max_kept)
        last_use = np.full(len(ids), -1)
        for i, d in enumerate(plan.donor):
            if d >= 0:
                last_use[d] = max(last_use[d], plan.wave[i])
        states: list[Any] = [None] * len(ids)
        kept: list[Any] = [None] * len(ids)
        counts = {"padded_slots": 0, "computed_tokens": 0, "shared_tokens": plan.shared_tokens}
        for run in np.unique(plan.run):  # a run's kept keys/values are freed before the next starts
            in_run = plan.run == run
            for wave in range(int(plan.wave[in_run].max()) + 1):
                todo = []
                for i in np.flatnonzero(in_run & (plan.wave == wave)):
                    d, n = int(plan.donor[i]), int(plan.shared[i])
                    if d >= 0 and n >= len(ids[i]):  # the same tokens as its donor's start (a cut at max_length)
                        states[i] = states[d][:n]
                        kept[i] = [(k[:, : plan.keep[i]], v[:, : plan.keep[i]]) for k, v in kept[d]] if plan.keep[i] else None
                    else:
                        todo.append(int(i))
                self._compute_wave(ids, todo, plan, states, kept, counts, max_tokens, max_batch_size, batch_overhead)
                for i in np.flatnonzero(in_run & (last_use == wave)):  # no later wave continues these rows
                    kept[i] = None
        return [s.numpy() for s in states], counts

    def _compute_wave(self, ids, todo, plan, states, kept, counts, max_tokens, max_batch_size, batch_overhead):
        import torch

        limit = self.model.share_limit

        def continuation(i: int) -> int:
            return len(ids[i]) - int(plan.shared[i])

        # Rows a sliding window could not hold with a prefix never share, and never share a batch with
        # rows that do (the window bounds prefix + continuation).
        fits = [i for i in todo if limit is None or len(ids[i]) <= limit]
        too_long = [i for i in todo if limit is not None and len(ids[i]) > limit]
        for group in (sorted(fits, key=continuation), sorted(too_long, key=continuation)):
            suffix = np.asarray([continuation(i) for i in group], dtype=np.int64)
            for sl in batching.pack_batches(suffix, max_tokens, max_batch_size, batch_overhead):
                batch = group[sl]
                prefixes = []
                for i in batch:
                    d, n = int(plan.donor[i]), int(plan.shared[i])
                    prefixes.append([(k[:, :n], v[:, :n]) for k, v in kept[d]] if d >= 0 else None)
                new, new_kept = self.model.forward_rows(
                    [ids[i][int(plan.shared[i]) :] for i in batch], prefixes, [int(plan.keep[i]) for i in batch]
                )
                for i, h, kv in zip(batch, new, new_kept, strict=True):
                    d = int(plan.donor[i])
                    states[i] = torch.cat([states[d][: int(plan.shared[i])], h]) if d >= 0 else h
                    kept[i] = kv
                counts["padded_slots"] += len(batch) * int(suffix[sl.stop - 1])
                counts["computed_tokens"] += int(suffix[sl].sum())

    def table(self, keys, values):
        return states_table(keys, values)


class ClipShardEncoder:
    """CLIP text states of the English side in stitched 77-token windows (mask-true tokens), plus pooled."""

    def __init__(
        self,
        text_encoder: str,
        tokenizer: str,
        max_windows: int,
        device: str,
        expected_inputs: dict,
        max_batch_size: int,
    ):
        self.model = load_clip(Path(text_encoder), Path(tokenizer)).to(device).eval()
        self.max_windows = int(max_windows)
        got = self.model.fingerprint_inputs(self.max_windows)
        if got != expected_inputs:
            raise RuntimeError(f"CLIP fingerprint inputs differ between driver {expected_inputs} and actor {got}")

    def compute(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        import torch

        # Windows a caption does not need are skipped inside encode(), so sorting by length (= windows
        # used) already keeps the compute to the windows that hold text.
        with torch.inference_mode():
            states, mask, pooled = self.model.encode(list(texts), self.max_windows)  # (B, W*77, D), (B, W*77), (B, D)
        states, mask, pooled = states.float().cpu().numpy(), mask.cpu().numpy(), pooled.float().cpu().numpy()
        return [(states[i][mask[i]], pooled[i]) for i in range(len(texts))]

    def table(self, keys, values):
        pooled = np.stack([v[1] for v in values]) if values else None
        return states_table(keys, [v[0] for v in values], pooled=pooled)


class PixelShardEncoder:
    """Decoded images as float16 (C, H, W) in [-1, 1], or VAE latents (posterior mean x scaling factor)."""

    def __init__(self, resolution: int, vae: str | None, device: str, max_batch_size: int, batch_size: int = 64):
        self.resolution = int(resolution)
        self.batch_size = int(batch_size)  # images per forward; the token budget means nothing here
        self.device = device
        self.vae = None
        if vae:
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(vae).to(device).eval()

    def compute(self, images: list[bytes]) -> list[np.ndarray]:
        pixels = np.stack([decode_image(data, self.resolution) for data in images])  # (B, 3, H, W)
        if self.vae is None:
            return list(pixels)
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(pixels).to(self.device)
            latents = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor  # (B, C', h, w)
        return list(latents.float().cpu().numpy())

    def table(self, keys, values):
        return pixels_table(keys, np.stack(values))


def decode_image(data: bytes, resolution: int) -> np.ndarray:
    """Encoded image bytes -> float32 ``(3, R, R)`` in [-1, 1]; other sizes: shorter side to R, centre crop."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (resolution, resolution):
            w, h = img.size
            scale = resolution / min(w, h)
            img = img.resize(
                (max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.BICUBIC
            )
            w, h = img.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            img = img.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(img, dtype=np.float32)  # (R, R, 3)
    return arr.transpose(2, 0, 1) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------- driver


def _new_stats(plan: KindPlan, directory: Path, wanted: int) -> dict[str, Any]:
    return {
        "kind": plan.kind,
        "fingerprint": plan.fingerprint,
        "dir": str(directory),
        "wanted": wanted,
        "computed": 0,
        "skipped": 0,
        "rejected": {},
        "tokens": 0,
        "planned": 0,
        "computed_tokens": 0,
        "shared_tokens": 0,
        "padded_slots": 0,
        "seconds": 0.0,
        "compute_seconds": 0.0,
        "load_seconds": 0.0,
        "roofline_gflop_s": 0.0,
        "probe_seconds": 0.0,
        "stale_shards": 0,
        "shards_written": 0,
    }


def plan_units(
    kind: str, writer: CacheWriter, todo: list[str], payloads: list[Any], lengths: np.ndarray, cfg: EmbedConfig
) -> list[pd.DataFrame]:
    """Length-sorted, token-balanced shards of missing keys: one DataFrame (= one Ray block) per shard."""
    order = batching.length_order(lengths, todo)
    keys = [todo[i] for i in order]
    payloads = [encode_payload(kind, payloads[i]) for i in order]
    lengths = lengths[order]
    return [
        pd.DataFrame({"kind": kind, "shard": writer.shard_name(unit), "key": keys[sl], "payload": payloads[sl],
                      "length": lengths[sl]})
        for unit, sl in enumerate(batching.plan_shards(lengths, cfg.shard_tokens, cfg.shard_rows))
    ]  # fmt: skip


def embed(inputs: EmbedInputs, cfg: EmbedConfig) -> dict[str, Any]:
    """Fill every cache in ``cfg.kinds`` with the keys of ``inputs`` it lacks; returns per-kind stats.

    All kinds share one actor pool (each actor loads each model once, on first use), so a run pays
    the actors' start-up once however many caches it fills.
    """
    start = time.perf_counter()
    plans = {kind: plan_kind(kind, cfg) for kind in cfg.kinds}
    stats: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        writers: dict[str, CacheWriter] = {}
        units: list[pd.DataFrame] = []
        totals: dict[str, int] = {}
        for kind, plan in plans.items():
            work = inputs.work(kind)
            directory = cache_dir(kind, plan.fingerprint, cfg.cache_root)
            writer = writers[kind] = stack.enter_context(CacheWriter(directory, plan.inputs))
            writer.set_value_shape(plan.value_shape)
            stats[kind] = _new_stats(plan, directory, len(work))
            stats[kind]["references"] = inputs.references[kind]
            if writer.recovered_anything:
                stats[kind]["recovered"] = {k: v for k, v in writer.recovered.items() if v}
                log.info("embed %s: recovered after an interrupted run: %s", kind, stats[kind]["recovered"])
            todo = sorted(k for k in work if k not in writer.keys)
            stats[kind]["skipped"] = len(work) - len(todo)
            if todo:
                payloads = [work[k] for k in todo]
                lengths = np.asarray(plan.lengths(todo, payloads), dtype=np.int64)
                kind_units = plan_units(kind, writer, todo, payloads, lengths, cfg)
                units += kind_units
                totals[kind] = int(lengths.sum())
                log.info(
                    "embed %s: %d cached, %d to compute in %d shards (%d %s) -> %s",
                    kind,
                    stats[kind]["skipped"],
                    len(todo),
                    len(kind_units),
                    totals[kind],
                    UNIT[kind],
                    directory,
                )
            else:
                log.info("embed %s: all %d keys cached -> %s", kind, len(work), directory)
        executor = choose_executor(cfg, sum(totals.values())) if units else None
        for kind_stats in stats.values():
            kind_stats["executor"] = executor
        if units:
            log.info("embed: %d units of work -> %s executor", sum(totals.values()), executor)
            results = (
                _execute_ray(units, plans, writers, cfg)
                if executor == "ray"
                else _execute_local(units, plans, writers, cfg)
            )
            _collect(results, writers, stats, totals, cfg, executor)
        for kind, writer in writers.items():
            stats[kind]["manifest"] = dict(writer.manifest)
    seconds = time.perf_counter() - start
    for kind_stats in stats.values():
        _finish_stats(kind_stats, seconds)
    return stats


def choose_executor(cfg: EmbedConfig, units: int) -> str:
    """``cfg.executor``, with ``auto`` resolved: in this process when the missing work is small.

    An actor pool costs a process start, a torch import and a model load per actor before the first
    token; a nightly delta of a few thousand tokens would spend most of its time there. Only CPU
    runs go local (the driver may have no GPU).
    """
    if cfg.executor != "auto":
        return cfg.executor
    on_cpu = cfg.device == "cpu" and not cfg.num_gpus_per_actor
    return "local" if on_cpu and units <= cfg.auto_local_max_units else "ray"


def _finish_stats(stats: dict[str, Any], seconds: float) -> None:
    manifest = stats["manifest"]
    stats["seconds"] = seconds
    stats["rows"] = manifest["rows"]
    # Of the slots computed, the share that was padding; tokens taken from a shared prefix were not computed.
    slots = stats["padded_slots"]
    stats["padding_fraction"] = 1.0 - stats["computed_tokens"] / slots if slots else 0.0
    stats["shared_fraction"] = stats["shared_tokens"] / stats["planned"] if stats["planned"] else 0.0
    stats["tokens_per_s"] = stats["tokens"] / seconds if stats["tokens"] and seconds > 0 else 0.0
    stats.pop("first_compute_at", None)
    stats.pop("first_probe_s", None)
    stats.setdefault("compute_span_s", 0.0)
    # Useful tokens per second of the busy span: the steady rate of the whole pool.
    stats["compute_tokens_per_s"] = stats["tokens"] / stats["compute_span_s"] if stats["compute_span_s"] else 0.0
    stats["roofline_gflops"] = (
        stats.pop("roofline_gflop_s") / stats["compute_seconds"] if stats["compute_seconds"] else 0.0
    )
    stats["bytes"] = sum(s["bytes"] for s in manifest["shards"])
    cached_tokens = sum(s.get("tokens", s["rows"]) for s in manifest["shards"])
    stats["bytes_per_token"] = stats["bytes"] / cached_tokens if cached_tokens else 0.0


def _actor_kwargs(plans: dict[str, KindPlan], writers: dict[str, CacheWriter], cfg: EmbedConfig) -> dict[str, Any]:
    return {
        "caches": {k: str(w.path) for k, w in writers.items()},
        "run_tokens": {k: w.run_token for k, w in writers.items()},
        "encoders": {k: p.encoder for k, p in plans.items()},
        "threads": cfg.threads_per_actor,
        "max_tokens": cfg.max_tokens,
        "max_batch_size": cfg.max_batch_size,
        "batch_overhead": cfg.batch_overhead_slots or None,
        "roofline_probe_s": cfg.roofline_probe_s,
    }


def _execute_ray(units: list[pd.DataFrame], plans, writers, cfg: EmbedConfig) -> Iterable[pd.DataFrame]:
    """Map the shards over an actor pool; yields each finished shard's report as it arrives."""
    from omnidiff.stack import ensure_ray

    ensure_ray()
    import ray.data
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress lines (tokens/s, ETA) instead of Ray's bars
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # One block per shard: every actor gets work even for a small input (NOTES.md "Ray").
    ds = ray.data.from_pandas(units)
    out = ds.map_batches(
        EncodeShardActor,
        fn_constructor_kwargs=_actor_kwargs(plans, writers, cfg),
        batch_size=None,
        batch_format="pandas",
        compute=ActorPoolStrategy(size=min(cfg.num_actors, len(units))),
        num_cpus=cfg.threads_per_actor,
        num_gpus=cfg.num_gpus_per_actor or None,
    )
    yield from out.iter_batches(batch_size=None, batch_format="pandas")


def _execute_local(units: list[pd.DataFrame], plans, writers, cfg: EmbedConfig) -> Iterable[pd.DataFrame]:
    """The same actor class called in this process, shard after shard (debugging, tiny updates, no Ray)."""
    actor = EncodeShardActor(**_actor_kwargs(plans, writers, cfg))
    for unit in units:
        yield actor(unit)


def _collect(
    results: Iterable[pd.DataFrame],
    writers: dict[str, CacheWriter],
    stats: dict[str, dict[str, Any]],
    totals: dict[str, int],
    cfg: EmbedConfig,
    executor: str,
) -> None:
    """List each finished shard in its manifest as it arrives; progress per kind with rate and ETA."""
    progress = {kind: Progress(f"embed {kind}", total=total, unit=UNIT[kind], every_s=cfg.progress_every_s)
                for kind, total in totals.items()}  # fmt: skip
    n_actors = cfg.num_actors if executor == "ray" else 1
    for batch in results:
        for row in batch.itertuples(index=False):
            kind_stats, entry = stats[row.kind], json.loads(row.entry)
            keys, rejected = json.loads(row.shard_keys), json.loads(row.rejected)
            if entry.get("stale"):
                kind_stats["stale_shards"] += 1
            elif entry["name"] is not None:
                writers[row.kind].publish(entry, keys)
                kind_stats["shards_written"] += 1
            kind_stats["computed"] += len(keys)
            kind_stats["tokens"] += int(entry.get("tokens", len(keys)))
            kind_stats["planned"] += int(row.planned_tokens)
            kind_stats["padded_slots"] += int(row.padded_slots)
            kind_stats["computed_tokens"] += int(row.computed_tokens)
            kind_stats["shared_tokens"] += int(row.shared_tokens)
            kind_stats["compute_seconds"] += float(row.compute_s)
            kind_stats["load_seconds"] += float(row.load_s)
            if row.roofline_gflops and row.roofline_gflops > 0:  # probe on: compute-time-weighted mean
                kind_stats["roofline_gflop_s"] += float(row.roofline_gflops) * float(row.compute_s)
            kind_stats["rejected"].update(rejected)
            for key, why in rejected.items():
                log.error("embed %s: rejected key %s: %s", row.kind, key, why)
            # Busy span: from the first shard's compute start to the last shard's arrival; actor start-up
            # and model loads are outside it, idle actors (an unbalanced tail) inside it.
            now = time.perf_counter()
            kind_stats.setdefault("first_compute_at", now - float(row.compute_s))
            # Probes after the first run between shards on every actor; their share of the span is not
            # compute. Never claim more than perfect overlap of the actors' compute.
            if "first_probe_s" not in kind_stats:
                kind_stats["first_probe_s"] = float(row.probe_s)
            kind_stats["probe_seconds"] += float(row.probe_s)
            probes = (kind_stats["probe_seconds"] - kind_stats["first_probe_s"]) / n_actors
            span = now - kind_stats["first_compute_at"] - probes
            kind_stats["compute_span_s"] = max(span, kind_stats["compute_seconds"] / n_actors)
            bar = progress[row.kind]
            if bar.done == 0:
                # Rate and ETA from this kind's first shard's compute on, not from before the actors
                # started (their start-up and model loads would make the ETA meaningless).
                bar.start = time.perf_counter() - float(row.compute_s)
            bar.update(int(row.planned_tokens))
            if bar.done >= bar.total:
                bar.emit(final=True)


def run(cfg: EmbedConfig) -> dict[str, Any]:
    """The embed stage: resolve snapshots, gather inputs, fill the caches, log to MLflow.

    Returns ``{"snapshots": [...], "kinds": {kind: stats}, "fingerprints": {kind: fp}, "dirs": {kind: dir},
    "rejected": n, "run_id": mlflow run id or None}``.
    """
    start = time.perf_counter()
    snapshots = resolve_snapshots(cfg.snapshots)
    inputs = gather_inputs(snapshots, cfg)
    if not cfg.track:
        kinds = embed(inputs, cfg)
        return _summary(inputs, kinds, time.perf_counter() - start, None)

    from omnidiff import tracking

    with tracking.start_run("embed", config=cfg) as mlrun:
        kinds = embed(inputs, cfg)
        summary = _summary(inputs, kinds, time.perf_counter() - start, mlrun.info.run_id)
        _log(summary, inputs, cfg)
    return summary


def _summary(inputs: EmbedInputs, kinds: dict[str, Any], seconds: float, run_id: str | None) -> dict[str, Any]:
    return {
        "snapshots": inputs.snapshots,
        "kinds": kinds,
        "fingerprints": {k: v["fingerprint"] for k, v in kinds.items()},
        "dirs": {k: v["dir"] for k, v in kinds.items()},
        "computed": {k: v["computed"] for k, v in kinds.items()},
        "skipped": {k: v["skipped"] for k, v in kinds.items()},
        "rejected": sum(len(v["rejected"]) for v in kinds.values()),
        "seconds": seconds,
        "run_id": run_id,
    }


def _log(summary: dict[str, Any], inputs: EmbedInputs, cfg: EmbedConfig) -> None:
    import mlflow

    from omnidiff import tracking

    params: dict[str, Any] = {}
    metrics: dict[str, float] = {"seconds": summary["seconds"]}
    tags: dict[str, str] = {}
    for kind, stats in summary["kinds"].items():
        params[f"{kind}.fingerprint"] = stats["fingerprint"]
        params[f"{kind}.cache_dir"] = stats["dir"]
        tags[f"cache_fingerprint.{kind}"] = stats["fingerprint"]
        if stats.get("executor"):
            tags["executor"] = stats["executor"]
        for name in (
            "wanted",
            "computed",
            "skipped",
            "references",
            "rows",
            "tokens",
            "tokens_per_s",
            "seconds",
            "compute_seconds",
            "compute_tokens_per_s",
            "load_seconds",
            "roofline_gflops",
            "padding_fraction",
            "shared_fraction",
            "computed_tokens",
            "bytes",
            "bytes_per_token",
            "stale_shards",
        ):
            metrics[f"{kind}.{name}"] = float(stats[name])
        metrics[f"{kind}.rejected"] = float(len(stats["rejected"]))
        tracking.log_json(stats["manifest"], f"manifests/{kind}.json")
        if stats["rejected"]:
            tracking.log_json(stats["rejected"], f"rejected/{kind}.json")
    for i, snap in enumerate(summary["snapshots"]):
        params[f"snapshot.{i}.digest"] = snap["digest"]
        params[f"snapshot.{i}.path"] = snap["path"]
        tags[f"snapshot_digest.{i}"] = snap["digest"]
    mlflow.log_params(params)
    mlflow.log_metrics(metrics)
    mlflow.set_tags(tags)
    tracking.log_json(
        {k: v for k, v in summary.items() if k != "kinds"} | {"config": to_dict(cfg)}, "embed_summary.json"
    )


def open_caches(summary_or_dirs: dict[str, Any]) -> dict[str, CacheStore]:
    """``{kind: CacheStore}`` from :func:`run`'s result (or its ``dirs``)."""
    dirs = summary_or_dirs.get("dirs", summary_or_dirs)
    return {kind: CacheStore(path) for kind, path in dirs.items()}
