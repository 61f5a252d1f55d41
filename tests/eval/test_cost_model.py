"""The eval cost model with per-question image-token counts (Qwen's dynamic resolution).

References: ``FlopCounterMode`` on the engine's prefill of each question alone (meta device, the
question's own image size) and on HF's own vision tower (CPU, SDPA math backend, as
tests/inference/test_vision_flops.py)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dllava.eval.loading import LoadedModel
from dllava.eval.runner import Arm, CostModel, summarize
from dllava.families import ImageFeatures
from dllava.inference.engine import SparseEngine
from dllava.inference.selection import image_budget
from dllava.model.tiny_qwen import build_tiny_qwen
from dllava.sparse.model import DynamicVLM

PREDICTOR = {"d_model": 16, "heads": 2, "ff": 32, "layers": 1}
# (rows, cols) token grids of three questions' images: square, wide, tall and larger
GRIDS = [(4, 4), (2, 6), (6, 4)]


def _counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def loaded(request):
    base, processor = build_tiny_qwen(request.param, seed=0, num_hidden_layers=3)
    base.config._attn_implementation = "sdpa"
    model = DynamicVLM(base.eval(), {"keep": 0.25, "layer": 2}, PREDICTOR).eval()
    return LoadedModel(model=model, processor=processor, name="tiny", path="", device="cpu")


def _prompt(config, n_image: int, text: int = 5) -> torch.Tensor:
    ids = [3] * 2 + [config.vision_start_token_id] + [config.image_token_id] * n_image + [config.vision_end_token_id] + [4] * text
    return torch.tensor([ids])


@pytest.mark.parametrize("method", ["dynamic", "fastv", "random", "dense"])
def test_prefill_of_each_question_is_what_the_engine_counts_for_it_alone(loaded, method):
    model = loaded.model
    config = model.base.config
    arm = Arm(method, 1.0 if method == "dense" else 0.25)
    cost = CostModel(loaded, arm, layer=2)
    meta = copy.deepcopy(model).to("meta")
    engine = SparseEngine(meta, method=method, keep=arm.keep, text="off")
    dense = SparseEngine(meta, method="dense", text="off")
    hidden = model.text_config.hidden_size
    for rows, cols in GRIDS:
        n = rows * cols
        ids = _prompt(config, n)
        positions = model.adapter.prompt_positions(model.base, ids, torch.ones_like(ids), {"image_grid_thw": torch.tensor([[1, 2 * rows, 2 * cols]])})
        features = ImageFeatures(torch.empty(n, hidden, device="meta"), [n], [(rows, cols)])
        inputs = (ids.to("meta"), torch.ones_like(ids, device="meta"))
        given = {"image_features": features, "position_ids": positions.to("meta")}
        kept = image_budget(method, n, arm.keep)
        assert cost.prefill(ids.shape[1], kept, n) == _counted(partial(engine.start, *inputs, **given)), (rows, cols)
        assert cost.prefill_dense(ids.shape[1]) == _counted(partial(dense.start, *inputs, **given))


def test_vision_flops_are_the_hf_towers_count_on_each_questions_image(loaded):
    model = loaded.model
    vc = model.base.config.vision_config
    cost = CostModel(loaded, Arm("dense"), layer=2)
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    counts = []
    for rows, cols in GRIDS:
        grid = torch.tensor([[1, 2 * rows, 2 * cols]])
        pixels = torch.randn(int(grid.prod()), width)
        counted = _counted(partial(model.base.model.get_image_features, pixels, grid))
        assert cost.vision(rows * cols, (rows, cols)) == counted
        counts.append(counted)
    assert len(set(counts)) == 3  # the grids matter: one count for every question would be wrong
    assert cost.vision(0) == 0


def _record(n_image: int, kept: int, prompt_len: int, cost: CostModel, grid) -> dict:
    return {"text": "red", "metadata": {
        "method": cost.arm.method, "keep": cost.arm.keep, "text": "off", "image_tokens": n_image, "image_tokens_kept": kept,
        "text_tokens_fed": 1, "text_tokens_kept": 1, "kv_bytes": 10, "kv_bytes_dense": 20, "kind": "color",
        "prefill_flops": cost.prefill(prompt_len, kept, n_image), "prefill_flops_dense": cost.prefill_dense(prompt_len),
        "prefill_flops_paper": cost.paper(kept, n_image), "vision_flops": cost.vision(n_image, grid),
        "reference": "red", "correct": True,
    }}


def test_summary_reports_the_mean_of_per_question_counts(loaded):
    cost = CostModel(loaded, Arm("random", 0.25), layer=2)
    records = [_record(r * c, image_budget("random", r * c, 0.25), r * c + 9, cost, (r, c)) for r, c in GRIDS]
    s = summarize(records, cost)
    assert s["image_tokens"] == pytest.approx((16 + 12 + 24) / 3)
    assert s["image_tokens_kept"] == pytest.approx((4 + 3 + 6) / 3)
    assert s["vision_keep"] == pytest.approx(0.25)
    assert s["vision_flops"] == pytest.approx(sum(cost.vision(r * c, (r, c)) for r, c in GRIDS) / 3)
    assert s["prefill_flops"] == pytest.approx(sum(r["metadata"]["prefill_flops"] for r in records) / 3)
    same = summarize(records[:1] * 2, cost)
    assert same["image_tokens"] == 16 and isinstance(same["image_tokens"], int)
    assert same["vision_flops"] == records[0]["metadata"]["vision_flops"]
