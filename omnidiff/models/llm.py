"""The frozen LLM text encoder (../shared/PAPER.md "The parts": hidden states of the raw caption).

    enc = LLMTextEncoder(ensure_gemma())      # omnidiff/models/llm_folders.py makes the folder
    states, mask = enc.encode(["a red circle", "一个红色的圆"])  # (B, T, D), (B, T)

Any transformers causal LM saved as a local folder works as well (``LLMTextEncoder(path)``).
:meth:`LLMTextEncoder.forward_rows` runs token rows that continue cached prefixes (the embed
job's prefix sharing).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from pathlib import Path

from omnidiff.models.llm_folders import read_manifest, torch_dtype, weights_digest


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


# How several layers' states become one vector per token (part of the fingerprint of a multi-layer cache).
LAYER_COMBINE = "concat-features"
# What an earlier layer's residual stream goes through (part of the fingerprint when a layer < the last).
LAYER_NORM = "final-norm"
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f")
# Bodies whose decoder may be cut after the deepest requested layer (LLMTextEncoder._truncate): their
# forward loops over ``self.layers[: config.num_hidden_layers]`` and reads ``config.layer_types[i]``.
TRUNCATABLE_MODEL_TYPES = frozenset({"gemma3_text", "gemma2", "gemma", "llama", "mistral", "qwen2", "qwen3"})


def resolve_layers(layer, num_hidden_layers: int, name: str = "the LLM") -> tuple[int, ...]:
    """``layer`` (an index, or a list of them) as non-negative indices into ``hidden_states``.

    Indices run 0..``num_hidden_layers`` (0 = the embeddings) or -1..-(``num_hidden_layers`` + 1); a list
    must be non-empty, of distinct layers, in increasing order (one cache per layer set, not per spelling).
    """
    many = isinstance(layer, (list, tuple))
    values = list(layer) if many else [layer]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"layer={layer!r}: an index into hidden_states or a non-empty list of them")
    n = num_hidden_layers
    for v in values:
        if not -(n + 1) <= v <= n:
            raise ValueError(f"layer={layer!r}: {name} has hidden_states 0..{n} (or -1..-{n + 1})")
    resolved = tuple(v % (n + 1) for v in values)
    if any(b <= a for a, b in zip(resolved, resolved[1:], strict=False)):
        raise ValueError(f"layer={layer!r}: several layers must be distinct and in increasing order "
                         f"(resolved: {list(resolved)})")
    return resolved


class LLMTextEncoder:
    """Per-token hidden states of a frozen causal LM, from the decoder body only.

    ``encode(texts) -> (states float32 (B, T, D), mask bool (B, T))`` with T the longest tokenised
    text of the call (dynamic padding, right-padded; ``mask`` is True on real tokens). Captions go in
    raw (no chat template, PAPER.md "The parts"); the tokenizer's own special tokens (Gemma's BOS) are
    kept. The 262k-way LM head is never computed: ``AutoModel`` loads the body alone (NOTES.md: the
    head costs 2.4x the tokens/s).

    ``layer`` indexes ``hidden_states`` as transformers returns them: 0 = the embeddings,
    ``num_hidden_layers`` (= -1) = the last layer after the final norm. An earlier layer's residual
    stream goes through the model's own final norm too (``model.norm``, what the last layer gets), so
    every layer is on the scale the LM head reads: Gemma 3's middle layers carry a "massive activation"
    (the <bos> token, one dimension past fp16's 65504) that the fp16 cache cannot store (measured:
    every caption's layer-9 row rejected as inf, issue 18). A list of indices (``[6, 12, 18]``)
    concatenates those layers' states along the features, in the order given, so
    ``D = len(layer) x hidden size``: middle layers are more language-agnostic than the last, and a
    linear first projection of the concatenation can weigh (or average) the layers as it learns to.
    Only the decoder layers up to the deepest requested one run (``run_layers``; :meth:`_truncate`).
    Texts are run in length-sorted micro-batches of ``batch_size`` so padding costs little.
    """

    def __init__(
        self,
        path: str | Path,
        layer: int | list[int] | tuple[int, ...] = -1,
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
        # One index per layer, so -1 and n_layers share a fingerprint; a one-element list is that layer.
        self.layers = resolve_layers(layer, n_layers, self.path.name)
        self.layer: int | list[int] = self.layers[0] if len(self.layers) == 1 else list(self.layers)
        self.num_hidden_layers = n_layers
        self.text_config = text_config
        self.hidden_size = int(text_config.hidden_size) * len(self.layers)  # the width of the states

        self.tokenizer = load_tokenizer(self.path)  # right padding, shared with the embed driver
        self._pad_id = self.tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        # An empty caption must still give one token (the unconditional prompt is ""); use BOS/EOS.
        self._fallback_id = next(
            (i for i in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id) if i is not None), self._pad_id
        )
        self.model = AutoModel.from_pretrained(self.path, dtype=torch_dtype(dtype)).to(self.device).eval()
        self.model.requires_grad_(False)
        # Decoder layers the forward runs: past the deepest requested layer, none is needed.
        self.run_layers = self._truncate(max(max(self.layers), 1)) if max(self.layers) < n_layers else n_layers
        # transformers renamed ``past_key_values`` to ``cache`` (5.x deprecates the old name).
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        if min(self.layers) < n_layers:
            self.final_norm  # noqa: B018 (a body without one is refused here, not at the first forward)
        self._manifest = read_manifest(self.path)
        self._weights_digest: str | None = self._manifest.get("weights_digest")

    def _truncate(self, keep: int) -> int:
        """Drop the decoder layers after the first ``keep``; return how many layers the forward runs.

        A causal decoder's layer ``k`` does not depend on the layers after it, so a run of the first
        ``keep`` layers gives the same ``hidden_states[0..keep]`` for a ``keep / num_hidden_layers``
        share of the compute (issue 18 item 5: a middle layer costs half the embed time). Only for
        bodies known to loop over ``self.layers[: config.num_hidden_layers]`` with per-layer
        ``config.layer_types`` (which also sizes the ``DynamicCache``); any other runs whole.
        """
        body, config = self.model, self.model.config
        layers = getattr(body, "layers", None)
        if (
            getattr(config, "model_type", None) not in TRUNCATABLE_MODEL_TYPES
            or not hasattr(layers, "__getitem__")
            or len(layers) != self.num_hidden_layers
            or config.num_hidden_layers != self.num_hidden_layers
        ):
            return self.num_hidden_layers
        body.layers = layers[:keep]  # a ModuleList slice: the kept layers' weights, the rest freed
        config.num_hidden_layers = keep
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = list(config.layer_types[:keep])
        return keep

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
    def final_norm(self):
        """The body's final norm (Gemma / Llama ``norm``, Phi ``final_layernorm``, GPT-2 ``ln_f``)."""
        import torch

        for name in FINAL_NORM_NAMES:
            module = getattr(self.model, name, None)
            if isinstance(module, torch.nn.Module):
                return module
        raise ValueError(f"layer={self.layer!r}: {self.path.name}'s body has no final norm ({', '.join(FINAL_NORM_NAMES)}) "
                         "to put an earlier layer on the last layer's scale; use layer=-1")

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
        """Bytes of cached keys + values one token takes over the layers that run (prefix sharing's memory)."""
        text = self.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        itemsize = next(self.model.parameters()).element_size()
        return int(2 * self.run_layers * kv_heads * head_dim * itemsize)  # only the layers that run cache

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
        # One layer that is the last one run: its states are last_hidden_state (through the final norm).
        last = self.layers == (self.run_layers,)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attn.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=want_cache,
                **({self._cache_kwarg: cache} if cache is not None else {}),
                output_hidden_states=not last,
            )
        if last:
            hidden = out.last_hidden_state  # (b, S, D)
        else:  # the final norm's output is last_hidden_state, whatever hidden_states[-1] holds in a version
            norm = self.final_norm
            with torch.inference_mode():
                per_layer = [out.last_hidden_state if i == self.run_layers else norm(out.hidden_states[i])
                             for i in self.layers]
            hidden = per_layer[0] if len(per_layer) == 1 else torch.cat(per_layer, dim=-1)  # (b, S, k x D)
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
        """Everything that changes the states (architecture.md "Embedding cache"). One layer keeps the
        form it always had (``"layer": 18``), so caches written before layer lists existed stay valid;
        several are ``"layer": [6, 12, 18]`` plus how they are combined."""
        from omnidiff.text import NORMALISER_VERSION

        inputs = {
            "model_id": self.model_id,
            "weights_digest": self.weights_digest,
            "layer": self.layer,
            "max_length": self.max_length,
            "dtype": self.dtype,
            "template": "raw",
            "normaliser_version": NORMALISER_VERSION,
        }
        if len(self.layers) > 1:
            inputs["layer_combine"] = LAYER_COMBINE
        if min(self.layers) < self.num_hidden_layers:
            inputs["layer_norm"] = LAYER_NORM
        return inputs

    @property
    def fingerprint(self) -> str:
        """16 hex chars of SHA-256 of :meth:`fingerprint_inputs` as sorted JSON."""
        blob = json.dumps(self.fingerprint_inputs(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
