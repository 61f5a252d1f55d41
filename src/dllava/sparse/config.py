"""Sparsity settings (``conf/sparsity/``) and predictor sizes (``model.predictor``), validated on creation.

Field names are the config keys, so a bad value fails with the key it came from
(``sparsity.keep=1.5`` -> "sparsity.keep must be in (0, 1], got 1.5").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dllava.sparse.attention import resolve_attention
from dllava.sparse.decisions import check_budget
from dllava.utils.checks import check_bool, check_choice, check_float, check_int

IMAGE_PREDICTORS = ("original", "instruction_aware")  # sparsity.image_predictor (dllava.sparse.predictors)


@dataclass
class SparsityConfig:
    """What to sparsify and how hard (PAPER.md sections 4-5; defaults are the paper's 7B recipe).

    ``keep`` is the vision keep target r_I (the top-k fraction at inference), ``text_keep`` the
    output-text target r_T, ``layer`` the decoder layer K whose input the predictors read and from
    which on the decisions gate attention, ``loss_weight`` the budget-loss weight lambda. Only final
    answers of at least ``text_min_len`` tokens are text-sparsified during training. ``attention`` is
    how the gated softmax is computed (``dllava.sparse.attention.resolve_attention``): ``auto``,
    ``eager`` (the reference), ``sdpa`` or ``flex``. ``budget`` is the image-budget convention
    (:func:`dllava.sparse.decisions.check_budget`): ``global`` (a share of each sample's droppable image
    tokens) or ``per_view`` (that share inside every view of a multi-view image, LLaVA-NeXT/OneVision).
    ``image_predictor`` is the image predictor's kind: ``original`` (the paper's, blind to the question)
    or ``instruction_aware`` (it also cross-attends to the prompt's text after the image,
    :class:`dllava.sparse.predictors.InstructionAwareImagePredictor`). Configs saved without the key
    (every checkpoint before it existed) get ``original``.
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
    attention: str = "auto"
    budget: str = "global"
    image_predictor: str = "original"

    def __post_init__(self) -> None:
        self.vision = check_bool("sparsity.vision", self.vision)
        self.text = check_bool("sparsity.text", self.text)
        for key in ("keep", "text_keep"):
            setattr(self, key, check_float(f"sparsity.{key}", getattr(self, key), low=0, high=1, low_open=True))
        # K: the predictors read the output of layer K-1, so K >= 1 (an integer: 2.5 matches no layer)
        self.layer = check_int("sparsity.layer", self.layer, low=1)
        self.loss_weight = check_float("sparsity.loss_weight", self.loss_weight, low=0)
        self.text_min_len = check_int("sparsity.text_min_len", self.text_min_len, low=1)
        for key in ("tau_start", "tau_end"):
            setattr(self, key, check_float(f"sparsity.{key}", getattr(self, key), low=0, low_open=True))
        resolve_attention(self.attention)  # raises on an unknown name, naming the key
        check_budget(self.budget)
        check_choice("sparsity.image_predictor", self.image_predictor, IMAGE_PREDICTORS)
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
            setattr(self, key, check_int(f"model.predictor.{key}", getattr(self, key), low=1))
        if self.d_model % self.heads:
            raise ValueError(f"model.predictor.d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if self.d_model % 4:
            raise ValueError(f"model.predictor.d_model must be a multiple of 4 (the heads use d/2 and d/4), got {self.d_model}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
