"""Qwen pixel inputs: per-sample preprocessing plus collate equals HF's image processor on the whole list."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from dllava.data.qwen_pixels import blank_image, collate_qwen_pixels, image_token_count, qwen_pixel_inputs


def _processor(patch_size: int) -> Qwen2VLImageProcessorPil:
    """Qwen2.5-VL (14 px patches) or Qwen3-VL (16 px) geometry; 112..256 px images stay unresized."""
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=256 * 256
    )


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


SIZES = {14: [(112, 112), (168, 112), (112, 168), (224, 196)], 16: [(128, 128), (192, 128), (128, 192), (224, 160)]}


@pytest.mark.parametrize("patch_size", [14, 16])
def test_per_sample_plus_collate_equals_the_processor_on_the_list(patch_size):
    processor = _processor(patch_size)
    images = [_image(w, h, seed) for seed, (w, h) in enumerate(SIZES[patch_size])] + [_image(150, 100, 9)]
    reference = processor(images=images, return_tensors="pt")
    batch = collate_qwen_pixels([qwen_pixel_inputs(image, processor) for image in images])
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])
    assert torch.equal(batch["image_grid_thw"], reference["image_grid_thw"])
    assert batch["image_grid_thw"].dtype == torch.long
    assert batch["pixel_values"].shape[1] == 3 * 2 * patch_size * patch_size


@pytest.mark.parametrize("patch_size", [14, 16])
def test_unresized_images_give_one_token_per_merged_cell(patch_size):
    processor = _processor(patch_size)
    token_px = patch_size * 2
    counts = []
    for seed, (w, h) in enumerate(SIZES[patch_size]):
        grid = qwen_pixel_inputs(_image(w, h, seed), processor)["image_grid_thw"][0]
        assert grid.tolist() == [1, h // patch_size, w // patch_size]
        counts.append(image_token_count(grid, processor.merge_size))
        assert counts[-1] == (h // token_px) * (w // token_px)
    # HF's own count of patches per image agrees (get_number_of_image_patches / merge_size**2)
    assert counts == [processor.get_number_of_image_patches(h, w) // 4 for w, h in SIZES[patch_size]]
    assert len(set(counts)) > 1  # different sizes give different token counts in one batch


def test_blank_padding_image_is_small_and_preprocesses_like_any_image():
    processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, min_pixels=28 * 28, max_pixels=256 * 256)
    blank = blank_image(processor)
    assert blank.size == (28, 28)
    inputs = qwen_pixel_inputs(blank, processor)
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 2]] and image_token_count(inputs["image_grid_thw"][0], 2) == 1
    # a processor whose min_pixels is larger upscales it: the count comes from the grid it returns
    big = _processor(14)
    grid = qwen_pixel_inputs(blank_image(big), big)["image_grid_thw"][0]
    assert image_token_count(grid, 2) == 4


def test_bad_inputs_are_named():
    processor = _processor(14)
    with pytest.raises(TypeError, match="PIL image"):
        qwen_pixel_inputs(np.zeros((28, 28, 3)), processor)
    with pytest.raises(ValueError, match="not divisible by merge_size"):
        image_token_count([1, 3, 4], 2)
    with pytest.raises(ValueError, match="at least one sample"):
        collate_qwen_pixels([])
    two = processor(images=[_image(112, 112, 0), _image(112, 112, 1)], return_tensors="pt")
    with pytest.raises(ValueError, match="one image"):
        collate_qwen_pixels([{"pixel_values": two["pixel_values"], "image_grid_thw": two["image_grid_thw"]}])
