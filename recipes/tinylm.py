"""A tiny causal transformer for the synthetic sequence task (recipe `tinylm`)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from statplug.config.ranges import LearningRate, NonNegative, Size
from statplug.encodings import RotaryEncoding, SinusoidalEncoding
from statplug.masks import CausalMask
from statplug.stats import RunningMoments

from .base import IGNORE, Classifier

__all__ = ["TinyLM", "padding_mask"]


def padding_mask(batch: tuple[Tensor, Tensor]) -> Tensor:
    """The positions of a ``SequenceDataModule`` batch that hold data (True), not padding:
    those whose target is not ``IGNORE``. For ``ActivationStats(mask_fn=padding_mask)``."""
    return batch[1] != IGNORE

__all__ = ["TinyLM"]


class _Block(nn.Module):
    """Pre-norm attention + MLP block; the mask and rotary encoding are the model's, shared."""

    def __init__(self, dim: int, heads: int, rotary: RotaryEncoding | None) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        # A plain attribute, not a submodule: the encoding is registered once, on the model.
        self._rotary = [rotary] if rotary is not None else []

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, head_dim]
        if self._rotary:
            q, k = self._rotary[0](q, k)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(Classifier):
    """Tiny causal transformer language model.

    Positions come from a :class:`~statplug.RotaryEncoding` on queries and keys (default) or a
    :class:`~statplug.SinusoidalEncoding` added to the embeddings; attention uses a
    :class:`~statplug.CausalMask` (bool, True = may attend). A :class:`~statplug.RunningMoments`
    keeps the per-feature mean and variance of the final hidden states seen in training, at
    real (not padded) positions only.

    Args:
        vocab_size: Default: 16.
        dim: model width. Default: 32.
        heads: attention heads (``dim`` must be divisible by it). Default: 2.
        layers: transformer blocks. Default: 2.
        max_len: length of the cached mask and encodings (they regrow). Default: 64.
        positions: ``"rotary"`` or ``"sinusoidal"``. Default: ``"rotary"``.
        lr: Default: 3e-3.
        weight_decay: Default: 0.0.
    """

    def __init__(
        self,
        vocab_size: Size = 16,
        dim: Size = 32,
        heads: Size = 2,
        layers: Size = 2,
        max_len: Size = 64,
        positions: Literal["rotary", "sinusoidal"] = "rotary",
        lr: LearningRate = 3e-3,
        weight_decay: NonNegative = 0.0,
    ) -> None:
        super().__init__(vocab_size, lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        if dim % heads:
            raise ValueError(f"TinyLM: `dim` ({dim}) must be divisible by `heads` ({heads})")
        if positions not in ("rotary", "sinusoidal"):
            raise ValueError(
                f"TinyLM: `positions` must be 'rotary' or 'sinusoidal', got {positions!r}"
            )
        # One more embedding row: the padding token (vocab_size) of a padded SequenceDataModule.
        self.embed = nn.Embedding(vocab_size + 1, dim, padding_idx=vocab_size)
        self.pad = vocab_size
        self.causal = CausalMask(max_len)
        self.rotary: RotaryEncoding | None = None
        self.sinusoidal: SinusoidalEncoding | None = None
        if positions == "rotary":
            self.rotary = RotaryEncoding(dim // heads, max_len=max_len)
        else:
            self.sinusoidal = SinusoidalEncoding(dim, max_len=max_len)
        self.blocks = nn.ModuleList(_Block(dim, heads, self.rotary) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        self.hidden_stats = RunningMoments(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        if self.sinusoidal is not None:
            x = self.sinusoidal(x)
        mask = self.causal.mask(tokens.shape[-1])
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln(x)
        if self.training:  # padding never pollutes the statistics
            self.hidden_stats.update(x, mask=tokens != self.pad)
        return self.head(x)
