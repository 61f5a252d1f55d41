"""Pictures of what a sparsifier keeps: the image with dropped patches darkened, kept ones outlined.

Image token ``i`` of a LLaVA prompt is CLIP patch ``i`` in row-major order (``vision_feature_select_strategy
= "default"`` drops the CLS token), so a keep mask of ``n`` image tokens lays onto a ``sqrt(n)`` x
``sqrt(n)`` grid over the image the model saw (after padding to a square, resizing and cropping). The
helpers here draw from that image, or from the normalised ``pixel_values`` of a batch (denormalised
with the processor's mean and std), which is all a LightningModule has during validation:

    panel = kept_patch_panel(batch["pixel_values"][:8], out.image_keep[:8], captions=batch["questions"][:8])
    wandb_logger.log_image("val/kept_patches", [panel], step=trainer.global_step)
"""

from __future__ import annotations

import math
import textwrap
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# OpenAI CLIP's preprocessing statistics (the tiny model's processor and llava-1.5's use them).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
KEPT_COLOR = (0, 230, 255)
BACKGROUND = (255, 255, 255)


def patch_grid(n_image: int) -> tuple[int, bool]:
    """Grid side for ``n_image`` image tokens, and whether the first token is a CLS token to skip."""
    side = math.isqrt(n_image)
    if side * side == n_image:
        return side, False
    side = math.isqrt(n_image - 1)
    if side * side == n_image - 1:
        return side, True
    raise ValueError(f"{n_image} image tokens do not form a square patch grid (with or without a CLS token)")


def _as_bool_list(keep: torch.Tensor | np.ndarray | Sequence[bool]) -> list[bool]:
    if isinstance(keep, torch.Tensor):
        keep = keep.detach().cpu().flatten().tolist()
    elif isinstance(keep, np.ndarray):
        keep = keep.flatten().tolist()
    return [bool(k) for k in keep]


def pixels_to_image(
    pixel_values: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> Image.Image:
    """Normalised (3, H, W) pixels back to an RGB image (exact up to 8-bit rounding)."""
    x = pixel_values.detach().float().cpu()
    x = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    array = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def kept_patch_overlay(
    image: Image.Image,
    keep: torch.Tensor | np.ndarray | Sequence[bool],
    size: int = 384,
    dim: float = 0.45,
    color: tuple[int, int, int] = KEPT_COLOR,
    caption: str | None = None,
) -> Image.Image:
    """The image at ``size`` x ``size`` px: dropped patches grey and darkened to ``dim`` of their
    brightness, kept patches in colour with a ``color`` border; an optional caption strip below.

    ``image`` is the square image the model saw (see the module docstring); ``keep`` has one entry per
    image token (``grid**2``, or ``grid**2 + 1`` with a leading CLS entry, which is ignored).
    """
    flags = _as_bool_list(keep)
    grid, has_cls = patch_grid(len(flags))
    if has_cls:
        flags = flags[1:]
    base = image.convert("RGB").resize((size, size), Image.NEAREST if image.width < size else Image.BICUBIC)
    dark = Image.eval(base.convert("L"), lambda v: int(v * dim)).convert("RGB")
    mask = Image.new("L", (grid, grid))
    mask.putdata([255 if k else 0 for k in flags])
    out = Image.composite(base, dark, mask.resize((size, size), Image.NEAREST))
    draw = ImageDraw.Draw(out)
    width = max(1, size // (grid * 12))
    for index, kept in enumerate(flags):
        if kept:
            row, col = divmod(index, grid)
            box = [col * size // grid, row * size // grid, (col + 1) * size // grid - 1, (row + 1) * size // grid - 1]
            draw.rectangle(box, outline=color, width=width)
    if caption:
        out = _with_caption(out, caption)
    return out


def captioned(image: Image.Image, size: int = 384, caption: str | None = None) -> Image.Image:
    """The image itself at ``size`` x ``size`` px (no decisions drawn), with an optional caption strip."""
    out = image.convert("RGB").resize((size, size), Image.NEAREST if image.width < size else Image.BICUBIC)
    return _with_caption(out, caption) if caption else out


def _with_caption(image: Image.Image, caption: str) -> Image.Image:
    font_size = max(10, image.width // 24)
    font = _font(font_size)
    chars = max(10, int(image.width / (font_size * 0.55)))
    lines = [l for part in caption.splitlines() for l in (textwrap.wrap(part, chars) or [""])]
    strip = (font_size + 4) * len(lines) + 6
    canvas = Image.new("RGB", (image.width, image.height + strip), BACKGROUND)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, image.height + 3 + i * (font_size + 4)), line, fill=(0, 0, 0), font=font)
    return canvas


def overlay_from_pixels(
    pixel_values: torch.Tensor,
    keep: torch.Tensor | np.ndarray | Sequence[bool],
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    **kwargs,
) -> Image.Image:
    """:func:`kept_patch_overlay` on normalised (3, H, W) pixels (what a batch holds)."""
    return kept_patch_overlay(pixels_to_image(pixel_values, mean, std), keep, **kwargs)


def tile(
    images: Sequence[Image.Image], columns: int, header: Sequence[str] | None = None, gap: int = 6
) -> Image.Image:
    """Images in a grid of ``columns`` (row-major), cells sized to the largest image; an optional header
    row of column titles (``\n`` breaks a title into lines)."""
    if not images:
        raise ValueError("tile needs at least one image")
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w = max(i.width for i in images)
    cell_h = max(i.height for i in images)
    font_size = max(12, cell_w // 16)
    header_lines = max((len(title.splitlines()) for title in header), default=0) if header else 0
    top = (font_size + 4) * header_lines + 6 if header else 0
    canvas = Image.new("RGB", (columns * cell_w + (columns + 1) * gap, top + rows * cell_h + (rows + 1) * gap), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if header:
        font = _font(font_size)
        for col, title in enumerate(header[:columns]):
            for line_no, line in enumerate(title.splitlines()):
                draw.text((gap + col * (cell_w + gap) + 4, 4 + line_no * (font_size + 4)), line, fill=(0, 0, 0), font=font)
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        canvas.paste(image, (gap + col * (cell_w + gap), top + gap + row * (cell_h + gap)))
    return canvas


def kept_patch_panel(
    pixel_values: torch.Tensor,
    image_keep: torch.Tensor,
    captions: Sequence[str] | None = None,
    count: int = 8,
    columns: int = 4,
    size: int = 192,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Image.Image:
    """One picture of the first ``count`` samples of a batch: (B, 3, H, W) pixels and (B, n_image) keep
    decisions (bool or 0/1) -> a grid of overlays, for W&B during validation."""
    count = min(count, pixel_values.shape[0], image_keep.shape[0])
    if count < 1:
        raise ValueError("kept_patch_panel needs at least one sample")
    tiles = []
    for i in range(count):
        keep = image_keep[i] > 0.5 if image_keep.dtype != torch.bool else image_keep[i]
        kept = int(keep.sum())
        caption = f"kept {kept}/{keep.numel()}" + (f": {captions[i]}" if captions is not None else "")
        tiles.append(overlay_from_pixels(pixel_values[i], keep, mean, std, size=size, caption=caption))
    return tile(tiles, columns)
