"""bench.py end to end on the tiny model, and the 7B shapes on meta (FLOPs and KV accounting only)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _bench(tmp_path, *overrides):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "bench.py"), f"hydra.run.dir={out}", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), done.stdout


def test_bench_on_the_tiny_model_writes_every_arm(tmp_path, tiny_model_dir):
    record, stdout = _bench(
        tmp_path, f"model.pretrained={tiny_model_dir}", "sparsity.keep=0.25", "bench.new_tokens=12",
        "bench.repeats=1", "bench.warmup=0", "bench.device=cpu",
    )
    assert "dynamic" in stdout and "fastv" in stdout
    prefill, decode = record["prefill"], record["decode"]
    assert set(record["baselines"]) == {"fastv", "random"}
    assert 0 < prefill["flops_ratio"] < 1 and prefill["latency_ratio"] > 0
    assert decode["new_tokens"] == 12 and decode["tokens_per_s_dense"] > 0
    # 64 image tokens -> 16 kept; 11 fed tokens at rate 0.5 -> 5 kept (pattern keeps odd steps)
    assert decode["kv_ratio"] == pytest.approx((64 - 48 + 32 + 5) / (64 + 32 + 11))


@pytest.mark.slow
def test_7b_shapes_on_meta_reach_the_paper_ratio(tmp_path):
    record, _ = _bench(
        tmp_path, "model=dllava_7b", "model.random_init=true", "sparsity.keep=0.2", "bench.device=meta", "bench.new_tokens=256",
    )
    prefill = record["prefill"]
    assert prefill["flops_ratio_limit"] == pytest.approx(0.247, abs=1e-3)
    assert abs(prefill["flops_ratio"] - prefill["flops_ratio_limit"]) / prefill["flops_ratio_limit"] < 0.03
    assert record["decode"]["kv_ratio"] <= 0.55
    assert prefill["latency_ratio"] is None  # no timings on meta


ALL_BASELINES = ("fastv", "random", "dart", "divprune", "cdpruner", "visionzip", "pdrop")


def test_every_method_benches_at_its_cuts_and_selection_flops_are_what_flopcounter_counts(tiny_model_dir):
    """All training-free arms in one run on CPU: the arms that choose from values (DART, DivPrune,
    CDPruner) are counted on the real run, FastV and PyramidDrop (stages at layers 1 and 2) on meta, and
    every FlopCounterMode count equals the decoder on each layer's realised tokens (their cuts: before
    the LLM, at K, or staged) plus ``flops.selection_flops``, the formula eval's cost model uses;
    VisionZip adds its second tower pass (reading the attention)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from dllava.bench.inference import bench_image, make_prompt, run_bench
    from dllava.inference import flops
    from dllava.inference.selection import cut_plan, image_tokens_per_layer, prune_layer
    from dllava.sparse.model import DynamicLlava

    torch.manual_seed(0)
    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)  # 3 layers, K = 1: PyramidDrop has stages
    model = DynamicLlava(base, {"keep": 0.25, "layer": 1}, {"d_model": 32, "heads": 4, "ff": 64, "layers": 1}).eval()
    record = run_bench(model, "cpu", keep=0.25, batch_size=2, text_tokens=6, new_tokens=3, warmup=0, repeats=1,
                       baselines=ALL_BASELINES)
    assert list(record["baselines"]) == list(ALL_BASELINES)
    shape = flops.DecoderShape.from_config(model.text_config)
    image = bench_image(model.adapter, model.base.config, None)
    ids, _ = make_prompt(model.base.config, image, 2, 6, "cpu", 0)
    length = ids.shape[1]
    last_image = max(i for i, t in enumerate(ids[0].tolist()) if t == model.base.config.image_token_id)
    instruction = length - 1 - last_image
    for name in ("dart", "divprune", "cdpruner", "pdrop", "fastv"):
        plan = cut_plan(name, torch.tensor([[64]]), 0.25, prune_layer(name, 1), shape.layers)
        per_layer = image_tokens_per_layer(plan, [64], [0], shape.layers)[0]
        expected = flops.prefill_flops_layers(shape, [length - 64 + n for n in per_layer], batch=2)
        expected += 2 * flops.selection_flops(name, shape, length, 64, per_layer, 1, instruction)
        assert record["baselines"][name]["prefill"]["flops_prompt"] == expected, name
    # before the LLM every layer runs the kept tokens: cheaper than the same budget cut at K
    arms = record["baselines"]
    assert arms["divprune"]["prefill"]["flops_ratio"] < arms["fastv"]["prefill"]["flops_ratio"]
    assert arms["visionzip"]["prefill"]["flops"] > arms["divprune"]["prefill"]["flops"]  # + the tower pass


def test_long_decoding_runs_whatever_baselines_are_listed_and_meta_refuses_what_needs_values(tiny_model_dir):
    """The long decode compares dense, Dynamic-LLaVA and FastV even when bench.baselines leaves FastV
    out; on the meta device the value-reading methods and the instruction-aware predictor are refused
    up front, naming why."""
    import copy

    import torch
    from transformers import LlavaForConditionalGeneration

    from dllava.bench.inference import run_bench
    from dllava.sparse.model import DynamicLlava

    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    model = DynamicLlava(base, {"keep": 0.25, "layer": 1}, {"d_model": 32, "heads": 4, "ff": 64, "layers": 1}).eval()
    record = run_bench(model, "cpu", keep=0.25, batch_size=1, text_tokens=4, new_tokens=2, warmup=0, repeats=1,
                       baselines=["random"], decode_lengths=[4], decode_device="meta")
    assert list(record["baselines"]) == ["random"]
    assert set(next(iter(record["decode_long"].values()))) == {"dense", "dynamic", "fastv"}
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match=r"bench.baselines \['divprune'\] choose tokens from the features' values"):
        run_bench(meta, "meta", keep=0.25, baselines=["divprune"])
    torch.manual_seed(0)
    aware = DynamicLlava(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir),
                         {"keep": 0.25, "layer": 1, "image_predictor": "instruction_aware"},
                         {"d_model": 32, "heads": 4, "ff": 64, "layers": 1}).to("meta")
    with pytest.raises(ValueError, match="instruction-aware image predictor reads the prompt's text"):
        run_bench(aware, "meta", keep=0.25)
