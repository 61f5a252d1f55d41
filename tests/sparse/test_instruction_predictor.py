"""DynamicVLM with sparsity.image_predictor=instruction_aware: what instruction the image predictor reads
(never an answer token), batching, gradients, initialisation from an original predictor, old configs."""

import json

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from dllava.sparse.model import SPARSITY_FILE, DynamicVLM, instruction_tokens
from dllava.sparse.predictors import ImagePredictor, InstructionAwareImagePredictor

from .test_model import PREDICTOR, _batch

AWARE = {"layer": 1, "text_min_len": 8, "image_predictor": "instruction_aware"}


def _model(path, trained=True, **sparsity):
    """A tiny instruction-aware DynamicVLM; ``trained``: predictor weights moved off the fresh init (so the
    logits are not ~1e-5 and the cross-attention output is not zero, i.e. the instruction matters)."""
    torch.manual_seed(0)
    model = DynamicVLM(LlavaForConditionalGeneration.from_pretrained(path), {**AWARE, **sparsity}, PREDICTOR)
    if trained:
        with torch.no_grad():
            for p in model.image_predictor.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _image_logits(model, *args, **kwargs):
    """The image predictor's logits in one DynamicVLM forward, and the forward's output."""
    seen = []
    handle = model.image_predictor.register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))
    try:
        out = model(*args, **kwargs)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0], out


def _differs(a, b):
    return (a - b).abs().max() > 1e-3 * a.abs().max()


def _other(ids, columns):
    changed = ids.clone()
    changed[:, columns] = 5 + (ids[:, columns] - 4) % 35  # other ordinary tokens
    assert not torch.equal(changed, ids)
    return changed


@pytest.mark.parametrize("multi_turn", [False, True])
def test_the_training_forward_never_shows_an_answer_token_to_the_predictor(tiny_model_dir, multi_turn):
    model = _model(tiny_model_dir).train()
    ids, mask, labels, span, pixels = _batch(model.base.config)
    # layout: text 0-3, image 4-67, question 68-74, final answer 75-. Multi-turn: 68-69 the first question,
    # 70-71 its answer, 72-74 the second question (whose hidden states have attended to that answer)
    if multi_turn:
        labels[:, 70:72] = ids[:, 70:72]

    def run(ids):
        return _image_logits(model, ids, mask, pixels, labels=ids.masked_fill(labels == -100, -100), answer_span=span,
                             mode="train")[0]

    reference = run(ids)
    hidden_from_it = [slice(76, 80)] + ([slice(70, 72), slice(72, 75)] if multi_turn else [])
    for columns in hidden_from_it:
        torch.testing.assert_close(run(_other(ids, columns)), reference, rtol=0, atol=0)
    changed = run(_other(ids, 69 if multi_turn else 72))  # a question token the predictor reads
    for row in range(3):
        assert _differs(reference[row], changed[row])


def test_eval_and_generate_read_the_prompt_only(tiny_model_dir):
    model = _model(tiny_model_dir).eval()
    ids, mask, _, span, pixels = _batch(model.base.config)
    changed = _other(ids, slice(76, 80))
    with torch.no_grad():
        # eval with an answer span (no labels): the span is excluded
        a = _image_logits(model, ids, mask, pixels, answer_span=span, mode="eval")[0]
        torch.testing.assert_close(_image_logits(model, changed, mask, pixels, answer_span=span, mode="eval")[0], a, rtol=0, atol=0)
        # generate: the tokens from generated_from on are generated text
        g = _image_logits(model, ids, mask, pixels, mode="generate", generated_from=75)[0]
        torch.testing.assert_close(_image_logits(model, changed, mask, pixels, mode="generate", generated_from=75)[0], g, rtol=0, atol=0)
        # without labels, span or generated_from: every valid token after the image, answer included
        assert _differs(_image_logits(model, ids, mask, pixels, mode="eval")[0],
                        _image_logits(model, changed, mask, pixels, mode="eval")[0])


def test_instruction_tokens_gathers_left_aligned_padded_rows():
    image = torch.zeros(3, 10, dtype=torch.bool)
    image[:, 1:4] = True
    image[2, 1:9] = True  # sample 2: only one token after its image
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    labels = torch.full((3, 10), -100)
    labels[0, 7:] = 1  # the final answer
    labels[0, 5] = 1  # an earlier turn's answer: the instruction stops before it
    labels[2, 9] = 1  # sample 2: everything after the image is answer
    hidden = torch.arange(30.0).reshape(3, 10, 1)
    words, valid = instruction_tokens(hidden, image, mask, labels=labels)
    # sample 0: position 4 only; 1: 4-7 (8-9 padding); 2: none
    assert valid.tolist() == [[True, False, False, False], [True, True, True, True], [False] * 4]
    assert words[0, 0, 0].item() == 4.0
    assert words[1, :, 0].tolist() == [14.0, 15.0, 16.0, 17.0]
    words, valid = instruction_tokens(hidden, image, mask)  # inference: every valid token after the image
    assert valid.sum(-1).tolist() == [6, 4, 1] and words[2, 0, 0].item() == 29.0


def test_left_padded_batch_equals_each_sample_alone(tiny_model_dir):
    model = _model(tiny_model_dir).eval()
    config = model.base.config
    n = config.image_seq_length
    g = torch.Generator().manual_seed(1)
    prompts = [[1, 5, 6, 7] + [config.image_token_id] * n + torch.randint(5, 40, (m,), generator=g).tolist()
               for m in (10, 4, 0)]  # ragged instructions; the last sample has none
    pixels = torch.randn(3, 3, 96, 96, generator=g)
    width = max(map(len, prompts))
    ids = torch.tensor([[3] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        batched, out = _image_logits(model, ids, mask, pixels, mode="eval")
        assert torch.isfinite(batched).all() and torch.isfinite(out.logits[mask.bool()]).all()
        for row, prompt in enumerate(prompts):
            alone, alone_out = _image_logits(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                                             pixels[row : row + 1], mode="eval")
            torch.testing.assert_close(batched[row : row + 1], alone, rtol=1e-4, atol=1e-5)
            assert torch.equal(out.image_keep[row : row + 1], alone_out.image_keep)
        assert _differs(batched[0], batched[1])  # a sanity check: different questions, different scores


def test_budget_loss_trains_the_cross_attention(tiny_model_dir):
    model = _model(tiny_model_dir, trained=False).train()  # the fresh init: zero cross-attention output
    cross = dict(model.image_predictor.cross.named_parameters())
    ids, mask, labels, span, pixels = _batch(model.base.config)
    labels[2, 68:] = ids[2, 68:].masked_fill(mask[2, 68:] == 0, -100)  # sample 2: no instruction token at all
    torch.manual_seed(0)
    out = model(ids, mask, pixels, labels=labels, answer_span=span, mode="train", tau=1.0)
    (out.lm_loss + model.sparsity.loss_weight * out.budget_loss_vision).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cross.values())
    assert cross["proj.weight"].grad.abs().sum() > 0  # the zero output projection learns first ...
    torch.optim.SGD(model.image_predictor.parameters(), lr=1.0).step()
    model.zero_grad()
    out = model(ids, mask, pixels, labels=labels, answer_span=span, mode="train", tau=1.0)
    (model.sparsity.loss_weight * out.budget_loss_vision).backward()  # ... then the budget loss alone reaches all
    for name, p in cross.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_fresh_instruction_aware_model_starts_as_the_original(tiny_model_dir, tmp_path):
    torch.manual_seed(3)
    original = DynamicVLM(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), {"layer": 1}, PREDICTOR).eval()
    with torch.no_grad():
        for p in original.predictors().parameters():
            p.add_(torch.randn_like(p) * 0.2)  # a "trained" original predictor
    original.export_predictors(tmp_path / "original")
    aware = _model(tiny_model_dir, trained=False, text_min_len=50).eval()
    assert isinstance(aware.image_predictor, InstructionAwareImagePredictor)
    assert type(original.image_predictor) is ImagePredictor
    aware.load_predictors(tmp_path / "original")  # only image_predictor.cross.* is missing: allowed
    ids, mask, _, _, pixels = _batch(original.base.config)
    with torch.no_grad():
        a, a_out = _image_logits(aware, ids, mask, pixels, mode="eval")
        o, o_out = _image_logits(original, ids, mask, pixels, mode="eval")
    torch.testing.assert_close(a, o, rtol=0, atol=0)
    assert torch.equal(a_out.image_keep, o_out.image_keep)
    # an instruction-aware export does not fit an original model
    aware.export_predictors(tmp_path / "aware")
    with pytest.raises(ValueError, match="predictors this model does not have"):
        original.load_predictors(tmp_path / "aware")


def test_saved_configs_with_and_without_the_key_load(tiny_model_dir, tmp_path):
    aware = _model(tiny_model_dir).eval()
    aware.save_pretrained(tmp_path / "aware")
    record = json.loads((tmp_path / "aware" / SPARSITY_FILE).read_text())
    assert record["sparsity"]["image_predictor"] == "instruction_aware"
    loaded = DynamicVLM.from_pretrained(tmp_path / "aware").eval()
    ids, mask, _, _, pixels = _batch(aware.base.config)
    with torch.no_grad():
        torch.testing.assert_close(_image_logits(loaded, ids, mask, pixels, mode="eval")[0],
                                   _image_logits(aware, ids, mask, pixels, mode="eval")[0], rtol=0, atol=0)
    # a save from before the option existed: no image_predictor key -> the original predictor
    original = DynamicVLM(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), {"layer": 1}, PREDICTOR)
    original.save_pretrained(tmp_path / "old")
    record = json.loads((tmp_path / "old" / SPARSITY_FILE).read_text())
    del record["sparsity"]["image_predictor"]
    (tmp_path / "old" / SPARSITY_FILE).write_text(json.dumps(record))
    old = DynamicVLM.from_pretrained(tmp_path / "old")
    assert old.sparsity.image_predictor == "original" and type(old.image_predictor) is ImagePredictor
