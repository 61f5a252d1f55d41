"""Pixel inputs of the Qwen-VL families (Qwen2.5-VL, Qwen3-VL): flattened patches plus ``image_grid_thw``.

A Qwen image is resized to multiples of ``patch_size * merge_size`` (28 px for Qwen2.5-VL, 32 px for
Qwen3-VL), cut into ``patch_size`` patches and flattened to ``(n_patches, C * T * P * P)`` rows; its grid
``(t, h, w)`` in patches is one row of ``image_grid_thw``. Image sizes differ, so a batch is never a
stacked ``(B, 3, H, W)`` tensor: the rows of every image are concatenated in sample order and the grids
say where each image ends, which is what HF's own image processor returns for a list of images.

Each sample is preprocessed on its own (in a dataloader worker) and :func:`collate_qwen_pixels` joins
them, so the result must equal one call of the image processor on the whole list (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image


def qwen_pixel_inputs(image: Image.Image, image_processor: Any) -> dict[str, torch.Tensor]:
    """One image through a Qwen2-VL-style image processor: ``pixel_values`` ``(n_patches, C*T*P*P)``
    and ``image_grid_thw`` ``(1, 3)`` long (t, h, w in patches)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"qwen_pixel_inputs needs a PIL image, got {type(image).__name__}")
    out = image_processor(images=[image], return_tensors="pt")
    missing = {"pixel_values", "image_grid_thw"} - set(out.keys())
    if missing:
        raise ValueError(
            f"image processor {type(image_processor).__name__} returned no {sorted(missing)}: "
            "a Qwen-VL family needs a Qwen2-VL-style image processor (flattened patches plus image_grid_thw)"
        )
    grid = out["image_grid_thw"].to(torch.long)
    if grid.shape != (1, 3):
        raise ValueError(f"expected one image_grid_thw row for one image, got shape {tuple(grid.shape)}")
    pixels = out["pixel_values"]
    if pixels.shape[0] != int(grid.prod()):
        raise ValueError(
            f"pixel_values has {pixels.shape[0]} patch rows, image_grid_thw {grid.tolist()} says {int(grid.prod())}"
        )
    return {"pixel_values": pixels, "image_grid_thw": grid}


def image_token_count(grid_thw: Sequence[int] | torch.Tensor, merge_size: int) -> int:
    """LLM tokens of one image: ``t * h * w / merge_size**2`` (the merger joins merge_size x merge_size
    patches into one token), as the Qwen processors expand ``<|image_pad|>``."""
    t, h, w = (int(v) for v in grid_thw)
    if merge_size < 1 or min(t, h, w) <= 0 or h % merge_size or w % merge_size:
        m = merge_size
        raise ValueError(f"image grid (t={t}, h={h}, w={w}) is not divisible by merge_size={m}: "
                         f"not a grid of whole {m}x{m} patch groups")
    return t * h * w // (merge_size * merge_size)


def collate_qwen_pixels(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-sample :func:`qwen_pixel_inputs` in sample order (one image per sample)."""
    if not samples:
        raise ValueError("collate_qwen_pixels needs at least one sample")
    for i, s in enumerate(samples):
        if tuple(s["image_grid_thw"].shape) != (1, 3):
            shape = tuple(s["image_grid_thw"].shape)
            raise ValueError(f"sample {i}: expected one image (image_grid_thw of shape (1, 3)), got {shape}")
    return {
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "image_grid_thw": torch.cat([s["image_grid_thw"] for s in samples]),
    }


def blank_image(image_processor: Any) -> Image.Image:
    """The image of a padding row of an exact pass: one merged token's square (``patch_size *
    merge_size`` px) in the processor's mean colour, so the row costs the fewest image tokens the
    processor allows (it may upscale it to ``min_pixels``; the grid it returns is what counts)."""
    side = int(image_processor.patch_size) * int(image_processor.merge_size)
    mean = getattr(image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
    fill = tuple(round(255 * m) for m in mean)
    return Image.new("RGB", (side, side), fill)
