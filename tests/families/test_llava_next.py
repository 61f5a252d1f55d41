"""The anyres families' inputs: token counts, processor, sample preprocessing and collate.

References: HF's own ``LlavaNextProcessor`` (how many ``<image>`` tokens it expands an image to, at the
tiny size and at NeXT-7B's), HF's ``LlavaOnevisionProcessor._get_number_of_features`` (the OneVision
processor itself cannot be built without torchvision; its counting method reads only plain settings),
and HF's forward (a preprocessed, collated batch runs through it: HF checks that the image tokens equal
its packed features).
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaOnevisionProcessor

from dllava.data.datamodule import collate
from dllava.families import adapter_for
from dllava.families.llava_next import AnyresProcessor, anyres_token_count, anyres_views
from dllava.model.tiny_next import GRID_PINPOINTS, save_tiny_next
from tests.helpers import compose

SIZES = [(64, 64), (40, 96), (96, 64), (33, 70), (96, 20), (32, 32)]


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def tiny(request, tmp_path_factory):
    name = request.param
    path = save_tiny_next(tmp_path_factory.mktemp(name), name, seed=0, num_hidden_layers=2)
    adapter = adapter_for(name)
    return name, path, adapter, adapter.model_class().from_pretrained(path).eval(), adapter.load_processor(str(path))


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _real_config(option: str, tmp_path):
    arch = OmegaConf.to_container(compose("train", [f"model={option}"], output_dir=tmp_path).model.architecture, resolve=True)
    adapter = adapter_for(arch["model_type"])
    return adapter.config_class()(**arch)


# -- counts ------------------------------------------------------------------------------------------
def test_next_counts_equal_hf_llava_next_processor(tiny):
    name, path, adapter, model, processor = tiny
    if name != "llava_next":
        pytest.skip("HF's OneVision processor needs torchvision (test_onevision_counts_equal_hf_formula)")
    hf = LlavaNextProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                            patch_size=model.config.vision_config.patch_size, vision_feature_select_strategy="default",
                            num_additional_image_tokens=1)  # the CLS token, dropped by "default" (as llava-hf sets it)
    for h, w in SIZES:
        ids = hf(text=["USER: <image>\nhi ASSISTANT:"], images=[_image(h, w)], return_tensors="pt")["input_ids"]
        assert int((ids == model.config.image_token_id).sum()) == anyres_token_count(model.config, (h, w)), (h, w)


def test_next_7b_counts_equal_hf_processor_at_real_size(tmp_path):
    """NeXT-Vicuna-7B's 336 px views and pinpoints: HF's processor formula for 672x672 (bench) and others."""
    config = _real_config("llava_next_7b", tmp_path)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=config.image_grid_pinpoints
    )
    fake = types.SimpleNamespace(image_processor=image_processor, patch_size=14, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1)
    fake._get_unpadded_features = types.MethodType(LlavaNextProcessor._get_unpadded_features, fake)
    for h, w in [(672, 672), (480, 640), (1000, 300), (336, 336), (200, 900)]:
        expected = LlavaNextProcessor._get_number_of_features(fake, h, w, 336, 336) - 1  # "default": CLS dropped
        assert anyres_token_count(config, (h, w)) == expected, (h, w)
    assert anyres_token_count(config, (672, 672)) == 576 + 48 * 49  # base view, 2x2 crops, a newline per row


def test_onevision_counts_equal_hf_formula(tmp_path):
    """OneVision-7B (SigLIP 384 px, anyres_max_9): HF's processor counting for images small and large
    enough to be shrunk (the unbound method on the settings it reads)."""
    config = _real_config("llava_onevision_7b", tmp_path)
    fake = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints),
        num_image_tokens=729, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )
    fake._get_unpadded_features = types.MethodType(LlavaOnevisionProcessor._get_unpadded_features, fake)
    for h, w in [(672, 672), (480, 640), (2000, 2000), (384, 384), (300, 1500), (1536, 1152)]:
        expected = LlavaOnevisionProcessor._get_number_of_features(fake, h, w, 384, 384)
        assert anyres_token_count(config, (h, w)) == expected, (h, w)


def test_views_name_base_crops_and_newlines(tmp_path):
    config = _real_config("llava_next_7b", tmp_path)
    views = anyres_views(config, (672, 672))
    assert (views[:576] == 0).all() and int((views == -1).sum()) == 48
    assert sorted(set(views.tolist())) == [-1, 0, 1, 2, 3, 4]
    crops = views[576:].reshape(48, 49)
    assert (crops[:, -1] == -1).all()
    assert crops[0, 0] == 1 and crops[0, 47] == 2 and crops[47, 0] == 3 and crops[47, 47] == 4
    assert [int((views == v).sum()) for v in (1, 2, 3, 4)] == [576] * 4


# -- processor, preprocessing, collate ------------------------------------------------------------------
def test_processor_round_trips_and_refuses_an_unknown_image_processor(tiny, tmp_path):
    name, path, adapter, model, processor = tiny
    again = AnyresProcessor.from_pretrained(path, adapter)
    assert again.image_token == processor.image_token and again.chat_template == processor.chat_template
    assert type(again.image_processor) is type(processor.image_processor)
    settings = json.loads((path / "preprocessor_config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "preprocessor_config.json").write_text(json.dumps({**settings, "image_processor_type": "SomethingElse"}))
    with pytest.raises(ValueError, match="SomethingElse"):
        AnyresProcessor.from_pretrained(bad, adapter)


def test_preprocessed_records_run_through_hf_forward(tiny):
    """Family-neutral LLaVA records -> the family's template, per-image counts, crops padded in collate:
    HF's forward accepts the batch (it raises when image tokens and packed features disagree), and the
    labels cover the assistant's answer only."""
    name, path, adapter, model, processor = tiny
    preprocess = adapter.sample_preprocessor(processor, max_length=512)
    samples = []
    for i, (h, w) in enumerate([(64, 64), (40, 96), (96, 64)]):
        record = {"id": str(i), "conversations": [
            {"from": "human", "value": "<image>\nhow many shapes are there ?"}, {"from": "gpt", "value": "two"}]}
        samples.append(preprocess({"key": str(i), "image": _image(h, w, i), "record": record}))
    counts = [sum(1 for t in s["input_ids"] if t == model.config.image_token_id) for s in samples]
    assert counts == [anyres_token_count(model.config, s["image_sizes"].tolist()) for s in samples]
    assert len(set(counts)) == 3
    batch = collate(samples, pad_id=processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[:2] == (3, max(s["pixel_values"].shape[0] for s in samples))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    answer = [processor.tokenizer.decode([t]) for t, lab in zip(samples[0]["input_ids"], samples[0]["labels"]) if lab != -100]
    assert answer[0].strip() == "two"
    rendered = processor.tokenizer.decode(samples[0]["prompt_ids"])
    assert ("<|im_start|>" in rendered) == (name == "llava_onevision")  # ChatML
    assert ("ASSISTANT" in rendered) == (name == "llava_next")  # vicuna_v1


def test_tiny_pinpoints_give_ragged_counts_on_the_non_square_task():
    """The tiny models' settings: the synthetic task's 64x64, 64x96 and 96x64 images differ in count."""
    from dllava.model.tiny_next import build_tiny_next

    model, _ = build_tiny_next("llava_next", num_hidden_layers=1)
    counts = [anyres_token_count(model.config, s) for s in [(64, 64), (64, 96), (96, 64)]]
    assert counts == [16 + 8 * 9, 16 + 8 * 13, 16 + 12 * 9]
    assert [64, 96] in GRID_PINPOINTS and [96, 64] in GRID_PINPOINTS


@pytest.mark.parametrize("size", [(3, 200), (200, 3), (32, 32), (33, 70)])
def test_extreme_aspect_ratios_pack_and_draw(tiny, size):
    """A banner-shaped image whose unpadding leaves no stitched row (3 x 200 px: 16 base-view tokens
    only), one of a single column, one without crops to cut: HF packs them (its count is the
    reference), and the overlay layout and picture cover exactly that many tokens."""
    name, path, adapter, model, processor = tiny
    pixels = processor.pixel_inputs([_image(*size)])
    with torch.no_grad():
        packed = model.model.get_image_features(**pixels, return_dict=True).pooler_output
    features = adapter.encode_images(model, pixels)
    assert features.counts == [packed[0].shape[0]] == [anyres_token_count(model.config, size)]
    (grid,) = adapter.token_grids(model.config, pixels)
    assert grid.tokens == features.counts[0]
    (picture,) = adapter.images_for_pictures(pixels, processor)
    from dllava.eval.overlay import kept_patch_overlay

    kept_patch_overlay(picture, torch.ones(grid.tokens, dtype=torch.bool), grid=grid)
