"""Vision-tower FLOPs and the decoder-layer count against torch's FlopCounterMode on tiny Qwen models.

The towers run on CPU with SDPA forced to its math backend: CPU's fused SDPA kernel has no FLOP
formula registered (FlopCounterMode counts it as 0), while the math backend decomposes into the two
``bmm`` that it counts, ``4 h n_q n_k d`` exactly as the formulas registered for the GPU kernels.
The real-size towers run on the meta device instead (as in test_flops.py), with the grid-derived
index tensors precomputed on CPU, since the towers ``torch.split`` by ``cu_seqlens.tolist()``.
"""

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
    get_vision_window_index,
)

from dllava.inference import flops, vision_flops
from tests.helpers import CONF

TEXT = dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
QWEN2_5 = dict(
    text_config=dict(TEXT, rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 2, 2])),
    # window_size 56 = 2x2 merged tokens of 28 px: grids of 4+ merged tokens a side split into windows
    vision_config=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=48,
                       patch_size=14, window_size=56, fullatt_block_indexes=[1, 3]),
    image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
)
QWEN3 = dict(
    text_config=dict(TEXT, head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[2, 3, 3],
                                                             mrope_interleaved=True)),
    vision_config=dict(depth=4, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=48,
                       patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0, 2]),
    image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
)
# (t, h, w) in patches: square, non-square, edge windows smaller than a full one, an exact tiling,
# two frames, and two images in one call
GRIDS = [
    [(1, 8, 8)],
    [(1, 6, 10)],
    [(1, 4, 12)],
    [(2, 6, 4)],
    [(1, 6, 10), (1, 8, 4)],
]


def _counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


def _saved_and_loaded(tmp_path_factory, model_cls, config):
    config._attn_implementation = "sdpa"
    path = tmp_path_factory.mktemp(config.model_type)
    torch.manual_seed(0)
    model_cls(config).save_pretrained(path)
    return model_cls.from_pretrained(path, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def qwen2_5(tmp_path_factory):
    return _saved_and_loaded(tmp_path_factory, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(**QWEN2_5))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _saved_and_loaded(tmp_path_factory, Qwen3VLForConditionalGeneration, Qwen3VLConfig(**QWEN3))


def _tower_flops(model, grids) -> int:
    vc = model.config.vision_config
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), vc.in_channels * vc.temporal_patch_size * vc.patch_size**2)
    return _counted(lambda: model.model.get_image_features(pixels, grid))


@pytest.mark.parametrize("grids", GRIDS, ids=str)
def test_qwen2_5_vl_tower_equals_flop_counter(qwen2_5, grids):
    counted = _tower_flops(qwen2_5, grids)
    assert counted == vision_flops.qwen2_5_vl_vision_flops(qwen2_5.config.vision_config, grids)
    assert counted == vision_flops.qwen2_5_vl_vision_flops(qwen2_5.config.vision_config, torch.tensor(grids))


@pytest.mark.parametrize("grids", GRIDS, ids=str)
def test_qwen3_vl_tower_equals_flop_counter(qwen3, grids):
    assert _tower_flops(qwen3, grids) == vision_flops.qwen3_vl_vision_flops(qwen3.config.vision_config, grids)


@pytest.mark.parametrize("grids", GRIDS + [[(1, 28, 44), (2, 16, 16)]], ids=str)
@pytest.mark.parametrize("window_size", [56, 112])
def test_window_lengths_equal_transformers_windows(grids, window_size):
    _, cu = get_vision_window_index(torch.tensor(grids), spatial_merge_size=2, window_size=window_size, patch_size=14)
    assert vision_flops.qwen2_5_vl_window_lengths(grids, window_size, 14, 2) == (cu[1:] - cu[:-1]).tolist()


def test_windows_matter_in_the_tiny_tower(qwen2_5):
    """The per-window count differs from a whole-image n^2 count: a test that could not tell them
    apart would not test the window term."""
    vc = qwen2_5.config.vision_config
    grids = [(1, 8, 12)]
    windows = vision_flops.qwen2_5_vl_window_lengths(grids, vc.window_size, vc.patch_size, vc.spatial_merge_size)
    assert len(windows) == 6 and sum(windows) == 96
    assert sum(n * n for n in windows) < 96**2


def _meta_kwargs(tower, grid: torch.Tensor) -> dict:
    """The grid-derived index tensors the towers accept precomputed (``transformers.vision_utils``):
    made on CPU (they call ``.tolist()``) and moved to meta, except the ``cu_seqlens`` that the
    attention splits by, which stay on CPU."""
    vc = tower.config
    kwargs = {"position_ids": get_vision_position_ids(grid, vc.spatial_merge_size).to("meta"),
              "cu_seqlens": get_vision_cu_seqlens(grid)}
    if isinstance(tower, Qwen2_5_VisionTransformerPretrainedModel):
        window_index, cu_windows = get_vision_window_index(grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
        kwargs.update(window_index=window_index.to("meta"), cu_window_seqlens=cu_windows)
    else:
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners, spatial_merge_size=vc.spatial_merge_size)
        kwargs.update(interp_indices=indices.to("meta"), interp_weights=weights.to("meta"))
    return kwargs


@pytest.mark.parametrize("option, config_cls, tower_cls, formula", [
    ("qwen2_5_vl_7b", Qwen2_5_VLConfig, Qwen2_5_VisionTransformerPretrainedModel, vision_flops.qwen2_5_vl_vision_flops),
    ("qwen3_vl_8b", Qwen3VLConfig, Qwen3VLVisionModel, vision_flops.qwen3_vl_vision_flops),
])
def test_real_size_towers_on_meta(option, config_cls, tower_cls, formula):
    """The published towers (conf/model), with their real window size, full-attention blocks and
    DeepStack layers, on the meta device: a 448x672 px image, then two images in one call."""
    arch = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{option}.yaml").architecture)
    vc = config_cls(**arch).vision_config
    vc._attn_implementation = "sdpa"
    with torch.device("meta"):
        tower = tower_cls._from_config(vc).eval()
    for grids in ([(1, 32, 48)], [(1, 36, 20), (1, 16, 16)]):
        grid = torch.tensor(grids)
        pixels = torch.empty(int(grid.prod(-1).sum()), vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, device="meta")
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            tower(pixels, grid_thw=grid.to("meta"), **_meta_kwargs(tower, grid))
        assert counter.get_total_flops() == formula(vc, grids)


def test_deepstack_indexes_outside_depth_never_run(tmp_path_factory):
    config = Qwen3VLConfig(**{**QWEN3, "vision_config": {**QWEN3["vision_config"], "deepstack_visual_indexes": [1, 9]}})
    model = _saved_and_loaded(tmp_path_factory, Qwen3VLForConditionalGeneration, config)
    assert vision_flops.qwen3_vl_deepstack_layers(model.config.vision_config) == [1]
    assert _tower_flops(model, [(1, 4, 6)]) == vision_flops.qwen3_vl_vision_flops(model.config.vision_config, [(1, 4, 6)])


def test_bad_grids_are_refused():
    vc = Qwen2_5_VLConfig(**QWEN2_5).vision_config
    for grids, match in [([], "empty"), ([(1, 5, 8)], "multiples"), ([(1, 8)], "three"), ([(0, 8, 8)], "three")]:
        with pytest.raises(ValueError, match=match):
            vision_flops.qwen2_5_vl_vision_flops(vc, grids)


def test_llava_vision_flops_is_the_old_name():
    assert flops.vision_flops is vision_flops.llava_vision_flops


# -- decoder layers --------------------------------------------------------------------------------
def _decoder_layer_flops(model, n: int, batch: int = 2) -> int:
    text = model.model.language_model
    hidden = torch.randn(batch, n, model.config.text_config.hidden_size)
    positions = torch.arange(n).expand(3, batch, n)  # the 3-row M-RoPE ids, all rows equal for text
    cos_sin = text.rotary_emb(hidden, positions)
    mask = torch.ones(n, n, dtype=torch.bool).tril().expand(batch, 1, n, n).clone()
    mask[0, :, :, :2] = False  # a left-padded first sample: the kernel still sees every key
    mask[0, :, :2, :2] = torch.eye(2, dtype=torch.bool)
    return _counted(lambda: text.layers[0](hidden, attention_mask=mask, position_embeddings=cos_sin))


@pytest.mark.parametrize("family", ["qwen2_5", "qwen3"])
def test_decoder_layer_equals_flop_counter(request, family):
    """q/k/v biases (Qwen2.5-VL) and q/k RMS norms (Qwen3-VL) add no matmul: layer_flops already
    counts both with GQA (4 query heads, 2 KV heads)."""
    model = request.getfixturevalue(family)
    assert model.model.language_model.layers[0].self_attn.config._attn_implementation == "sdpa"
    shape = flops.DecoderShape.from_config(model.config.text_config)
    assert _decoder_layer_flops(model, 7) == flops.layer_flops(shape, 7, 7, batch=2)
