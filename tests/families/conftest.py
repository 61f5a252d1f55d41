"""One tiny random model per family, loaded the way every checkpoint is: the family's own HF config
class, ``save_pretrained``, then ``adapter.model_class().from_pretrained``.

Each family fixture holds two copies of the same weights: ``hf``, the stock HF model that is the
reference (its forward and generate), and ``model``, a :class:`DynamicVLM` around a second copy (the
wrapper switches its decoder's attention to the gated kernel). The prompts are a left-padded batch of
three, each with one image; where the family has dynamic resolution the images have different sizes,
so the samples hold different image-token counts (the case that breaks batched pruning).

Adding a family (after its adapter is registered in :mod:`dllava.families`): its ``model_type`` in
``FAMILIES``, a sparsity layer in ``SPARSE_LAYER``, image sizes in ``IMAGE_SIZES``, and a branch in
``_save`` (write a tiny random model of it from its own HF config class) and ``_texts`` (its prompt
format); everything else goes through the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dllava.families import FamilyAdapter, adapter_for
from dllava.sparse.model import DynamicVLM

FAMILIES = ("llava", "qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision")
# Qwen3-VL at K = 1: tokens are dropped before decoder layer 1, so two of the three DeepStack additions
# (after layers 0, 1, 2) land on the pruned sequence. Qwen2.5-VL at K = 2 covers a later layer.
SPARSE_LAYER = {"llava": 1, "qwen2_5_vl": 2, "qwen3_vl": 1, "llava_next": 2, "llava_onevision": 1}
PREDICTOR = {"d_model": 32, "heads": 2, "ff": 64, "layers": 1}
# (height, width) px per prompt: multiples of 28 px (Qwen2.5-VL) / 32 px (Qwen3-VL) pass unresized and
# give 16, 24 and 48 image tokens; LLaVA resizes every image to 96 px (64 tokens each).
IMAGE_SIZES = {
    "llava": [(96, 96), (80, 120), (96, 96)],
    "qwen2_5_vl": [(112, 112), (112, 168), (168, 224)],
    "qwen3_vl": [(128, 128), (128, 192), (192, 256)],
    # anyres: 2x2, 2x3 (unpadded: 40 of 64 px rows hold image) and 3x2 crops of 32 px views -> 88, 94, 124
    # tokens with newlines; OneVision at anyres_max_2 also shrinks every stitched grid (46, 52, 46).
    "llava_next": [(64, 64), (40, 96), (96, 64)],
    "llava_onevision": [(64, 64), (40, 96), (96, 64)],
}
QUESTIONS = (
    "what color is the shape at row one column two ?",
    "how many shapes are there ?",
    "describe the image .",
)
NEW_TOKENS = 8


@dataclass
class Family:
    """A loaded tiny model of one family with its prompts and HF's own generation on them."""

    name: str
    path: Path
    adapter: FamilyAdapter
    hf: torch.nn.Module
    model: DynamicVLM
    inputs: dict[str, torch.Tensor]  # everything the processor returned (HF's forward/generate kwargs)
    pad_token_id: int
    reference: dict[str, Any] = field(default_factory=dict)
    # per sample, over its image tokens: where HF packed its learned ``image_newline`` (anyres families)
    newlines: list[torch.Tensor] = field(default_factory=list)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.inputs["attention_mask"]

    @property
    def images(self) -> dict[str, torch.Tensor]:
        """The pixel inputs (the engine's and DynamicVLM's keyword arguments)."""
        return {k: self.inputs[k] for k in self.adapter.pixel_keys}

    @property
    def image_token_id(self) -> int:
        return self.adapter.image_token_id(self.hf.config)

    @property
    def counts(self) -> list[int]:
        return (self.input_ids == self.image_token_id).sum(-1).tolist()

    @property
    def sparse_layer(self) -> int:
        return self.model.sparsity.layer

    def budgets(self, keep: float) -> list[int]:
        """Image tokens each sample keeps at ``keep`` (global budget): ``int(n * keep)`` of the tokens
        that are not HF's newline embedding, plus every newline."""
        from dllava.sparse.decisions import num_kept

        fixed = [int(n.sum()) for n in self.newlines] or [0] * len(self.counts)
        return [num_kept(c - f, keep) + f for c, f in zip(self.counts, fixed)]

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Prompt ``i`` alone, without its padding: ids (1, n), mask, pixel inputs."""
        row = self.input_ids[i, self.attention_mask[i].bool()][None]
        return row, torch.ones_like(row), self.adapter.select_rows(self.images, [i])

    def rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's own rotary module on (R, B, N) position ids (R = 1: 1-D RoPE, 3: M-RoPE)."""
        rotary = self.adapter.decoder(self.hf).rotary_emb
        return rotary(hidden, positions[0] if positions.shape[0] == 1 else positions)


def _image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _texts(name: str, processor: Any) -> list[str]:
    if name in ("llava", "llava_next"):
        from dllava.data.conversation import (
            ASSISTANT_ROLE,
            IMAGE_PLACEHOLDER,
            USER_ROLE,
        )

        return [f"{USER_ROLE}: {IMAGE_PLACEHOLDER}\n{q} {ASSISTANT_ROLE}:" for q in QUESTIONS]
    return [
        processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            tokenize=False, add_generation_prompt=True,
        )
        for q in QUESTIONS
    ]


def _save(name: str, out: Path) -> Path:
    if name == "llava":
        from dllava.model.tiny import save_tiny_llava

        return save_tiny_llava(out, seed=0, num_hidden_layers=3)
    if name in ("llava_next", "llava_onevision"):
        from dllava.model.tiny_next import save_tiny_next

        # the classic vocabulary keeps the seeded init these tests were calibrated on (the questions need no more)
        extra = {"vision_aspect_ratio": "anyres_max_2"} if name == "llava_onevision" else {"full_vocabulary": False}
        return save_tiny_next(out, name, seed=0, num_hidden_layers=3, **extra)
    from dllava.model.tiny_qwen import save_tiny_qwen

    return save_tiny_qwen(out, name, seed=0)


def _encode(name: str, processor: Any) -> dict[str, torch.Tensor]:
    processor.tokenizer.padding_side = "left"  # batched generation
    images = [_image(h, w, seed) for seed, (h, w) in enumerate(IMAGE_SIZES[name])]
    texts = _texts(name, processor)
    if name == "llava":
        encoded = processor(text=texts, images=images, padding=True, return_tensors="pt")
    else:  # dllava's stand-ins for HF's Qwen / anyres processors (which need torchvision): tensors, padded
        encoded = processor(texts, images)
    return {k: v for k, v in encoded.items()}


def hf_newlines(family: Family) -> list[torch.Tensor]:
    """Per sample, which of its packed image features are HF's ``image_newline`` vector (computed with
    HF's own ``get_image_features``, not with dllava's layout); empty for families without one."""
    newline = getattr(family.hf.model, "image_newline", None)
    if newline is None:
        return []
    with torch.no_grad():
        packed = family.hf.model.get_image_features(**family.images, return_dict=True).pooler_output
    return [(p - newline).abs().amax(-1) == 0 for p in packed]


def _center_text_predictor(family: Family) -> None:
    """Shift the text predictor's keep logit so that it keeps about half of the prompt's tokens (read
    at layer K by HF's forward): at random init one direction dominates and it would keep all or none."""
    with torch.no_grad():
        hidden = family.hf(**family.inputs, output_hidden_states=True).hidden_states[family.sparse_layer]
        logits = family.model.text_predictor(hidden[family.attention_mask.bool()])
        family.model.text_predictor.head[-1].bias[0] -= (logits[:, 0] - logits[:, 1]).median()


def hf_generate(family: Family) -> dict[str, Any]:
    """HF ``generate`` (greedy, no EOS stop) on the batch: new tokens, raw logits per step, and the
    position ids HF's decoder received in every call (prefill, then one column per step)."""
    positions: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        positions.append(kwargs["position_ids"].clone())

    decoder = family.adapter.decoder(family.hf)
    handle = decoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = family.hf.generate(
                **family.inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                pad_token_id=family.pad_token_id, output_logits=True, return_dict_in_generate=True,
            )
    finally:
        handle.remove()
    # Qwen's generate passes 4 rows (text positions, then M-RoPE t, h, w): the decoder rotates with the last 3.
    positions = [p[None] if p.dim() == 2 else p[-3:] for p in positions]
    return {
        "tokens": out.sequences[:, family.input_ids.shape[1]:],
        "logits": torch.stack(out.logits, 1).float(),  # (B, T, V)
        "prefill_positions": positions[0],
        "step_positions": torch.cat(positions[1:], -1),  # (R, B, T-1)
    }


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> Family:
    name = request.param
    adapter = adapter_for(name)
    path = _save(name, tmp_path_factory.mktemp(name))
    hf = adapter.model_class().from_pretrained(path).eval()
    assert type(hf.config) is adapter.config_class() and hf.config.model_type == name
    base = adapter.model_class().from_pretrained(path).eval()
    torch.manual_seed(1)  # the predictors' init, whichever tests ran before
    model = DynamicVLM(base, {"layer": SPARSE_LAYER[name], "keep": 0.25}, PREDICTOR).eval()
    with torch.no_grad():  # decisive predictors (far from ties)
        for p in model.predictors().parameters():
            p.mul_(20)
    processor = adapter.load_processor(str(path))
    fam = Family(name, path, adapter, hf, model, _encode(name, processor), int(processor.tokenizer.pad_token_id))
    _center_text_predictor(fam)
    fam.reference = hf_generate(fam)
    fam.newlines = hf_newlines(fam)
    return fam
