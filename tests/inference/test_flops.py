"""The FLOPs formulas against torch's FlopCounterMode on the real module graph (tiny, and 7B on meta)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaConfig, LlavaForConditionalGeneration

from dllava.inference import flops
from dllava.inference.engine import SparseEngine
from dllava.sparse.config import PredictorConfig
from dllava.sparse.model import DynamicLlava

SEVEN_B = dict(
    image_token_index=32000, image_seq_length=576, vision_feature_layer=-2, projector_hidden_act="gelu",
    vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
)


def test_paper_numbers():
    # PAPER.md section 10: 7B dense 10.07 T, Dynamic-LLaVA-7B 2.49 T, FastV k=3 3.2 T, 13B 19.6 / 4.66 T
    assert flops.paper_prefill_flops([576] * 32, 4096) / 1e12 == pytest.approx(10.07, abs=0.01)
    assert flops.paper_prefill_flops(flops.image_tokens_per_layer(32, 2, 576, 115), 4096) / 1e12 == pytest.approx(2.49, abs=0.01)
    assert flops.paper_prefill_flops(flops.image_tokens_per_layer(32, 3, 576, 144), 4096) / 1e12 == pytest.approx(3.2, abs=0.05)
    assert flops.paper_prefill_flops([576] * 40, 5120) / 1e12 == pytest.approx(19.6, abs=0.05)
    assert flops.paper_ratio_limit(32, 2, 576, 0.2, 4096) == pytest.approx(0.247, abs=0.001)


def _counted(fn):
    """FLOPs of ``fn`` as FlopCounterMode counts them. Run on meta tensors: on CPU tensors torch's
    fused SDPA kernel has no FLOP formula registered (it counts 0), on meta SDPA decomposes to bmm."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _prompt(config, n_text_before=3, n_text_after=5, device="cpu"):
    n = config.image_seq_length
    ids = torch.cat([torch.full((n_text_before,), 5), torch.full((n,), config.image_token_id), torch.full((n_text_after,), 6)])
    return ids[None].to(device), torch.ones(1, ids.numel(), dtype=torch.long, device=device)


@pytest.mark.parametrize("method", ["dense", "dynamic", "fastv"])
def test_full_count_equals_flop_counter_on_tiny(tiny_model_dir, method):
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    predictor = PredictorConfig(32, 4, 64, 2)
    model = DynamicLlava(llava, {"layer": 1}, predictor.to_dict()).eval().to("meta")
    ids, mask = _prompt(llava.config, device="meta")
    pixels = torch.empty(1, 3, 96, 96, device="meta")
    features = model.image_features(pixels)
    engine = SparseEngine(model, method=method, keep=0.25, text="off")
    counted = _counted(lambda: engine.start(ids, mask, image_features=features))
    shape = flops.DecoderShape.from_config(llava.config.text_config)
    n, n_img = ids.shape[1], features.shape[1]
    kept = n if method == "dense" else n - n_img + 16
    extra = {"dense": 0, "fastv": flops.fastv_score_flops(shape, n),
             "dynamic": flops.image_predictor_flops(shape.hidden, predictor, n_img)}[method]
    assert counted == flops.prefill_flops(shape, 1, n, kept, extra=extra)
    vision = _counted(lambda: model.image_features(pixels))
    assert vision == flops.vision_flops(llava.config.vision_config, shape.hidden)


def test_full_count_equals_flop_counter_for_7b_on_meta():
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(LlavaConfig(**SEVEN_B))
        model = DynamicLlava(llava, {"layer": 2, "keep": 0.2}, PredictorConfig().to_dict()).eval()
    ids, mask = _prompt(llava.config, device="meta")
    features = torch.empty(1, 576, 4096, device="meta")
    shape = flops.DecoderShape.from_config(llava.config.text_config)
    predictor = flops.image_predictor_flops(4096, PredictorConfig(), 576)
    counted = {m: _counted(lambda: SparseEngine(model, method=m, text="off").start(ids, mask, image_features=features)) for m in ("dense", "dynamic")}
    n = ids.shape[1]
    assert counted["dense"] == flops.prefill_flops(shape, 2, n, n)
    assert counted["dynamic"] == flops.prefill_flops(shape, 2, n, n - 576 + 115, extra=predictor)
    # the paper's convention counts image tokens only: measured on the image plus the one token that
    # predicts, the real ratio (predictor included) is within 3% of the convention's limit
    ids, mask = _prompt(llava.config, n_text_before=0, n_text_after=1, device="meta")
    measured = [_counted(lambda: SparseEngine(model, method=m, text="off").start(ids, mask, image_features=features)) for m in ("dense", "dynamic")]
    limit = flops.paper_ratio_limit(32, 2, 576, 0.2, 4096)
    assert abs(measured[1] / measured[0] - limit) / limit < 0.03, (measured[1] / measured[0], limit)
