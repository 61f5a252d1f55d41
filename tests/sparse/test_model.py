"""DynamicLlava against HF's own LLaVA forward, gradients to the predictors, and its save formats."""

import json

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from dllava.sparse.model import PREDICTORS_FILE, SPARSITY_FILE, DynamicLlava

PREDICTOR = {"d_model": 32, "heads": 4, "ff": 64, "layers": 2}


def _batch(config, batch=3, length=90, answer_from=75, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_image = config.image_seq_length
    ids = torch.randint(5, 40, (batch, length), generator=g)
    ids[:, 4 : 4 + n_image] = config.image_token_id
    mask = torch.ones_like(ids)
    mask[1, length - 8 :] = 0  # right padding, as in training
    mask[2, length - 14 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :answer_from] = -100
    ends = mask.sum(-1)
    span = torch.stack([torch.full_like(ends, answer_from), ends], dim=-1)
    pixels = torch.randn(batch, 3, 96, 96, generator=g)
    return ids, mask, labels, span, pixels


def _dynamic(path, dtype=torch.float32, **sparsity):
    llava = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
    return DynamicLlava(llava, {"layer": 1, "text_min_len": 8, **sparsity}, PREDICTOR)


@pytest.mark.parametrize("layer", [1, 2])
def test_all_kept_equals_hf_llava_forward_fp32(tiny_model_dir, layer):
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    dynamic = _dynamic(tiny_model_dir, layer=layer).eval()
    ids, mask, _, _, pixels = _batch(hf.config)
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        ours = dynamic(ids, mask, pixels, mode="all")
    assert ours.vision_keep.tolist() == [1.0, 1.0, 1.0]
    assert dynamic.llava.config.text_config._attn_implementation == "dllava_gated"
    diff = (reference - ours.logits)[mask.bool()].abs().max().item()
    assert diff <= 1e-5, diff


def test_all_kept_equals_hf_llava_forward_fp64(tiny_model_dir):
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    dynamic = _dynamic(tiny_model_dir, dtype=torch.float64).eval()
    ids, mask, _, _, pixels = _batch(hf.config)
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels.double()).logits
        ours = dynamic(ids, mask, pixels.double(), mode="all").logits
    assert (reference - ours)[mask.bool()].abs().max().item() <= 1e-10


def test_dropping_image_tokens_changes_later_layers_only(tiny_model_dir):
    dynamic = _dynamic(tiny_model_dir).eval()
    ids, mask, _, _, pixels = _batch(dynamic.llava.config)
    with torch.no_grad():
        full = dynamic(ids, mask, pixels, mode="all").logits
        pruned = dynamic(ids, mask, pixels, mode="generate", keep=0.25)
    assert pruned.image_keep.sum(-1).tolist() == [16.0, 16.0, 16.0]  # int(64 * 0.25)
    assert not torch.allclose(full, pruned.logits, atol=1e-4)
    # the text before the image sees no image key at all, so it is unaffected
    torch.testing.assert_close(full[:, :4], pruned.logits[:, :4])


def test_lm_loss_alone_reaches_both_predictors(tiny_model_dir):
    dynamic = _dynamic(tiny_model_dir).train()
    ids, mask, labels, span, pixels = _batch(dynamic.llava.config)
    out = dynamic(ids, mask, pixels, labels=labels, answer_span=span, mode="train", tau=1.0)
    assert out.text_eligible.tolist() == [True, False, False]  # answers of 15, 7, 1 tokens; text_min_len 8
    out.lm_loss.backward()  # lambda = 0: no budget term
    for name in ("image_predictor", "text_predictor"):
        grads = [p.grad for p in getattr(dynamic, name).parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name


def test_short_answers_are_never_text_sparsified(tiny_model_dir):
    dynamic = _dynamic(tiny_model_dir, text_min_len=100).train()
    ids, mask, labels, span, pixels = _batch(dynamic.llava.config)
    out = dynamic(ids, mask, pixels, labels=labels, answer_span=span, mode="train")
    # the text predictor still runs in training (every rank needs its gradients under FSDP), but no
    # sample is eligible, so nothing is gated and the text budget term is 0
    assert out.text_eligible.tolist() == [False, False, False]
    assert out.text_keep.tolist() == [0.0, 0.0, 0.0] and float(out.budget_loss_text) == 0.0



def test_save_then_from_pretrained_gives_identical_logits(tiny_model_dir, tmp_path):
    dynamic = _dynamic(tiny_model_dir).eval()
    with torch.no_grad():
        for p in dynamic.predictors().parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the fresh init, so loading must really happen
    dynamic.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / SPARSITY_FILE).read_text())["sparsity"]["layer"] == 1
    loaded = DynamicLlava.from_pretrained(tmp_path / "saved").eval()
    ids, mask, _, _, pixels = _batch(dynamic.llava.config)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, mask, pixels, mode="eval").logits, dynamic(ids, mask, pixels, mode="eval").logits, rtol=0, atol=0
        )
    # the same directory is still a stock llava-hf checkpoint for HF's own loader
    stock = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert stock.config.text_config._attn_implementation != "dllava_gated"


def test_exported_predictors_attach_to_a_stock_checkpoint(tiny_model_dir, tmp_path):
    dynamic = _dynamic(tiny_model_dir).eval()
    dynamic.export_predictors(tmp_path / "predictors")
    assert sorted(p.name for p in (tmp_path / "predictors").iterdir()) == sorted([PREDICTORS_FILE, SPARSITY_FILE])
    attached = DynamicLlava.from_pretrained(tiny_model_dir, predictors=tmp_path / "predictors").eval()
    for (name, a), (_, b) in zip(attached.predictors().state_dict().items(), dynamic.predictors().state_dict().items()):
        assert torch.equal(a, b), name


def test_predictors_for_another_hidden_size_are_refused(tiny_model_dir, tmp_path):
    dynamic = _dynamic(tiny_model_dir)
    dynamic.export_predictors(tmp_path / "p")
    record = json.loads((tmp_path / "p" / SPARSITY_FILE).read_text())
    record["hidden_size"] = 4096
    (tmp_path / "p" / SPARSITY_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="hidden size 4096"):
        DynamicLlava.from_pretrained(tiny_model_dir, predictors=tmp_path / "p")


def test_layer_at_or_beyond_the_decoder_is_refused(tiny_model_dir):
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="sparsity.layer"):
        DynamicLlava(llava, {"layer": 3}, PREDICTOR)


def test_greedy_generation_reports_kept_image_tokens(tiny_model_dir):
    dynamic = _dynamic(tiny_model_dir, keep=0.1).eval()
    ids, mask, _, _, pixels = _batch(dynamic.llava.config, length=70)
    tokens, kept = dynamic.generate_greedy(ids, torch.ones_like(ids), pixels, 3, eos_token_id=2, pad_token_id=0)
    assert tokens.shape[0] == 3 and 1 <= tokens.shape[1] <= 3
    assert kept.tolist() == [6, 6, 6]  # int(64 * 0.1)
