"""The one loading path: save_pretrained -> from_pretrained, offline, for the tiny and 7B configs."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from dllava.model.loading import ModelSource, load_config, load_llava, load_processor


def _inputs(processor, image):
    prompt = "USER: <image>\nwhat color is the shape at row one column one ? ASSISTANT:"
    return processor(text=prompt, images=image, return_tensors="pt")


def test_save_then_from_pretrained_gives_identical_logits(tiny_model_dir, tiny_image):
    processor = load_processor(str(tiny_model_dir))
    inputs = _inputs(processor, tiny_image)
    ours = load_llava({"pretrained": str(tiny_model_dir)}).eval()
    reference = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        a = ours(**inputs).logits
        b = reference(**inputs).logits
    assert a.shape[1] == inputs["input_ids"].shape[1]
    assert torch.equal(a, b)


def test_tiny_directory_holds_safetensors_tokenizer_and_processor(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)


def test_random_init_keeps_config_but_not_weights(tiny_model_dir):
    trained = load_llava({"pretrained": str(tiny_model_dir)})
    fresh = load_llava({"pretrained": str(tiny_model_dir), "random_init": True})
    assert fresh.config.text_config.hidden_size == trained.config.text_config.hidden_size
    a = trained.model.language_model.layers[0].self_attn.q_proj.weight
    b = fresh.model.language_model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(a, b)


def test_llava_7b_config_builds_without_download():
    from omegaconf import OmegaConf

    from tests.helpers import compose

    cfg = compose("train", ["model=llava_7b", "model.random_init=true"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    config = load_config(ModelSource(**model))
    assert config.text_config.num_hidden_layers == 32 and config.text_config.hidden_size == 4096
    assert config.vision_config.image_size == 336 and config.image_seq_length == 576
    with torch.device("meta"):
        meta = LlavaForConditionalGeneration(config)
    params = sum(p.numel() for p in meta.parameters())
    assert 7.0e9 < params < 7.2e9


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"pretrained": "/nonexistent/tiny"}, "does not exist"),
        ({"pretrained": "x", "dtype": "float64"}, "model.dtype"),
        ({}, "model.pretrained or model.architecture"),
        ({"architecture": {}}, "random_init"),
    ],
)
def test_bad_model_config_names_the_key(fields, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_llava(fields)


@pytest.mark.parametrize("load", ["model", "processor", "config"])
def test_hub_model_missing_from_the_offline_cache_says_so_and_how_to_point_at_a_directory(load):
    """HF_HUB_OFFLINE=1 (conftest) and an id not in the cache: no download, and a message that says
    the weights are not cached and how to use a local directory instead of transformers' raw error."""
    from huggingface_hub import constants, try_to_load_from_cache

    from dllava.model.loading import NotInLocalCache, load_config, load_processor

    hub_id = "llava-hf/llava-1.5-7b-hf"
    assert constants.HF_HUB_OFFLINE
    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        pytest.skip(f"{hub_id} is in this machine's HF cache")
    calls = {
        "model": lambda: load_llava({"pretrained": hub_id}),
        "processor": lambda: load_processor(hub_id),
        "config": lambda: load_config(ModelSource(pretrained=hub_id)),
    }
    with pytest.raises(NotInLocalCache) as error:
        calls[load]()
    message = str(error.value)
    assert message.startswith(f"model.pretrained={hub_id!r}: the weights of {hub_id} are not in the local HF cache")
    assert "HF_HUB_OFFLINE=1" in message and "set model.pretrained=<local directory>" in message
    assert try_to_load_from_cache(hub_id, "config.json") is None  # nothing was downloaded
