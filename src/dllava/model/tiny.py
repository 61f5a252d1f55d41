"""The tiny LLaVA that makes the default run quick on a laptop CPU.

It is a real HF ``LlavaForConditionalGeneration`` (CLIP vision tower, two-layer projector, Llama
decoder) with a word-level tokenizer built in code from the synthetic task's words, and a CLIP image
processor. ``save_tiny_llava`` writes it with ``save_pretrained`` so that the tiny model and
llava-1.5-7b load through the same ``from_pretrained`` code.

Sizes follow ../shared/CALIBRATION.md: 96 px images with 12 px patches give 64 image tokens (a
synthetic grid cell is 2x2 patches and each object fills one of them), and a 6-layer decoder leaves
room for sparsification at K = 2 to matter.

CLI: ``python -m dllava.model.tiny --out DIR`` writes an untrained tiny model (the starting point of
``experiment=tiny_base``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from dllava.data import synthetic
from dllava.data.conversation import ASSISTANT_ROLE, IMAGE_PLACEHOLDER, SYSTEM_PROMPT, USER_ROLE

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

TINY_VISION = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=96, patch_size=12
)
TINY_TEXT = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def tiny_vocabulary(full: bool = False) -> list[str]:
    """Special tokens, then every word of the template and the square synthetic task's first five kinds,
    then ``<image>``; with ``full``, then the words of the ``detail`` kind, the rows / columns five and
    six of wider layouts, and the words of LLaVA-1.5's short-answer suffix that are new ("Answer", "question",
    "using", "single", "word", "or", "phrase"; ``synthetic.SHORT_ANSWER_SUFFIX``): every word any synthetic
    record can hold.

    The later words come after the image token because they were added later: a checkpoint saved with
    the 66-word vocabulary keeps every id when it is extended (:func:`extend_vocabulary`). Without them the
    vocabulary is the 66 words that fresh test models are built from (their random init, and so every
    seeded test, stays as it was); the CLI and the committed models use the full one.
    """
    splitter = pre_tokenizers.Whitespace()
    template_text = f"{SYSTEM_PROMPT} {USER_ROLE}: {ASSISTANT_ROLE}:"
    words = [w for w, _ in splitter.pre_tokenize_str(template_text)] + list(synthetic.WORDS)
    vocab = list(SPECIAL_TOKENS)
    for word in words:
        if word not in vocab:
            vocab.append(word)
    later = [
        w for w in (*synthetic.DETAIL_WORDS, *synthetic.WIDE_POSITION_WORDS, *synthetic.SHORT_ANSWER_SUFFIX_WORDS)
        if w not in vocab
    ]
    return vocab + [IMAGE_PLACEHOLDER] + (list(dict.fromkeys(later)) if full else [])


def build_tiny_tokenizer(model_max_length: int = 512, full: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer that adds ``<s>`` like Llama's and knows ``<image>`` as a special token."""
    vocab = {word: i for i, word in enumerate(tiny_vocabulary(full))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
        model_max_length=model_max_length,
        padding_side="right",
    )


def build_tiny_processor(tokenizer: PreTrainedTokenizerFast | None = None, full: bool = False) -> LlavaProcessor:
    """CLIP preprocessing at 96 px plus the tokenizer, wrapped as HF's ``LlavaProcessor``."""
    size = TINY_VISION["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tiny_tokenizer(full=full),
        patch_size=TINY_VISION["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast, **text_overrides: Any) -> LlavaConfig:
    """LlavaConfig of the tiny model; ``text_overrides`` change the Llama part (tests use smaller ones)."""
    patches = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**TINY_TEXT, **text_overrides},
    )
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        image_seq_length=patches,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_llava(
    seed: int = 0, full: bool = False, **text_overrides: Any
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised tiny LLaVA and its processor (``full``: every word of the synthetic task)."""
    processor = build_tiny_processor(full=full)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_config(processor.tokenizer, **text_overrides))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model, processor


def save_tiny_llava(out: str | Path, seed: int = 0, full: bool = False, **text_overrides: Any) -> Path:
    """Write an untrained tiny LLaVA (safetensors, tokenizer, processor) to ``out``."""
    out = Path(out)
    model, processor = build_tiny_llava(seed, full, **text_overrides)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def extend_vocabulary(src: str | Path, out: str | Path) -> Path:
    """Copy the trained tiny LLaVA at ``src`` to ``out`` with today's vocabulary (new words appended).

    Every id of ``src``'s tokenizer must keep its word (raises otherwise), so the copy computes exactly
    what ``src`` computes on any old text; the new rows of the embedding and the LM head start at the
    mean of the old ones (HF's ``resize_token_embeddings`` default).
    """
    model = LlavaForConditionalGeneration.from_pretrained(src)
    old = PreTrainedTokenizerFast.from_pretrained(src).get_vocab()
    processor = build_tiny_processor(full=True)
    new = processor.tokenizer.get_vocab()
    moved = sorted(w for w, i in old.items() if new.get(w) != i)
    if moved:
        raise ValueError(f"{src}: today's tiny vocabulary is not an extension of its tokenizer (moved: {moved[:8]})")
    model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=True)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extend", default=None,
                        help="a trained tiny LLaVA to copy with today's vocabulary instead (new words appended)")
    args = parser.parse_args(argv)
    print(extend_vocabulary(args.extend, args.out) if args.extend else save_tiny_llava(args.out, args.seed, full=True))


if __name__ == "__main__":
    main()
