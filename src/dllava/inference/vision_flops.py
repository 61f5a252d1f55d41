"""FLOPs of the vision towers (ViT plus merger/projector), one function per family.

Counted the way ``torch.utils.flop_counter.FlopCounterMode`` counts them: 2 FLOPs per multiply-add,
only matmuls (linears, including their bias-free ``addmm`` count), convolutions and attention
(``QK^T`` and ``AV``: ``4 h n_q n_k d``); norms, activations, rotary and the learned position-
embedding lookup are free. The vision tower runs once per image in every method, so these are
reported beside the decoder's prefill, never inside it.

How attention is counted follows what the installed transformers (5.23) executes on its non-flash
path (``qwen2_5_vl/modeling_qwen2_5_vl.py`` and ``qwen3_vl/modeling_qwen3_vl.py``,
``*VisionAttention.forward``): the packed patch sequence is ``torch.split`` at ``cu_seqlens`` and
one unmasked SDPA runs per segment. Attention is therefore the sum of ``L^2`` over segments, not
``n^2`` over the whole sequence: segments are Qwen2.5-VL's windows in its window blocks and one
frame of one image (``h * w`` patches) in full-attention blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

Grid = Sequence[int]


# -- shared pieces -------------------------------------------------------------------------------
def _check_grids(image_grid_thw: Iterable[Grid], merge: int) -> list[tuple[int, int, int]]:
    """``image_grid_thw`` as int triples; each h and w must be a multiple of the merge size (the
    image processors guarantee it, and the merger would fail otherwise)."""
    rows = image_grid_thw.tolist() if hasattr(image_grid_thw, "tolist") else image_grid_thw  # a tensor or a list
    grids = [tuple(int(v) for v in row) for row in rows]
    if not grids:
        raise ValueError("image_grid_thw is empty: at least one (t, h, w) row is needed")
    for row in grids:
        if len(row) != 3 or min(row) <= 0:
            raise ValueError(f"image_grid_thw rows must be three positive ints (t, h, w), got {row}")
        if row[1] % merge or row[2] % merge:
            raise ValueError(f"image_grid_thw row {row}: h and w must be multiples of spatial_merge_size {merge}")
    return grids


def _patch_embed_flops(vision_config: Any, patches: int) -> int:
    """The Conv3d patch embedding: one output vector per patch, kernel ``in_ch x t_patch x p x p``."""
    kernel = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
    return 2 * patches * kernel * vision_config.hidden_size


def _attention_flops(hidden: int, segment_lengths: Iterable[int]) -> int:
    """``QK^T`` and ``AV`` of one SDPA per segment over all heads (``heads * head_dim == hidden``)."""
    return 4 * hidden * sum(n * n for n in segment_lengths)


def _merger_flops(vision_config: Any, patches: int) -> int:
    """A patch merger: ``merge^2`` patches concatenated, Linear(mC, mC), GELU, Linear(mC, out)."""
    merged_dim = vision_config.hidden_size * vision_config.spatial_merge_size**2
    tokens = patches // vision_config.spatial_merge_size**2
    return 2 * tokens * merged_dim * (merged_dim + vision_config.out_hidden_size)


def frame_lengths(image_grid_thw: Iterable[Grid]) -> list[int]:
    """Full-attention segments: one per frame of each image (``cu_seqlens`` of
    ``transformers.vision_utils.get_vision_cu_seqlens``, ``merge_temporal=False``)."""
    return [h * w for t, h, w in image_grid_thw for _ in range(t)]


# -- CLIP + LLaVA projector ----------------------------------------------------------------------
def llava_vision_flops(vision_config: Any, projector_out: int, batch: int = 1, cls: bool = True) -> int:
    """CLIP tower (every layer runs; LLaVA reads layer -2) plus the two-layer projector, ``batch`` times
    (LLaVA-NeXT: once per view); ``cls`` False for towers without a CLS token (SigLIP)."""
    c, i = vision_config.hidden_size, vision_config.intermediate_size
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    n = patches + int(cls)
    embed = 2 * patches * 3 * vision_config.patch_size**2 * c
    layer = 8 * n * c * c + 4 * n * n * c + 4 * n * c * i
    projector = 2 * patches * (c * projector_out + projector_out * projector_out)
    return batch * (embed + vision_config.num_hidden_layers * layer + projector)


# -- Qwen2.5-VL ----------------------------------------------------------------------------------
def qwen2_5_vl_window_lengths(image_grid_thw: Iterable[Grid], window_size: int, patch_size: int, spatial_merge_size: int) -> list[int]:
    """Patches per attention window, as ``transformers.vision_utils.get_vision_window_index`` cuts
    them: per frame, the merged-token grid (h/m, w/m) is tiled by squares of
    ``window_size // m // patch_size`` merged tokens from the top-left, edge windows being smaller;
    each merged token is ``m^2`` patches. Empty windows (its padding) are dropped, as there."""
    side = window_size // spatial_merge_size // patch_size
    if side <= 0:
        raise ValueError(f"window_size {window_size} is smaller than one merged token ({spatial_merge_size * patch_size} px)")
    lengths = []
    for t, h, w in image_grid_thw:
        rows, cols = h // spatial_merge_size, w // spatial_merge_size
        row_spans = [min(side, rows - r) for r in range(0, rows, side)]
        col_spans = [min(side, cols - c) for c in range(0, cols, side)]
        lengths += [a * b * spatial_merge_size**2 for _ in range(t) for a in row_spans for b in col_spans]
    return lengths


def qwen2_5_vl_vision_flops(vision_config: Any, image_grid_thw: Iterable[Grid]) -> int:
    """Qwen2.5-VL's ViT for the images of one call: Conv3d patch embed, ``depth`` blocks (qkv and
    proj linears, SwiGLU MLP, attention per window or, in ``fullatt_block_indexes``, per frame), and
    the PatchMerger. ``image_grid_thw``: one (t, h, w) row per image, in patches."""
    merge = vision_config.spatial_merge_size
    grids = _check_grids(image_grid_thw, merge)
    c, i = vision_config.hidden_size, vision_config.intermediate_size
    patches = sum(t * h * w for t, h, w in grids)
    full = {b for b in vision_config.fullatt_block_indexes if 0 <= b < vision_config.depth}
    windowed = vision_config.depth - len(full)
    linears = patches * (8 * c * c + 6 * c * i)  # qkv (3C^2) + proj (C^2), gate/up/down (3CI)
    windows = qwen2_5_vl_window_lengths(grids, vision_config.window_size, vision_config.patch_size, merge)
    attention = windowed * _attention_flops(c, windows) + len(full) * _attention_flops(c, frame_lengths(grids))
    blocks = vision_config.depth * linears + attention
    return _patch_embed_flops(vision_config, patches) + blocks + _merger_flops(vision_config, patches)


# -- Qwen3-VL ------------------------------------------------------------------------------------
def qwen3_vl_deepstack_layers(vision_config: Any) -> list[int]:
    """The blocks whose output feeds a DeepStack merger: indexes outside ``range(depth)`` never match
    the block loop, so their mergers never run."""
    return sorted({b for b in vision_config.deepstack_visual_indexes if 0 <= b < vision_config.depth})


def qwen3_vl_vision_flops(vision_config: Any, image_grid_thw: Iterable[Grid]) -> int:
    """Qwen3-VL's ViT for the images of one call: Conv3d patch embed (the bilinear position-embedding
    resampling is a gather and a weighted sum: no matmul), ``depth`` blocks with attention per frame
    and a two-linear GELU MLP, the final merger and one DeepStack merger per deepstack layer."""
    merge = vision_config.spatial_merge_size
    grids = _check_grids(image_grid_thw, merge)
    c, i = vision_config.hidden_size, vision_config.intermediate_size
    patches = sum(t * h * w for t, h, w in grids)
    linears = patches * (8 * c * c + 4 * c * i)  # qkv (3C^2) + proj (C^2), fc1/fc2 (2CI)
    blocks = vision_config.depth * (linears + _attention_flops(c, frame_lengths(grids)))
    mergers = (1 + len(qwen3_vl_deepstack_layers(vision_config))) * _merger_flops(vision_config, patches)
    return _patch_embed_flops(vision_config, patches) + blocks + mergers
