"""The base model's CLIP-style text encoder: English-only word vocabulary, hard 77-token window.

It plays the part of Stable Diffusion's CLIP text encoder (../shared/PAPER.md "The problem"): a
transformers ``CLIPTextModel`` with ``max_position_embeddings=77`` and a word-level tokenizer built
offline from the tiny world's English vocabulary, so it cannot read Chinese (every unknown word is
``<unk>``) and cannot see past token 75 of a caption. Stage 1 needs CLIP states of long English
captions too (PAPER.md "The three stages"), so ``encode(texts, max_windows=W)`` encodes consecutive
windows of 75 tokens, each as ``<bos> tokens <eos> <pad>...`` (77), and stitches them along T.

    from omnidiff.models.clip_text import build_clip_text_encoder
    enc = build_clip_text_encoder(words)              # random weights; omnidiff base pretrain trains it
    states, mask, pooled = enc.encode(["a red circle"])   # (1, 77, D), (1, 77), (1, D)
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

WINDOW = 77  # CLIP's context: <bos> + 75 tokens + <eos>
WINDOW_TOKENS = WINDOW - 2
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0..3
PRETOKENIZE_PATTERN = r"\w+|[^\w\s]"
# Punctuation a caption template may use; always in the vocabulary so it never becomes <unk>.
_PUNCTUATION = tuple(".,;:!?-'\"()/")


def _pieces(text: str) -> list[str]:
    return re.findall(PRETOKENIZE_PATTERN, text.lower())


def build_clip_tokenizer(words, out_dir: str | Path | None = None):
    """A word-level ``tokenizers`` tokenizer over ``words`` (lowercased), wrapped for transformers.

    Pre-tokenisation splits on ``\\w+|[^\\w\\s]``: a run of Chinese characters is one piece, which is
    not in the English vocabulary and so becomes ``<unk>``. Calling the tokenizer adds
    ``<bos> ... <eos>`` and, with ``truncation=True``, cuts at 77 like CLIP. Saved to ``out_dir``
    (tokenizer.json + config) when given.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if isinstance(words, str):
        raise TypeError("words must be an iterable of words, not one str")
    vocab_words = sorted({p for w in words for p in _pieces(str(w))} | set(_PUNCTUATION))
    if not vocab_words:
        raise ValueError("words: empty vocabulary")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in vocab_words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="removed", invert=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=WINDOW,
        padding_side="right",
    )
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_clip_tokenizer(folder: str | Path):
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (made by build_clip_tokenizer)")
    return PreTrainedTokenizerFast.from_pretrained(folder)


class ClipTextEncoder(nn.Module):
    """``CLIPTextModel`` + word tokenizer. Windows are encoded independently (each has its own
    positions 0..76, as CLIP was trained), then stitched: window w occupies T positions
    ``w*77 .. w*77+76``.

    ``mask`` is True on <bos>, the words and <eos> of each used window, False on padding and on
    windows a caption does not need (their states are zero). ``pooled`` is the <eos> state of the
    first window, as CLIP pools.
    """

    def __init__(self, text_model, tokenizer):
        super().__init__()
        cfg = text_model.config
        if cfg.max_position_embeddings != WINDOW:
            raise ValueError(f"max_position_embeddings={cfg.max_position_embeddings}: a CLIP window is {WINDOW}")
        if cfg.vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
        self.text_model = text_model
        self.tokenizer = tokenizer

    @property
    def hidden_size(self) -> int:
        return int(self.text_model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.text_model.parameters()).device

    # -- tokenisation -------------------------------------------------------------------------
    def tokenize(self, texts: list[str], max_windows: int = 1):
        """``texts`` -> ``(input_ids long (B, W*77), mask bool (B, W*77))`` with W = ``max_windows``.

        Words past ``75 * max_windows`` are dropped (max_windows=1 is CLIP's hard truncation).
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of str (one caption each), not a bare str or other values")
        if not isinstance(max_windows, int) or max_windows < 1:
            raise ValueError(f"max_windows={max_windows!r}: must be an int >= 1")
        tk = self.tokenizer
        # The backend directly: no "longer than 77" warning, the windows are cut below.
        pieces = [e.ids for e in tk.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        ids = torch.full((len(texts), max_windows * WINDOW), tk.pad_token_id, dtype=torch.long)  # (B, W*77)
        mask = torch.zeros(len(texts), max_windows * WINDOW, dtype=torch.bool)  # (B, W*77)
        for b, words in enumerate(pieces):
            n_windows = min(max_windows, max(1, -(-len(words) // WINDOW_TOKENS)))  # "" still gets <bos><eos>
            for w in range(n_windows):
                chunk = words[w * WINDOW_TOKENS : (w + 1) * WINDOW_TOKENS]
                window = [tk.bos_token_id, *chunk, tk.eos_token_id]
                ids[b, w * WINDOW : w * WINDOW + len(window)] = torch.tensor(window)
                mask[b, w * WINDOW : w * WINDOW + len(window)] = True
        return ids, mask

    def token_lengths(self, texts: list[str], max_windows: int = 1) -> list[int]:
        """Per text, positions up to and including its last real token (the unpadded T to store)."""
        _, mask = self.tokenize(texts, max_windows)
        positions = torch.arange(mask.shape[1]) + 1
        return (mask * positions).amax(1).tolist()

    # -- encoding -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor):
        """``input_ids (B, W*77)``, ``mask (B, W*77)`` -> ``(states (B, W*77, D), pooled (B, D))``."""
        b, t = input_ids.shape
        if t % WINDOW:
            raise ValueError(f"input_ids has {t} positions; expected a multiple of {WINDOW}")
        w = t // WINDOW
        win_ids = input_ids.reshape(b * w, WINDOW)  # (B*W, 77)
        win_mask = mask.reshape(b * w, WINDOW)  # (B*W, 77)
        used = win_mask.any(1)  # (B*W,) windows that hold a caption part; the rest stay zero
        out = self.text_model(input_ids=win_ids[used], attention_mask=win_mask[used].long())
        hidden = out.last_hidden_state  # (n_used, 77, D)
        states = hidden.new_zeros(b * w, WINDOW, hidden.shape[-1])
        states[used] = hidden * win_mask[used, :, None]
        states = states.reshape(b, w * WINDOW, -1)  # (B, W*77, D)
        # <eos> of window 0 = its last real position (every caption uses window 0)
        eos = mask[:, :WINDOW].long().sum(1) - 1  # (B,)
        pooled = states[torch.arange(b, device=states.device), eos]  # (B, D)
        return states, pooled

    def encode(self, texts: list[str], max_windows: int = 1):
        """``texts`` -> ``(states (B, W*77, D), mask bool (B, W*77), pooled (B, D))``; W = ``max_windows``.

        Differentiable (base pretraining trains through it); wrap in ``torch.no_grad()`` to embed.
        """
        ids, mask = self.tokenize(texts, max_windows)
        ids, mask = ids.to(self.device), mask.to(self.device)
        states, pooled = self(ids, mask)
        return states, mask, pooled

    # -- identity and files -------------------------------------------------------------------
    def weights_digest(self) -> str:
        """SHA-256 over parameter names and fp32 bytes (same value in memory and after a reload)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.text_model.state_dict().items()):
            digest.update(name.encode() + b"\0")
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        digest.update(self.tokenizer.backend_tokenizer.to_str().encode())
        return digest.hexdigest()

    def fingerprint_inputs(self, max_windows: int = 1, model_id: str = "clip-text") -> dict:
        """What changes the states (architecture.md "Embedding cache"), as for the LLM encoder."""
        from omnidiff.text import NORMALISER_VERSION

        return {
            "model_id": model_id,
            "weights_digest": self.weights_digest(),
            "layer": -1,
            "max_length": WINDOW * max_windows,
            "dtype": str(next(self.text_model.parameters()).dtype).removeprefix("torch."),
            "template": f"clip-windows-{WINDOW}x{max_windows}",
            "normaliser_version": NORMALISER_VERSION,
        }

    def fingerprint(self, max_windows: int = 1, model_id: str = "clip-text") -> str:
        blob = json.dumps(self.fingerprint_inputs(max_windows, model_id), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save_pretrained(self, folder: str | Path, tokenizer_folder: str | Path | None = None) -> None:
        """Model (config.json + model.safetensors) to ``folder``, tokenizer to ``tokenizer_folder`` or ``folder``."""
        self.text_model.save_pretrained(folder)
        self.tokenizer.save_pretrained(tokenizer_folder or folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, tokenizer_folder: str | Path | None = None) -> ClipTextEncoder:
        from transformers import CLIPTextModel

        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder}: no config.json (a ClipTextEncoder.save_pretrained folder)")
        text_model = CLIPTextModel.from_pretrained(folder, use_safetensors=True).eval()
        return cls(text_model, load_clip_tokenizer(tokenizer_folder or folder))


def build_clip_text_encoder(
    vocab_words, hidden: int = 128, layers: int = 2, heads: int = 4, seed: int = 0
) -> ClipTextEncoder:
    """A randomly initialised CLIP-style text encoder over an English word list (``omnidiff base`` trains it)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
    tokenizer = build_clip_tokenizer(vocab_words)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=WINDOW,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return ClipTextEncoder(CLIPTextModel(config).eval(), tokenizer)


# ---------------------------------------------------------------------------------------- published bases


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of what a published CLIP tokenizer does: its backend (vocabulary, merges, normaliser,
    pre-tokeniser; not the call-time padding / truncation state) and the special ids it pads with."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend.pop("truncation", None)
    backend.pop("padding", None)
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, int(tokenizer.model_max_length)]
    blob = json.dumps({"backend": backend, "bos_eos_pad_max": ids}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def load_base_tokenizer(folder: str | Path):
    """A published ``tokenizer/`` folder (``vocab.json`` + ``merges.txt``), loaded as its pipeline loads it."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(Path(folder))
    if int(tokenizer.model_max_length) != WINDOW:
        raise ValueError(f"{folder}: model_max_length={tokenizer.model_max_length}; a CLIP window is {WINDOW}")
    return tokenizer


def window_ids(tokenizer, texts: list[str], max_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``texts`` -> ``(input_ids long (B, W*77), used bool (B, W))`` as the base's pipeline tokenizes a window.

    Window w is ``<bos> tokens[75w : 75w+75] <eos>`` padded to 77 with the tokenizer's pad token, so
    window 0 is exactly ``tokenizer(text, padding="max_length", max_length=77, truncation=True)``
    (diffusers ``StableDiffusionPipeline.encode_prompt``); later windows continue the caption
    (PAPER.md "The three stages" 1). Windows past the caption's last token are unused (pad only).
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str (one caption each), not a bare str or other values")
    if not isinstance(max_windows, int) or max_windows < 1:
        raise ValueError(f"max_windows={max_windows!r}: must be an int >= 1")
    # truncation=False explicitly: an earlier call with truncation=True may have left it on in the backend.
    pieces = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    ids = torch.full((len(texts), max_windows * WINDOW), tokenizer.pad_token_id, dtype=torch.long)  # (B, W*77)
    used = torch.zeros(len(texts), max_windows, dtype=torch.bool)  # (B, W)
    for b, words in enumerate(pieces):
        n_windows = min(max_windows, max(1, -(-len(words) // WINDOW_TOKENS)))  # "" still fills window 0
        for w in range(n_windows):
            window = [tokenizer.bos_token_id, *words[w * WINDOW_TOKENS : (w + 1) * WINDOW_TOKENS], tokenizer.eos_token_id]
            ids[b, w * WINDOW : w * WINDOW + len(window)] = torch.tensor(window)
            used[b, w] = True
    return ids, used


class BaseTextEncoder(nn.Module):
    """The text towers of a published SD 1.x / SDXL folder: per caption, what its pipeline feeds the UNet.

    * ``sd`` (diffusers ``StableDiffusionPipeline.encode_prompt``): ``text_encoder(ids)[0]``, the last
      hidden state after the final layer norm, of all 77 positions of the window (padding included:
      the UNet cross-attends to every position). Pooled: ``pooler_output`` (the <eos> state; SD's
      UNet does not read it).
    * ``sdxl`` (``StableDiffusionXLPipeline.encode_prompt``): ``hidden_states[-2]`` of each tower,
      concatenated along features (w1 + w2); pooled: ``text_encoder_2``'s projected ``text_embeds``.
      With ``force_zeros_for_empty_prompt`` the unconditional embedding (the empty prompt,
      ``contracts.keys.EMPTY_PROMPT``) is zeros, states and pooled.

    Neither pipeline passes an attention mask (unless a tower's config sets ``use_attention_mask``).
    Long captions: consecutive windows (:func:`window_ids`), each encoded on its own and stitched
    along T; pooled from the first window. ``encode`` returns ``mask`` True on *every* position of a
    used window: that is what the UNet reads, so it is the stage-1 target.
    """

    def __init__(self, towers, tokenizers, hidden_layer: str, force_zeros_for_empty_prompt: bool, layout: str):
        super().__init__()
        if len(towers) != len(tokenizers) or not 1 <= len(towers) <= 2:
            raise ValueError(f"{len(towers)} text towers and {len(tokenizers)} tokenizers: expected 1 or 2 of each")
        if hidden_layer not in ("last", "penultimate"):
            raise ValueError(f"hidden_layer={hidden_layer!r}: 'last' or 'penultimate'")
        for tower in towers:
            if tower.config.max_position_embeddings < WINDOW:
                raise ValueError(f"max_position_embeddings={tower.config.max_position_embeddings}: a window is {WINDOW}")
        self.towers = nn.ModuleList(towers)
        self.tokenizers = list(tokenizers)
        self.hidden_layer = hidden_layer
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.layout = layout

    @classmethod
    def from_base_folder(cls, base, dtype: torch.dtype = torch.float32) -> BaseTextEncoder:
        """The towers of ``base`` (a path or a ``contracts.base_folder.BaseFolder``) with transformers' own
        classes, safetensors only, the folder's ``fp16`` variant where it has one, computing in ``dtype``."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from omnidiff.contracts.base_folder import open_base_folder, tower_variant

        base = open_base_folder(base) if not hasattr(base, "towers") else base
        if base.layout == "omnidiff":
            raise ValueError(f"{base.path}: the tiny base's encoder is ClipTextEncoder, not a published tower")
        towers, tokenizers = [], []
        for tower in base.towers:
            model_cls = CLIPTextModelWithProjection if tower.projection_dim is not None else CLIPTextModel
            variant = tower_variant(tower.encoder, base.variant)
            kwargs = {"use_safetensors": True, "dtype": dtype, **({"variant": variant} if variant else {})}
            towers.append(model_cls.from_pretrained(tower.encoder, **kwargs).eval())
            tokenizers.append(load_base_tokenizer(tower.tokenizer))
        return cls(towers, tokenizers, base.hidden_layer, base.force_zeros_for_empty_prompt, base.layout)

    @property
    def hidden_size(self) -> int:
        """Features per token: the sum over towers (SDXL: 768 + 1280 = 2048)."""
        return sum(int(t.config.hidden_size) for t in self.towers)

    @property
    def pooled_dim(self) -> int:
        last = self.towers[-1]
        return int(last.config.projection_dim if hasattr(last, "text_projection") else last.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.towers[0].parameters()).device

    def tokenize(self, texts: list[str], max_windows: int = 1):
        """``[(input_ids (B, W*77), used (B, W)) per tower]``; every tower must split a caption into as many windows."""
        out = [window_ids(tok, texts, max_windows) for tok in self.tokenizers]
        if any(not torch.equal(out[0][1], used) for _, used in out[1:]):
            raise ValueError("the base's tokenizers split a caption into different numbers of windows")
        return out

    def token_lengths(self, texts: list[str], max_windows: int = 1) -> list[int]:
        """Per text, the positions stored: 77 per used window."""
        return (window_ids(self.tokenizers[0], texts, max_windows)[1].sum(1) * WINDOW).tolist()

    def _tower_states(self, tower, tokenizer, ids: torch.Tensor):
        """One tower on windows ``(N, 77)`` -> ``(states (N, 77, d), pooled (N, p))`` as the pipeline reads them."""
        mask = None
        if getattr(tower.config, "use_attention_mask", False):
            eos = (ids == tokenizer.eos_token_id).long()  # the tokenizer's attention mask: <bos> .. first <eos>
            mask = (eos.cumsum(1) - eos == 0).long()
        out = tower(input_ids=ids, attention_mask=mask, output_hidden_states=self.hidden_layer == "penultimate")
        states = out[0] if self.hidden_layer == "last" else out.hidden_states[-2]  # (N, 77, d)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output  # (N, p)
        return states, pooled

    def forward(self, tokenized, used: torch.Tensor):
        """``tokenized``: ``[input_ids (B, W*77)]`` per tower, ``used (B, W)`` -> ``(states (B, W*77, D), pooled (B, P))``."""
        b, w = used.shape
        flat_used = used.reshape(-1)  # (B*W,)
        parts, pooled = [], None
        for tower, tokenizer, ids in zip(self.towers, self.tokenizers, tokenized, strict=True):
            windows = ids.reshape(b * w, WINDOW)[flat_used]  # (n_used, 77)
            states, pool = self._tower_states(tower, tokenizer, windows)
            parts.append(states)
            pooled = pool  # SDXL: the last tower's text_embeds
        hidden = torch.cat(parts, -1)  # (n_used, 77, D)
        states = hidden.new_zeros(b * w, WINDOW, hidden.shape[-1])
        states[flat_used] = hidden
        pooled_all = pooled.new_zeros(b * w, pooled.shape[-1])
        pooled_all[flat_used] = pooled
        return states.reshape(b, w * WINDOW, -1), pooled_all.reshape(b, w, -1)[:, 0]  # window 0 pools

    def encode(self, texts: list[str], max_windows: int = 1):
        """``texts`` -> ``(states (B, W*77, D), mask bool (B, W*77), pooled (B, P))``.

        ``mask`` is True on all 77 positions of each used window (what the UNet reads).
        """
        tokenized = self.tokenize(list(texts), max_windows)
        used = tokenized[0][1]
        states, pooled = self([ids.to(self.device) for ids, _ in tokenized], used.to(self.device))
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([t == "" for t in texts], device=states.device)  # keys.EMPTY_PROMPT
            states, pooled = states * ~empty[:, None, None], pooled * ~empty[:, None]
        mask = used.repeat_interleave(WINDOW, dim=1).to(states.device)  # (B, W*77)
        return states, mask, pooled

    def weights_digest(self) -> str:
        """SHA-256 over each tower's parameter names and fp32 bytes, then each tokenizer's digest;
        ``contracts.encoders.describe_base_text`` computes the same from the files."""
        digest = hashlib.sha256()
        for i, (tower, tok) in enumerate(zip(self.towers, self.tokenizers, strict=True)):
            for name, tensor in sorted(tower.state_dict().items()):
                digest.update(f"{i}/{name}".encode() + b"\0")
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            digest.update(tokenizer_digest(tok).encode())
        return digest.hexdigest()

    def fingerprint_inputs(self, max_windows: int = 1) -> dict:
        """What changes the targets (architecture.md "Embedding cache"): weights + tokenizers, which hidden
        state, the window layout, the empty prompt rule, the compute dtype, the normaliser."""
        from omnidiff.text import NORMALISER_VERSION

        return {
            "model_id": f"{self.layout}-text-encoders",
            "weights_digest": self.weights_digest(),
            "layer": "penultimate-concat" if self.hidden_layer == "penultimate" else "last",
            "max_length": WINDOW * max_windows,
            "dtype": str(next(self.towers[0].parameters()).dtype).removeprefix("torch."),
            "template": f"pipeline-windows-{WINDOW}x{max_windows}",
            "empty_prompt": "zeros" if self.force_zeros_for_empty_prompt else "encoded",
            "normaliser_version": NORMALISER_VERSION,
        }
