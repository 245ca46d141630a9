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
