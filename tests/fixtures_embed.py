"""Session fixtures of the embed stage (loaded as a pytest plugin by conftest).

    .venv/bin/pytest tests/test_embed_job.py -x -q

* ``tiny_clip_base``: a base-model-shaped folder (``text_encoder/`` + ``tokenizer/``) holding a randomly
  initialised CLIP-style text encoder over the tiny world's English vocabulary; or the pretrained base
  model when the session has a ``tiny_base`` fixture.
* ``embed_snapshot``: the tiny world as a pair snapshot: the collected one when the session has a
  ``tiny_snapshot`` fixture, else written from the world's own files with ``SnapshotWriter``.
* ``tiny_cache``: the embed job run over ``embed_snapshot`` with the tiny LLM (configs/embed_test.yaml):
  ``{"snapshot", "cfg", "dirs", "fingerprints", "summary", "llm_path", "base_model", "cache_root"}``.
  Train tests configure their encoders from it (``llm_path``, ``base_model``) so the fingerprints match.

Helpers for tests: :func:`write_snapshot` (a pair snapshot from plain rows, through the real
``SnapshotWriter``) and :func:`png_bytes`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EMBED_TEST_CONFIG = REPO / "configs" / "embed_test.yaml"


def png_bytes(seed: int, size: int = 16) -> bytes:
    """A small deterministic RGB PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_snapshot(name: str, pairs: list[dict], parallel: list[dict] = (), root: Path | None = None) -> Path:
    """Write a pair snapshot (architecture.md columns the embed and train stages read) and return its folder.

    ``pairs`` rows: ``caption`` (+ ``caption_en``, ``lang``, ``image`` bytes, ``split``, ``aesthetic``);
    ``parallel`` rows: ``text``, ``text_en``, ``lang`` (+ ``split``). Captions are normalised and keyed the
    way collect does it; ``LATEST`` of ``name`` points at the new snapshot.
    """
    import pyarrow as pa

    from omnidiff.contracts.keys import digest_bytes, pair_key, text_key
    from omnidiff.contracts.snapshot import SnapshotWriter
    from omnidiff.text import normalise_caption

    writer = SnapshotWriter(name, root=root)
    rows = []
    for i, row in enumerate(pairs):
        caption = normalise_caption(row["caption"])
        image = row.get("image") or png_bytes(i)
        digest = digest_bytes(image)
        key = pair_key(digest, caption)
        rows.append({
            "key": key, "caption": caption,
            "caption_en": normalise_caption(row["caption_en"]) if row.get("caption_en") else None,
            "lang": row.get("lang", "en"), "image": image, "image_digest": digest, "width": 16, "height": 16,
            "aesthetic": float(row.get("aesthetic", 5.0)), "split": row.get("split", "train"),
        })  # fmt: skip
    writer.write_shard("pairs", pa.Table.from_pylist(rows))
    if parallel:
        par = [{"key": text_key(f"{p['text']}\x1f{p['text_en']}"), "text": normalise_caption(p["text"]),
                "text_en": normalise_caption(p["text_en"]), "lang": p.get("lang", "zh"),
                "split": p.get("split", "train")} for p in parallel]  # fmt: skip
        writer.write_shard("parallel", pa.Table.from_pylist(par))
    return writer.finish({"source": "tests/fixtures_embed.py", "counts": {"pairs": len(rows)}})


def snapshot_from_world(world_dir: Path, name: str, root: Path | None = None) -> Path:
    """The tiny world's pairs + parallel texts as a snapshot (no HTTP, no img2dataset: those are collect's tests)."""
    import pandas as pd

    from omnidiff.contracts.keys import text_key
    from omnidiff.text import normalise_caption

    pairs = pd.read_parquet(world_dir / "pairs.parquet")
    rows = []
    for row in pairs.itertuples(index=False):
        key = text_key(normalise_caption(row.caption))
        rows.append({"caption": row.caption, "caption_en": row.caption_en, "lang": row.lang,
                     "image": (world_dir / row.image).read_bytes(),
                     "split": "val" if int(key[:2], 16) < 26 else "train"})  # fmt: skip
    parallel = pd.read_parquet(world_dir / "parallel.parquet")
    par = [{"text": p.text, "text_en": p.text_en, "lang": p.lang} for p in parallel.itertuples(index=False)]
    return write_snapshot(name, rows, par, root)


@pytest.fixture(scope="session")
def tiny_clip_base(request, tmp_path_factory) -> Path:
    try:
        return Path(request.getfixturevalue("tiny_base"))
    except pytest.FixtureLookupError:
        pass
    from omnidiff.models.clip_text import build_clip_text_encoder
    from omnidiff.world import english_vocabulary

    folder = tmp_path_factory.mktemp("clip_base")
    encoder = build_clip_text_encoder(english_vocabulary(), hidden=32, layers=1, heads=2, seed=0)
    encoder.save_pretrained(folder / "text_encoder", tokenizer_folder=folder / "tokenizer")
    return folder


@pytest.fixture(scope="session")
def embed_snapshot(request, tiny_world) -> Path:
    try:
        return Path(request.getfixturevalue("tiny_snapshot"))
    except pytest.FixtureLookupError:
        return snapshot_from_world(Path(tiny_world), "embedtest")


@pytest.fixture(scope="session")
def tiny_cache(stack, tiny_llm, tiny_clip_base, embed_snapshot) -> dict:
    from embed_cache.config import EmbedConfig
    from embed_cache.job import run
    from omnidiff.config import load_config

    cfg = load_config(EmbedConfig, EMBED_TEST_CONFIG, [
        f"snapshots=[{embed_snapshot}]", f"llm.path={tiny_llm}", f"clip.base_model={tiny_clip_base}",
    ])  # fmt: skip
    summary = run(cfg)
    return {
        "snapshot": Path(embed_snapshot), "cfg": cfg, "summary": summary,
        "dirs": {k: Path(v) for k, v in summary["dirs"].items()}, "fingerprints": summary["fingerprints"],
        "llm_path": Path(tiny_llm), "base_model": Path(tiny_clip_base),
        "cache_root": Path(summary["dirs"]["llm"]).parent.parent,
    }  # fmt: skip
