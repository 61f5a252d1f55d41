"""FastV's score, recomputed by the engine from layer K-1's own projections, equals HF's own attention
weights (eager, ``output_attentions``) for every family: Qwen3-VL's q/k norms, M-RoPE positions and
DeepStack additions included. The kept set is each sample's top ``int(n_b * keep)`` of those weights."""

import numpy as np
import pytest
import torch
from PIL import Image

from dllava.families import adapter_for
from dllava.inference.engine import SparseEngine
from dllava.sparse.model import DynamicVLM

SIZES = {"qwen2_5_vl": [(112, 112), (112, 168), (168, 224)], "qwen3_vl": [(128, 128), (128, 192), (192, 256)]}
QUESTIONS = ["what color is the shape ?", "how many shapes are there ?", "describe the image in detail ."]


@pytest.fixture(scope="module")
def saved_qwen(tmp_path_factory):
    """A tiny model directory per Qwen family, written once for the module."""
    from dllava.model.tiny_qwen import save_tiny_qwen

    return {f: save_tiny_qwen(tmp_path_factory.mktemp(f), f) for f in SIZES}


def _batch(family, path, tiny_processor):
    rng = np.random.default_rng(0)
    if family == "llava":
        images = [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in QUESTIONS]
        texts = [f"USER: <image>\n{q} ASSISTANT:" for q in QUESTIONS]
        tiny_processor.tokenizer.padding_side = "left"
        return dict(tiny_processor(text=texts, images=images, return_tensors="pt", padding=True))
    from dllava.families.qwen_processor import ImageTextProcessor

    processor = ImageTextProcessor.from_pretrained(path)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES[family]]
    texts = [processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], tokenize=False,
        add_generation_prompt=True) for q in QUESTIONS]
    return dict(processor(texts, images))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("layer", [1, 2])
def test_fastv_keeps_the_top_of_hf_attention_of_the_last_prompt_token(family, layer, tiny_model_dir, tiny_processor, saved_qwen):
    path = tiny_model_dir if family == "llava" else saved_qwen[family]
    model_class = adapter_for(family).model_class()
    reference = model_class.from_pretrained(path, attn_implementation="eager").eval()
    batch = _batch(family, path, tiny_processor)
    with torch.no_grad():
        attentions = reference(**batch, output_attentions=True).attentions
    scores = attentions[layer - 1][:, :, -1, :].mean(1)  # (B, N): what layer K-1's last query attends to
    model = DynamicVLM(model_class.from_pretrained(path).eval(), {"layer": layer, "keep": 0.25},
                       {"d_model": 16, "heads": 2, "ff": 32, "layers": 1}).eval()
    images = {k: batch[k] for k in model.adapter.pixel_keys}
    _, state = SparseEngine(model, method="fastv", keep=0.25, text="off").start(
        batch["input_ids"], batch["attention_mask"], **images)
    image_mask = batch["input_ids"] == model.adapter.image_token_id(model.base.config)
    for b in range(len(QUESTIONS)):
        own = scores[b][image_mask[b]]  # this sample's image tokens, in order
        k = max(1, int(own.numel() * 0.25))
        expected = torch.zeros(own.numel(), dtype=torch.bool)
        expected[own.topk(k).indices] = True
        kept = state.image_keep[b, : own.numel()]
        assert torch.equal(kept, expected), (family, b)
        assert not bool(state.image_keep[b, own.numel():].any())  # padding slots of shorter samples


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("method", ["dynamic", "fastv", "random"])
def test_vision_start_and_end_tokens_are_never_dropped(family, method, saved_qwen):
    """Only ``<|image_pad|>`` tokens are droppable: after pruning at keep 0.1 every text column of each
    sample, ``<|vision_start|>`` and ``<|vision_end|>`` included, is still a valid key."""
    path = saved_qwen[family]
    model = DynamicVLM(adapter_for(family).model_class().from_pretrained(path).eval(), {"layer": 1, "keep": 0.1},
                       {"d_model": 16, "heads": 2, "ff": 32, "layers": 1}).eval()
    batch = _batch(family, path, None)
    engine = SparseEngine(model, method=method, keep=0.1, text="off")
    _, state = engine.start(batch["input_ids"], batch["attention_mask"], use_cache=False,
                            **{k: batch[k] for k in model.adapter.pixel_keys})
    _, index, key_valid = engine._sequence_forward(state, every_position=True)
    config = model.base.config
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    for b in range(ids.shape[0]):
        kept = set(index[b][key_valid[b]].tolist())
        for token in (config.vision_start_token_id, config.vision_end_token_id):
            assert (ids[b] == token).sum() == 1 and int((ids[b] == token).nonzero()) in kept
        text = set((mask[b] & (ids[b] != config.image_token_id)).nonzero()[:, 0].tolist())
        assert text <= kept
        n_image = int((ids[b] == config.image_token_id).sum())
        assert len(kept) == len(text) + max(1, int(n_image * 0.1))
