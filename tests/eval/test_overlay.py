"""Kept-patch pictures: dropped patches darkened, kept ones in colour with a border, on the model's grid."""

import numpy as np
import pytest
import torch
from PIL import Image

from dllava.eval.overlay import (
    CLIP_MEAN,
    CLIP_STD,
    KEPT_COLOR,
    kept_patch_overlay,
    kept_patch_panel,
    patch_grid,
    pixels_to_image,
)


def _red_image(size=96):
    return Image.new("RGB", (size, size), (200, 30, 30))


def test_patch_grid_is_the_square_root_and_skips_a_cls_token():
    assert patch_grid(64) == (8, False)
    assert patch_grid(576) == (24, False)
    assert patch_grid(65) == (8, True)
    with pytest.raises(ValueError, match="square"):
        patch_grid(60)


def test_kept_patches_keep_their_colour_and_dropped_ones_are_darkened_grey():
    keep = torch.zeros(64, dtype=torch.bool)
    keep[0] = True  # top-left patch
    out = np.asarray(kept_patch_overlay(_red_image(), keep, size=96))
    assert out.shape == (96, 96, 3)
    inside_kept = out[5, 5]  # inside patch (0, 0), away from its border
    assert tuple(inside_kept) == (200, 30, 30)
    dropped = out[50, 50]
    assert dropped[0] == dropped[1] == dropped[2] < 100  # grey and dark
    assert tuple(out[0, 0]) == KEPT_COLOR  # the kept patch's border


def test_keep_mask_is_row_major_over_the_grid():
    keep = torch.zeros(64, dtype=torch.bool)
    keep[1 * 8 + 3] = True  # row 1, column 3
    out = np.asarray(kept_patch_overlay(_red_image(), keep, size=96))
    assert tuple(out[12 + 6, 36 + 6]) == (200, 30, 30)
    assert tuple(out[36 + 6, 12 + 6]) != (200, 30, 30)


def test_caption_adds_a_strip_below():
    out = kept_patch_overlay(_red_image(), [True] * 64, size=96, caption="what color is it ?\nanswer: red")
    assert out.width == 96 and out.height > 96


def test_pixels_round_trip_through_clip_normalisation():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    x = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert np.abs(np.asarray(pixels_to_image(x), dtype=int) - np.asarray(image, dtype=int)).max() <= 1


def test_panel_from_a_batch_is_one_image_wandb_accepts():
    pixels = torch.randn(5, 3, 96, 96)
    keep = torch.rand(5, 64) > 0.8
    panel = kept_patch_panel(pixels, keep.float(), captions=[f"q{i}" for i in range(5)], count=4, columns=2, size=96)
    assert isinstance(panel, Image.Image)
    assert panel.width > 2 * 96 and panel.height > 2 * 96
    wandb = pytest.importorskip("wandb")
    assert wandb.Image(panel).image is not None
