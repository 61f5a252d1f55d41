"""LLaVA-1.5 (HF ``model_type`` "llava"): CLIP tower, MLP projector, Llama decoder, 1-D RoPE.

Every image gives the same number of tokens (576 for 336 px CLIP-L/14, 64 for the tiny model), laid
out on a square grid; positions skip left padding as HF ``generate`` does.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from dllava.families.base import FamilyAdapter, ImageFeatures, image_statistics


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (as HF ``generate`` does); arange for right padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class LlavaAdapter(FamilyAdapter):
    model_type = "llava"
    pixel_keys = ("pixel_values",)
    part_prefixes = {"projector": ("model.multi_modal_projector.",), "vision": ("model.vision_tower.",)}
    rope_rows = 1

    def model_class(self) -> type[nn.Module]:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def config_class(self) -> type:
        from transformers import LlavaConfig

        return LlavaConfig

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.vision_tower

    def vision_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        tower = self.vision_tower(model)
        return getattr(tower, "vision_model", tower).encoder.layers

    def encode_images(self, model: nn.Module, images: dict[str, torch.Tensor]) -> ImageFeatures:
        """Projected CLIP features, exactly as ``LlavaModel`` computes them."""
        config = model.config
        features = model.model.get_image_features(
            pixel_values=images["pixel_values"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        stacked = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
        return ImageFeatures.from_stacked(stacked)

    def prompt_positions(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        images: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        return positions_from_mask(attention_mask)[None]

    def vision_saliency(self, model: nn.Module, images: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's CLS-to-patch attention (summed over heads) and keys (mean over heads) in the layer whose
        output LLaVA projects (``vision_feature_layer``), recomputed from that layer's input as VisionZip
        reads them; rows follow the projected tokens (CLS dropped under the ``default`` strategy)."""
        config = model.config
        tower = self.vision_tower(model)
        pixels = images["pixel_values"].to(next(tower.parameters()).dtype)
        hidden = tower(pixels, output_hidden_states=True).hidden_states
        layers = self.vision_layers(model)
        chosen = config.vision_feature_layer
        if not isinstance(chosen, int):
            raise NotImplementedError("method=visionzip with several vision_feature_layer values")
        index = chosen % (len(layers) + 1) - 1  # hidden_states[i] is the output of layer i - 1
        layer = layers[index]
        attn = layer.self_attn
        normed = layer.layer_norm1(hidden[index])
        batch, n, _ = normed.shape
        query = attn.q_proj(normed).view(batch, n, -1, attn.head_dim).transpose(1, 2).float()
        key = attn.k_proj(normed).view(batch, n, -1, attn.head_dim).transpose(1, 2).float()
        cls = (query[:, :, :1] @ key.transpose(-1, -2) * attn.scale).softmax(-1)[:, :, 0].sum(1)  # (B, n)
        first = 1 if config.vision_feature_select_strategy == "default" else 0
        keys = key.mean(1)[:, first:]
        return cls[:, first:].reshape(-1), keys.reshape(-1, keys.shape[-1])

    def vision_flops(self, config: Any, features: ImageFeatures) -> int:
        from dllava.inference.flops import vision_flops

        return vision_flops(config.vision_config, config.text_config.hidden_size, batch=len(features.counts))

    def load_processor(self, path: str) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)

    def sample_preprocessor(self, processor: Any, max_length: int) -> Any:
        """vicuna_v1 template, square-padded CLIP pixels, the processor's fixed image-token count."""
        from dllava.data.datamodule import SamplePreprocessor

        return SamplePreprocessor(processor, count_image_tokens(processor), max_length)

    # -- pictures --------------------------------------------------------------------------------
    def images_for_pictures(self, images: dict[str, torch.Tensor], image_processor: Any = None) -> list[Any]:
        """Each (3, H, W) CLIP-normalised image (the square the model saw), un-normalised."""
        from dllava.eval.overlay import CLIP_MEAN, CLIP_STD, pixels_to_image

        pixels = images["pixel_values"]
        if pixels.ndim == 3:  # one question's image
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"LLaVA pixel_values must be (B, 3, H, W) or (3, H, W), got {tuple(images['pixel_values'].shape)}")
        stats = image_statistics(image_processor, (CLIP_MEAN, CLIP_STD))
        return [pixels_to_image(p, **stats) for p in pixels]

    def token_grids(self, config: Any, images: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        """The same square patch grid for every image (``image_seq_length`` tokens; one row if not square)."""
        pixels = images["pixel_values"]
        batch = 1 if pixels.ndim == 3 else pixels.shape[0]
        return [square_grid(int(config.image_seq_length))] * batch


def square_grid(n_image: int) -> tuple[int, int]:
    """(rows, cols) of LLaVA's ``n_image`` patch tokens: a square, or one row when ``n`` is not one."""
    side = math.isqrt(n_image)
    return (side, side) if side * side == n_image else (1, n_image)


def count_image_tokens(processor: Any) -> int:
    """Image tokens per image as HF's LlavaProcessor expands them (patches, plus CLS unless dropped)."""
    crop = getattr(processor.image_processor, "crop_size", None) or {}
    size = crop.get("height") if isinstance(crop, dict) else None
    if size is None:
        size = processor.image_processor.size["shortest_edge"]
    tokens = (size // processor.patch_size) ** 2 + processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        tokens -= 1
    return tokens
