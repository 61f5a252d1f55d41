"""Tiny Qwen2.5-VL and Qwen3-VL models with their processors, built offline.

Each is a real HF ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` (its own
vision tower: window attention and merger for Qwen2.5-VL, learned position grid and DeepStack taps for
Qwen3-VL) with a word-level tokenizer built in code from the synthetic task's words plus Qwen's special
tokens and a ChatML chat template, and HF's PIL Qwen2-VL image processor.

HF's ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` cannot be constructed without torchvision (their video
processor check fails, see ../shared/FAMILIES.md), so :class:`ImageTextProcessor` stands in for them: it
holds the tokenizer and the image processor, saves and loads both, and :func:`expand_image_placeholders`
does the rest of HF's processor job (one ``<|image_pad|>`` per merged image token).

Sizes: images whose sides are multiples of 28 px (Qwen2.5-VL: 14 px patches, 2x2 merge) or 32 px
(Qwen3-VL: 16 px patches) are not resized, so 112x112 gives 16 image tokens and 112x168 gives 24.

CLI: ``python -m dllava.model.tiny_qwen --family qwen2_5_vl --out DIR`` writes an untrained tiny model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from dllava.data import synthetic
from dllava.data.conversation import SYSTEM_PROMPT
from dllava.families.qwen_processor import (  # noqa: F401  (the processor's names, also used from here)
    IMAGE_PAD,
    IMAGE_PROCESSOR_CLASSES,
    ImageTextProcessor,
    expand_image_ids,
    expand_image_placeholders,
    mm_token_type_ids,
)

FAMILIES = ("qwen2_5_vl", "qwen3_vl")

UNK = "<unk>"  # word-level needs one; Qwen's byte-level BPE has none, and no synthetic word maps to it
PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
# In Qwen's own order (151643 ...), appended after the words as in Qwen's vocabulary.
QWEN_SPECIAL_TOKENS = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Words, punctuation runs and newlines: spaces are dropped, a newline is a token, since ChatML puts
    one after every role and Qwen's own tokenizer keeps them."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="isolated"),
        ]
    )


# ChatML as Qwen2.5-VL renders it: a default system turn when the first message is not one, an image
# entry as <|vision_start|><|image_pad|><|vision_end|> (expanded later to one pad per merged token),
# every turn closed by <|im_end|> and a newline. Content is a string or a list of {"type": ...} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Per family: the vision patch size and the image normalisation of the released checkpoints' processors
# (Qwen2.5-VL: CLIP mean/std; Qwen3-VL: 0.5/0.5), so the tiny processors preprocess as the real ones do.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_PROCESSING: dict[str, dict[str, Any]] = {
    "qwen2_5_vl": dict(patch_size=14, image_mean=_CLIP_MEAN, image_std=_CLIP_STD),
    "qwen3_vl": dict(patch_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
}
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_TOKENS, MAX_TOKENS = 4, 1024  # merged tokens per image; 112 px .. 896 px squares pass unresized

TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY_QWEN2_5_VISION = dict(
    depth=4,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=14,
    spatial_merge_size=MERGE_SIZE,
    temporal_patch_size=TEMPORAL_PATCH_SIZE,
    window_size=56,  # 2x2 merged cells per window: windows matter on 112 px and larger images
    fullatt_block_indexes=[1, 3],
    tokens_per_second=2,
)
TINY_QWEN3_VISION = dict(
    depth=4,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=16,
    spatial_merge_size=MERGE_SIZE,
    temporal_patch_size=TEMPORAL_PATCH_SIZE,
    num_position_embeddings=64,  # an 8x8 learned grid, bilinearly resampled to each image's patch grid
    deepstack_visual_indexes=[0, 1, 2],
)


# -- tokenizer ---------------------------------------------------------------------------------------
def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    return family


def tiny_qwen_vocabulary() -> list[str]:
    """``<unk>``, the newline, every word of the ChatML roles, both system prompts and the synthetic task,
    then Qwen's special tokens in Qwen's order."""
    text = " ".join(["system user assistant", DEFAULT_SYSTEM_PROMPT, SYSTEM_PROMPT, *synthetic.WIDE_WORDS])
    vocab = [UNK, "\n"]
    for word, _ in _pre_tokenizer().pre_tokenize_str(text):
        if word not in vocab:
            vocab.append(word)
    return vocab + list(QWEN_SPECIAL_TOKENS)


def build_qwen_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with Qwen's special tokens and ChatML template: eos ``<|im_end|>``, pad
    ``<|endoftext|>``, no bos (Qwen adds none), left padding (batched generation)."""
    vocab = {word: i for i, word in enumerate(tiny_qwen_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    # Matched before pre-tokenization and never split, at their vocabulary ids.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD},
        model_max_length=model_max_length,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# -- image processor ---------------------------------------------------------------------------------
def build_qwen_image_processor(family: str) -> Qwen2VLImageProcessorPil:
    """HF's PIL Qwen2-VL image processor with the family's patch size; images whose sides are multiples of
    patch * merge px and hold MIN_TOKENS..MAX_TOKENS merged tokens pass through unresized."""
    settings = IMAGE_PROCESSING[_check_family(family)]
    factor = settings["patch_size"] * MERGE_SIZE
    return Qwen2VLImageProcessorPil(
        min_pixels=MIN_TOKENS * factor * factor,
        max_pixels=MAX_TOKENS * factor * factor,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        **settings,
    )


def build_qwen_processor(family: str) -> ImageTextProcessor:
    """The family's tiny processor: word-level ChatML tokenizer plus the family's image processor."""
    return ImageTextProcessor(build_qwen_tokenizer(), build_qwen_image_processor(family))


# -- configs and models ------------------------------------------------------------------------------
def _token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    tokens = {"image": IMAGE_PAD, "video": VIDEO_PAD, "start": VISION_START, "end": VISION_END}
    tokens.update(pad=PAD, eos=IM_END)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in tokens.items()}
    missing = [name for name, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks the Qwen special tokens {missing}")
    return ids


def _special_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The config's token ids (image, video, vision start/end, pad/eos; bos = pad, as Qwen's)."""
    return {
        "image_token_id": ids["image"], "video_token_id": ids["video"], "vision_start_token_id": ids["start"],
        "vision_end_token_id": ids["end"], "pad_token_id": ids["pad"], "eos_token_id": ids["eos"],
        "bos_token_id": ids["pad"],
    }


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (T, H, W) as Qwen does (about 1/4, 3/8, 3/8)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _text_settings(tokenizer: PreTrainedTokenizerBase, overrides: dict[str, Any]) -> dict[str, Any]:
    ids = _token_ids(tokenizer)
    text = {**TINY_TEXT, **overrides}
    specials = {"pad_token_id": ids["pad"], "bos_token_id": ids["pad"], "eos_token_id": ids["eos"]}
    return {"vocab_size": len(tokenizer), **specials, **text}


def tiny_qwen2_5_vl_config(
    tokenizer: PreTrainedTokenizerBase, vision_overrides: dict[str, Any] | None = None, **text_overrides: Any
) -> Qwen2_5_VLConfig:
    """Qwen2_5_VLConfig of the tiny model; ``text_overrides`` change the decoder (e.g. num_hidden_layers),
    ``vision_overrides`` the ViT (e.g. hidden_size, depth)."""
    ids = _token_ids(tokenizer)
    text = _text_settings(tokenizer, text_overrides)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": _mrope_section(head_dim),
    }
    vision = {**TINY_QWEN2_5_VISION, **(vision_overrides or {}), "out_hidden_size": text["hidden_size"]}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_special_token_ids(ids))


def tiny_qwen3_vl_config(
    tokenizer: PreTrainedTokenizerBase, vision_overrides: dict[str, Any] | None = None, **text_overrides: Any
) -> Qwen3VLConfig:
    """Qwen3VLConfig of the tiny model (q/k norms, interleaved M-RoPE, DeepStack from ViT blocks 0-2);
    overrides as for :func:`tiny_qwen2_5_vl_config`."""
    ids = _token_ids(tokenizer)
    text = _text_settings(tokenizer, text_overrides)
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": _mrope_section(text["head_dim"]),
        "mrope_interleaved": True,
    }
    vision = {**TINY_QWEN3_VISION, **(vision_overrides or {}), "out_hidden_size": text["hidden_size"]}
    return Qwen3VLConfig(text_config=text, vision_config=vision, **_special_token_ids(ids))


_BUILDERS = {
    "qwen2_5_vl": (tiny_qwen2_5_vl_config, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (tiny_qwen3_vl_config, Qwen3VLForConditionalGeneration),
}


def build_tiny_qwen(
    family: str, seed: int = 0, vision_overrides: dict[str, Any] | None = None, **text_overrides: Any
) -> tuple[Qwen2_5_VLForConditionalGeneration | Qwen3VLForConditionalGeneration, ImageTextProcessor]:
    """A freshly initialised tiny model of ``family`` ("qwen2_5_vl" or "qwen3_vl") and its processor;
    ``vision_overrides`` / ``text_overrides`` change the ViT / decoder sizes (defaults: TINY_*)."""
    processor = build_qwen_processor(family)
    make_config, model_class = _BUILDERS[family]
    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    model = model_class(make_config(tokenizer, vision_overrides, **text_overrides))
    # As the released checkpoints: stop at <|im_end|> or <|endoftext|>, pad with <|endoftext|>.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.pad_token_id
    return model, processor


def save_tiny_qwen(
    out: str | Path, family: str, seed: int = 0, vision_overrides: dict[str, Any] | None = None, **text_overrides: Any
) -> Path:
    """Write an untrained tiny ``family`` model (safetensors, tokenizer, preprocessor config) to ``out``."""
    out = Path(out)
    model, processor = build_tiny_qwen(family, seed, vision_overrides, **text_overrides)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# CLI flag -> (config part, config key): the sizes a bigger tiny base (data/tiny_qwen2_5_vl) changes.
_SIZE_KEYS = {
    "hidden": ("text", "hidden_size"),
    "intermediate": ("text", "intermediate_size"),
    "layers": ("text", "num_hidden_layers"),
    "heads": ("text", "num_attention_heads"),
    "kv-heads": ("text", "num_key_value_heads"),
    "vision-hidden": ("vision", "hidden_size"),
    "vision-intermediate": ("vision", "intermediate_size"),
    "vision-depth": ("vision", "depth"),
    "vision-heads": ("vision", "num_heads"),
}
_SIZE_FLAGS = {flag: f"{part} {key}" for flag, (part, key) in _SIZE_KEYS.items()}


def _size_overrides(args: argparse.Namespace) -> tuple[dict[str, int], dict[str, int]]:
    """(text, vision) config overrides from the size flags that were given."""
    parts: dict[str, dict[str, int]] = {"text": {}, "vision": {}}
    for flag, (part, key) in _SIZE_KEYS.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            if value <= 0:
                raise ValueError(f"--{flag} must be positive, got {value}")
            parts[part][key] = value
    return parts["text"], parts["vision"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=FAMILIES)
    parser.add_argument("--out", required=True, help="directory to write the untrained tiny model into")
    parser.add_argument("--seed", type=int, default=0)
    # Size overrides (unset: the TINY_* defaults the tests use). The decoder's head_dim / 2 is split over
    # M-RoPE's (t, h, w) sections, so keep head_dim >= 8.
    for flag, help_text in _SIZE_FLAGS.items():
        parser.add_argument(f"--{flag}", type=int, default=None, help=help_text)
    args = parser.parse_args(argv)
    text, vision = _size_overrides(args)
    print(save_tiny_qwen(args.out, args.family, args.seed, vision, **text))


if __name__ == "__main__":
    main()
