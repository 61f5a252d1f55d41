"""VisionZip's saliency on the Qwen towers (``QwenAdapter.vision_saliency``), which have no CLS token:
per merged image token, the attention its 2x2 patches receive in the tower's last block (mean over
heads, summed over the queries of the same image) and that block's keys (mean over heads and patches).

References nobody here wrote: HF's own eager attention of the last vision block (the probabilities and
rotated keys its ``eager_attention_forward`` computes, recorded by wrapping that function while the
vision config asks for eager attention), and HF's own merger output order, matched row by row against
the merger applied to the blocks' output (the tower's internal order), so Qwen2.5-VL's window
reordering is undone without reading ``window_index``. The prompts are the conftest's left-padded batch
of three images of different sizes.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from dllava.families import adapter_for

from .conftest import Family

QWEN = ("qwen2_5_vl", "qwen3_vl")
pytestmark = pytest.mark.parametrize("family", QWEN, indirect=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hf_eager_last_block(hf: torch.nn.Module, images: dict[str, torch.Tensor]):
    """HF's eager attention of the last vision block: per attention call (one per ``cu_seqlens``
    segment) its probabilities (heads, L, L) and keys (heads, L, d), and the tower's output."""
    tower = hf.model.visual
    attn = tower.blocks[-1].attn
    modeling = importlib.import_module(type(attn).__module__)
    original = modeling.eager_attention_forward
    probs, keys = [], []

    def recording(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if module is attn:
            assert attention_mask is None
            probs.append(weights[0].detach().float())
            keys.append(key[0].detach().float())
        return out, weights

    before = attn.config._attn_implementation
    modeling.eager_attention_forward = recording
    attn.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(images["pixel_values"].to(tower.dtype), grid_thw=images["image_grid_thw"])
    finally:
        attn.config._attn_implementation = before
        modeling.eager_attention_forward = original
    return probs, keys, out


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


def test_batch_equals_each_image_alone(family: Family):
    """Per-image segments: an image's rows do not depend on the other images of the batch."""
    hf = _sharpened(family.hf)
    score, keys = family.adapter.vision_saliency(hf, family.images)
    counts = family.adapter.encode_images(hf, family.images).counts
    for i, (s, k) in enumerate(zip(torch.split(score, counts), torch.split(keys, counts))):
        alone_score, alone_keys = family.adapter.vision_saliency(hf, family.adapter.select_rows(family.images, [i]))
        torch.testing.assert_close(s, alone_score, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(k, alone_keys, rtol=1e-5, atol=1e-6)


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


def test_windowed_last_block_is_refused(family: Family):
    if family.name != "qwen2_5_vl":
        pytest.skip("only Qwen2.5-VL has window-attention blocks")
    from dllava.model.tiny_qwen import build_tiny_qwen

    model, _ = build_tiny_qwen("qwen2_5_vl", vision_overrides={"fullatt_block_indexes": [1]})
    with pytest.raises(NotImplementedError, match="within windows"):
        adapter_for("qwen2_5_vl").vision_saliency(model.eval(), family.images)
