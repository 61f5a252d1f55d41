"""Sparsity settings (``conf/sparsity/``) and predictor sizes (``model.predictor``), validated on creation.

Field names are the config keys, so a bad value fails with the key it came from
(``sparsity.keep=1.5`` -> "sparsity.keep must be in (0, 1], got 1.5").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class SparsityConfig:
    """What to sparsify and how hard (PAPER.md sections 4-5; defaults are the paper's 7B recipe).

    ``keep`` is the vision keep target r_I (the top-k fraction at inference), ``text_keep`` the
    output-text target r_T, ``layer`` the decoder layer K whose input the predictors read and from
    which on the decisions gate attention, ``loss_weight`` the budget-loss weight lambda. Only final
    answers of at least ``text_min_len`` tokens are text-sparsified during training.
    """

    vision: bool = True
    text: bool = True
    keep: float = 0.2
    text_keep: float = 0.5
    layer: int = 2
    loss_weight: float = 100.0
    text_min_len: int = 50
    tau_start: float = 1.0
    tau_end: float = 0.1

    def __post_init__(self) -> None:
        for key in ("keep", "text_keep"):
            value = getattr(self, key)
            if not 0 < value <= 1:
                raise ValueError(f"sparsity.{key} must be in (0, 1], got {value}")
        if self.layer < 1:
            raise ValueError(f"sparsity.layer must be >= 1 (the predictors read the output of layer K-1), got {self.layer}")
        if self.loss_weight < 0:
            raise ValueError(f"sparsity.loss_weight must be >= 0, got {self.loss_weight}")
        if self.text_min_len < 1:
            raise ValueError(f"sparsity.text_min_len must be >= 1, got {self.text_min_len}")
        for key in ("tau_start", "tau_end"):
            if not getattr(self, key) > 0:
                raise ValueError(f"sparsity.{key} must be > 0, got {getattr(self, key)}")
        if self.text and not self.vision:
            # As in the reference code, the attention gate is built in the vision branch.
            raise ValueError("sparsity.text=true needs sparsity.vision=true (text-only sparsification is not supported)")

    @property
    def enabled(self) -> bool:
        return self.vision or self.text

    def check_layers(self, num_layers: int) -> None:
        """Raise unless K leaves at least one gated layer in a decoder of ``num_layers`` layers."""
        if self.layer >= num_layers:
            raise ValueError(
                f"sparsity.layer must be < the number of decoder layers ({num_layers}), got {self.layer}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PredictorConfig:
    """Predictor sizes: the paper uses d_model 512, 8 heads, feed-forward 2048, 2 blocks for 7B and 13B."""

    d_model: int = 512
    heads: int = 8
    ff: int = 2048
    layers: int = 2

    def __post_init__(self) -> None:
        for key in ("d_model", "heads", "ff", "layers"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.predictor.{key} must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.heads:
            raise ValueError(f"model.predictor.d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if self.d_model % 4:
            raise ValueError(f"model.predictor.d_model must be a multiple of 4 (the heads use d/2 and d/4), got {self.d_model}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
