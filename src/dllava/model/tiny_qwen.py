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
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    BatchFeature,
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

FAMILIES = ("qwen2_5_vl", "qwen3_vl")

UNK = "<unk>"  # word-level needs one; Qwen's byte-level BPE has none, and no synthetic word maps to it
PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
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


# Classes ``ImageTextProcessor.from_pretrained`` may build from a preprocessor_config.json, by the name it
# records. The released checkpoints name the torchvision variants; their PIL twin preprocesses the same way.
IMAGE_PROCESSOR_CLASSES: dict[str, type] = {
    "Qwen2VLImageProcessorPil": Qwen2VLImageProcessorPil,
    "Qwen2VLImageProcessor": Qwen2VLImageProcessorPil,
    "Qwen2VLImageProcessorFast": Qwen2VLImageProcessorPil,
}


class ImageTextProcessor:
    """Tokenizer plus image processor, saved and loaded as a pair, without torchvision.

    It stands in for HF's Qwen processors, which cannot be built here: calling it does what theirs do
    (image patches, one ``<|image_pad|>`` per merged token, ``mm_token_type_ids``); the pieces
    (:meth:`image_tokens`, :func:`expand_image_placeholders`) serve callers that tokenize themselves.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor: Qwen2VLImageProcessorPil) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    @property
    def image_token(self) -> str:
        """The placeholder; released Qwen tokenizers may not name one, HF's processors default to this."""
        return getattr(self.tokenizer, "image_token", None) or IMAGE_PAD

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def image_tokens(self, image_grid_thw_row: Sequence[int] | torch.Tensor) -> int:
        """LLM tokens of one image: t * h * w patches over merge_size**2 (the merger's 2x2 groups)."""
        t, h, w = (int(v) for v in image_grid_thw_row)
        m = self.merge_size
        if min(t, h, w) <= 0 or h % m or w % m:
            raise ValueError(f"image_grid_thw row {(t, h, w)} is not a grid of whole {m}x{m} patch groups")
        merged = t * h * w // (m * m)
        return merged

    def __call__(
        self, text: str | Sequence[str], images: Sequence[Any] = (), **tokenizer_kwargs: Any
    ) -> BatchFeature:
        """What HF's Qwen processors return for ``text`` with one ``<|image_pad|>`` per image: ``input_ids``,
        ``attention_mask``, ``mm_token_type_ids`` and, given images, ``pixel_values`` (flattened patches of
        all images) and ``image_grid_thw``. Images are matched to placeholders in reading order across
        ``text``; the tokenizer's padding side applies (left for the tiny tokenizers)."""
        texts = [text] if isinstance(text, str) else list(text)
        image_token = self.image_token
        data: dict[str, Any] = {}
        counts: list[int] = []
        if images:
            pixels = self.image_processor(images=list(images), return_tensors="pt")
            data.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
            counts = [self.image_tokens(row) for row in pixels["image_grid_thw"]]
        expanded = []
        for t in texts:
            n = t.count(image_token)
            expanded.append(expand_image_placeholders(t, counts[:n], image_token))
            counts = counts[n:]
        if counts:
            raise ValueError(f"{len(images)} images given but the text holds fewer {image_token} placeholders")
        tokenizer_kwargs.setdefault("padding", True)
        encoded = self.tokenizer(expanded, return_tensors="pt", **tokenizer_kwargs)
        data.update(encoded)
        data["mm_token_type_ids"] = mm_token_type_ids(encoded["input_ids"], self.image_token_id)
        return BatchFeature(data)

    def save_pretrained(self, out: str | Path) -> Path:
        """Tokenizer files plus preprocessor_config.json (which names the image processor class)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ImageTextProcessor:
        """Load both halves from a directory; only allow-listed PIL image processors, no remote code."""
        path = Path(path)
        config_file = path / "preprocessor_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: not a saved image processor")
        name = json.loads(config_file.read_text()).get("image_processor_type")
        if name not in IMAGE_PROCESSOR_CLASSES:
            raise ValueError(
                f"{config_file} names image processor {name!r}; expected one of {sorted(IMAGE_PROCESSOR_CLASSES)}"
            )
        image_processor = IMAGE_PROCESSOR_CLASSES[name].from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        return cls(tokenizer, image_processor)


def expand_image_placeholders(text: str, counts: Sequence[int], image_token: str = IMAGE_PAD) -> str:
    """Replace the i-th ``image_token`` of ``text`` by ``counts[i]`` copies, as HF's Qwen processors do.

    ``text`` must hold exactly ``len(counts)`` placeholders (one per image, in order)."""
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(counts):
        raise ValueError(
            f"text has {len(pieces) - 1} {image_token} placeholders but {len(counts)} image counts were given"
        )
    if any(int(c) <= 0 for c in counts):
        raise ValueError(f"image token counts must be positive, got {list(counts)}")
    out = [pieces[0]]
    for count, piece in zip(counts, pieces[1:]):
        out.append(image_token * int(count) + piece)
    return "".join(out)


def expand_image_ids(ids: Sequence[int], counts: Sequence[int], image_token_id: int) -> list[int]:
    """Token-id form of :func:`expand_image_placeholders`: the i-th ``image_token_id`` becomes ``counts[i]``."""
    positions = [i for i, t in enumerate(ids) if int(t) == image_token_id]
    if len(positions) != len(counts):
        raise ValueError(
            f"ids hold {len(positions)} image tokens (id {image_token_id}) but {len(counts)} image counts were given"
        )
    if any(int(c) <= 0 for c in counts):
        raise ValueError(f"image token counts must be positive, got {list(counts)}")
    out: list[int] = []
    start = 0
    for position, count in zip(positions, counts):
        out.extend(int(t) for t in ids[start:position])
        out.extend([image_token_id] * int(count))
        start = position + 1
    out.extend(int(t) for t in ids[start:])
    return out


def mm_token_type_ids(
    input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None = None
) -> torch.Tensor:
    """HF's Qwen processor's ``mm_token_type_ids``: 1 at image tokens, 2 at video tokens, 0 elsewhere
    (vision start/end are text). ``get_rope_index`` groups positions by this, not by token id."""
    types = (input_ids == image_token_id).to(torch.int32)
    if video_token_id is not None:
        types = types + 2 * (input_ids == video_token_id).to(torch.int32)
    return types


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
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"],
        pad_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        bos_token_id=ids["pad"],
    )


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
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"],
        pad_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        bos_token_id=ids["pad"],
    )


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
