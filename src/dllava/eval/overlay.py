"""Pictures of what a sparsifier keeps: the image with dropped patches darkened, kept ones outlined.

Image token ``i`` of a prompt is cell ``i`` of the image's token grid in row-major order: for LLaVA a
square ``sqrt(n)`` x ``sqrt(n)`` grid of CLIP patches (``vision_feature_select_strategy = "default"``
drops the CLS token) over the square image the model saw; for Qwen2.5-VL / Qwen3-VL each image's own
``rows`` x ``cols`` grid of merged 2x2 patch groups (``image_grid_thw`` h/2 x w/2) over the image at the
size the processor resized it to; for LLaVA-NeXT / OneVision a :class:`PanelGrid`: the base view's
patch grid beside the stitched crops (as unpadded) with their newline column. The helpers here draw from that image, or from the pixels of a batch
(un-normalised with the processor's mean and std), which is all a LightningModule has during
validation. The family adapter turns any family's pixel inputs back into images and token grids
(``FamilyAdapter.images_for_pictures`` / ``token_grids``):

    pictures = adapter.images_for_pictures(pixels, image_processor)
    panel = kept_patch_panel(pictures, keep_rows, grids=adapter.token_grids(config, pixels))
    wandb_logger.log_image("val/kept_patches", [panel], step=trainer.global_step)
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PanelGrid:
    """Token grids drawn side by side on one picture, each panel as tall as the picture and as wide as its
    cells are square: LLaVA-NeXT / OneVision's base view (side x side) next to the stitched crops
    (rows x (cols + 1), the last column its newline tokens). A keep row fills the panels in order."""

    panels: tuple[tuple[int, int], ...]

    @property
    def tokens(self) -> int:
        return sum(rows * cols for rows, cols in self.panels)

    def spans(self, width: int) -> list[tuple[int, int]]:
        """[x0, x1) of each panel on a picture ``width`` px wide (widths in proportion cols / rows)."""
        shares = [cols / rows for rows, cols in self.panels]
        edges = [round(width * sum(shares[:i]) / sum(shares)) for i in range(len(shares) + 1)]
        return list(zip(edges[:-1], edges[1:]))


Grid = tuple[int, int]  # (rows, cols) of image tokens; or a PanelGrid of several


def _as_bool_list(keep: torch.Tensor | np.ndarray | Sequence[bool]) -> list[bool]:
    """Keep decisions as bools: bool masks as they are, 0/1 (or soft) values kept above 0.5."""
    if isinstance(keep, torch.Tensor):
        keep = keep.detach().cpu().flatten()
        keep = (keep if keep.dtype == torch.bool else keep.float() > 0.5).tolist()
    elif isinstance(keep, np.ndarray):
        keep = (keep if keep.dtype == np.bool_ else keep.astype(np.float32) > 0.5).flatten().tolist()
    return [bool(k) if isinstance(k, (bool, np.bool_)) else bool(k > 0.5) for k in keep]


def _on_grid(flags: list[bool], grid: Grid | None) -> tuple[list[bool], int, int]:
    """The flags of the image tokens and their (rows, cols) grid: square from the count when ``grid`` is
    None (a leading CLS entry dropped), else exactly ``rows * cols`` flags (a keep row padded to the
    batch's largest count must be cut to this image's own count first: its tail is not on this image)."""
    if grid is None:
        side, has_cls = patch_grid(len(flags))
        return (flags[1:] if has_cls else flags), side, side
    rows, cols = (int(v) for v in grid)
    if rows < 1 or cols < 1:
        raise ValueError(f"a token grid needs at least one row and one column, got {tuple(grid)}")
    if len(flags) != rows * cols:
        raise ValueError(
            f"{len(flags)} keep entries do not fill a {rows}x{cols} token grid ({rows * cols}): cut a padded "
            "keep row to this image's own token count"
        )
    return flags, rows, cols


def _kept_boxes(flags: list[bool], grid: Grid | PanelGrid | None, width: int, height: int) -> tuple[list[list[int]], int]:
    """Pixel boxes of the kept cells on a ``width`` x ``height`` picture, and the outline width."""
    if isinstance(grid, PanelGrid):
        if len(flags) != grid.tokens:
            raise ValueError(f"{len(flags)} keep entries do not fill the panels {grid.panels} ({grid.tokens} tokens)")
        boxes, lines, start = [], [], 0
        for (rows, cols), (x0, x1) in zip(grid.panels, grid.spans(width)):
            part = flags[start : start + rows * cols]
            start += rows * cols
            inner, line = _kept_boxes(part, (rows, cols), x1 - x0, height)
            boxes += [[a + x0, b, c + x0, d] for a, b, c, d in inner]
            lines.append(line)
        return boxes, min(lines)
    flags, rows, cols = _on_grid(flags, grid)
    boxes = [cell_box(index, rows, cols, width, height) for index, kept in enumerate(flags) if kept]
    return boxes, max(1, min(width // cols, height // rows) // 12)


def cell_box(index: int, rows: int, cols: int, width: int, height: int) -> list[int]:
    """Pixel box [x0, y0, x1, y1] (inclusive) of row-major token ``index`` on a ``rows`` x ``cols`` grid
    over a ``width`` x ``height`` picture."""
    row, col = divmod(index, cols)
    return [col * width // cols, row * height // rows, (col + 1) * width // cols - 1, (row + 1) * height // rows - 1]


def pixels_to_image(
    pixel_values: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> Image.Image:
    """Normalised (3, H, W) pixels back to an RGB image (exact up to 8-bit rounding)."""
    x = pixel_values.detach().float().cpu()
    x = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    array = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")


def patches_to_images(
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]],
    patch_size: int | None = None,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> list[Image.Image]:
    """Qwen2-VL-style flattened patches (all images concatenated) back to one RGB image per
    ``image_grid_thw`` row, at the size the processor resized it to (exact up to 8-bit rounding).

    Inverts HF's ``Qwen2VLImageProcessor`` patchify: an image's rows are its patches in (h/m, w/m, m, m)
    order (m = ``merge_size``: each merged token's m x m patches are contiguous), each row one patch as
    (C, T, P, P), T = ``temporal_patch_size`` copies of a still image (the first frame is taken).
    ``patch_size`` defaults to the one the row width implies.
    """
    x = pixel_values.detach().float().cpu()
    grid = torch.as_tensor(image_grid_thw).reshape(-1, 3).tolist()
    sizes = [int(t) * int(h) * int(w) for t, h, w in grid]
    if x.ndim != 2 or x.shape[0] != sum(sizes):
        raise ValueError(
            f"pixel_values of shape {tuple(x.shape)} are not the flattened patches of image_grid_thw {grid} "
            f"({sum(sizes)} patch rows expected)"
        )
    channels, m, frames = len(mean), int(merge_size), int(temporal_patch_size)
    p = patch_size or math.isqrt(x.shape[1] // (channels * frames))
    if channels * frames * p * p != x.shape[1]:
        raise ValueError(
            f"patch rows of {x.shape[1]} values are not {channels} channels x {frames} frames x {p}x{p} px "
            "(check the image processor's patch_size and temporal_patch_size)"
        )
    images = []
    for part, (t, h, w) in zip(torch.split(x, sizes), grid):
        if h % m or w % m:
            raise ValueError(f"image_grid_thw row {(t, h, w)} is not a grid of whole {m}x{m} patch groups")
        cells = part.reshape(t, h // m, w // m, m, m, channels, frames, p, p)[0, :, :, :, :, :, 0]
        # (h/m, w/m, m, m, C, P, P) -> (C, h/m, m, P, w/m, m, P) -> (C, H, W)
        image = cells.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * p, w * p)
        images.append(pixels_to_image(image, mean, std))
    return images


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _fitted(image: Image.Image, size: int) -> Image.Image:
    """``image`` with its longer side ``size`` px and its aspect ratio kept (a square at ``size`` x
    ``size``): enlarged with NEAREST so small images stay crisp, reduced with BICUBIC."""
    width, height = image.size
    scale = size / max(width, height)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.convert("RGB").resize(target, Image.NEAREST if width < size else Image.BICUBIC)


def kept_patch_overlay(
    image: Image.Image,
    keep: torch.Tensor | np.ndarray | Sequence[bool],
    size: int = 384,
    dim: float = 0.45,
    color: tuple[int, int, int] = KEPT_COLOR,
    caption: str | None = None,
    grid: Grid | PanelGrid | None = None,
) -> Image.Image:
    """The image with its longer side ``size`` px: dropped tokens' cells grey and darkened to ``dim`` of
    their brightness, kept cells in colour with a ``color`` border; an optional caption strip below.

    ``image`` is the image the model saw (see the module docstring); ``keep`` has one entry per image
    token, row-major over ``grid`` = (rows, cols); without ``grid`` it is square (``side**2`` entries, or
    ``side**2 + 1`` with a leading CLS entry, which is ignored), as for LLaVA; a :class:`PanelGrid` lays
    the row over several panels side by side (LLaVA-NeXT: base view, stitched crops and newlines).
    """
    flags = _as_bool_list(keep)
    base = _fitted(image, size)
    width, height = base.size
    boxes, line = _kept_boxes(flags, grid, width, height)
    dark = Image.eval(base.convert("L"), lambda v: int(v * dim)).convert("RGB")
    mask = Image.new("L", (width, height), 0)
    draw_mask = ImageDraw.Draw(mask)
    for box in boxes:
        draw_mask.rectangle(box, fill=255)
    out = Image.composite(base, dark, mask)
    draw = ImageDraw.Draw(out)
    for box in boxes:
        draw.rectangle(box, outline=color, width=line)
    if caption:
        out = _with_caption(out, caption)
    return out


def captioned(image: Image.Image, size: int = 384, caption: str | None = None) -> Image.Image:
    """The image itself with its longer side ``size`` px (no decisions drawn), with an optional caption strip."""
    out = _fitted(image, size)
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
    """:func:`kept_patch_overlay` on normalised (3, H, W) pixels (what a LLaVA batch holds)."""
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
    images: torch.Tensor | Sequence[Image.Image],
    image_keep: torch.Tensor | Sequence[torch.Tensor | Sequence[bool]],
    captions: Sequence[str] | None = None,
    count: int = 8,
    columns: int = 4,
    size: int = 192,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    grids: Sequence[Grid] | None = None,
) -> Image.Image:
    """One picture of the first ``count`` samples of a batch, a grid of overlays (for W&B during
    validation).

    ``images``: (B, 3, H, W) normalised pixels (un-normalised with ``mean``/``std``) or one image per
    sample (``FamilyAdapter.images_for_pictures``); ``image_keep``: (B, n) decisions (bool or 0/1) or one
    row per sample, each cut to that sample's own token count; ``grids``: each sample's (rows, cols)
    token grid (default: square from the row's length)."""
    count = min(count, len(images), len(image_keep))
    if grids is not None:
        count = min(count, len(grids))
    if count < 1:
        raise ValueError("kept_patch_panel needs at least one sample")
    tiles = []
    for i in range(count):
        flags = _as_bool_list(image_keep[i])
        caption = f"kept {sum(flags)}/{len(flags)}" + (f": {captions[i]}" if captions is not None else "")
        picture = images[i] if isinstance(images[i], Image.Image) else pixels_to_image(images[i], mean, std)
        grid = None if grids is None else grids[i]
        tiles.append(kept_patch_overlay(picture, flags, size=size, caption=caption, grid=grid))
    return tile(tiles, columns)
