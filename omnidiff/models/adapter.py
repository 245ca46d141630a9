"""The OmniDiffusion adapter: LLM token states -> the base model's text conditioning.

../shared/PAPER.md "The parts": a Linear -> GELU -> Linear projection of the LLM tokens, a small
transformer encoder over them, a decoder whose fixed set of learnable queries cross-attends to the
encoded tokens (so the output length is fixed whatever the prompt length; the release uses 227 =
three CLIP windows), and an MLP on the mean of the output tokens for the pooled embedding.
Unlike the release, padding is masked in every attention (PAPER.md "Known weak points").

    adapter = OmniAdapter(llm_dim=640, width=256, out_dim=128, num_queries=77)
    tokens, pooled = adapter(llm_states, llm_mask)    # (B, 77, 128), (B, 128)
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


class OmniAdapter(nn.Module):
    """``forward(llm_states (B, T, Dl), llm_mask bool (B, T)) -> (tokens (B, Q, out_dim), pooled (B, out_dim))``.

    ``llm_mask`` is True on real tokens. Padded positions are keys nowhere (encoder self-attention,
    decoder cross-attention), so their values cannot change the output.
    """

    def __init__(
        self,
        llm_dim: int,
        width: int = 256,
        out_dim: int = 128,
        num_queries: int = 77,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, value in (
            ("llm_dim", llm_dim),
            ("width", width),
            ("out_dim", out_dim),
            ("num_queries", num_queries),
            ("heads", heads),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive int")
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        if encoder_layers < 0 or decoder_layers < 1:
            raise ValueError(f"encoder_layers={encoder_layers}, decoder_layers={decoder_layers}: need >= 0 and >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r}: must be in [0, 1)")
        self.shape = AdapterShape(llm_dim, width, out_dim, num_queries, encoder_layers, decoder_layers, heads, dropout)

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
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)  # (Q, W)
        dec_layer = nn.TransformerDecoderLayer(
            width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(dec_layer, decoder_layers)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)
        self.pooled_mlp = nn.Sequential(nn.Linear(out_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, llm_states: torch.Tensor, llm_mask: torch.Tensor):
        if llm_states.ndim != 3 or llm_states.shape[-1] != self.shape.llm_dim:
            raise ValueError(f"llm_states has shape {tuple(llm_states.shape)}; expected (B, T, {self.shape.llm_dim})")
        if llm_mask.shape != llm_states.shape[:2]:
            raise ValueError(f"llm_mask has shape {tuple(llm_mask.shape)}; expected {tuple(llm_states.shape[:2])}")
        llm_mask = llm_mask.bool()
        if not llm_mask.any(1).all():
            raise ValueError("llm_mask: a row has no real token (encode '' as the LLM does: at least one token)")
        pad = ~llm_mask  # (B, T) True = ignore, torch's convention
        x = self.proj(llm_states.to(self.queries.dtype))  # (B, T, W)
        if isinstance(self.encoder, nn.TransformerEncoder):
            x = self.encoder(x, src_key_padding_mask=pad)  # (B, T, W)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, Q, W)
        h = self.decoder(q, x, memory_key_padding_mask=pad)  # (B, Q, W)
        tokens = self.out(self.norm(h))  # (B, Q, out_dim)
        pooled = self.pooled_mlp(tokens.mean(1))  # (B, out_dim)
        return tokens, pooled

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
        model = cls(**config)
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
        return model.eval()
