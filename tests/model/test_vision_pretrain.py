import json

import numpy as np
import pytest
from PIL import Image
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from dllava.data.synthetic import COLORS, SHAPES, Layout, make_scene
from dllava.model.tiny_qwen import ImageTextProcessor, save_tiny_qwen
from dllava.model.vision_pretrain import (
    merged_features,
    patch_targets,
    pretrain_qwen_vision,
    pretrain_vision_tower,
    token_targets,
)


def test_patch_targets_mark_the_patch_holding_each_object():
    scene = make_scene(np.random.default_rng(3))
    colours, shapes = patch_targets(scene, image_size=96, patch=12)
    assert len(colours) == 64 and sum(c > 0 for c in colours) == len(scene)
    for obj in scene:
        x0, y0, x1, y1 = obj["box"]
        assert x0 // 12 == (x1 - 1) // 12 and y0 // 12 == (y1 - 1) // 12  # the whole object is in one patch
        index = (y0 // 12) * 8 + x0 // 12
        assert colours[index] == COLORS.index(obj["color"]) + 1 and shapes[index] == SHAPES.index(obj["shape"]) + 1


def test_pretraining_teaches_the_tower_patch_colours(tiny_model_dir, tmp_path):
    report = pretrain_vision_tower(str(tiny_model_dir), str(tmp_path), steps=40, batch_size=16, lr=3e-3)
    assert report["after"]["colour_acc_objects"] > report["before"]["colour_acc_objects"] + 0.2
    assert json.loads((tmp_path / "vision_pretrain.json").read_text())["steps"] == 40
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()


def test_token_targets_mark_the_merged_token_holding_each_object():
    layout = Layout(4, 6, 56)
    scene = make_scene(np.random.default_rng(5), layout=layout)
    colours, shapes = token_targets(scene, layout, token_px=28)
    assert len(colours) == 8 * 12 and sum(c > 0 for c in colours) == len(scene)
    for obj in scene:
        x0, y0, _, _ = obj["box"]
        index = (y0 // 28) * 12 + x0 // 28
        assert colours[index] == COLORS.index(obj["color"]) + 1 and shapes[index] == SHAPES.index(obj["shape"]) + 1


def test_token_targets_reject_a_grid_that_does_not_tile_the_image():
    with pytest.raises(ValueError, match="not a grid"):
        token_targets([], Layout(4, 4, 50), token_px=28)


def test_qwen_merged_features_are_row_major_merged_tokens(tmp_path):
    """The targets' order must be the features' order. With the ViT blocks removed, each merged token
    depends on its own 28 px square only (patch embedding + merger), so painting one square changes
    exactly one feature row: the row-major index of that square, after HF's window reordering."""
    path = save_tiny_qwen(tmp_path / "qwen", "qwen2_5_vl")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    model.model.visual.blocks = torch.nn.ModuleList()
    processor = ImageTextProcessor.from_pretrained(path)
    layout = Layout(4, 6, 56)
    base = np.full((layout.height, layout.width, 3), 120, dtype=np.uint8)
    painted = base.copy()
    row, col = 5, 9  # a merged token inside a 56 px window's lower-right quadrant of window (2, 4)
    painted[row * 28 : (row + 1) * 28, col * 28 : (col + 1) * 28] = (220, 40, 40)
    features = []
    for array in (base, painted):
        pixels = processor.image_processor(images=[Image.fromarray(array)], return_tensors="pt")
        with torch.no_grad():
            features.append(merged_features(model, dict(pixels)))
    changed = ((features[0] - features[1]).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
    assert changed == [row * (layout.width // 28) + col]


@pytest.mark.slow
def test_qwen_pretraining_teaches_the_vit_and_merger_token_colours(tmp_path):
    path = save_tiny_qwen(tmp_path / "qwen", "qwen2_5_vl")
    out = tmp_path / "out"
    report = pretrain_qwen_vision(str(path), str(out), steps=80, batch_size=8, lr=5e-3, grid_sizes=[(4, 4)])
    assert report["after"]["colour_acc_objects"] > report["before"]["colour_acc_objects"] + 0.2
    assert report["token_px"] == 28 and report["grid_sizes"] == [[4, 4]]
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    before = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    assert not torch.equal(reloaded.model.visual.merger.mlp[0].weight, before.model.visual.merger.mlp[0].weight)
    torch.testing.assert_close(reloaded.lm_head.weight, before.lm_head.weight)  # only the tower learned
    assert (out / "preprocessor_config.json").is_file() and (out / "tokenizer.json").is_file()
