"""Stage 0 of the tiny base recipe: give the tiny CLIP tower the pretraining real CLIP already has.

LLaVA starts from a CLIP that already sees objects; our tiny tower starts random. A random tower keeps
shape information (a standardised linear probe reads it), but in low-variance directions that the
frozen-tower LLaVA learned only slowly: on CPU the tiny LLaVA reached 0.92 on colour questions but
0.30 on shape questions after 2000 steps. This stage trains the tower (its embeddings and the layers up
to LLaVA's feature layer) to classify, for every patch token, the colour and shape of the object drawn
in that patch (or none), with linear heads on the feature layer that LLaVA reads. The heads are
discarded; the tower is then frozen for the LLaVA stages, as LLaVA freezes CLIP.

The Qwen-VL families (the tiny Qwen2.5-VL base, data/tiny_qwen2_5_vl) go through the family adapter
instead: the whole ViT and its merger learn, and the heads sit on the merger's output tokens (what the
LLM reads), one per merged token, on the synthetic task's Qwen layouts (``--cell 56 --grid-sizes
4x4,4x6,6x4``: each object inside one 28 px quadrant = one merged token; images of different sizes in
one batch, as flattened patches + ``image_grid_thw``).

    python -m dllava.model.vision_pretrain --model data/tiny_base --out data/tiny_base --steps 1500
    python -m dllava.model.vision_pretrain --model <tiny qwen> --out <dir> --cell 56 --grid-sizes 4x4,4x6,6x4
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from dllava.data.synthetic import COLORS, SHAPES, Layout, layouts, make_scene, parse_grid_sizes, render
from dllava.model.loading import load_processor

log = logging.getLogger(__name__)


def patch_targets(scene: list[dict[str, Any]], image_size: int, patch: int) -> tuple[list[int], list[int]]:
    """Per patch (row-major): colour index + 1 and shape index + 1 of the object inside it, 0 if empty."""
    side = image_size // patch
    colours, shapes = [0] * side * side, [0] * side * side
    for obj in scene:
        x0, y0, x1, y1 = obj["box"]
        row, col = ((y0 + y1) // 2) // patch, ((x0 + x1) // 2) // patch
        colours[row * side + col] = COLORS.index(obj["color"]) + 1
        shapes[row * side + col] = SHAPES.index(obj["shape"]) + 1
    return colours, shapes


def token_targets(scene: list[dict[str, Any]], layout: Layout, token_px: int) -> tuple[list[int], list[int]]:
    """:func:`patch_targets` for a ``layout`` image (rows x cols cells) read as tokens of ``token_px``
    px square, row-major over its (height / token_px) x (width / token_px) grid."""
    if layout.height % token_px or layout.width % token_px:
        raise ValueError(f"a {layout.width}x{layout.height} px image is not a grid of {token_px} px tokens")
    rows, cols = layout.height // token_px, layout.width // token_px
    colours, shapes = [0] * rows * cols, [0] * rows * cols
    for obj in scene:
        x0, y0, x1, y1 = obj["box"]
        if x0 // token_px != (x1 - 1) // token_px or y0 // token_px != (y1 - 1) // token_px:
            raise ValueError(f"object box {obj['box']} spans several {token_px} px tokens")
        index = (y0 // token_px) * cols + x0 // token_px
        colours[index] = COLORS.index(obj["color"]) + 1
        shapes[index] = SHAPES.index(obj["shape"]) + 1
    return colours, shapes


def _as_shard_image(image: Image.Image) -> Image.Image:
    """The JPEG round trip the shards apply (quality 95, 4:4:4), so the tower sees what LLaVA sees."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def make_batch(
    rng: np.random.Generator, processor: Any, batch_size: int, image_size: int, patch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, colours, shapes = [], [], []
    for _ in range(batch_size):
        scene = make_scene(rng, image_size=image_size)
        images.append(_as_shard_image(render(scene, rng, image_size=image_size)))
        c, s = patch_targets(scene, image_size, patch)
        colours.append(c)
        shapes.append(s)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(colours), torch.tensor(shapes)


class PatchHeads(nn.Module):
    """Linear colour and shape classifiers on each patch token of the feature layer."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.colour = nn.Linear(hidden, len(COLORS) + 1)
        self.shape = nn.Linear(hidden, len(SHAPES) + 1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.colour(tokens), self.shape(tokens)


def patch_features(llava: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's hidden states at LLaVA's ``vision_feature_layer``, CLS dropped: (B, n_patches, H)."""
    out = llava.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[llava.config.vision_feature_layer][:, 1:]


def evaluate(llava: nn.Module, heads: PatchHeads, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Per-patch accuracy on occupied patches, and on empty ones."""
    pixels, colours, shapes = batch
    with torch.no_grad():
        return head_accuracies(heads(patch_features(llava, pixels)), colours, shapes)


def head_accuracies(logits: tuple[torch.Tensor, torch.Tensor], colours: torch.Tensor, shapes: torch.Tensor) -> dict[str, float]:
    """Colour and shape accuracy on tokens that hold an object, and "empty" accuracy on the others."""
    colour_logits, shape_logits = logits
    occupied = colours > 0
    return {
        "colour_acc_objects": float((colour_logits.argmax(-1) == colours)[occupied].float().mean()),
        "shape_acc_objects": float((shape_logits.argmax(-1) == shapes)[occupied].float().mean()),
        "empty_acc": float((shape_logits.argmax(-1) == 0)[~occupied].float().mean()),
    }


# -- Qwen-VL families: through the family adapter --------------------------------------------------
def merged_token_px(config: Any) -> int:
    """Side in px of one merged (LLM) image token: patch_size * spatial_merge_size (28 for Qwen2.5-VL)."""
    vision = config.vision_config
    return int(vision.patch_size) * int(vision.spatial_merge_size)


def make_layout_batch(
    rng: np.random.Generator, processor: Any, batch_size: int, choices: tuple[Layout, ...], token_px: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Images of layouts drawn from ``choices`` as the family's pixel inputs (flattened patches +
    ``image_grid_thw``, one processor call on the list, as the datamodule's collate gives), with flat
    per-token colour/shape targets in the same order as the adapter's image features."""
    images, colours, shapes = [], [], []
    for _ in range(batch_size):
        layout = choices[int(rng.integers(len(choices)))]
        scene = make_scene(rng, layout=layout)
        images.append(_as_shard_image(render(scene, rng, layout=layout)))
        c, s = token_targets(scene, layout, token_px)
        colours.extend(c)
        shapes.extend(s)
    out = processor.image_processor(images=images, return_tensors="pt")
    pixels = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
    return pixels, torch.tensor(colours), torch.tensor(shapes)


def merged_features(model: nn.Module, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
    """The merger's output tokens (T, H), flat in batch order, row-major per image: what the LLM reads."""
    from dllava.families import get_adapter

    features = get_adapter(model).encode_images(model, pixels)
    expected = sum(rows * cols for rows, cols in features.grids)
    if features.flat.shape[0] != expected:
        raise ValueError(f"image features hold {features.flat.shape[0]} tokens, the grids {expected}")
    return features.flat


def evaluate_tokens(model: nn.Module, heads: PatchHeads, batch: tuple[Any, ...]) -> dict[str, float]:
    """:func:`evaluate` on merged tokens."""
    pixels, colours, shapes = batch
    with torch.no_grad():
        return head_accuracies(heads(merged_features(model, pixels)), colours, shapes)


def _train_heads_and_tower(
    tower: nn.Module, heads: PatchHeads, features: Any, next_batch: Any, steps: int, lr: float
) -> None:
    """AdamW + one-cycle on the summed colour and shape cross-entropies of every token."""
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    progress = tqdm(range(steps), desc="vision pretraining", unit="step", mininterval=10)
    for _ in progress:
        pixels, colours, shapes = next_batch()
        colour_logits, shape_logits = heads(features(pixels))
        loss = F.cross_entropy(colour_logits.flatten(0, -2), colours.flatten()) + F.cross_entropy(
            shape_logits.flatten(0, -2), shapes.flatten()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")


def pretrain_qwen_vision(
    model_dir: str,
    out: str,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    cell: int = 56,
    grid_sizes: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Train the ViT + merger of the Qwen-VL model in ``model_dir`` on merged-token colour/shape (heads on
    the merger output) over the synthetic ``cell`` / ``grid_sizes`` layouts; save the model to ``out``."""
    from dllava.families import get_adapter
    from transformers import AutoConfig

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    adapter = get_adapter(AutoConfig.from_pretrained(model_dir))
    model = adapter.model_class().from_pretrained(model_dir)
    processor = load_processor(model_dir)
    token_px = merged_token_px(model.config)
    choices = layouts(cell=cell, grid_sizes=grid_sizes or [(4, 4)])
    heads = PatchHeads(model.config.text_config.hidden_size)
    tower = model.model.visual.train()
    held_out = make_layout_batch(np.random.default_rng([seed, 8]), processor, 128, choices, token_px)
    before = evaluate_tokens(model, heads, held_out)
    _train_heads_and_tower(
        tower,
        heads,
        lambda pixels: merged_features(model, pixels),
        lambda: make_layout_batch(rng, processor, batch_size, choices, token_px),
        steps,
        lr,
    )
    tower.eval()
    after = evaluate_tokens(model, heads, held_out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "cell": cell,
        "grid_sizes": [list(c[:2]) for c in choices], "token_px": token_px, "before": before, "after": after,
    }
    Path(out, "vision_pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def pretrain_vision_tower(
    model_dir: str, out: str, steps: int = 1500, batch_size: int = 64, lr: float = 1e-3, seed: int = 0
) -> dict[str, Any]:
    """Train the tower of the LLaVA in ``model_dir`` on patch colour/shape and save the LLaVA to ``out``."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    llava = LlavaForConditionalGeneration.from_pretrained(model_dir)
    processor = load_processor(model_dir)
    vision = llava.config.vision_config
    image_size, patch = vision.image_size, vision.patch_size
    heads = PatchHeads(vision.hidden_size)
    tower = llava.model.vision_tower.train()
    params = [p for p in tower.parameters()] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    held_out = make_batch(np.random.default_rng([seed, 8]), processor, 256, image_size, patch)
    before = evaluate(llava, heads, held_out)
    progress = tqdm(range(steps), desc="vision pretraining", unit="step")
    for _ in progress:
        pixels, colours, shapes = make_batch(rng, processor, batch_size, image_size, patch)
        colour_logits, shape_logits = heads(patch_features(llava, pixels))
        loss = F.cross_entropy(colour_logits.flatten(0, 1), colours.flatten()) + F.cross_entropy(
            shape_logits.flatten(0, 1), shapes.flatten()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    tower.eval()
    after = evaluate(llava, heads, held_out)
    llava.save_pretrained(out)
    processor.save_pretrained(out)
    report = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "before": before, "after": after}
    Path(out, "vision_pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain a tiny model's vision tower on patch colour/shape.")
    parser.add_argument("--model", required=True, help="from_pretrained directory of the tiny LLaVA")
    parser.add_argument("--out", required=True, help="where to save the LLaVA with the pretrained tower")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cell", type=int, default=None, help="Qwen-VL models: px per synthetic cell (default 56)")
    parser.add_argument("--grid-sizes", default=None, help="Qwen-VL models: ROWSxCOLS layouts, e.g. 4x4,4x6,6x4")
    args = parser.parse_args(argv)
    from transformers import AutoConfig

    if AutoConfig.from_pretrained(args.model).model_type == "llava":
        if args.cell is not None or args.grid_sizes is not None:
            raise ValueError("--cell / --grid-sizes apply to Qwen-VL models; the LLaVA tower reads its square image")
        report = pretrain_vision_tower(args.model, args.out, args.steps, args.batch_size, args.lr, args.seed)
    else:
        sizes = parse_grid_sizes(args.grid_sizes) if args.grid_sizes else None
        report = pretrain_qwen_vision(
            args.model, args.out, args.steps, args.batch_size, args.lr, args.seed, args.cell or 56, sizes
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
