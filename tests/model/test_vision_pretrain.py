import json

import numpy as np

from dllava.data.synthetic import COLORS, SHAPES, make_scene
from dllava.model.vision_pretrain import patch_targets, pretrain_vision_tower


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
