"""Checkpoints written before the family seam (``DynamicLlava``: keys ``model.llava.*``) still load."""

import torch

from dllava.eval.loading import load_for_eval


def _pre_seam_copy(lightning_ckpt, out):
    """The checkpoint as the code before the seam wrote it: the base model under ``model.llava.``."""
    checkpoint = torch.load(lightning_ckpt, map_location="cpu", weights_only=True)
    renamed = {k.replace("model.base.", "model.llava.", 1): v for k, v in checkpoint["state_dict"].items()}
    assert any(k.startswith("model.llava.") for k in renamed) and not any(k.startswith("model.base.") for k in renamed)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**checkpoint, "state_dict": renamed}, out)
    return renamed


def test_pre_seam_lightning_checkpoint_loads_every_weight_for_eval(lightning_ckpt, tmp_path):
    old = _pre_seam_copy(lightning_ckpt, tmp_path / "run" / "checkpoints" / "last.ckpt")
    loaded = load_for_eval(tmp_path / "run" / "checkpoints" / "last.ckpt", device="cpu")
    ours = loaded.model.state_dict()
    assert len(ours) == len(old)
    for key, value in ours.items():
        assert torch.equal(value, old["model." + key.replace("base.", "llava.", 1)]), key


def test_pre_seam_state_dict_loads_into_the_lightning_module(lightning_ckpt, tiny_model_dir, tmp_path):
    """What ``train.py ckpt_path=...`` does with the module's state: strict load of the old keys."""
    from dllava.training.module import LlavaLitModule
    from tests.eval.conftest import PREDICTOR, SPARSITY

    old = _pre_seam_copy(lightning_ckpt, tmp_path / "old.ckpt")
    module = LlavaLitModule(model={"pretrained": str(tiny_model_dir), "predictor": PREDICTOR}, sparsity=SPARSITY)
    module.configure_model()
    module.load_state_dict(old, strict=True)
    new = torch.load(lightning_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, new[k]) for k, v in module.state_dict().items())
