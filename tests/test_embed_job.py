"""The embed job: correctness of what is cached, incremental runs, NaN rejection, flows. (SIGKILL + rerun:
tests/test_lineage.py on a local cache, tests/test_s3_kill.py with the cache on S3.)

    .venv/bin/pytest tests/test_embed_job.py -x -q              # unit + e2e (real Ray, MLflow, Prefect)
    .venv/bin/pytest tests/test_embed_job.py -x -q -m "not e2e" # no stack

Timing claims (second run < 10% of the first, 10% new captions ~ 10% of the cost) are measured in
benchmarks/embed_throughput.py, not asserted here; these tests check what is computed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from embed_cache.config import EmbedConfig
from embed_cache.writer import CacheWriter
from omnidiff.config import ConfigError, load_config, replace
from omnidiff.contracts.cache import SHARDS_DIR, CacheStore, cache_dir, states_table
from omnidiff.contracts.encoders import describe_llm, fingerprint, llm_inputs
from omnidiff.contracts.keys import text_key
from omnidiff.text import normalise_caption
from tests.fixtures_embed import EMBED_TEST_CONFIG, png_bytes, write_snapshot

WORDS = (
    "a red blue green yellow purple circle square triangle cross diamond on the left right top bottom of "
    "small big picture showing background near"
).split()


def captions(n: int, seed: int, lo: int = 2, hi: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))) + f" #{seed}-{i}" for i in range(n)]


def encoder_of(path: Path, **kw):
    from omnidiff.models.llm import LLMTextEncoder

    return LLMTextEncoder(path, **kw)


def poisoned_llm(src: Path, dst: Path, byte: str) -> Path:
    """A copy of the tiny LLM whose embedding of ``byte`` is NaN: every caption containing it yields NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    from omnidiff.models.llm_folders import MANIFEST_NAME, read_manifest, weights_digest

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if k.endswith("embed_tokens.weight"))
    token_id = ord(byte) + 3  # ByT5: pad, eos, unk, then the 256 bytes
    state[name][token_id] = torch.nan
    save_file(state, weights, metadata={"format": "pt"})
    manifest = read_manifest(dst) | {"weights_digest": weights_digest(dst), "model_id": "tiny-poisoned"}
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest))
    return dst


# ----------------------------------------------------------------------------------------- unit (no Ray)


def test_describe_llm_matches_the_loaded_encoder(tiny_llm):
    from embed_cache.plan import llm_token_lengths

    encoder = encoder_of(tiny_llm, layer=1, max_length=48)
    inputs, hidden = describe_llm(tiny_llm, layer=1, max_length=48)
    assert inputs == encoder.fingerprint_inputs() and hidden == encoder.hidden_size
    texts = ["", "a red circle", "日本語のキャプション", "x" * 500]
    assert llm_token_lengths(tiny_llm, texts, 48) == encoder.token_lengths(texts)
    with pytest.raises(ValueError, match="llm.layer=9"):
        describe_llm(tiny_llm, layer=9)


def llm_actor(cls, llm, writer, expected_inputs):
    """An embed actor (``cls``) of one LLM cache writer, 1 thread, small batches."""
    return cls(caches={"llm": str(writer.path)}, run_tokens={"llm": writer.run_token}, threads=1, max_tokens=256,
               max_batch_size=8, encoders={"llm": {"path": str(llm), "layer": -1, "max_length": 512, "dtype": "float32",
                                                   "device": "cpu", "expected_inputs": expected_inputs}})


def test_actor_packs_computes_unpadded_and_rejects_nan_rows_by_key(tiny_llm, tmp_path):
    from embed_cache.actor import EncodeShardActor

    bad_llm = poisoned_llm(tiny_llm, tmp_path / "poisoned", "Z")
    enc_inputs, _ = describe_llm(bad_llm)
    inputs = llm_inputs(enc_inputs)
    texts = captions(30, seed=1) + ["a Zebra on the left", "", "ZZZ"]
    keys = [text_key(normalise_caption(t)) for t in texts]
    lengths = encoder_of(bad_llm).token_lengths(texts)
    with CacheWriter(cache_dir("llm", fingerprint(inputs), tmp_path), inputs) as w:
        w.set_value_shape((64,))
        actor = llm_actor(EncodeShardActor, bad_llm, w, enc_inputs)
        frame = pd.DataFrame({"kind": "llm", "shard": w.shard_name(0), "key": keys,
                              "payload": [t.encode() for t in texts], "length": lengths})  # fmt: skip
        out = actor(frame.sort_values("length"))
        entry, rejected = json.loads(out.entry[0]), json.loads(out.rejected[0])
        assert set(rejected) == {keys[-3], keys[-1]}  # the two captions with a Z, named by key
        w.publish(entry, json.loads(out.shard_keys[0]))
        # Budget respected: padded slots <= useful + what one long caption can waste per batch.
        assert out.padded_slots[0] < 1.5 * out.planned_tokens[0]
    store = CacheStore(w.path)
    assert len(store) == len(texts) - 2 and store.verify().ok
    direct = encoder_of(bad_llm)
    for i in (0, 5, 31):  # single-caption encodes: no batch, no padding
        states, mask = direct.encode([texts[i]])
        np.testing.assert_allclose(
            store.read([keys[i]])[keys[i]].astype(np.float32), states[0][mask[0]].numpy(), rtol=2e-3, atol=2e-3
        )


def test_an_actor_uploads_one_shard_while_it_computes_the_next(tiny_llm, tmp_path, monkeypatch):
    """Two calls of one actor at once (as Ray runs them, embed_cache/job.py): the models compute one shard at a
    time, and a shard's write (one PUT on object storage) runs beside the other shard's compute (issue 17)."""
    import threading
    import time

    import embed_cache.actor as actor_module
    from embed_cache.actor import CALLS_PER_ACTOR, EncodeShardActor

    assert CALLS_PER_ACTOR >= 2
    spans: dict[str, list[tuple[str, float, float]]] = {"compute": [], "write": []}
    write = actor_module.write_shard_file

    def slow_write(directory, name, *args, **kw):  # a store with a slow PUT
        start = time.perf_counter()
        time.sleep(0.5)
        try:
            return write(directory, name, *args, **kw)
        finally:
            spans["write"].append((name, start, time.perf_counter()))

    class Recording(EncodeShardActor):
        def _compute_shard(self, encoder, keys, payloads, lengths):
            start = time.perf_counter()
            try:
                return super()._compute_shard(encoder, keys, payloads, lengths)
            finally:
                spans["compute"].append((threading.current_thread().name, start, time.perf_counter()))

    monkeypatch.setattr(actor_module, "write_shard_file", slow_write)
    enc_inputs, _ = describe_llm(tiny_llm)
    inputs = llm_inputs(enc_inputs)
    texts = captions(40, seed=3)
    keys = [text_key(normalise_caption(t)) for t in texts]
    lengths = encoder_of(tiny_llm).token_lengths(texts)
    with CacheWriter(cache_dir("llm", fingerprint(inputs), tmp_path), inputs) as w:
        w.set_value_shape((64,))
        actor = llm_actor(Recording, tiny_llm, w, enc_inputs)
        actor.encoder("llm")  # loaded before the race: the spans then time the computes alone
        frames = [pd.DataFrame({"kind": "llm", "shard": w.shard_name(u), "key": keys[u::3],
                                "payload": [t.encode() for t in texts[u::3]], "length": lengths[u::3]})
                  for u in range(3)]  # fmt: skip
        outs: list = []
        threads = [threading.Thread(target=lambda f=f: outs.append(actor(f.sort_values("length")))) for f in frames]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for out in outs:
            w.publish(json.loads(out.entry[0]), json.loads(out.shard_keys[0]))
    computes = sorted(spans["compute"], key=lambda s: s[1])
    assert len(computes) == 3 and len(spans["write"]) == 3
    assert all(a[2] <= b[1] for a, b in zip(computes, computes[1:], strict=False))  # one compute at a time
    # some shard's upload ran while another shard computed
    assert any(ws < ce and cs < we for _, ws, we in spans["write"] for _, cs, ce in computes[1:])
    store = CacheStore(w.path)
    assert sorted(store.keys()) == sorted(set(keys)) and store.verify().ok


def test_shared_prefixes_are_computed_once_and_change_no_state(tiny_llm):
    from embed_cache.encoders.llm import LLMShardEncoder

    enc_inputs, _ = describe_llm(tiny_llm)
    starts = ["a big red circle on the left of", "a big red circle at the top", "un petit carré bleu"]
    rng = np.random.default_rng(3)
    texts = [f"{starts[i % 3]} {t}" for i, t in enumerate(captions(40, seed=4, lo=0, hi=6))]
    texts += [starts[0], starts[0][:12], "x" * 300]  # a row that is another's prefix; one too long to share
    texts = [texts[i] for i in rng.permutation(len(texts))]
    out = {}
    for share, cache_mb in ((0, 1), (4, 1), (4, 0.05)):  # 0.05 MB: ~100 tokens of the tiny model's keys/values
        enc = LLMShardEncoder(str(tiny_llm), -1, 512, "float32", "cpu", enc_inputs, max_batch_size=8,
                              share_prefixes=share, share_cache_mb=cache_mb)  # fmt: skip
        out[share, cache_mb] = enc.compute_shard(texts, max_tokens=256, max_batch_size=8)
    assert enc.model.causal and enc.model.kv_bytes_per_token == 2 * 2 * 1 * 32 * 4  # 2 layers, 1 kv head of 32, fp32
    lengths = enc.model.token_lengths(texts)
    (plain, plain_counts), (shared, counts), (bounded, bounded_counts) = out[0, 1], out[4, 1], out[4, 0.05]
    assert 0 < bounded_counts["shared_tokens"] < counts["shared_tokens"]
    assert plain_counts["computed_tokens"] == sum(lengths) and plain_counts["shared_tokens"] == 0
    assert counts["computed_tokens"] + counts["shared_tokens"] == sum(lengths)
    assert counts["shared_tokens"] > 0.4 * sum(lengths)  # the common starts are computed once
    assert counts["padded_slots"] >= counts["computed_tokens"]
    for a, b, c, n in zip(plain, shared, bounded, lengths, strict=True):
        assert a.shape == b.shape == c.shape == (n, 64)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-4)


def test_prefix_sharing_is_off_for_a_bidirectional_model(tiny_llm, tmp_path, caplog):
    from embed_cache.encoders.llm import LLMShardEncoder

    bidi = shutil.copytree(tiny_llm, tmp_path / "bidi")
    config = json.loads((bidi / "config.json").read_text())
    (bidi / "config.json").write_text(json.dumps(config | {"use_bidirectional_attention": True}))
    enc_inputs, _ = describe_llm(bidi)
    with caplog.at_level("WARNING", logger="omnidiff.embed"):
        enc = LLMShardEncoder(str(bidi), -1, 512, "float32", "cpu", enc_inputs, max_batch_size=8, share_prefixes=4)
    assert not enc.model.causal and enc.share_prefixes == 0
    assert "not a causal LM" in caplog.text
    _, counts = enc.compute_shard(["a red circle", "a red circle on the left"], max_tokens=256, max_batch_size=8)
    assert counts["shared_tokens"] == 0


def test_decode_image_scales_and_resizes():
    from embed_cache.encoders.pixels import decode_image

    x = decode_image(png_bytes(3, size=16), 16)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
    from PIL import Image

    buf = __import__("io").BytesIO()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(buf, format="PNG")
    y = decode_image(buf.getvalue(), 16)
    assert y.shape == (3, 16, 16)
    np.testing.assert_allclose(y[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(y[1], -1.0, atol=1e-6)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="num_actors=0"):
        load_config(EmbedConfig, EMBED_TEST_CONFIG, ["num_actors=0"])
    with pytest.raises(ConfigError, match="kinds"):
        load_config(EmbedConfig, EMBED_TEST_CONFIG, ["kinds=[llm, tokens]"])
    with pytest.raises(ConfigError, match="shard_tokens"):
        load_config(EmbedConfig, EMBED_TEST_CONFIG, ["shard_tokens=10", "max_tokens=100"])
    with pytest.raises(ConfigError, match="num_gpus_per_actor"):
        load_config(EmbedConfig, EMBED_TEST_CONFIG, ["device=cuda"])
    with pytest.raises(ConfigError, match="share_prefixes=-1"):
        load_config(EmbedConfig, EMBED_TEST_CONFIG, ["share_prefixes=-1"])
    with pytest.raises(ConfigError, match="batch_overhead_slots=-5"):
        load_config(EmbedConfig, EMBED_TEST_CONFIG, ["batch_overhead_slots=-5"])


def test_auto_executor_runs_small_cpu_work_in_process_and_the_rest_on_ray():
    from embed_cache.job import choose_executor

    auto = load_config(EmbedConfig, EMBED_TEST_CONFIG, ["executor=auto", "auto_local_max_units=1000"])
    assert choose_executor(auto, 1000) == "local"
    assert choose_executor(auto, 1001) == "ray"
    on_gpu = load_config(EmbedConfig, EMBED_TEST_CONFIG, ["executor=auto", "device=cuda", "num_gpus_per_actor=1"])
    assert choose_executor(on_gpu, 1) == "ray"  # the driver may have no GPU
    assert choose_executor(load_config(EmbedConfig, EMBED_TEST_CONFIG, ["executor=ray"]), 1) == "ray"
    with pytest.raises(ConfigError, match="auto_local_max_units"):
        load_config(EmbedConfig, EMBED_TEST_CONFIG, ["auto_local_max_units=-1"])


def test_cli_verify_names_corrupt_shard_and_repair_unlists_it(tmp_path, capsys):
    from embed_cache.cli import main

    inputs = llm_inputs({"model_id": "m", "weights_digest": "w"})
    rng = np.random.default_rng(0)
    with CacheWriter(cache_dir("llm", fingerprint(inputs), tmp_path), inputs) as w:
        w.set_value_shape((4,))
        names = [w.write(states_table([f"k{i}"], [rng.standard_normal((3, 4))]), i)["name"] for i in range(3)]
    path = w.path / SHARDS_DIR / names[1]
    path.write_bytes(path.read_bytes()[:-30] + b"\0" * 30)
    assert main(["verify", str(w.path)]) == 1
    assert names[1] in capsys.readouterr().out
    assert main(["verify", str(w.path), "--repair"]) == 1
    assert main(["verify", str(w.path)]) == 0
    assert CacheStore(w.path).keys() == ["k0", "k2"]
    assert main(["verify", str(tmp_path / "nope")]) == 2


def test_latest_snapshot_names_follow_latest(tmp_path):
    from flows.embed import latest_snapshot_names

    first = write_snapshot("nightlytest", [{"caption": "a red circle"}], root=tmp_path)
    second = write_snapshot("nightlytest", [{"caption": "a red circle"}, {"caption": "a blue square"}], root=tmp_path)
    assert (tmp_path / "nightlytest" / "LATEST").read_text().strip() == second.name
    assert latest_snapshot_names((str(first), "other", str(second))) == ("nightlytest", "other")


# ----------------------------------------------------------------------------------------- e2e (stack)


def _cfg(tiny_cache: dict, *overrides: str) -> EmbedConfig:
    return load_config(EmbedConfig, EMBED_TEST_CONFIG, [
        f"snapshots=[{tiny_cache['snapshot']}]", f"llm.path={tiny_cache['llm_path']}",
        f"clip.base_model={tiny_cache['base_model']}", *overrides,
    ])  # fmt: skip


@pytest.mark.e2e
def test_cache_content_matches_the_encoders(tiny_cache):
    from embed_cache.encoders.clip import load_clip
    from embed_cache.encoders.pixels import decode_image
    from omnidiff.contracts.snapshot import Snapshot
    from omnidiff.models.clip_text import WINDOW

    summary = tiny_cache["summary"]
    snap = Snapshot.open(tiny_cache["snapshot"])
    pairs = snap.pairs(columns=["caption", "caption_en", "lang", "image_digest", "image"]).to_pandas()
    parallel = snap.parallel(columns=["text", "text_en"]).to_pandas()
    llm_texts = set(pairs.caption) | set(parallel.text) | {""}
    stores = {k: CacheStore(v) for k, v in tiny_cache["dirs"].items()}
    assert set(stores["llm"].keys()) == {text_key(t) for t in llm_texts}
    assert summary["kinds"]["llm"]["references"] > len(llm_texts)  # each image's caption repeats; embedded once
    assert set(stores["pixels"].keys()) == set(pairs.image_digest)
    for store in stores.values():
        report = store.verify()
        assert report.ok and not report.unlisted, report.as_dict()

    # LLM: unpadded fp16 states equal a direct, unbatched encode.
    llm = encoder_of(tiny_cache["llm_path"])
    long_caption = max(llm_texts, key=len)
    for text in ("", long_caption, pairs.caption.iloc[0], parallel.text.iloc[0]):
        states, mask = llm.encode([text])
        got = stores["llm"].read([text_key(text)])[text_key(text)]
        assert got.dtype == np.float16 and got.shape == (int(mask.sum()), llm.hidden_size)
        np.testing.assert_allclose(got.astype(np.float32), states[0][mask[0]].numpy(), rtol=2e-3, atol=2e-3)

    # CLIP: the English side in stitched 77-token windows, and the pooled vector.
    clip = load_clip(Path(tiny_cache["base_model"]) / "text_encoder", Path(tiny_cache["base_model"]) / "tokenizer")
    english = [e for e in pairs.caption_en.dropna()] + list(pairs.caption[pairs.lang == "en"]) + list(parallel.text_en)
    longest = max(english, key=lambda t: clip.token_lengths([t], 3)[0])
    assert clip.token_lengths([longest], 3)[0] > WINDOW  # the world has captions past CLIP's window
    import torch

    with torch.no_grad():
        states, mask, pooled = clip.encode([longest], max_windows=3)
    key = text_key(longest)
    got = stores["clip"].read([key])[key]
    np.testing.assert_allclose(got.astype(np.float32), states[0][mask[0]].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(
        stores["clip"].read_pooled([key])[key].astype(np.float32), pooled[0].numpy(), rtol=2e-3, atol=2e-3
    )
    assert not (set(stores["clip"].keys()) - {text_key(t) for t in english + [""]})

    # Pixels: the decoded image in [-1, 1] at the configured resolution.
    row = pairs.iloc[0]
    got = stores["pixels"].read([row.image_digest])[row.image_digest]
    assert got.shape == (3, 16, 16) and stores["pixels"].value_shape == (3, 16, 16)
    np.testing.assert_allclose(got.astype(np.float32), decode_image(row.image, 16), atol=2e-3)


@pytest.mark.e2e
def test_rerun_computes_nothing_and_new_captions_only_them(tiny_cache, tmp_path):
    import mlflow

    from embed_cache.job import run
    from omnidiff.contracts.snapshot import Snapshot

    first = tiny_cache["summary"]
    again = run(_cfg(tiny_cache))
    for kind, stats in again["kinds"].items():
        assert stats["computed"] == 0 and stats["skipped"] == first["kinds"][kind]["wanted"], kind
    assert again["dirs"] == first["dirs"]

    # A new snapshot: the old pairs + 10% new captions with new images.
    old = Snapshot.open(tiny_cache["snapshot"]).pairs(columns=["caption", "caption_en", "lang", "image"]).to_pandas()
    n_new = max(1, len(old) // 10)
    rows = [
        {"caption": r.caption, "caption_en": r.caption_en, "lang": r.lang, "image": r.image}
        for r in old.itertuples(index=False)
    ]
    new_captions = captions(n_new, seed=7)
    rows += [{"caption": c, "lang": "en", "image": png_bytes(1000 + i)} for i, c in enumerate(new_captions)]
    grown = write_snapshot("embedgrown", rows)
    # A delta this small runs in this process under executor=auto (no actor start-up, no model loads in Ray).
    third = run(_cfg(tiny_cache, f"snapshots=[{grown}]", "include_parallel=false", "executor=auto"))
    assert third["computed"] == {"llm": n_new, "clip": n_new, "pixels": n_new}
    assert {stats["executor"] for stats in third["kinds"].values()} == {"local"}
    assert third["kinds"]["llm"]["rows"] == first["kinds"]["llm"]["rows"] + n_new
    assert set(CacheStore(third["dirs"]["llm"]).keys()) >= {text_key(normalise_caption(c)) for c in new_captions}

    # Every run is in MLflow: fingerprints, counts, throughput, cache location, manifests.
    client = mlflow.MlflowClient()
    logged = client.get_run(third["run_id"])
    assert logged.data.params["llm.fingerprint"] == third["fingerprints"]["llm"]
    assert logged.data.params["clip.cache_dir"] == third["dirs"]["clip"]
    assert logged.data.metrics["llm.computed"] == n_new and logged.data.metrics["llm.skipped"] > 0
    assert logged.data.metrics["llm.tokens_per_s"] > 0
    assert logged.data.tags["stage"] == "embed"
    assert logged.data.tags["executor"] == "local"
    artifacts = {a.path for a in client.list_artifacts(third["run_id"], "manifests")}
    assert artifacts == {"manifests/llm.json", "manifests/clip.json", "manifests/pixels.json"}


@pytest.mark.e2e
def test_fingerprint_input_change_makes_a_new_cache(tiny_cache):
    from embed_cache.job import run

    before = json.loads((tiny_cache["dirs"]["llm"] / "manifest.json").read_text())
    out = run(_cfg(tiny_cache, "kinds=[llm]", "llm.max_length=24", "track=false", "executor=local"))
    assert out["fingerprints"]["llm"] != tiny_cache["fingerprints"]["llm"]
    assert out["computed"]["llm"] == out["kinds"]["llm"]["wanted"]  # nothing reused from the other encoder
    assert max(CacheStore(out["dirs"]["llm"]).lengths().values()) == 24
    after = json.loads((tiny_cache["dirs"]["llm"] / "manifest.json").read_text())
    assert after["shards"] == before["shards"]


def test_roofline_probe_lives_in_the_benchmark_actor(tiny_llm, tmp_path):
    """The production actor does not probe; benchmarks/embed_throughput.py's actor does, and the stats read it."""
    from benchmarks.embed_throughput import probing_actor
    from embed_cache.job import run

    snap = write_snapshot("embedprobe", [{"caption": t} for t in captions(12, seed=5)])
    cfg = load_config(EmbedConfig, EMBED_TEST_CONFIG, [
        f"snapshots=[{snap}]", f"llm.path={tiny_llm}", "kinds=[llm]", "track=false", "executor=local",
        "shard_rows=4",
    ])  # fmt: skip
    plain = run(replace(cfg, cache_root=tmp_path / "plain"))["kinds"]["llm"]
    probed = run(replace(cfg, cache_root=tmp_path / "probed"), actor=probing_actor(0.05))["kinds"]["llm"]
    assert plain["roofline_gflops"] == 0.0 and plain["probe_seconds"] == 0.0
    assert probed["roofline_gflops"] > 0 and probed["probe_seconds"] >= 3 * 0.05  # one probe per shard
    assert probed["computed"] == plain["computed"] == 13 and probed["shards_written"] == plain["shards_written"] >= 3


def test_nan_states_are_rejected_with_the_key_named(tiny_llm, tmp_path, capsys):
    from embed_cache.cli import main

    bad_llm = poisoned_llm(tiny_llm, tmp_path / "poisoned", "Q")
    texts = captions(20, seed=3) + ["a Quiet red circle", "Q"]
    snap = write_snapshot("embednan", [{"caption": t} for t in texts])
    code = main(
        [
            "--config",
            str(EMBED_TEST_CONFIG),
            f"snapshots=[{snap}]",
            f"llm.path={bad_llm}",
            "kinds=[llm]",
            "track=false",
            f"cache_root={tmp_path / 'cache'}",
            "executor=local",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    for text in ("a Quiet red circle", "Q"):
        assert text_key(text) in err
    store = CacheStore(next((tmp_path / "cache" / "llm").iterdir()))
    assert len(store) == len(texts) + 1 - 2 and store.verify().ok  # "" included, the two Q captions not


@pytest.mark.e2e
def test_embed_flow_and_nightly_deployment(tiny_cache):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.embed import DEFAULT_CRON, create_nightly_reembed, embed_flow

    cfg = _cfg(tiny_cache, "track=false")
    result = embed_flow(cfg)
    assert result["computed"] == {"llm": 0, "clip": 0, "pixels": 0}
    assert result["llm_fingerprint"] == tiny_cache["fingerprints"]["llm"]

    deployment_id = create_nightly_reembed(cfg)

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name("nightly-reembed/nightly-reembed")

    deployment = asyncio.run(read())
    assert str(deployment.id) == deployment_id
    crons = [s.schedule.cron for s in deployment.schedules]
    assert crons == [DEFAULT_CRON] and all(s.active for s in deployment.schedules)
    assert deployment.parameters["cfg"]["snapshots"] == [str(tiny_cache["snapshot"])]


def test_vae_slot_stores_latents_for_sd_class_models(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from embed_cache.encoders.pixels import decode_image
    from embed_cache.job import run

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=16, scaling_factor=0.5).eval()  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    images = [png_bytes(i) for i in range(5)]
    snap = write_snapshot("embedvae", [{"caption": f"image {i}", "image": b} for i, b in enumerate(images)])
    out = run(load_config(EmbedConfig, EMBED_TEST_CONFIG, [
        f"snapshots=[{snap}]", "kinds=[pixels]", f"pixels.vae={tmp_path / 'vae'}", "executor=local", "track=false",
        f"cache_root={tmp_path / 'cache'}",
    ]))  # fmt: skip
    store = CacheStore(out["dirs"]["pixels"])
    assert store.value_shape == (4, 8, 8) and out["computed"]["pixels"] == 5
    from omnidiff.contracts.keys import digest_bytes

    key = digest_bytes(images[2])
    with torch.no_grad():
        expected = vae.encode(torch.from_numpy(decode_image(images[2], 16))[None]).latent_dist.mean[0] * 0.5
    np.testing.assert_allclose(store.read([key])[key].astype(np.float32), expected.numpy(), rtol=1e-2, atol=2e-3)
    # A different VAE (or none) is a different cache.
    plain = run(load_config(EmbedConfig, EMBED_TEST_CONFIG, [
        f"snapshots=[{snap}]", "kinds=[pixels]", "executor=local", "track=false", f"cache_root={tmp_path / 'cache'}",
    ]))  # fmt: skip
    assert plain["fingerprints"]["pixels"] != out["fingerprints"]["pixels"]
    assert CacheStore(plain["dirs"]["pixels"]).value_shape == (3, 16, 16)


def test_the_driver_tokenises_in_bounded_chunks(tiny_llm, tiny_clip_base):
    """The token lengths that plan the shards come from tokenizer calls of at most TOKENIZE_CHUNK texts, and equal a
    single call over every text (a single call held every caption's token ids at once)."""
    import dataclasses

    from embed_cache.plan import plan_kind

    cfg = load_config(EmbedConfig, EMBED_TEST_CONFIG, [f"llm.path={tiny_llm}", f"clip.base_model={tiny_clip_base}"])
    texts = [normalise_caption(t) for t in captions(23, seed=5)]
    keys = [text_key(t) for t in texts]
    for kind in ("llm", "clip"):
        plan = plan_kind(kind, cfg)
        calls: list[int] = []

        def recorded(k, p, lengths=plan.lengths, calls=calls):
            calls.append(len(k))
            return lengths(k, p)

        lengths = dataclasses.replace(plan, lengths=recorded).token_lengths(keys, texts, chunk=5)
        assert calls == [5, 5, 5, 5, 3]
        assert lengths.dtype == np.int64 and lengths.tolist() == list(plan.lengths(keys, texts))


def test_key_partitions_keep_each_key_once_in_one_part_with_its_first_value(tmp_path):
    from embed_cache.inputs import KeyPartitions

    spill = KeyPartitions(tmp_path / "spill", parts=4, decode=bytes.decode, buffer_rows=7)
    rows = [(f"k{i % 50}", f"v{i}") for i in range(200)]  # every key four times, first value v0..v49
    for key, value in rows:
        spill.add(key, value.encode())
        assert sum(len(k) for k in spill._keys) < 7, "rows wait in memory only up to buffer_rows"
    parts = list(spill)
    assert 1 < len(parts) <= 4
    merged = {k: v for part in parts for k, v in part.items()}
    assert sum(len(p) for p in parts) == len(merged) == 50  # each key in exactly one part
    assert merged == {f"k{i}": f"v{i}" for i in range(50)}
    assert spill.peak_keys == max(len(p) for p in parts) < 50 and spill.rows == 200
    spill.cleanup()
    assert not (tmp_path / "spill").exists()


def test_the_driver_holds_one_partition_of_captions_and_every_key_is_cached_once(tiny_llm, tmp_path, monkeypatch):
    """issue 17: embed's driver never holds every distinct caption. With dedup_partition_rows far below the
    snapshot's rows the driver's largest partition is a fraction of the captions, and the cache still holds
    every distinct caption (repeats across rows and snapshots included) exactly once, as a one-partition run does;
    a rerun computes nothing, its cache writer holding one partition's cached keys at a time."""
    from embed_cache import job
    from embed_cache.job import run

    planned: list[int] = []  # the keys the driver planned at once, per call

    def plan_units(kind, writer, todo, *args, **kwargs):
        planned.append(len(todo))
        return plan_units_of_job(kind, writer, todo, *args, **kwargs)

    plan_units_of_job = job.plan_units
    monkeypatch.setattr(job, "plan_units", plan_units)
    texts = captions(120, seed=11)
    rows = [{"caption": t} for t in texts] + [{"caption": t} for t in texts[::3]]  # repeats in the same snapshot
    first = write_snapshot("embedparts-a", rows)
    second = write_snapshot("embedparts-b", [{"caption": t} for t in texts[::2] + captions(30, seed=12)])
    expected = {text_key(normalise_caption(t)) for t in texts + captions(30, seed=12)} | {text_key("")}

    def embed(folder: str, *overrides: str) -> dict:
        cfg = load_config(EmbedConfig, EMBED_TEST_CONFIG, [
            f"snapshots=[{first},{second}]", f"llm.path={tiny_llm}", "kinds=[llm]", "track=false",
            "executor=local", f"cache_root={tmp_path / folder}", *overrides,
        ])  # fmt: skip
        return run(cfg)

    out = embed("parts", "dedup_partition_rows=40")
    stats = out["kinds"]["llm"]
    assert stats["wanted"] == stats["computed"] == len(expected) == 151
    assert 0 < stats["driver_peak_keys"] <= len(expected) // 3, stats["driver_peak_keys"]  # not every caption
    assert len(planned) > 3 and max(planned) <= len(expected) // 3 and sum(planned) == len(expected), planned
    store = CacheStore(out["dirs"]["llm"])
    assert sorted(store.keys()) == sorted(expected) and store.manifest["rows"] == len(expected)  # exactly once
    assert store.verify().ok
    names = [s["name"] for s in store.manifest["shards"]]
    assert len(names) == len(set(names))  # unit numbers run on across partitions

    planned.clear()
    whole = embed("whole")  # the default: one partition here
    assert planned == [len(expected)]
    assert whole["kinds"]["llm"]["driver_peak_keys"] == len(expected)
    assert sorted(CacheStore(whole["dirs"]["llm"]).keys()) == sorted(expected)

    assert stats["writer_peak_keys"] == 0  # an empty cache: no shard read

    again = embed("parts", "dedup_partition_rows=40")["kinds"]["llm"]
    assert again["computed"] == 0 and again["skipped"] == again["wanted"] == len(expected)
    # The writer held the cached keys of one partition (and one shard of it) at a time, never the whole cache.
    assert 0 < again["writer_peak_keys"] <= 2 * again["driver_peak_keys"] < len(expected), again
