"""Tiny Qwen2.5-VL / Qwen3-VL: built offline, saved, loaded with from_pretrained, checked against HF itself."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rotary
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen3_vl import modeling_qwen3_vl

from dllava.data import synthetic
from dllava.model.tiny_qwen import (
    FAMILIES,
    IMAGE_PAD,
    TINY_QWEN2_5_VISION,
    TINY_TEXT,
    ImageTextProcessor,
    build_qwen_tokenizer,
    expand_image_ids,
    expand_image_placeholders,
    main,
    save_tiny_qwen,
)

MODEL_CLASS = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration}
# (height, width) -> merged tokens: sides are multiples of 28 px (Qwen2.5-VL) or 32 px (Qwen3-VL).
TOKEN_COUNTS = {
    "qwen2_5_vl": {(112, 112): 16, (112, 168): 24, (168, 224): 48},
    "qwen3_vl": {(128, 128): 16, (128, 192): 24, (192, 256): 48},
}
QUESTIONS = (
    "what color is the shape at row one column two ?",
    "how many shapes are there ?",
    "describe the image in detail .",
)


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    family = request.param
    path = save_tiny_qwen(tmp_path_factory.mktemp(family), family, seed=0)
    model = MODEL_CLASS[family].from_pretrained(path).eval()
    return family, model, ImageTextProcessor.from_pretrained(path)


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_chat_template_renders_chatml_with_one_image_placeholder():
    tokenizer = build_qwen_tokenizer()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a red circle ?"}]},
        {"role": "assistant", "content": "yes"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>is there a red circle ?<|im_end|>\n"
        "<|im_start|>assistant\nyes<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "describe"}, {"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\ndescribe<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_knows_every_synthetic_word_and_keeps_special_tokens_whole():
    tokenizer = build_qwen_tokenizer()
    for index in range(200):
        record = synthetic.make_conversation("train", index, seed=3)
        text = " ".join(turn["value"].replace("<image>", "") for turn in record["conversations"])
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text
    ids = tokenizer("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>yes<|im_end|>")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|im_start|>", "user", "\n", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "yes", "<|im_end|>"
    ]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_saved_directory_holds_safetensors_and_loads_the_pil_image_processor(saved, tmp_path):
    family, model, processor = saved
    out = save_tiny_qwen(tmp_path / "again", family)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    # HF records the backend-neutral name; from_pretrained builds the PIL class from it.
    assert json.loads((out / "preprocessor_config.json").read_text())["image_processor_type"] == "Qwen2VLImageProcessor"
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    assert model.config.model_type == family
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.image_token_id == tok.convert_tokens_to_ids(IMAGE_PAD)
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert model.config.text_config.vocab_size == len(tok)


def test_from_pretrained_refuses_an_unlisted_image_processor(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    with pytest.raises(ValueError, match="CLIPImageProcessor"):
        ImageTextProcessor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        ImageTextProcessor.from_pretrained(tmp_path / "missing")


def test_image_processor_keeps_sizes_and_counts_merged_tokens(saved):
    family, model, processor = saved
    patch = model.config.vision_config.patch_size
    for (height, width), tokens in TOKEN_COUNTS[family].items():
        image = _image(height, width)
        out = processor.image_processor(images=[image], return_tensors="pt")
        assert out["image_grid_thw"].tolist() == [[1, height // patch, width // patch]]
        assert out["pixel_values"].shape == (4 * tokens, 3 * 2 * patch * patch)
        assert processor.image_tokens(out["image_grid_thw"][0]) == tokens
        unresized = processor.image_processor(images=[image], do_resize=False, return_tensors="pt")
        assert torch.equal(out["pixel_values"], unresized["pixel_values"])


def test_expand_image_placeholders_in_text_and_ids():
    assert expand_image_placeholders("a<P>b<P>", [2, 3], "<P>") == "a<P><P>b<P><P><P>"
    assert expand_image_ids([5, 9, 6, 9], [2, 1], 9) == [5, 9, 9, 6, 9]
    with pytest.raises(ValueError, match="placeholders"):
        expand_image_placeholders("a<P>", [1, 1], "<P>")
    with pytest.raises(ValueError, match="image tokens"):
        expand_image_ids([9, 9], [1], 9)


def test_processor_call_matches_image_token_count_and_hf_forward_accepts_it(saved):
    family, model, processor = saved
    (height, width), tokens = next(iter(TOKEN_COUNTS[family].items()))
    inputs = processor(_prompt(processor, QUESTIONS[0]), [_image(height, width)])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == model.config.image_token_id)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)


def test_left_padded_batch_of_different_image_sizes_generates_as_each_sample_alone(saved):
    """The reference the engine is checked against: HF's batched generate equals per-sample generate."""
    family, model, processor = saved
    sizes = list(TOKEN_COUNTS[family])
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    prompts = [_prompt(processor, q) for q in QUESTIONS]
    batch = processor(prompts, images)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3  # every row padded differently
    greedy = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        together = model.generate(**batch, **greedy)
        new_tokens = together.sequences[:, batch["input_ids"].shape[1] :]
        for i in range(3):
            alone = processor(prompts[i], [images[i]])
            single = model.generate(**alone, **greedy)
            assert new_tokens[i].tolist() == single.sequences[0, alone["input_ids"].shape[1] :].tolist(), f"sample {i}"
            # Scores too: greedy tokens of a random tiny model can hide a position error, logits cannot.
            for step, (batched, own) in enumerate(zip(together.scores, single.scores)):
                torch.testing.assert_close(batched[i], own[0], atol=1e-5, rtol=1e-4, msg=f"sample {i} step {step}")


@pytest.mark.parametrize("module", [modeling_qwen2_5_vl, modeling_qwen3_vl])
def test_text_rotary_is_llamas_rotate_half_on_b_n_head_dim_cos_sin(module):
    """Adapters apply Qwen's M-RoPE with the shared Llama-style rotation: only cos/sin differ."""
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    for ours, theirs in zip(module.apply_rotary_pos_emb(q, k, cos, sin), llama_rotary(q, k, cos, sin)):
        assert torch.equal(ours, theirs)


def test_text_rotary_embedding_returns_batch_by_length_by_head_dim(saved):
    _, model, _ = saved
    rotary = model.model.language_model.rotary_emb
    position_ids = torch.arange(7).view(1, 1, 7).expand(3, 2, 7)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), position_ids)
    head_dim = model.model.language_model.layers[0].self_attn.head_dim
    assert cos.shape == sin.shape == (2, 7, head_dim)


def test_cli_writes_a_loadable_model(tmp_path, capsys):
    main(["--family", "qwen3_vl", "--out", str(tmp_path / "q3")])
    assert str(tmp_path / "q3") in capsys.readouterr().out
    assert Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "q3").config.model_type == "qwen3_vl"


def test_unknown_family_is_refused():
    from dllava.model.tiny_qwen import build_tiny_qwen

    with pytest.raises(ValueError, match="family"):
        build_tiny_qwen("qwen2_vl")


def test_qwen2_5_windows_split_a_112_px_image_into_four():
    """window_size 56 = 2x2 merged cells: the windowed ViT blocks differ from full attention already at 112 px."""
    from transformers.vision_utils import get_vision_window_index

    from dllava.model.tiny_qwen import TINY_QWEN2_5_VISION

    v = TINY_QWEN2_5_VISION
    grid = torch.tensor([[1, 112 // v["patch_size"], 112 // v["patch_size"]]])
    _, cu_window_seqlens = get_vision_window_index(grid, v["spatial_merge_size"], v["window_size"], v["patch_size"])
    assert cu_window_seqlens.tolist() == [0, 16, 32, 48, 64]  # four windows of 2x2 merged cells (16 patches)


def test_processor_refuses_mismatched_images_and_grids(saved):
    _, _, processor = saved
    prompt = "<|vision_start|><|image_pad|><|vision_end|>yes"
    image = _image(128, 128)
    with pytest.raises(ValueError, match="placeholders"):
        processor([prompt], [image, image])
    with pytest.raises(ValueError, match="placeholders"):
        processor([prompt + prompt], [image])
    with pytest.raises(ValueError, match="patch groups"):
        processor.image_tokens([1, 3, 4])


def test_cli_size_flags_change_only_the_sizes_given(tmp_path):
    main(["--family", "qwen2_5_vl", "--out", str(tmp_path), "--hidden", "96", "--layers", "2",
          "--heads", "4", "--vision-hidden", "48", "--vision-depth", "2"])
    config = json.loads((tmp_path / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"]) == (96, 2)
    assert text["intermediate_size"] == TINY_TEXT["intermediate_size"]
    assert (vision["hidden_size"], vision["depth"], vision["out_hidden_size"]) == (48, 2, 96)
    assert vision["intermediate_size"] == TINY_QWEN2_5_VISION["intermediate_size"]
    assert text["rope_parameters"]["mrope_section"] == [3, 4, 5]  # head_dim 24 -> 12 frequencies
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config.text_config.hidden_size == 96


def test_cli_size_flags_reject_non_positive_sizes(tmp_path):
    with pytest.raises(ValueError, match="--layers must be positive"):
        main(["--family", "qwen2_5_vl", "--out", str(tmp_path), "--layers", "0"])
