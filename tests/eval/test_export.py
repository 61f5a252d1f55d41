"""Exporting a Lightning checkpoint: the export reloads with from_pretrained to the same model."""

import pytest
import torch

from dllava.eval.export import export_checkpoint, main
from dllava.eval.loading import load_lightning_model
from dllava.model.loading import load_processor
from dllava.sparse.model import DynamicVLM


def test_export_reloads_with_the_checkpoints_weights_and_predictors(lightning_ckpt, tmp_path):
    out = export_checkpoint(lightning_ckpt, tmp_path / "export")
    reloaded = DynamicVLM.from_pretrained(out)
    original, _ = load_lightning_model(lightning_ckpt)
    theirs, ours = original.state_dict(), reloaded.state_dict()
    assert theirs.keys() == ours.keys() and any(k.startswith("image_predictor.") for k in ours)
    for key, value in theirs.items():
        assert torch.equal(value, ours[key]), key
    processor = load_processor(str(out))  # the processor came along
    assert processor.tokenizer.pad_token_id == load_processor(str(original.base.config._name_or_path)).tokenizer.pad_token_id


def test_export_refuses_a_directory_in_use_and_a_file_that_is_no_checkpoint(lightning_ckpt, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        main([str(lightning_ckpt), str(used)])
    assert (used / "keep.txt").read_text() == "mine"
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint"):
        export_checkpoint(not_ckpt, tmp_path / "out")
