"""VisionZip's saliency on the Qwen towers (``QwenAdapter.vision_saliency``), which have no CLS token:
per merged image token, the attention its 2x2 patches receive in the tower's last block (mean over
heads, summed over the queries of the same image) and that block's keys (mean over heads and patches).

References nobody here wrote: HF's own eager attention of the last vision block (the probabilities and
rotated keys its ``eager_attention_forward`` computes, recorded by wrapping that function while the
vision config asks for eager attention), and HF's own merger output order, matched row by row against
the merger applied to the blocks' output (the tower's internal order), so Qwen2.5-VL's window
reordering is undone without reading ``window_index``. The prompts are the conftest's left-padded batch
of three images of different sizes.

The anyres families (``LlavaNextAdapter.vision_saliency``, ``LlavaOnevisionAdapter``'s): per crop, the
attention of the layer whose output the projector reads (found by matching its output with the tower's
``hidden_states[vision_feature_layer]``), from HF's eager attention (CLIP: the CLS row summed over heads;
SigLIP: received, mean over heads and summed over the crop's queries) with HF's keys, placed in packed
order by a stitching written here (crop blocks, HF's ``unpad_image``, OneVision's bilinear shrink, a zero
column of newlines), itself checked against HF's packed features (the same placement of the projected
crops reproduces ``get_image_features`` exactly). The three images get 2x2, 2x3 and 3x2 crops.
"""

from __future__ import annotations

import contextlib
import copy
import importlib

import pytest
import torch

from dllava.families import adapter_for

from .conftest import Family

QWEN = ("qwen2_5_vl", "qwen3_vl")
ANYRES = ("llava_next", "llava_onevision")
qwen = pytest.mark.parametrize("family", QWEN, indirect=True)
anyres = pytest.mark.parametrize("family", ANYRES, indirect=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def _eager_calls(attn: torch.nn.Module):
    """HF's eager attention recorded for one attention module: yields a list that fills with one
    (probabilities, keys) pair per call of ``attn``, in float32 (the module's config set to eager, its
    modeling file's ``eager_attention_forward`` wrapped, both restored after)."""
    modeling = importlib.import_module(type(attn).__module__)
    original = modeling.eager_attention_forward
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if module is attn:
            assert attention_mask is None
            seen.append((weights.detach().float(), key.detach().float()))
        return out, weights

    before = attn.config._attn_implementation
    modeling.eager_attention_forward = recording
    attn.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            yield seen
    finally:
        attn.config._attn_implementation = before
        modeling.eager_attention_forward = original


def _hf_eager_last_block(hf: torch.nn.Module, images: dict[str, torch.Tensor]):
    """HF's eager attention of the last vision block: per attention call (one per ``cu_seqlens``
    segment) its probabilities (heads, L, L) and keys (heads, L, d), and the tower's output."""
    tower = hf.model.visual
    with _eager_calls(tower.blocks[-1].attn) as seen:
        out = tower(images["pixel_values"].to(tower.dtype), grid_thw=images["image_grid_thw"])
    return [w[0] for w, _ in seen], [k[0] for _, k in seen], out


def _output_order(hf: torch.nn.Module, out) -> torch.Tensor:
    """For each merger output row (HF's order), the tower's internal merge unit it came from: the merger
    is row-wise, so its output on the blocks' output is the same rows, permuted."""
    with torch.no_grad():
        internal = hf.model.visual.merger(out.last_hidden_state)
    pooled = out.pooler_output
    distance = (pooled.float()[:, None] - internal.float()[None]).abs().amax(-1)
    nearest = distance.topk(2, -1, largest=False)
    order = nearest.indices[:, 0]
    assert nearest.values[:, 0].max().item() <= 1e-6 < nearest.values[:, 1].min().item()  # one match per row
    assert sorted(order.tolist()) == list(range(pooled.shape[0]))
    return order


def _sharpened(hf: torch.nn.Module) -> torch.nn.Module:
    """A copy whose last vision block has 20x larger queries and keys: at random init the attention is
    nearly uniform (every score about the patches per token), which would hide a misplaced row."""
    sharp = copy.deepcopy(hf)
    qkv = sharp.model.visual.blocks[-1].attn.qkv
    dim = qkv.weight.shape[1]
    with torch.no_grad():
        qkv.weight[: 2 * dim] *= 20
        qkv.bias[: 2 * dim] *= 20
    return sharp


@qwen
def test_saliency_equals_hf_eager_attention_of_last_block(family: Family):
    hf, images, adapter = _sharpened(family.hf), family.images, family.adapter
    score, keys = adapter.vision_saliency(hf, images)
    features = adapter.encode_images(hf, images)
    assert score.shape == (features.flat.shape[0],) and keys.shape[0] == features.flat.shape[0]

    probs, ref_keys, out = _hf_eager_last_block(hf, images)
    # HF's own output order is encode_images' order (eager here, the model's own kernel there)
    torch.testing.assert_close(out.pooler_output, features.flat, rtol=1e-4, atol=1e-6)  # eager vs sdpa
    # one attention call per image, over that image's patches only (ragged sizes)
    patches = images["image_grid_thw"].prod(-1).tolist()
    assert [p.shape[-1] for p in probs] == patches and len(set(patches)) == len(patches)
    received = torch.cat([p.mean(0).sum(0) for p in probs])  # mean over heads, sum over the image's queries
    unit = hf.model.visual.spatial_merge_unit
    order = _output_order(hf, out)
    if family.name == "qwen2_5_vl":  # windows reorder these images: a missing un-reorder would show
        assert order.tolist() != list(range(len(order)))
    expected = received.reshape(-1, unit).sum(-1)[order]
    expected_keys = torch.cat(ref_keys, 1).mean(0).reshape(-1, unit, keys.shape[-1]).mean(1)[order]
    assert expected.std() > 0.1 * expected.mean()  # far from uniform: a misplaced row shows
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(keys, expected_keys, rtol=1e-5, atol=1e-6)
    # every query's probabilities sum to 1: an image's scores sum to its patch count
    sums = [s.sum().item() for s in torch.split(score, features.counts)]
    assert sums == pytest.approx(patches, rel=1e-5)


@qwen
def test_batch_equals_each_image_alone(family: Family):
    """Per-image segments: an image's rows do not depend on the other images of the batch."""
    hf = _sharpened(family.hf)
    _assert_batch_equals_alone(family, hf)


@qwen
def test_rows_follow_merged_tokens(family: Family):
    """With every block but the last an identity, a key depends on its own patch only: changing the
    pixels of merged token j of an image (its 4 consecutive patch rows in ``pixel_values``) changes the
    keys of exactly row j of that image (the tower's input order is encode_images' order)."""
    hf, adapter, images = family.hf, family.adapter, family.images
    blocks = hf.model.visual.blocks
    handles = [b.register_forward_hook(lambda m, args, out: args[0]) for b in blocks[:-1]]
    try:
        _, base_keys = adapter.vision_saliency(hf, images)
        counts = adapter.encode_images(hf, images).counts
        unit = hf.model.visual.spatial_merge_unit
        patch_offset, token_offset = 0, 0
        for patches, count in zip(images["image_grid_thw"].prod(-1).tolist(), counts):
            for j in range(count):
                pixels = images["pixel_values"].clone()
                rows = slice(patch_offset + unit * j, patch_offset + unit * (j + 1))
                pixels[rows] = pixels[rows] + 1.0
                changed = {**images, "pixel_values": pixels}
                _, keys = adapter.vision_saliency(hf, changed)
                moved = (keys - base_keys).abs().amax(-1) > 1e-6
                assert moved.nonzero().flatten().tolist() == [token_offset + j]
            patch_offset += patches
            token_offset += count
    finally:
        for h in handles:
            h.remove()


@qwen
def test_windowed_last_block_is_refused(family: Family):
    if family.name != "qwen2_5_vl":
        pytest.skip("only Qwen2.5-VL has window-attention blocks")
    from dllava.model.tiny_qwen import build_tiny_qwen

    model, _ = build_tiny_qwen("qwen2_5_vl", vision_overrides={"fullatt_block_indexes": [1]})
    with pytest.raises(NotImplementedError, match="within windows"):
        adapter_for("qwen2_5_vl").vision_saliency(model.eval(), family.images)


# -- LLaVA-NeXT / OneVision (anyres) ------------------------------------------------------------------
def _vision_layers(hf: torch.nn.Module) -> torch.nn.ModuleList:
    tower = hf.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def _projected_layer(hf: torch.nn.Module, pixels: torch.Tensor) -> int:
    """The index of the vision layer whose output is ``hidden_states[vision_feature_layer]`` (the one
    the projector reads), found by matching every layer's output against it."""
    tower = hf.model.vision_tower
    layers = _vision_layers(hf)
    outputs = []
    handles = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
               for layer in layers]
    try:
        with torch.no_grad():
            selected = tower(pixels, output_hidden_states=True).hidden_states[hf.config.vision_feature_layer]
    finally:
        for h in handles:
            h.remove()
    matches = [i for i, out in enumerate(outputs) if torch.equal(out, selected)]
    assert len(matches) == 1, matches
    return matches[0]


def _crops(hf: torch.nn.Module, images: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Each image's base view and crops (HF's grid shape), concatenated, and each image's crop grid."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    config = hf.config
    grids = [tuple(int(v) for v in get_anyres_image_grid_shape(s, config.image_grid_pinpoints, config.vision_config.image_size))
             for s in images["image_sizes"].tolist()]
    pixels = torch.cat([p[: 1 + r * c] for p, (r, c) in zip(images["pixel_values"], grids)])
    return pixels, grids


def _sharpened_layer(hf: torch.nn.Module, index: int) -> torch.nn.Module:
    """A copy whose vision layer ``index`` has 20x larger queries and keys (random init attends nearly
    uniformly, which would hide a misplaced row)."""
    sharp = copy.deepcopy(hf)
    attn = _vision_layers(sharp)[index].self_attn
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.mul_(20)
            proj.bias.mul_(20)
    return sharp


def _hf_eager_layer(hf: torch.nn.Module, index: int, pixels: torch.Tensor):
    """HF's eager attention of vision layer ``index`` on ``pixels`` (crops, 3, s, s): probabilities
    (crops, heads, n, n) and keys (crops, heads, n, d), and the tower's hidden states."""
    tower = hf.model.vision_tower
    with _eager_calls(_vision_layers(hf)[index].self_attn) as seen:
        out = tower(pixels, output_hidden_states=True)
    assert len(seen) == 1
    return seen[0][0], seen[0][1], out.hidden_states


def _place(config, per_crop: torch.Tensor, grids, sizes, newline: torch.Tensor) -> list[torch.Tensor]:
    """Per image, (crops, side * side, C) rows placed as the LLM sees them, written here: the base view's
    patches, then the crops pasted block by block into one grid, HF's ``unpad_image``, OneVision's
    bilinear shrink, ``newline`` after every row, read row by row."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    side = config.vision_config.image_size // config.vision_config.patch_size
    out, start = [], 0
    for (rows, cols), size in zip(grids, sizes.tolist()):
        crops = per_crop[start : start + 1 + rows * cols]
        start += 1 + rows * cols
        grid = per_crop.new_zeros(per_crop.shape[-1], rows * side, cols * side)
        for k in range(rows * cols):
            r, c = divmod(k, cols)
            grid[:, r * side : (r + 1) * side, c * side : (c + 1) * side] = crops[1 + k].reshape(side, side, -1).permute(2, 0, 1)
        grid = unpad_image(grid, size)
        ratio_text = getattr(config, "vision_aspect_ratio", None)
        if ratio_text is not None:  # OneVision: shrink above anyres_max_N views' worth of patches
            height, width = grid.shape[1:]
            ratio = (height * width / (int(ratio_text.removeprefix("anyres_max_")) * side * side)) ** 0.5
            if ratio > 1.1:
                grid = torch.nn.functional.interpolate(grid[None], [int(height // ratio), int(width // ratio)], mode="bilinear")[0]
        grid = torch.cat([grid, newline[:, None, None].expand(-1, grid.shape[1], 1)], -1)
        out.append(torch.cat([crops[0], grid.permute(1, 2, 0).reshape(-1, grid.shape[0])]))
    return out


@anyres
def test_anyres_saliency_equals_hf_eager_attention_of_projected_layer(family: Family):
    from dllava.families.llava_next import anyres_layout

    config = family.hf.config
    pixels, grids = _crops(family.hf, family.images)
    assert sorted(set(grids)) == [(2, 2), (2, 3), (3, 2)]
    index = _projected_layer(family.hf, pixels)
    hf = _sharpened_layer(family.hf, index)
    score, keys = family.adapter.vision_saliency(hf, family.images)
    features = family.adapter.encode_images(hf, family.images)
    assert score.shape == (features.flat.shape[0],) and keys.shape[0] == features.flat.shape[0]

    probs, ref_keys, hidden = _hf_eager_layer(hf, index, pixels)
    first = 1 if config.vision_feature_select_strategy == "default" else 0
    if family.adapter.vision_cls:  # CLIP: the CLS query's row, summed over heads
        assert family.name == "llava_next" and first == 1
        per_crop = probs[:, :, 0].sum(1)
    else:  # SigLIP: received by each patch, mean over heads, summed over the crop's queries
        assert family.name == "llava_onevision" and first == 0
        per_crop = probs.mean(1).sum(1)
        assert per_crop.sum(-1).tolist() == pytest.approx([probs.shape[-1]] * len(per_crop), rel=1e-5)
    per_crop = per_crop[:, first:]
    assert per_crop.std() > 0.1 * per_crop.mean()  # far from uniform: a misplaced row shows
    crop_keys = ref_keys.mean(1)[:, first:]
    sizes = family.images["image_sizes"]

    # the placement written here is HF's packing: it reproduces HF's packed features from the projected crops
    with torch.no_grad():
        projected = hf.model.multi_modal_projector(hidden[config.vision_feature_layer][:, first:])
        packed = hf.model.get_image_features(**family.images, return_dict=True).pooler_output
    placed = _place(config, projected, grids, sizes, hf.model.image_newline)
    assert [p.shape[0] for p in placed] == features.counts
    for mine, theirs in zip(placed, packed):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    for (rows, cols), size, p in zip(grids, sizes.tolist(), placed):  # and agrees with anyres_layout
        layout = anyres_layout(config, size)
        assert layout.crops == (rows, cols) and layout.views.shape[0] == p.shape[0]

    both = torch.cat([per_crop[..., None], crop_keys], -1)
    expected = torch.cat(_place(config, both, grids, sizes, both.new_zeros(both.shape[-1])))
    # float32 rounding (eager vs the model's sdpa in earlier layers), amplified by the 20x sharpened
    # queries and keys: far below the scores' spread and the keys' scale
    assert keys.abs().max() > 1
    torch.testing.assert_close(score, expected[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(keys, expected[:, 1:], rtol=1e-4, atol=1e-4)


@anyres
def test_anyres_newline_rows_are_zero(family: Family):
    """HF's newline positions (where its packed features are ``image_newline``) get score 0 and zero
    keys; every other token has a positive score."""
    score, keys = family.adapter.vision_saliency(family.hf, family.images)
    newline = torch.cat(family.newlines)
    assert newline.shape == score.shape and 0 < int(newline.sum()) < newline.numel()
    assert torch.equal(newline, family.adapter.encode_images(family.hf, family.images).views == -1)
    assert (score[newline] == 0).all() and (keys[newline] == 0).all()
    assert (score[~newline] > 0).all() and (keys[~newline].abs().amax(-1) > 0).all()


@anyres
def test_anyres_batch_equals_each_image_alone(family: Family):
    """Per-crop attention: an image's rows do not depend on the other images of the batch (nor on the
    zero crops its pixel tensor is padded with)."""
    pixels, _ = _crops(family.hf, family.images)
    hf = _sharpened_layer(family.hf, _projected_layer(family.hf, pixels))
    _assert_batch_equals_alone(family, hf)


@anyres
def test_anyres_rows_count_packed_tokens(family: Family):
    """One row per packed image token, for every image of the batch."""
    score, keys = family.adapter.vision_saliency(family.hf, family.images)
    features = family.adapter.encode_images(family.hf, family.images)
    assert score.shape == (features.flat.shape[0],) and keys.shape[0] == features.flat.shape[0]
    assert keys.shape[1] == family.hf.config.vision_config.hidden_size // family.hf.config.vision_config.num_attention_heads
    assert sum(features.counts) == features.flat.shape[0] == sum(family.counts)


def _assert_batch_equals_alone(family: Family, hf) -> None:
    """Each image's rows (score and keys) are the same in the batch and alone."""
    score, keys = family.adapter.vision_saliency(hf, family.images)
    counts = family.adapter.encode_images(hf, family.images).counts
    assert score.shape[0] == keys.shape[0] == sum(counts)
    for i, (s, k) in enumerate(zip(torch.split(score, counts), torch.split(keys, counts))):
        alone_score, alone_keys = family.adapter.vision_saliency(hf, family.adapter.select_rows(family.images, [i]))
        torch.testing.assert_close(s, alone_score, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(k, alone_keys, rtol=1e-5, atol=1e-6)
