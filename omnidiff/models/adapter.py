"""The OmniDiffusion adapter: LLM token states -> the base model's text conditioning.

../shared/PAPER.md "The parts": a Linear -> GELU -> Linear projection of the LLM tokens, a small
transformer encoder over them, a decoder whose fixed set of learnable queries cross-attends to the
encoded tokens (so the output length is fixed whatever the prompt length; the release uses 227 =
three CLIP windows), and an MLP on the mean of the output tokens for the pooled embedding.
The token width ``out_dim`` is the base UNet's cross-attention width; the pooled head's width
``pooled_dim`` is SDXL's ``text_embeds`` width (1280) where the base has one, else ``out_dim``.
Unlike the release, padding is masked in every attention (PAPER.md "Known weak points").

Three options, each fixing what the release's shape gets wrong on a base model that masks CLIP
padding (the first two measured on the tiny world; README "Where it stands"). The module has no
defaults for them: the training builder (train.model) passes the config's values, and a folder
saved before an option existed loads with it off (:meth:`OmniAdapter.from_pretrained`).

* ``input_norm``: per-dimension standardisation of the LLM states with statistics taken from the
  cache before training (buffers, saved with the weights). LLMs carry a few "massive" dimensions
  (Gemma 3: two dims average |x| ~55 where the median is ~2); unnormalised, they drown every other
  feature in the first projection and the adapter collapses to a caption-independent output.
* ``length_head``: predicts how many real CLIP tokens the caption has (log count, from the mean of
  the normalised LLM states and their number); the UNet reads that many queries, a prefix. The base
  UNet was pretrained with CLIP's padding masked out of cross-attention, so it should read as many
  tokens as it was trained on, not 231 positions of which stage 1 trained a handful. The head sits
  apart from the transformer, so when stages 2-3 train the adapter (and freeze this head) the mask
  of a caption stays what stage 1 taught (a per-query logit on the decoder drifted: 14 -> 7-86 tokens).
* ``pooled_query``: one extra learnable query whose output is the pooled embedding (CLIP pools a
  single <eos> state, not a mean).

Learned position embeddings of the LLM tokens (``max_positions``) were removed in issue 14: no gain
in stage-1 token cosine on the tiny world.

    adapter = OmniAdapter(llm_dim=640, width=256, out_dim=128, num_queries=77, encoder_layers=1, decoder_layers=2,
                          heads=4, input_norm=True, length_head=True, pooled_query=True)
    tokens, pooled = adapter(llm_states, llm_mask)               # (B, 77, 128), (B, 128)
    tokens, pooled, mask = adapter.condition(llm_states, llm_mask)  # + bool (B, 77): what the UNet reads
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class AdapterShape:
    """The constructor arguments, saved as config.json so a folder rebuilds the same module."""

    llm_dim: int
    width: int
    out_dim: int
    num_queries: int
    encoder_layers: int
    decoder_layers: int
    heads: int
    dropout: float
    input_norm: bool
    length_head: bool
    pooled_query: bool
    pooled_dim: int  # the pooled head's width: out_dim, or SDXL's text_embeds width (issue 16)


# Options a folder saved before they existed does not name: they were off then.
LEGACY_OPTIONS = {"input_norm": False, "length_head": False, "pooled_query": False}


class OmniAdapter(nn.Module):
    """``forward(llm_states (B, T, Dl), llm_mask bool (B, T)) -> (tokens (B, Q, out_dim), pooled (B, out_dim))``.

    ``llm_mask`` is True on real tokens. Padded positions are keys nowhere (encoder self-attention,
    decoder cross-attention), so their values cannot change the output.
    """

    def __init__(
        self,
        llm_dim: int,
        width: int,
        out_dim: int,
        num_queries: int,
        encoder_layers: int,
        decoder_layers: int,
        heads: int,
        dropout: float = 0.0,
        *,
        input_norm: bool,
        length_head: bool,
        pooled_query: bool,
        pooled_dim: int | None = None,
    ):
        super().__init__()
        pooled_dim = out_dim if pooled_dim is None else pooled_dim
        for name, value in (
            ("llm_dim", llm_dim),
            ("width", width),
            ("out_dim", out_dim),
            ("num_queries", num_queries),
            ("heads", heads),
            ("pooled_dim", pooled_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive int")
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        if encoder_layers < 0 or decoder_layers < 1:
            raise ValueError(f"encoder_layers={encoder_layers}, decoder_layers={decoder_layers}: need >= 0 and >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r}: must be in [0, 1)")
        self.shape = AdapterShape(llm_dim, width, out_dim, num_queries, encoder_layers, decoder_layers, heads, dropout,
                                  bool(input_norm), bool(length_head), bool(pooled_query), pooled_dim)
        if input_norm:  # identity until set_input_stats; saved with the weights
            self.register_buffer("input_mean", torch.zeros(llm_dim))
            self.register_buffer("input_scale", torch.ones(llm_dim))

        self.proj = nn.Sequential(nn.Linear(llm_dim, width), nn.GELU(), nn.Linear(width, width))
        # Pre-norm layers train stably from scratch without warm-up tricks.
        enc_layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = (
            nn.TransformerEncoder(enc_layer, encoder_layers, enable_nested_tensor=False)
            if encoder_layers
            else nn.Identity()
        )
        self.queries = nn.Parameter(torch.randn(num_queries + int(bool(pooled_query)), width) * 0.02)  # (Q[+1], W)
        dec_layer = nn.TransformerDecoderLayer(
            width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(dec_layer, decoder_layers)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)
        self.pooled_mlp = nn.Sequential(nn.Linear(out_dim, out_dim), nn.GELU(), nn.Linear(out_dim, pooled_dim))
        self.length_head = (
            nn.Sequential(nn.Linear(llm_dim + 1, width), nn.GELU(), nn.Linear(width, 1)) if length_head else None
        )

    @torch.no_grad()
    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-3) -> None:
        """Per-dimension mean and std of the LLM states (real tokens of the training cache) for ``input_norm``."""
        if not self.shape.input_norm:
            raise ValueError("set_input_stats: this adapter was built with input_norm=False")
        mean, std = torch.as_tensor(mean).float().flatten(), torch.as_tensor(std).float().flatten()
        if mean.shape != (self.shape.llm_dim,) or std.shape != (self.shape.llm_dim,):
            raise ValueError(f"input stats have shapes {tuple(mean.shape)}, {tuple(std.shape)}; expected ({self.shape.llm_dim},)")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("input stats hold NaN or infinite values")
        self.input_mean.copy_(mean)
        self.input_scale.copy_(std.clamp_min(eps))

    def forward(self, llm_states: torch.Tensor, llm_mask: torch.Tensor):
        """``(tokens (B, Q, out_dim), pooled (B, pooled_dim))``."""
        tokens, pooled, _ = self.forward_all(llm_states, llm_mask)
        return tokens, pooled

    def condition(self, llm_states: torch.Tensor, llm_mask: torch.Tensor):
        """What the UNet reads: ``(tokens, pooled, mask bool (B, Q))``.

        With ``length_head`` the mask is the first n queries, n the predicted number of real CLIP
        tokens (at least 1, at most Q); without it every query is real.
        """
        tokens, pooled, log_count = self.forward_all(llm_states, llm_mask)
        if log_count is None:
            return tokens, pooled, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return tokens, pooled, self.prefix_mask(log_count)

    def prefix_mask(self, log_count: torch.Tensor) -> torch.Tensor:
        """Predicted log counts ``(B,)`` -> bool ``(B, Q)``: True on the first round(exp) queries."""
        q = self.shape.num_queries
        n = log_count.detach().float().exp().round().clamp(1, q)  # (B,)
        return torch.arange(q, device=log_count.device)[None] < n[:, None]

    def forward_all(self, llm_states: torch.Tensor, llm_mask: torch.Tensor):
        """``(tokens (B, Q, out_dim), pooled (B, pooled_dim), log of the predicted real-token count (B,) or None)``."""
        if llm_states.ndim != 3 or llm_states.shape[-1] != self.shape.llm_dim:
            raise ValueError(f"llm_states has shape {tuple(llm_states.shape)}; expected (B, T, {self.shape.llm_dim})")
        if llm_mask.shape != llm_states.shape[:2]:
            raise ValueError(f"llm_mask has shape {tuple(llm_mask.shape)}; expected {tuple(llm_states.shape[:2])}")
        llm_mask = llm_mask.bool()
        if not llm_mask.any(1).all():
            raise ValueError("llm_mask: a row has no real token (encode '' as the LLM does: at least one token)")
        x = llm_states.to(self.queries.dtype)
        if self.shape.input_norm:
            x = (x - self.input_mean.to(x.dtype)) / self.input_scale.to(x.dtype)
        log_count = None
        if self.length_head is not None:
            m = llm_mask[..., None].to(x.dtype)  # (B, T, 1)
            mean = (x * m).sum(1) / m.sum(1)  # (B, Dl): normalised states, real tokens only
            feats = torch.cat([mean, m.sum(1).log()], -1)  # (B, Dl + 1)
            log_count = self.length_head(feats).squeeze(-1)  # (B,)
        h = self._training_body(x, llm_mask) if self.training else self._stock_body(x, llm_mask)  # (B, Q[+1], W)
        out = self.out(self.norm(h))  # (B, Q[+1], out_dim)
        if self.shape.pooled_query:
            tokens, pooled = out[:, :-1], self.pooled_mlp(out[:, -1])  # (B, Q, out_dim), (B, pooled_dim)
        else:
            tokens, pooled = out, self.pooled_mlp(out.mean(1))
        return tokens, pooled, log_count

    def _stock_body(self, x: torch.Tensor, llm_mask: torch.Tensor) -> torch.Tensor:
        """Normalised LLM states ``(B, T, Dl)`` -> decoder output ``(B, Q[+1], W)`` through torch's modules as
        they are (in eval mode the encoder's inference fast path): what sampling and serving run."""
        pad = ~llm_mask  # (B, T) True = ignore, torch's convention
        x = self.proj(x)  # (B, T, W)
        if isinstance(self.encoder, nn.TransformerEncoder):
            x = self.encoder(x, src_key_padding_mask=pad)  # (B, T, W)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, Q[+1], W)
        return self.decoder(q, x, memory_key_padding_mask=pad)  # (B, Q[+1], W)

    def _training_body(self, x: torch.Tensor, llm_mask: torch.Tensor) -> torch.Tensor:
        """:meth:`_stock_body`'s function with less work, for training (issue 18 item 5): the projection and the
        encoder's feed-forward blocks on real tokens only, the decoder's first self-attention once per batch.
        Equal up to float rounding (tests/test_models.py compares outputs and gradients; benchmarks/train_step.py
        --adapter measures the time)."""
        x = self._project(x, llm_mask)  # (B, T, W)
        if isinstance(self.encoder, nn.TransformerEncoder):
            x = self._encode(x, llm_mask)  # (B, T, W)
        return self._decode(x, ~llm_mask)  # (B, Q[+1], W)

    def _project(self, x: torch.Tensor, llm_mask: torch.Tensor) -> torch.Tensor:
        """``proj`` of the real tokens only ``(B, T, Dl) -> (B, T, W)``, zeros at padding.

        Padded positions are keys nowhere and their encoder rows are read by nothing, so their values
        cannot change the output; a batch is mostly padding (its longest caption sets T), so projecting
        only the real rows saves most of the widest matmul (640 -> W) and its backward (benchmarks/train_step.py).
        """
        if bool(llm_mask.all()):
            return self.proj(x)
        out = x.new_zeros(*x.shape[:2], self.shape.width)  # (B, T, W)
        out[llm_mask] = self.proj(x[llm_mask])  # (N real, Dl) -> (N real, W)
        return out

    def _encode(self, x: torch.Tensor, llm_mask: torch.Tensor) -> torch.Tensor:
        """The encoder over ``x (B, T, W)``: what ``self.encoder(x, src_key_padding_mask=~llm_mask)`` computes at the
        real tokens, with each layer's feed-forward block on the real tokens only (padded rows stay as the
        self-attention left them; nothing reads them: they are masked keys everywhere)."""
        pad = ~llm_mask
        packed = not bool(llm_mask.all())
        for layer in self.encoder.layers:
            if not layer.norm_first:  # built pre-norm here; any other layer runs as torch defines it
                x = layer(x, src_key_padding_mask=pad)
                continue
            n = layer.norm1(x)
            x = x + layer.dropout1(layer.self_attn(n, n, n, key_padding_mask=pad, need_weights=False)[0])
            real = x[llm_mask] if packed else x  # (N real, W)
            f = layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm2(real)))))
            real = real + layer.dropout2(f)
            if packed:
                x = x.masked_scatter(llm_mask[..., None], real)  # (B, T, W)
            else:
                x = real
        return self.encoder.norm(x) if self.encoder.norm is not None else x

    def _decode(self, memory: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """The decoder's queries reading ``memory (B, T, W)`` -> ``(B, Q[+1], W)``; what ``self.decoder(queries,
        memory, memory_key_padding_mask=pad)`` computes, with the first layer's self-attention done once.

        Before the first cross-attention the queries are the same learned vectors for every caption, so the
        first layer's self-attention block (pre-norm: ``q + self_attn(norm1(q))``) is the same for every row
        of the batch: it runs on one row and is broadcast (a fifth of the adapter's FLOPs at batch 16 with
        231 queries). Only without dropout (the demo's 0.0), where one row's result is every row's result;
        with dropout the stock layer runs, so every row draws its own noise.
        """
        b = memory.shape[0]
        layers = list(self.decoder.layers)
        first = layers[0]
        q = self.queries.unsqueeze(0)  # (1, Q[+1], W)
        if first.norm_first and self.shape.dropout == 0:
            n = first.norm1(q)
            h = q + first.dropout1(first.self_attn(n, n, n, need_weights=False)[0])  # (1, Q[+1], W)
            h = h.expand(b, -1, -1)  # (B, Q[+1], W)
            a = first.norm2(h)
            h = h + first.dropout2(first.multihead_attn(a, memory, memory, key_padding_mask=pad, need_weights=False)[0])
            f = first.linear2(first.dropout(first.activation(first.linear1(first.norm3(h)))))
            h = h + first.dropout3(f)
            layers = layers[1:]
        else:
            h = q.expand(b, -1, -1)
        for layer in layers:
            h = layer(h, memory, memory_key_padding_mask=pad)
        return self.decoder.norm(h) if self.decoder.norm is not None else h

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, **asdict(self.shape)}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> OmniAdapter:
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder}: no {name} (an OmniAdapter.save_pretrained folder)")
        config = json.loads((folder / CONFIG_NAME).read_text())
        config.pop("_class_name", None)
        if config.pop("max_positions", 0):
            raise ValueError(f"{folder}: this adapter was trained with position embeddings (max_positions), an option "
                             "removed in issue 14 (no gain); retrain it")
        config.setdefault("pooled_dim", config.get("out_dim"))  # saved before issue 16: the pooled head was out_dim wide
        model = cls(**{**LEGACY_OPTIONS, **config})
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
        return model.eval()
