"""Checkpoints to evaluate: Lightning .ckpt files, save_pretrained directories, dense directories."""

import shutil
import zipfile

import pytest
import torch

from dllava.eval.loading import load_for_eval, model_name
from dllava.training.safe_load import CorruptCheckpointError, UnsafeCheckpointError
from tests.helpers import CONF
from tests.training.test_safe_load import _flip_tensor_byte, _WritesMarker


def test_lightning_checkpoint_loads_every_weight_of_its_state_dict(lightning_ckpt):
    loaded = load_for_eval(lightning_ckpt, device="cpu")
    state = torch.load(lightning_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    ours = loaded.model.state_dict()
    assert {f"model.{k}" for k in ours} == set(state)
    for key, value in ours.items():
        assert torch.equal(value, state[f"model.{key}"]), key
    assert loaded.model.image_predictor is not None and loaded.model.sparsity.keep == 0.25
    assert loaded.processor.tokenizer.eos_token == "</s>"
    assert not loaded.model.training
    assert loaded.name == f"{lightning_ckpt.parent.parent.name}/step_000010"


def test_save_pretrained_directory_loads_with_its_predictors(dynamic_dir):
    loaded = load_for_eval(dynamic_dir, device="cpu")
    assert loaded.model.image_predictor is not None and loaded.model.text_predictor is not None
    assert loaded.name.endswith("/hf")


def test_plain_llava_directory_loads_as_a_dense_model(tiny_model_dir):
    loaded = load_for_eval(tiny_model_dir, device="cpu")
    assert not loaded.model.sparsity.enabled and loaded.model.image_predictor is None


def test_bad_paths_say_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        load_for_eval(tmp_path / "missing.ckpt")
    (tmp_path / "sharded.ckpt").mkdir()
    with pytest.raises(ValueError, match="export=true"):
        load_for_eval(tmp_path / "sharded.ckpt")


def test_model_name_is_run_and_checkpoint(tmp_path):
    assert model_name(tmp_path / "run1" / "checkpoints" / "last.ckpt") == "run1/last"
    assert model_name(tmp_path / "run1" / "hf") == "run1/hf"
    assert model_name(tmp_path / "llava-1.5-7b-hf") == "llava-1.5-7b-hf"


def test_a_file_that_is_not_a_checkpoint_says_what_eval_takes(tmp_path):
    readme = CONF.parent / "README.md"
    with pytest.raises(ValueError, match="is not a checkpoint of this project") as err:
        load_for_eval(readme, device="cpu")
    message = str(err.value)
    assert "README.md" in message and ".ckpt" in message and "save_pretrained directory" in message
    assert "llava-hf" in message and "weights_only" not in message
    zipped = tmp_path / "images.zip"  # a zip archive, but not one torch wrote
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("a.txt", "hello")
    with pytest.raises(ValueError, match="is not a checkpoint of this project"):
        load_for_eval(zipped, device="cpu")


def test_checkpoint_with_code_is_refused_without_suggesting_weights_only_false(tmp_path):
    path, marker = tmp_path / "last.ckpt", tmp_path / "code_ran"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": _WritesMarker(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load \(.*open") as err:
        load_for_eval(path, device="cpu")
    assert "weights_only=False" not in str(err.value) and "save_pretrained directory" in str(err.value)
    assert not marker.exists()


def test_bit_flipped_checkpoint_is_refused_naming_the_file_and_member(lightning_ckpt, tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    shutil.copy(lightning_ckpt, path)
    member = _flip_tensor_byte(path)
    with pytest.raises(CorruptCheckpointError, match=rf"{path} is damaged: archive member '{member}' fails its CRC32"):
        load_for_eval(path, device="cpu")
