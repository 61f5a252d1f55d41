"""The dense path (stage=dense: HF's own forward and generate) gets the family's full inputs: for Qwen
HF falls back to 1-D positions without ``mm_token_type_ids``, silently (found when a dense-trained tiny
Qwen scored lower through the engine, whose M-RoPE positions are right, than through HF generate)."""

import torch

from dllava.sparse.model import DynamicVLM


def test_dense_forward_equals_hf_forward_with_the_processors_inputs(family):
    """``DynamicVLM`` without sparsity is HF's forward on everything the family's processor returns."""
    dense = DynamicVLM(family.hf, {"vision": False, "text": False})
    with torch.no_grad():
        ours = dense(family.input_ids, family.attention_mask, **family.images).logits
        reference = family.hf(**family.inputs).logits
    valid = family.attention_mask.bool()
    assert (ours - reference)[valid].abs().max() < 1e-5
    if family.name == "qwen2_5_vl":  # the silent fallback this guards against really changes the logits
        with torch.no_grad():
            bare = family.hf(input_ids=family.input_ids, attention_mask=family.attention_mask, **family.images).logits
        assert (bare - reference)[valid].abs().max() > 1e-4
