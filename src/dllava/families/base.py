"""The family seam: what the method needs from a base model, one adapter per HF ``model_type``.

Dynamic-LLaVA's training forward (:mod:`dllava.sparse.model`), the pruned inference engine
(:mod:`dllava.inference.engine`), FLOPs accounting, parameter groups, FSDP units, data preprocessing
and evaluation reach the base model only through a :class:`FamilyAdapter`, so only an adapter module
names a model class. An adapter holds no request state: everything it returns (image features,
position ids) goes back to the caller, which keeps it for as long as the request lives.

Shared across families and not part of the seam: the gated attention (registered in
``AttentionInterface``), the sparse KV cache, the keep/drop decisions, the predictors, the budget loss
and span-based labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from dllava.sparse.decisions import check_budget, group_budgets, group_sizes

# Position ids everywhere in the seam are (R, B, N): R = 1 for 1-D RoPE, 3 for M-RoPE (t, h, w rows).


@dataclass
class ImageFeatures:
    """The projected image tokens of a batch with one image per sample.

    ``flat`` (T, H) holds every sample's tokens in batch order (what HF scatters into the image-token
    positions row by row); ``counts`` the tokens per sample (host ints, so shapes never depend on device
    data); ``grids`` each image's (rows, cols) token grid (for pictures); ``layer_additions`` maps a
    decoder layer index i to flat (T, H) features added at the image positions after layer i
    (Qwen3-VL's DeepStack), empty for other families. ``views`` (T,) host longs say which view of its
    image each token comes from (LLaVA-NeXT / OneVision: 0 = the base view, 1.. = the crops) and -1 for
    tokens that are never dropped and never counted in a budget (their newline tokens); None: every
    token is droppable and the image is one view.
    """

    flat: torch.Tensor
    counts: list[int]
    grids: list[tuple[int, int]]
    layer_additions: dict[int, torch.Tensor] = field(default_factory=dict)
    views: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.flat.device.type != "meta" and sum(self.counts) != self.flat.shape[0]:
            raise ValueError(f"image features hold {self.flat.shape[0]} tokens, counts say {sum(self.counts)}")
        if self.views is not None:
            self.views = self.views.detach().to("cpu", torch.long)
            if self.views.shape != (sum(self.counts),):
                raise ValueError(f"views must hold one id per image token ({sum(self.counts)}), got {tuple(self.views.shape)}")

    @property
    def most(self) -> int:
        """The largest per-sample token count (the padded width)."""
        return max(self.counts, default=0)

    def valid(self, device: torch.device | None = None) -> torch.Tensor:
        """(B, most) bool: which padded slots hold a real image token."""
        counts = torch.tensor(self.counts, device=device)
        return torch.arange(self.most, device=device)[None] < counts[:, None]

    def padded(self, flat: torch.Tensor | None = None) -> torch.Tensor:
        """(B, most, H): ``flat`` (default: the features) split per sample and zero-padded."""
        flat = self.flat if flat is None else flat
        rows = []
        for part in torch.split(flat, self.counts):
            pad = self.most - part.shape[0]
            rows.append(torch.cat([part, part.new_zeros(pad, part.shape[1])]) if pad else part)
        return torch.stack(rows)

    def slot_views(self, device: torch.device | None = None) -> torch.Tensor:
        """(B, most) long: each padded slot's view id (-1 at never-dropped tokens and at padding)."""
        views = self.views if self.views is not None else torch.zeros(sum(self.counts), dtype=torch.long)
        slots = torch.full((len(self.counts), self.most), -1, dtype=torch.long)
        for row, part in enumerate(torch.split(views, self.counts)):
            slots[row, : part.shape[0]] = part
        return slots.to(device)

    def groups(self, budget: str = "global", device: torch.device | None = None) -> torch.Tensor:
        """(B, most) long budget group of every slot under ``budget`` (:data:`~dllava.sparse.decisions.BUDGETS`): ``global``, one
        group per sample (0); ``per_view``, one per view; -1 at tokens always kept and at padding."""
        views = self.slot_views(device)
        if check_budget(budget) == "global":
            return torch.where(views >= 0, 0, -1)
        return views

    def droppable(self, device: torch.device | None = None) -> torch.Tensor:
        """(B, most) bool: slots holding a token some method may drop (a budget counts only these)."""
        return self.slot_views(device) >= 0

    def fixed_counts(self) -> list[int]:
        """Image tokens per sample that no method drops (LLaVA-NeXT's newlines; 0 for one-view families)."""
        return (self.valid() & ~self.droppable()).sum(-1).tolist()

    def kept_counts(self, keep: float | None, budget: str = "global") -> list[int]:
        """Image tokens each sample keeps after prefill: its never-dropped tokens plus ``int(n * keep)``, at
        least one, of every non-empty budget group (keep None: all of them, the dense arm)."""
        if keep is None:
            return list(self.counts)
        groups, valid = self.groups(budget), self.valid()
        fixed = (valid & (groups < 0)).sum(-1).tolist()  # -1 groups: the never-dropped tokens, either budget
        return [f + sum(b) for f, b in zip(fixed, group_budgets(group_sizes(groups, valid), keep))]

    @classmethod
    def from_stacked(cls, stacked: torch.Tensor, grid: tuple[int, int] | None = None) -> "ImageFeatures":
        """Equal-count features (B, n, H), e.g. LLaVA-1.5's 576 per image."""
        batch, n, _ = stacked.shape
        side = int(round(n**0.5))
        grid = grid or ((side, side) if side * side == n else (1, n))
        return cls(stacked.reshape(batch * n, -1), [n] * batch, [grid] * batch)


class FamilyAdapter:
    """What the rest of dllava needs from one family of HF multimodal models (stateless).

    Methods take the HF ``...ForConditionalGeneration`` model (or its config) as their first argument.
    Subclasses set the class attributes and implement the methods that raise ``NotImplementedError``.
    """

    model_type: ClassVar[str]
    # batch keys of the pixel inputs this family's model reads (collate output and HF forward kwargs)
    pixel_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # parameter-name prefixes (relative to the HF model) of the trainable parts; "projector" is matched
    # before "vision" so a merger inside the vision tower counts as the projector
    part_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {}
    rope_rows: ClassVar[int] = 1

    # -- building --------------------------------------------------------------------------------
    def model_class(self) -> type[nn.Module]:
        raise NotImplementedError

    def config_class(self) -> type:
        raise NotImplementedError

    # -- structure -------------------------------------------------------------------------------
    def text_config(self, config: Any) -> Any:
        return config.text_config

    def decoder(self, model: nn.Module) -> nn.Module:
        """The text decoder (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``)."""
        return model.model.language_model

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def vision_tower(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def vision_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        raise NotImplementedError

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """Modules sharded as their own FSDP unit: every vision block and every decoder layer."""
        return list(self.vision_layers(model)) + list(self.decoder(model).layers)

    def image_token_id(self, config: Any) -> int:
        return int(config.image_token_id)

    # -- inputs ----------------------------------------------------------------------------------
    def pixel_inputs(self, batch: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The pixel tensors of a collated batch, floats cast to ``dtype`` (the model's)."""
        found = {k: batch[k] for k in self.pixel_keys if batch.get(k) is not None}
        if dtype is not None:
            found = {k: v.to(dtype) if v.is_floating_point() else v for k, v in found.items()}
        return found

    def select_rows(self, images: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
        """The pixel inputs of samples ``rows`` only (default: every tensor is batch-first)."""
        if not images:
            return images
        index = torch.tensor(rows, device=next(iter(images.values())).device)
        return {k: v.index_select(0, index) for k, v in images.items()}

    def encode_images(self, model: nn.Module, images: dict[str, torch.Tensor]) -> ImageFeatures:
        raise NotImplementedError

    def hf_inputs(self, config: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inputs HF's own ``forward``/``generate`` of this family need beyond ids, mask and pixels
        (Qwen: ``mm_token_type_ids``, without which HF silently uses 1-D positions)."""
        return {}

    def prompt_positions(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        images: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """(R, B, N) position ids of the whole, unpruned sequence (left or right padding)."""
        raise NotImplementedError

    def rotary(self, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for ``positions`` (R, B, N), shaped as the decoder layers take them."""
        rotary = self.decoder(model).rotary_emb
        return rotary(hidden, positions[0] if self.rope_rows == 1 else positions)

    def query_key(self, attn: nn.Module, normed: torch.Tensor, query_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-rotated query of column ``query_index`` (B, h, 1, d) and every key (B, h_kv, N, d) of one
        attention module, from the hidden states after its input norm (FastV recomputes them)."""
        batch, n, _ = normed.shape
        d = attn.head_dim
        query = attn.q_proj(normed[:, query_index:][:, :1]).view(batch, 1, -1, d)
        key = attn.k_proj(normed).view(batch, n, -1, d)
        return query.transpose(1, 2), key.transpose(1, 2)

    def vision_saliency(self, model: nn.Module, images: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """VisionZip's inputs, one row per image token in :meth:`encode_images`' order: the attention the
        token receives in the vision tower's selected layer (T,) (CLS attention where the tower has a CLS
        token) and that layer's keys (T, d), mean over heads."""
        raise NotImplementedError(
            f"method=visionzip reads the vision tower's attention, which the {self.model_type} adapter does not "
            "provide yet (vision_saliency)"
        )

    # -- cost ------------------------------------------------------------------------------------
    def vision_flops(self, config: Any, features: ImageFeatures) -> int:
        """FLOPs of the vision tower and projector for the images of ``features``."""
        raise NotImplementedError

    # -- data ------------------------------------------------------------------------------------
    def load_processor(self, path: str) -> Any:
        raise NotImplementedError

    def sample_preprocessor(self, processor: Any, max_length: int) -> Any:
        """The :class:`~dllava.data.datamodule.SamplePreprocessor` that turns a (family-neutral) LLaVA
        record into this family's token ids, labels and pixel inputs."""
        raise NotImplementedError

    # -- pictures --------------------------------------------------------------------------------
    def images_for_pictures(self, images: dict[str, torch.Tensor], image_processor: Any = None) -> list[Any]:
        """One displayable PIL image per sample of ``images`` (this family's pixel inputs, as a batch or
        one question holds them), un-normalised with ``image_processor``'s mean and std (a processor
        holding one works too; None: the family's default statistics): what the model saw, on which
        :meth:`token_grids` lays the keep masks."""
        raise NotImplementedError

    def token_grids(self, config: Any, images: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        """(rows, cols) of each sample's image tokens (row-major, as its keep row is ordered)."""
        raise NotImplementedError


def image_statistics(image_processor: Any, default: tuple[Sequence[float], Sequence[float]]) -> dict[str, Any]:
    """``image_processor``'s normalisation (``mean``, ``std``), from it or from the processor holding
    it, or ``default`` when it has none: what pictures need to undo the normalisation."""
    image_processor = getattr(image_processor, "image_processor", image_processor)
    mean = getattr(image_processor, "image_mean", None)
    std = getattr(image_processor, "image_std", None)
    if mean is None or std is None:
        mean, std = default
    return {"mean": list(mean), "std": list(std)}


def next_positions(positions: torch.Tensor) -> torch.Tensor:
    """(R, B, 1) positions of the next generated token: one past each row's last column (a generated
    token is text, so every M-RoPE row continues from the prompt's largest position)."""
    return positions[..., -1:].amax(0, keepdim=True).expand(positions.shape[0], -1, -1) + 1


def gather_columns(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Kept columns ``index`` (B, n) of (R, B, N) position ids: the original ids, never renumbered."""
    return positions.gather(2, index[None].expand(positions.shape[0], -1, -1))
