"""Depth up-scaling keeps the function: HF's own forward of the grown model equals the original's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dllava.families import adapter_for
from dllava.model.grow_depth import check_plan, grow_depth, main


def _batch(name: str, path):
    adapter = adapter_for(name)
    processor = adapter.load_processor(str(path))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 168, 3), dtype=np.uint8))
    if name == "llava":
        return processor(text=["USER: <image>\nhow many shapes are there ? ASSISTANT:"], images=[image], return_tensors="pt")
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many shapes are there ?"}]}],
        tokenize=False, add_generation_prompt=True)
    return processor([text], [image])


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_grown_model_computes_what_the_original_computes(name, tmp_path, tiny_model_dir):
    from dllava.model.tiny_qwen import save_tiny_qwen

    path = tiny_model_dir if name == "llava" else save_tiny_qwen(tmp_path / name, name, seed=0)
    adapter = adapter_for(name)
    model = adapter.model_class().from_pretrained(path).eval()
    with torch.no_grad():  # the zero-output copies must not start as identity by accident of init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    old = len(adapter.decoder(model).layers)
    plan = [0, 1, 1] + list(range(2, old)) + [old - 1]
    grown = grow_depth(model, plan)
    assert len(adapter.decoder(grown).layers) == len(plan) == adapter.text_config(grown.config).num_hidden_layers
    batch = dict(_batch(name, path))
    with torch.no_grad():
        before, after = model(**batch).logits, grown(**batch).logits
    assert float((before - after).abs().max()) <= 1e-5
    copy = adapter.decoder(grown).layers[2]
    assert float(copy.self_attn.o_proj.weight.abs().max()) == 0 and float(copy.self_attn.q_proj.weight.abs().max()) > 0
    grown.save_pretrained(tmp_path / "grown")  # and it reloads as a plain checkpoint of its family
    again = adapter.model_class().from_pretrained(tmp_path / "grown").eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, after)


def test_plans_that_would_change_the_function_are_refused():
    assert check_plan([0, 0, 1, 2, 3], 4) == [0, 0, 1, 2, 3]
    for bad, match in [([0, 1, 3], "every old layer"), ([0, 2, 1, 3], "every old layer"), ([0, 1, 2, 1, 3], "after its original"),
                       ([0, 1, 2, 4], "old layers 0..3")]:
        with pytest.raises(ValueError, match=match):
            check_plan(bad, 4)


def test_cli_writes_a_loadable_grown_model_with_the_processor(tmp_path, tiny_model_dir):
    main([str(tiny_model_dir), str(tmp_path / "out"), "--plan", "0,1,2,2"])
    grown = adapter_for("llava").model_class().from_pretrained(tmp_path / "out")
    assert grown.config.text_config.num_hidden_layers == 4
    assert adapter_for("llava").load_processor(str(tmp_path / "out")) is not None
    with pytest.raises(FileExistsError):
        main([str(tiny_model_dir), str(tmp_path / "out"), "--plan", "0,1,2"])
