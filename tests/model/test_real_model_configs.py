"""The real-size model configs of the families beyond LLaVA-1.5 (conf/model/qwen*.yaml, llava_next_7b.yaml,
llava_onevision_7b.yaml and their dllava_ twins) build with their family's HF classes on the meta device,
to the parameter counts the model cards publish."""

import pytest
import torch
from omegaconf import OmegaConf

from dllava.families import adapter_for
from dllava.inference import flops
from tests.helpers import compose

# the sizes the hub model pages give (3.75B, 8.29B, 8.77B, llava-v1.6-vicuna-7b-hf 7.06B,
# llava-onevision-qwen2-7b-ov-hf 8.03B)
PUBLISHED = {"qwen2_5_vl_3b": 3.75e9, "qwen2_5_vl_7b": 8.29e9, "qwen3_vl_8b": 8.77e9,
             "llava_next_7b": 7.06e9, "llava_onevision_7b": 8.03e9}


def _model_config(option, tmp_path):
    return compose("train", [f"model={option}"], output_dir=tmp_path).model


def _built(arch):
    adapter = adapter_for(arch["model_type"])
    config = adapter.config_class()(**arch)
    with torch.device("meta"):
        return adapter.model_class()(config)


@pytest.mark.parametrize("option", sorted(PUBLISHED))
def test_architecture_builds_on_meta_to_the_published_size(option, tmp_path):
    model = _built(OmegaConf.to_container(_model_config(option, tmp_path).architecture, resolve=True))
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(PUBLISHED[option], rel=0.005), count
    text = model.config.text_config
    # one decoder layer's weights are what layer_flops counts (biases aside)
    shape = flops.DecoderShape.from_config(text)
    layer = model.model.language_model.layers[0]
    weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert flops.layer_flops(shape, 1, 0) == 2 * weights


@pytest.mark.parametrize("option", sorted(PUBLISHED))
def test_dllava_twin_is_the_base_plus_the_paper_predictor(option, tmp_path):
    base, twin = _model_config(option, tmp_path), _model_config(f"dllava_{option}", tmp_path)
    assert twin.architecture == base.architecture and twin.pretrained == base.pretrained
    assert twin.predictor == _model_config("dllava_7b", tmp_path).predictor
