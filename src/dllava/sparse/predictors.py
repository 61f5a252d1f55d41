"""The two keep/drop predictors of Dynamic-LLaVA (PAPER.md section 3). Channel 0 is keep, channel 1 drop.

Both read the hidden states entering decoder layer K. The image predictor mixes tokens (two transformer
blocks plus a policy-weighted global summary, the DynamicViT recipe); the text predictor is strictly
per token, so the decision for a generated token can be made from that token alone at decode time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dllava.sparse.config import PredictorConfig


def _score_head(d_model: int) -> nn.Sequential:
    """d -> d/2 -> d/4 -> 2 with GELUs: the shared tail of both predictors."""
    return nn.Sequential(
        nn.Linear(d_model, d_model // 2),
        nn.GELU(),
        nn.Linear(d_model // 2, d_model // 4),
        nn.GELU(),
        nn.Linear(d_model // 4, 2),
    )


class PredictorBlock(nn.Module):
    """Pre-LayerNorm transformer block: multi-head self-attention (qkv without bias) and a GELU MLP."""

    def __init__(self, d_model: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, ff), nn.GELU(), nn.Linear(ff, d_model))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid`` (B, n) bool: only these tokens are attended to (padding of shorter samples)."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if valid is None else valid[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class ImagePredictor(nn.Module):
    """Keep/drop logits for the image tokens of each sample: (B, n_image, H) -> (B, n_image, 2)."""

    def __init__(self, hidden_size: int, config: PredictorConfig) -> None:
        super().__init__()
        d = config.d_model
        self.norm = nn.LayerNorm(hidden_size)
        self.embed = nn.Linear(hidden_size, d)
        self.blocks = nn.ModuleList(PredictorBlock(d, config.heads, config.ff) for _ in range(config.layers))
        self.head = _score_head(d)

    def forward(
        self, image_hidden: torch.Tensor, policy: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``policy`` (B, n_image, 1) is a previous keep decision; all ones (None) at the first call.
        ``valid`` (B, n_image) bool marks real tokens when samples hold different counts (padded to the
        longest): padding is neither attended to nor pooled, so each sample's logits are its own."""
        h = F.gelu(self.embed(self.norm(image_hidden)))
        if policy is None:
            policy = h.new_ones(h.shape[:2] + (1,))
        if valid is not None:
            policy = policy * valid[..., None].to(policy.dtype)
        h = h * policy
        for block in self.blocks:
            h = block(h, valid)
        local, summary = h.chunk(2, dim=-1)
        summary = (summary * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True).clamp_min(1e-6)
        return self.head(torch.cat([local, summary.expand_as(local)], dim=-1))


class TextPredictor(nn.Module):
    """Per-token keep/drop logits for output-text tokens: (..., H) -> (..., 2)."""

    def __init__(self, hidden_size: int, config: PredictorConfig) -> None:
        super().__init__()
        d = config.d_model
        self.norm = nn.LayerNorm(hidden_size)
        self.embed = nn.Linear(hidden_size, d)
        self.head = _score_head(d)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.embed(self.norm(hidden))))


def init_predictor_weights(module: nn.Module, std: float = 0.02) -> None:
    """HF-style init for fresh predictors: Linear ~ N(0, std) with zero bias, LayerNorm (1, 0)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
