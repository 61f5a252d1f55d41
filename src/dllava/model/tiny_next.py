"""Tiny random LLaVA-NeXT and LLaVA-OneVision models with their processors, built offline.

Each is a real HF ``LlavaNextForConditionalGeneration`` (CLIP tower with CLS, Llama decoder, the tiny
LLaVA's word-level vicuna tokenizer) or ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower without
CLS, Qwen2 decoder, the tiny Qwen's word-level ChatML tokenizer), with HF's PIL image processor of the
family and :class:`~dllava.families.llava_next.AnyresProcessor`, saved with ``save_pretrained``.

Sizes: 32 px views of 8 px patches (16 tokens per view) and crop resolutions from 32 to 96 px, so the
synthetic task's non-square images (16 px cells on 4x4, 4x6 and 6x4 grids: 64x64, 64x96, 96x64 px)
pick 2x2, 2x3 and 3x2 crops and one batch holds different token counts (48-120 per image).

CLI: ``python -m dllava.model.tiny_next --family llava_next --out DIR`` writes an untrained model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from dllava.families.llava_next import AnyresProcessor

FAMILIES = ("llava_next", "llava_onevision")
VIEW = 32
PATCH = 8
GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [64, 96], [96, 64]]
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   image_size=VIEW, patch_size=PATCH)
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    return family


def build_tiny_next(
    family: str, seed: int = 0, vision_aspect_ratio: str = "anyres_max_9", full_vocabulary: bool = True,
    **text_overrides: Any,
) -> tuple[torch.nn.Module, AnyresProcessor]:
    """A freshly initialised tiny model of ``family`` and its processor. ``vision_aspect_ratio``
    (OneVision) sets how many crops' worth of tokens the stitched grid may hold before HF shrinks it.
    ``full_vocabulary`` (LLaVA-NeXT): the tiny vocabulary with the words of wider layouts and the detail
    kind (its task names rows five and six); False: the 66 classic words (tests' seeded models)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen2Config,
        SiglipVisionConfig,
    )

    text = {**TINY_TEXT, **text_overrides}
    if _check_family(family) == "llava_next":
        from dllava.model.tiny import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer(model_max_length=1024, full=full_vocabulary)
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": VIEW}, crop_size={"height": VIEW, "width": VIEW}, image_grid_pinpoints=GRID_PINPOINTS
        )
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(**TINY_VISION),
            text_config=LlamaConfig(vocab_size=len(tokenizer), **ids, **text),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=GRID_PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        model_class = LlavaNextForConditionalGeneration
    else:
        from dllava.model.tiny_qwen import IMAGE_PAD, build_qwen_tokenizer

        tokenizer = build_qwen_tokenizer()
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": VIEW, "width": VIEW}, image_grid_pinpoints=GRID_PINPOINTS
        )
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**TINY_VISION, vision_use_head=False),
            text_config=Qwen2Config(vocab_size=len(tokenizer), **ids, **text),
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PAD),
            image_grid_pinpoints=GRID_PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=vision_aspect_ratio,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        model_class = LlavaOnevisionForConditionalGeneration
    torch.manual_seed(seed)
    model = model_class(config)
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    return model, AnyresProcessor(tokenizer, image_processor, config)


def save_tiny_next(out: str | Path, family: str, seed: int = 0, **kwargs: Any) -> Path:
    """Write an untrained tiny model of ``family`` (safetensors, tokenizer, image processor) to ``out``."""
    out = Path(out)
    model, processor = build_tiny_next(family, seed, **kwargs)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--out", required=True, help="directory to write the untrained tiny model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_tiny_next(args.out, args.family, args.seed))


if __name__ == "__main__":
    main()
