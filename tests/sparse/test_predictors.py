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
