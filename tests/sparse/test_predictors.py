import pytest
import torch

from dllava.sparse.config import PredictorConfig, SparsityConfig
from dllava.sparse.predictors import ImagePredictor, TextPredictor


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_sizes_match_the_reported_parameter_counts():
    # PAPER.md section 3: about 8.57 M / 2.27 M for H = 4096 and 9.10 M / 2.80 M for H = 5120
    config = PredictorConfig()
    with torch.device("meta"):
        assert _params(ImagePredictor(4096, config)) / 1e6 == pytest.approx(8.57, abs=0.01)
        assert _params(TextPredictor(4096, config)) / 1e6 == pytest.approx(2.27, abs=0.01)
        assert _params(ImagePredictor(5120, config)) / 1e6 == pytest.approx(9.10, abs=0.01)
        assert _params(TextPredictor(5120, config)) / 1e6 == pytest.approx(2.80, abs=0.01)


def test_shapes_and_token_mixing():
    config = PredictorConfig(d_model=32, heads=4, ff=64, layers=2)
    image, text = ImagePredictor(48, config), TextPredictor(48, config)
    x = torch.randn(2, 10, 48)
    assert image(x).shape == (2, 10, 2) and text(x).shape == (2, 10, 2)
    y = x.clone()
    y[:, 5:] = torch.randn(2, 5, 48) * 3  # change other tokens only
    assert not torch.allclose(image(x)[:, :5], image(y)[:, :5])  # image scores see the whole image
    torch.testing.assert_close(text(x)[:, :5], text(y)[:, :5])  # text scores are per token


@pytest.mark.parametrize(
    "field, value, key",
    [("keep", 1.5, "sparsity.keep"), ("keep", 0.0, "sparsity.keep"), ("text_keep", -0.1, "sparsity.text_keep"),
     ("layer", 0, "sparsity.layer"), ("loss_weight", -1.0, "sparsity.loss_weight"), ("tau_end", 0.0, "sparsity.tau_end")],
)
def test_bad_sparsity_values_name_the_key(field, value, key):
    with pytest.raises(ValueError, match=key):
        SparsityConfig(**{field: value})


def test_layer_beyond_the_decoder_names_the_key():
    with pytest.raises(ValueError, match=r"sparsity.layer must be < the number of decoder layers \(3\)"):
        SparsityConfig(layer=3).check_layers(3)


def test_bad_predictor_sizes_name_the_key():
    with pytest.raises(ValueError, match="model.predictor.d_model"):
        PredictorConfig(d_model=30, heads=3)


# -- the instruction-aware image predictor (sparsity.image_predictor=instruction_aware) ------------
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from dllava.inference import flops  # noqa: E402
from dllava.sparse.predictors import InstructionAwareImagePredictor, init_predictor_weights  # noqa: E402

SMALL = PredictorConfig(d_model=32, heads=4, ff=64, layers=2)


def _aware(seed=0, hidden=48, trained_cross=True):
    """An instruction-aware predictor with PyTorch's init and a non-zero cross-attention output (as a
    trained one has), so the instruction matters; with ``trained_cross=False``, DynamicVLM's fresh init
    (HF-style, zero cross-attention output)."""
    torch.manual_seed(seed)
    predictor = InstructionAwareImagePredictor(hidden, SMALL)
    if trained_cross:
        torch.nn.init.normal_(predictor.cross.proj.weight, std=0.2)
    else:
        init_predictor_weights(predictor)
    return predictor


def test_instruction_changes_the_aware_logits_only():
    aware = _aware()
    original = ImagePredictor(48, SMALL)
    x = torch.randn(2, 10, 48)
    question, other = torch.randn(2, 6, 48), torch.randn(2, 6, 48)
    assert not torch.allclose(aware(x, instruction=question), aware(x, instruction=other), atol=1e-4)
    torch.testing.assert_close(original(x, instruction=question), original(x, instruction=other), rtol=0, atol=0)
    torch.testing.assert_close(original(x, instruction=question), original(x), rtol=0, atol=0)  # ignored
    with pytest.raises(ValueError, match=r"instruction_aware\) needs instruction="):
        aware(x)


def test_instruction_padding_is_masked_and_an_empty_instruction_contributes_nothing():
    aware = _aware()
    x = torch.randn(2, 10, 48)
    words = torch.randn(2, 7, 48)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 4:] = False  # sample 1 has 4 instruction tokens, then padding
    padded = aware(x, instruction=words, instruction_valid=valid)
    alone = aware(x[1:], instruction=words[1:, :4], instruction_valid=valid[1:, :4])
    torch.testing.assert_close(padded[1:], alone, rtol=1e-5, atol=1e-5)
    junk = words.clone()
    junk[1, 4:] = torch.randn(3, 48) * 10  # what sits in the padding never matters
    torch.testing.assert_close(aware(x, instruction=junk, instruction_valid=valid), padded, rtol=0, atol=0)
    # no valid instruction token: finite, and the cross-attention adds exactly nothing
    empty = torch.zeros(2, 7, dtype=torch.bool)
    empty[0] = True
    out = aware(x, instruction=words, instruction_valid=empty)
    assert torch.isfinite(out).all()
    blind = ImagePredictor(48, SMALL)
    blind.load_state_dict(aware.state_dict(), strict=False)
    torch.testing.assert_close(out[1], blind(x)[1], rtol=0, atol=0)
    assert not torch.allclose(out[0], blind(x)[0], atol=1e-4)
    # no instruction column at all
    assert torch.isfinite(aware(x, instruction=torch.zeros(2, 0, 48), instruction_valid=empty[:, :0])).all()


def test_fresh_instruction_aware_predictor_is_the_original_one():
    original = ImagePredictor(48, SMALL)
    init_predictor_weights(original)
    for _ in range(2):  # a standalone predictor and one initialised as DynamicVLM does
        fresh = _aware(seed=1, trained_cross=False)
        assert not fresh.cross.proj.weight.any() and not fresh.cross.proj.bias.any()
        fresh.load_state_dict(original.state_dict(), strict=False)
        x, words = torch.randn(3, 10, 48), torch.randn(3, 5, 48)
        torch.testing.assert_close(fresh(x, instruction=words), original(x), rtol=0, atol=0)
    standalone = InstructionAwareImagePredictor(48, SMALL)  # PyTorch's own init: the output is zero too
    assert not standalone.cross.proj.weight.any()


def test_an_original_state_dict_leaves_exactly_the_cross_attention_missing():
    aware = InstructionAwareImagePredictor(48, SMALL)
    missing, unexpected = aware.load_state_dict(ImagePredictor(48, SMALL).state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(k for k in aware.state_dict() if k.startswith("cross."))
    assert sorted(missing) == sorted(
        f"cross.{name}" for name in ("instruction_norm.weight", "instruction_norm.bias", "instruction_embed.weight",
                                     "instruction_embed.bias", "norm.weight", "norm.bias", "q.weight", "kv.weight",
                                     "proj.weight", "proj.bias")
    )


def test_instruction_aware_parameter_counts():
    with torch.device("meta"):
        for hidden, extra in ((4096, 3_155_968), (5120, 3_682_304)):  # 2H + (H+1)d + 2d + 3d^2 + d^2 + d, d = 512
            aware, original = InstructionAwareImagePredictor(hidden, PredictorConfig()), ImagePredictor(hidden, PredictorConfig())
            assert _params(aware) - _params(original) == _params(aware.cross) == extra


@pytest.mark.parametrize("aware", [False, True])
@pytest.mark.parametrize("n_image, m", [(10, 3), (7, 1), (16, 0), (5, 9), (64, 12)])
def test_image_predictor_flops_match_the_flop_counter(aware, n_image, m):
    # on meta tensors SDPA decomposes to bmm, which FlopCounterMode counts (its fused CPU kernel counts 0)
    with torch.device("meta"):
        predictor = (InstructionAwareImagePredictor if aware else ImagePredictor)(48, SMALL)
        x, words = torch.empty(2, n_image, 48), torch.empty(2, m, 48)
        valid, words_valid = torch.ones(2, n_image, dtype=torch.bool), torch.ones(2, m, dtype=torch.bool)
    counter = FlopCounterMode(display=False)
    with counter:
        predictor(x, valid=valid, instruction=words, instruction_valid=words_valid)
    expected = flops.image_predictor_flops(48, SMALL, n_image, batch=2, instruction_tokens=m, instruction_aware=aware)
    assert counter.get_total_flops() == expected
    if not aware:  # the original predictor's count does not depend on the instruction keywords
        assert expected == flops.image_predictor_flops(48, SMALL, n_image, batch=2)


def test_image_predictor_option_is_validated_and_defaults_to_original():
    assert SparsityConfig().image_predictor == "original"
    assert SparsityConfig(image_predictor="instruction_aware").image_predictor == "instruction_aware"
    saved = SparsityConfig().to_dict()
    del saved["image_predictor"]  # a config saved before the option existed
    assert SparsityConfig(**saved).image_predictor == "original"
    with pytest.raises(ValueError, match="sparsity.image_predictor must be one of 'original', 'instruction_aware'"):
        SparsityConfig(image_predictor="question")


def test_startup_checks_accept_the_image_predictor_key():
    from dllava.startup import check_sparsity

    check_sparsity({"keep": 0.2, "image_predictor": "instruction_aware"})
    check_sparsity({"keep": 0.2})  # without the key
    with pytest.raises(ValueError, match="sparsity.image_predictor"):
        check_sparsity({"image_predictor": "both"})
