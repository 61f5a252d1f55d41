"""The two keep/drop predictors of Dynamic-LLaVA (PAPER.md section 3). Channel 0 is keep, channel 1 drop.

Both read the hidden states entering decoder layer K. The image predictor mixes tokens (two transformer
blocks plus a policy-weighted global summary, the DynamicViT recipe); the text predictor is strictly
per token, so the decision for a generated token can be made from that token alone at decode time.

``sparsity.image_predictor=instruction_aware`` swaps the image predictor for
:class:`InstructionAwareImagePredictor`, which also reads the instruction (the prompt's text after the
image, entering layer K) through one cross-attention layer.
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
    """Keep/drop logits for the image tokens of each sample: (B, n_image, H) -> (B, n_image, 2).

    The paper's predictor: it never reads the instruction (``forward`` accepts ``instruction`` /
    ``instruction_valid`` so that both image predictors share one call signature, and ignores them)."""

    def __init__(self, hidden_size: int, config: PredictorConfig) -> None:
        super().__init__()
        d = config.d_model
        self.norm = nn.LayerNorm(hidden_size)
        self.embed = nn.Linear(hidden_size, d)
        self.blocks = nn.ModuleList(PredictorBlock(d, config.heads, config.ff) for _ in range(config.layers))
        self.head = _score_head(d)

    def forward(
        self,
        image_hidden: torch.Tensor,
        policy: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        instruction: torch.Tensor | None = None,
        instruction_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``policy`` (B, n_image, 1) is a previous keep decision; all ones (None) at the first call.
        ``valid`` (B, n_image) bool marks real tokens when samples hold different counts (padded to the
        longest): padding is neither attended to nor pooled, so each sample's logits are its own.
        ``instruction`` (B, m, H) / ``instruction_valid`` (B, m) bool: the instruction's hidden states
        and their validity, read only by :class:`InstructionAwareImagePredictor` (ignored here)."""
        h = F.gelu(self.embed(self.norm(image_hidden)))
        h = self._read_instruction(h, instruction, instruction_valid)
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

    def _read_instruction(
        self, h: torch.Tensor, instruction: torch.Tensor | None, instruction_valid: torch.Tensor | None
    ) -> torch.Tensor:
        """The embedded image tokens (B, n_image, d) after reading the instruction: unchanged here."""
        return h


class InstructionCrossAttention(nn.Module):
    """Pre-LayerNorm multi-head cross-attention from image tokens (B, n, d) to instruction tokens
    (B, m, H), with a residual: ``h + proj(attend(q(norm(h)), kv(gelu(embed(norm_H(instruction))))))``.

    The instruction is normed and embedded to d the way the image tokens are. q/kv carry no bias (as the
    self-attention blocks' qkv). ``proj`` is zero-initialised (``zero_init``, honoured by
    :func:`init_predictor_weights`), so a fresh layer is the identity. Padding of the instruction is
    never attended to; a sample without any valid instruction token gets a zero contribution (its
    attention runs over the padding only to stay finite, and is multiplied by 0), never NaN.
    """

    def __init__(self, hidden_size: int, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.instruction_norm = nn.LayerNorm(hidden_size)
        self.instruction_embed = nn.Linear(hidden_size, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)
        self.proj.zero_init = True
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor, instruction: torch.Tensor, instruction_valid: torch.Tensor | None) -> torch.Tensor:
        b, n, d = h.shape
        if instruction_valid is None:
            instruction_valid = torch.ones(instruction.shape[:2], dtype=torch.bool, device=instruction.device)
        if instruction.shape[1] == 0:  # no instruction column at all: one padding column keeps shapes (and FSDP) uniform
            instruction = instruction.new_zeros(b, 1, instruction.shape[-1])
            instruction_valid = torch.zeros(b, 1, dtype=torch.bool, device=instruction.device)
        m = instruction.shape[1]
        words = F.gelu(self.instruction_embed(self.instruction_norm(instruction)))
        q = self.q(self.norm(h)).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(words).view(b, m, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        present = instruction_valid.any(-1)  # (B,)
        mask = (instruction_valid | ~present[:, None])[:, None, None, :]  # an empty row attends to its padding ...
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, d)
        return h + self.proj(attended) * present[:, None, None].to(h.dtype)  # ... and contributes nothing


class InstructionAwareImagePredictor(ImagePredictor):
    """:class:`ImagePredictor` whose image tokens also read the instruction (``sparsity.image_predictor=
    instruction_aware``): right after the embedding, before the self-attention blocks, every image token
    cross-attends to the instruction's hidden states (:class:`InstructionCrossAttention`, module ``cross``).
    Placed there, the question-conditioned features pass through the blocks (image tokens exchange what
    the question made relevant) and into the global summary, and the layers after it are exactly the
    original predictor's.

    Initialisation: ``cross.proj`` starts at zero, so a fresh predictor computes exactly what an original
    :class:`ImagePredictor` with the same remaining weights computes. To start from a trained original
    predictor, ``load_state_dict(original.state_dict(), strict=False)``: the only missing keys are the
    ``cross.*`` parameters (which keep their fresh init) and nothing is unexpected.
    ``forward`` requires ``instruction`` (B, m, H); ``instruction_valid`` (B, m) bool marks its real tokens.
    """

    def __init__(self, hidden_size: int, config: PredictorConfig) -> None:
        super().__init__(hidden_size, config)
        self.cross = InstructionCrossAttention(hidden_size, config.d_model, config.heads)

    def _read_instruction(
        self, h: torch.Tensor, instruction: torch.Tensor | None, instruction_valid: torch.Tensor | None
    ) -> torch.Tensor:
        if instruction is None:
            raise ValueError(
                "the instruction-aware image predictor (sparsity.image_predictor=instruction_aware) needs "
                "instruction= (B, m, H): the hidden states of the prompt's text after the image"
            )
        if instruction.shape[0] != h.shape[0] or (
            instruction_valid is not None and instruction_valid.shape != instruction.shape[:2]
        ):
            raise ValueError(
                f"instruction {tuple(instruction.shape)} / instruction_valid "
                f"{None if instruction_valid is None else tuple(instruction_valid.shape)} do not match "
                f"{h.shape[0]} samples of image tokens"
            )
        return self.cross(h, instruction.to(h.dtype), instruction_valid)


IMAGE_PREDICTOR_CLASSES = {"original": ImagePredictor, "instruction_aware": InstructionAwareImagePredictor}  # by sparsity.image_predictor


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
    """HF-style init for fresh predictors: Linear ~ N(0, std) with zero bias, LayerNorm (1, 0); a Linear
    marked ``zero_init`` (the instruction cross-attention's output) gets zero weights instead."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            if getattr(sub, "zero_init", False):
                nn.init.zeros_(sub.weight)
            else:
                nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
