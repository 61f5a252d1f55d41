"""Where each image method cuts, how much it keeps, and its settings (conf/method/<name>.yaml)."""

from pathlib import Path

import pytest
import torch
import yaml

from dllava.inference.selection import (
    BEFORE_LLM,
    IMAGE_METHODS,
    check_options,
    cut_plan,
    image_tokens_per_layer,
    method_defaults,
    prune_layer,
)
from dllava.sparse.decisions import num_kept

CONF = Path(__file__).resolve().parents[2] / "conf" / "method"


@pytest.mark.parametrize("method", IMAGE_METHODS)
def test_every_method_has_a_config_stating_its_paper_defaults(method):
    """conf/method/<name>.yaml holds the same settings and values as the rule's own defaults, so the
    config and code cannot drift apart (a setting added in code must be stated in the config)."""
    config = yaml.safe_load((CONF / f"{method}.yaml").read_text())
    assert config["name"] == method
    assert (config.get("options") or {}) == method_defaults(method)


def test_a_misspelt_setting_is_refused_naming_the_method():
    with pytest.raises(ValueError, match=r"method.options.ratios is not a setting of method=pdrop \(its settings: stage_layers, ratio\)"):
        check_options("pdrop", {"ratios": 0.5})
    with pytest.raises(ValueError, match="its settings: none"):
        check_options("divprune", {"theta": 1})
    assert check_options("dart", {"image_pivots": 2}) == {"image_pivots": 2}


def test_prune_layer_moves_only_rules_that_read_no_particular_layer():
    assert [prune_layer(m, 2) for m in ("divprune", "cdpruner", "visionzip", "dart", "fastv", "pdrop")] == [0, 0, 0, 2, 2, 2]
    assert prune_layer("divprune", 2, 2) == 2 and prune_layer("random", 2, 0) == 0
    for method in ("dynamic", "fastv", "dart", "pdrop"):
        with pytest.raises(ValueError, match="cuts at K=2 only"):
            prune_layer(method, 2, 0)
    with pytest.raises(ValueError, match="0 \\(before the LLM\\) or the sparse layer K=2"):
        prune_layer("divprune", 2, 1)


@pytest.mark.parametrize("method", [m for m in IMAGE_METHODS if m != "dense"])
@pytest.mark.parametrize("sizes", [[[576]], [[64], [50]], [[144, 144, 0], [144, 0, 0]]])
@pytest.mark.parametrize("keep", [0.1, 0.2, 0.35])
def test_every_single_cut_keeps_int_n_keep_and_pdrop_the_same_token_layers(method, sizes, keep):
    layers, k = 32, 2
    plan = cut_plan(method, torch.tensor(sizes), keep, 0 if method in BEFORE_LLM else k, layers)
    single = [sum(num_kept(s, keep) for s in row if s) for row in sizes]
    if method != "pdrop":
        assert plan == [(0 if method in BEFORE_LLM else k, [[num_kept(s, keep) if s else 0 for s in row] for row in sizes])]
        return
    per_layer = image_tokens_per_layer(plan, [sum(row) for row in sizes], [0] * len(sizes), layers)
    assert [layer for layer, _ in plan] == [2, 8, 16, 24]
    for row, target in zip(per_layer, single):
        assert row[:k] == [row[0]] * k and row[0] == max(row)  # all image tokens below K
        tail = sum(row[k:])
        assert tail <= (layers - k) * target  # never more than the single cut's token-layers
        assert tail > (layers - k) * target - 8 * len(sizes[0])  # short of it by less than a stage per group
        assert row[k:] == sorted(row[k:], reverse=True)


def test_a_family_without_vision_saliency_cannot_run_visionzip_and_says_so(tiny_model_dir):
    """VisionZip reads the vision tower's attention through the adapter; a family adapter that does not
    provide it is refused before anything runs (and a comparison skips the method, naming why)."""
    from transformers import LlavaForConditionalGeneration

    from dllava.families.base import FamilyAdapter
    from dllava.families.llava import LlavaAdapter
    from dllava.inference.engine import SparseEngine
    from dllava.inference.selection import unsupported
    from dllava.sparse.model import DynamicLlava

    class WithoutSaliency(LlavaAdapter):
        vision_saliency = FamilyAdapter.vision_saliency

    assert unsupported("visionzip", LlavaAdapter()) is None
    assert "has no vision_saliency" in unsupported("visionzip", WithoutSaliency())
    assert unsupported("divprune", WithoutSaliency()) is None
    model = DynamicLlava(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), {"layer": 1}, {"d_model": 32, "heads": 4, "ff": 64, "layers": 1})
    model.__class__ = type("OtherFamily", (type(model),), {"adapter": property(lambda self: WithoutSaliency())})
    with pytest.raises(NotImplementedError, match="method=visionzip: the llava adapter has no vision_saliency"):
        SparseEngine(model, method="visionzip", keep=0.25, text="off")
    SparseEngine(model, method="divprune", keep=0.25, text="off")  # the other methods run


def test_pyramid_drop_leaves_out_stages_that_would_keep_what_the_last_kept():
    """A stage keeping the previous stage's count is no cut: it is left out of the plan, so nothing is
    ranked there and nothing counted (at keep 1.0 PyramidDrop is a single cut keeping everything)."""
    plan = cut_plan("pdrop", torch.tensor([[64]]), 1.0, 2, 8)
    assert plan == [(2, [[64]])]
    for keep in (0.3, 0.6, 0.9):
        plan = cut_plan("pdrop", torch.tensor([[64], [40]]), keep, 2, 32)
        assert all(b[1] != a[1] for a, b in zip(plan, plan[1:]))


def test_continuing_answers_needs_the_same_cut_and_settings_defaults_filled_in():
    from dllava.eval.runner import Arm, check_answered

    record = {"model_id": "m", "question_id": 1, "metadata": {
        "method": "divprune", "keep": 0.2, "text": "off", "budget": "global", "options": {}, "prune_layer": 2,
        "prefill_flops_dense": 1}}
    arm = Arm("divprune", 0.2, "off", options={})
    check_answered([record], "m", arm, prune_layer=2)
    with pytest.raises(ValueError, match="prune_layer=2, not of .* prune_layer=0"):
        check_answered([record], "m", arm, prune_layer=0)  # DivPrune at K continued before the LLM
    spelled = {**record, "metadata": {**record["metadata"], "method": "cdpruner", "options": {"theta": None}}}
    check_answered([spelled], "m", Arm("cdpruner", 0.2, "off", options={}), prune_layer=2)  # the default, spelled out
    with pytest.raises(ValueError, match="options="):
        check_answered([spelled], "m", Arm("cdpruner", 0.2, "off", options={"theta": 0.5}), prune_layer=2)
