"""The Qwen-VL families' processor: tokenizer plus image processor, without torchvision.

HF's ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` cannot be constructed without torchvision (their
video-processor check fails, ../shared/FAMILIES.md), so :class:`ImageTextProcessor` stands in for them
for released checkpoints and the tiny models alike: it loads the tokenizer and the (PIL) image
processor a checkpoint names, and does the rest of HF's processor job (one ``<|image_pad|>`` per merged
image token, ``mm_token_type_ids``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase, Qwen2VLImageProcessorPil

IMAGE_PAD = "<|image_pad|>"

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
        from dllava.data.qwen_pixels import image_token_count

        return image_token_count(image_grid_thw_row, self.merge_size)

    def __call__(
        self, text: str | Sequence[str], images: Sequence[Any] = (), **tokenizer_kwargs: Any
    ) -> BatchFeature:
        """What HF's Qwen processors return for ``text`` with one ``<|image_pad|>`` per image: ``input_ids``,
        ``attention_mask``, ``mm_token_type_ids`` and, given images, ``pixel_values`` (flattened patches of
        all images) and ``image_grid_thw``. Images are matched to placeholders in reading order across
        ``text``; the tokenizer's padding side applies (left for the tiny tokenizers)."""
        data: dict[str, Any] = {}
        counts: list[int] = []
        if images:
            pixels = self.image_processor(images=list(images), return_tensors="pt")
            data.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
            counts = [self.image_tokens(row) for row in pixels["image_grid_thw"]]
        encoded = tokenize_with_images(self.tokenizer, text, counts, self.image_token, **tokenizer_kwargs)
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
        """Load both halves from a directory or a hub id (through the local HF cache); only allow-listed
        PIL image processors, no remote code."""
        from transformers.utils import cached_file

        local = Path(path).expanduser()
        if local.is_dir() or str(path).startswith(("/", ".", "~")):
            config_file = local / "preprocessor_config.json"
            if not config_file.is_file():
                raise FileNotFoundError(f"{config_file} not found: not a saved image processor")
        else:  # a hub id: an OSError here says it is not cached (dllava.model.loading explains the way out)
            config_file = Path(cached_file(str(path), "preprocessor_config.json"))
        name = json.loads(config_file.read_text()).get("image_processor_type")
        if name not in IMAGE_PROCESSOR_CLASSES:
            raise ValueError(
                f"{config_file} names image processor {name!r}; expected one of {sorted(IMAGE_PROCESSOR_CLASSES)}"
            )
        image_processor = IMAGE_PROCESSOR_CLASSES[name].from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        return cls(tokenizer, image_processor)


def tokenize_with_images(
    tokenizer: PreTrainedTokenizerBase, text: str | Sequence[str], counts: Sequence[int], image_token: str,
    **tokenizer_kwargs: Any,
) -> Any:
    """What a multimodal processor does with its texts: the i-th ``image_token`` across ``text`` (in
    reading order) expanded to ``counts[i]`` copies, then tokenized to padded tensors (the tokenizer's
    padding side)."""
    texts = [text] if isinstance(text, str) else list(text)
    remaining = list(counts)
    expanded = []
    for t in texts:
        n = t.count(image_token)
        expanded.append(expand_image_placeholders(t, remaining[:n], image_token))
        remaining = remaining[n:]
    if remaining:
        raise ValueError(f"{len(counts)} images given but the text holds fewer {image_token} placeholders")
    tokenizer_kwargs.setdefault("padding", True)
    return tokenizer(expanded, return_tensors="pt", **tokenizer_kwargs)


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
