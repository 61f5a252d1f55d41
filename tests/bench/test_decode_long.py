"""Long decoding (bench.decode_lengths, the paper's Table 4) on a tiny LLaVA (3 decoder layers, K = 2).

References: ``FlopCounterMode`` on the engine's real no-cache decoding steps on CPU (the SDPA math
backend: torch registers no FLOPs formula for the fused CPU kernel, the math one decomposes into
the two matmuls), an independent count of the K/V bytes from the kept tokens, and the real cached
decode against the meta accounting.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dllava.bench import inference as bench
from dllava.inference import flops
from dllava.inference.engine import SparseEngine
from tests.conftest import ROOT

PREDICTOR = {"d_model": 16, "heads": 2, "ff": 32, "layers": 1}
KEEP = 0.25  # 64 image tokens -> 16 kept
TEXT = 6  # prompt text tokens


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)  # the fresh predictors' init, whichever tests ran before
    model, device = bench.build_model({"pretrained": str(tiny_model_dir), "predictor": PREDICTOR},
                                      {"keep": KEEP, "layer": 2}, None, "cpu", 8)
    assert device == "cpu"
    return model


@pytest.fixture(scope="module")
def meta_model(model):
    return copy.deepcopy(model).to("meta")


def _inputs(model, batch: int):
    config = model.base.config
    image = bench.bench_image(model.adapter, config)
    ids, mask = bench.make_prompt(config, image, batch, TEXT, "cpu")
    positions = bench.prompt_positions(model, (ids, mask), image, batch)
    pixels = bench.bench_pixels(image, config, batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.encode_images(pixels)
    return ids, mask, positions, features


def _real_nocache_steps(engine, ids, mask, positions, features, fed: int) -> tuple[list[int], list[list[int]]]:
    """FlopCounterMode of each real no-cache step (``SparseEngine.step`` without cache) on CPU, and
    per sample the generated tokens each step ran in layers >= K (``TextMembership.computing``)."""
    _, state = engine.start(ids, mask, image_features=features, position_ids=positions, use_cache=False)
    tokens = torch.randint(3, 40, (ids.shape[0], fed), generator=torch.Generator().manual_seed(1))
    counts = []
    for s in range(fed):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            engine.step(state, tokens[:, s])
        counts.append(counter.get_total_flops())
    return counts, state.text.computing


# -- no-cache FLOPs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method, text", [("dense", "off"), ("dynamic", 0.5), ("fastv", "off"), ("dynamic", "learned")])
def test_each_no_cache_step_is_what_the_real_engine_runs(model, meta_model, method, text):
    """The per-step FLOPs from the quadratics counted on meta equal FlopCounterMode on every real
    no-cache step, a batch of 2 (learned text: the fresh predictor's own decisions, which differ
    between the samples, so the batch runs its larger count)."""
    batch, fed = 2, 9
    ids, mask, positions, features = _inputs(model, batch)
    real, computing = _real_nocache_steps(SparseEngine(model, method=method, keep=KEEP, text=text),
                                          ids, mask, positions, features, fed)
    engine = SparseEngine(meta_model, method=method, keep=KEEP, text=text)
    prompt = ids.shape[1]
    kept = features.kept_counts(engine.image_keep_share, engine.budget)
    steps = bench.nocache_step_tokens(prompt, [prompt - c + k for c, k in zip(features.counts, kept)], computing)
    assert [N for N, _ in steps] == list(range(prompt + 1, prompt + fed + 1))
    # fitted on a narrower range than the steps use: the quadratics must extrapolate exactly
    counter = bench.NoCacheFlops(engine, batch, (prompt + 1, prompt + 3), (steps[0][1], steps[0][1] + 2))
    assert [counter.step(N, n) for N, n in steps] == real
    if text == "learned":
        assert counter.text > 0 and computing[0] != computing[1]


def test_bench_no_cache_flops_for_a_short_length_equal_the_real_run(model):
    """bench's decode_long FLOPs (counted on meta) for T = 10 equal FlopCounterMode over the real
    no-cache run of the same T - 1 steps on CPU, for every arm; the ratios are theirs."""
    T = 10
    record = bench.run_bench(model, "cpu", keep=KEEP, text_tokens=TEXT, new_tokens=2, warmup=0, repeats=1,
                             decode_lengths=[T], decode_device="meta")
    ids, mask, positions, features = _inputs(model, 1)
    arms = record["decode_long"][str(T)]
    total = {}
    for name, (method, text) in {"dense": ("dense", "off"), "dynamic": ("dynamic", 0.5), "fastv": ("fastv", "off")}.items():
        real, _ = _real_nocache_steps(SparseEngine(model, method=method, keep=KEEP, text=text), ids, mask, positions, features, T - 1)
        total[name] = sum(real)
        assert arms[name]["nocache_flops"] == total[name], name
    assert arms["dynamic"]["nocache_flops_ratio"] == total["dynamic"] / total["dense"] < 1
    assert arms["dense"]["nocache_flops_ratio"] == 1.0
    # and the closed form eval's decode comparison uses (dllava.inference.flops), from the same token counts
    shape = flops.DecoderShape.from_config(model.text_config)
    prompt, fed = 64 + TEXT, T - 1
    computing = {"dense": list(range(1, T)), "fastv": list(range(1, T)),
                 "dynamic": [t // 2 + 1 for t in range(fed)]}  # rate 0.5: tokens 1, 3, 5, ... stay
    for name, kept_images in {"dense": 64, "dynamic": 16, "fastv": 16}.items():
        expected = flops.nocache_decode_flops(shape, 2, prompt, prompt - 64 + kept_images, computing[name])
        assert arms[name]["nocache_flops"] == expected, name


def test_learned_text_runs_the_cached_decode_and_counts_its_decisions(model):
    """With learned text (bench.text_keep_rate=null) auto runs the cached decode on CPU; its no-cache
    FLOPs (the cached run's decisions, the predictor once a step) equal the real no-cache run of the
    same forced tokens, whose decisions the engine makes from the same layer-K inputs."""
    T = 9
    record = bench.run_bench(model, "cpu", keep=KEEP, text_tokens=TEXT, new_tokens=2, warmup=0, repeats=1,
                             text_keep_rate=None, decode_lengths=[T])
    assert record["decode_long_setup"]["device"] == "cpu"
    assert record["decode_long_setup"]["arms"]["dynamic"]["text"] == "learned"
    ids, mask, positions, features = _inputs(model, 1)
    forced = bench.forced_tokens(model.base.config, 1, T - 1)
    engine = SparseEngine(model, method="dynamic", keep=KEEP, text="learned")
    _, state = engine.start(ids, mask, image_features=features, position_ids=positions, use_cache=False)
    real = 0
    for s in range(T - 1):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            engine.step(state, forced[:, s])
        real += counter.get_total_flops()
    dynamic = record["decode_long"][str(T)]["dynamic"]
    assert dynamic["nocache_flops"] == real
    assert dynamic["text_tokens_kept"] == state.text.staying_after[0][-1]
    assert 0 < dynamic["text_tokens_kept"] < T - 1  # the fresh predictor drops some


def test_quadratic_fit_is_exact_and_refuses_what_is_not_quadratic(meta_model):
    q = bench.Quadratic.through([(3, 3 * 9 + 7 * 3 + 11), (10, 3 * 100 + 70 + 11), (50, 3 * 2500 + 350 + 11)])
    assert [q(m) for m in (0, 1, 4096)] == [11, 21, 3 * 4096**2 + 7 * 4096 + 11]
    with pytest.raises(RuntimeError, match="not a quadratic"):
        bench.fit_quadratic(lambda m: m**3, 1, 100)
    engine = SparseEngine(meta_model, method="dynamic", keep=KEEP, text="learned")
    counter = bench.NoCacheFlops(engine, 1, (80, 90), (30, 40))
    for m in (1, 200, 511):  # far from the fitted points: the direct meta count of every block
        assert counter.dense(m) == counter.count_dense(m)
        assert counter.sparse(m) == counter.count_sparse(m)
    assert counter.text == counter.count_text() > 0


# -- the record ------------------------------------------------------------------------------------
def _kv_bytes(model, batch: int, prompt: int, image_kept: int, fed: int, text_kept: int) -> int:
    """K + V bytes counted independently: tokens kept x layers x 2 x kv heads x head dim x 4 bytes (fp32)."""
    text = model.text_config
    layers, K = text.num_hidden_layers, 2
    per_token = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4
    dense_layers = prompt + fed
    sparse_layers = prompt - 64 + image_kept + text_kept
    return batch * per_token * (K * dense_layers + (layers - K) * sparse_layers)


@pytest.mark.parametrize("decode_device", ["meta", "cpu"])
def test_decode_long_record(model, decode_device):
    lengths, batch = [5, 12], 2
    record = bench.run_bench(model, "cpu", keep=KEEP, batch_size=batch, text_tokens=TEXT, new_tokens=2, warmup=0,
                             repeats=1, decode_lengths=lengths[::-1], decode_device=decode_device)
    assert list(record["decode_long"]) == ["5", "12"]
    setup = record["decode_long_setup"]
    assert setup["device"] == decode_device and setup["prompt_tokens"] == 64 + TEXT
    prompt = 64 + TEXT
    for T in lengths:
        arms = record["decode_long"][str(T)]
        assert set(arms) == {"dense", "dynamic", "fastv"}
        for arm in arms.values():
            assert {"kv_ratio", "kv_ratio_generated", "nocache_flops_ratio", "kv_bytes", "kv_bytes_per_token",
                    "nocache_flops", "peak_memory_bytes", "tokens_per_s"} <= set(arm)
            assert arm["new_tokens"] == T and arm["fed_tokens"] == T - 1
        dense, dynamic, fastv = arms["dense"], arms["dynamic"], arms["fastv"]
        assert dense["kv_ratio"] == dense["nocache_flops_ratio"] == dense["kv_ratio_generated"] == 1.0
        fed = T - 1
        # rate 0.5 keeps the odd steps: fed // 2 of the fed tokens
        assert dynamic["kv_bytes"] == _kv_bytes(model, batch, prompt, 16, fed, fed // 2)
        assert dense["kv_bytes"] == _kv_bytes(model, batch, prompt, 64, fed, fed)
        assert fastv["kv_bytes"] == _kv_bytes(model, batch, prompt, 16, fed, fed)
        assert dynamic["kv_ratio"] == dynamic["kv_bytes"] / dense["kv_bytes"] < fastv["kv_ratio"] < 1
        per_layer = 2 * 4 * 32 * 4  # one token in one layer: K and V, 4 kv heads of 32, fp32
        assert dynamic["kv_bytes_generated"] == batch * per_layer * (2 * fed + 1 * (fed // 2))
        assert dynamic["kv_bytes_per_token"] == dynamic["kv_bytes_generated"] / (batch * fed)
        assert dynamic["kv_ratio_generated"] == pytest.approx((2 * fed + fed // 2) / (3 * fed))
        assert fastv["kv_ratio_generated"] == 1.0
        assert dynamic["nocache_flops_ratio"] < fastv["nocache_flops_ratio"] < 1
        for arm in arms.values():
            if decode_device == "meta":
                assert arm["tokens_per_s"] is None and arm["kv_bytes_allocated"] is None
                assert arm["peak_memory_measure"] == "kv_cache_accounted" and arm["peak_memory_bytes"] == arm["kv_bytes"]
            else:
                assert arm["tokens_per_s"] > 0
                assert arm["peak_memory_measure"] == "kv_cache_allocated"
                assert arm["peak_memory_bytes"] == arm["kv_bytes_allocated"] >= arm["kv_bytes"]
    assert "decode" in record and "baselines" in record  # the rest of the record stays


def test_meta_accounting_equals_the_real_cached_decode(model):
    kwargs = {"keep": KEEP, "text_tokens": TEXT, "new_tokens": 2, "warmup": 0, "repeats": 1, "decode_lengths": [7]}
    meta = bench.run_bench(model, "cpu", decode_device="meta", **kwargs)["decode_long"]["7"]
    real = bench.run_bench(model, "cpu", decode_device="cpu", **kwargs)["decode_long"]["7"]
    for name in ("dense", "dynamic", "fastv"):
        for key in ("kv_bytes", "kv_bytes_generated", "nocache_flops", "kv_tokens_sparse_layer", "text_tokens_kept"):
            assert meta[name][key] == real[name][key], (name, key)


def test_no_decode_lengths_leaves_the_record_as_it_was(model):
    record = bench.run_bench(model, "cpu", keep=KEEP, text_tokens=TEXT, new_tokens=2, warmup=0, repeats=1)
    assert "decode_long" not in record and "decode_long_setup" not in record


# -- bad settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths, error", [
    ([0], ValueError), ([16, -1], ValueError), ([513], ValueError), ([8, 8], ValueError), ([1.5], TypeError),
    (["1024"], TypeError), ([True], TypeError), (1024, TypeError), ("1024", TypeError),
])
def test_bad_decode_lengths_name_the_key(lengths, error):
    with pytest.raises(error, match="bench.decode_lengths"):
        bench.check_decode_lengths(lengths, max_positions=512)


def test_lengths_beyond_the_decoders_positions_fail_before_any_work(model):
    with pytest.raises(ValueError, match=r"bench.decode_lengths.*max_position_embeddings \(512\)"):
        bench.run_bench(model, "cpu", keep=KEEP, decode_lengths=[64, 513], decode_device="meta")
    assert bench.check_decode_lengths([512, 1, 64], max_positions=512) == [1, 64, 512]
    assert bench.check_decode_lengths(None) == bench.check_decode_lengths([]) == []


def test_decode_device_choices():
    assert bench.resolve_decode_device("auto", "cpu", learned_text=False) == "meta"
    assert bench.resolve_decode_device("auto", "cpu", learned_text=True) == "cpu"
    assert bench.resolve_decode_device("auto", "cuda", learned_text=False) == "cuda"
    assert bench.resolve_decode_device("cpu", "cpu", learned_text=False) == "cpu"
    with pytest.raises(ValueError, match="bench.decode_device=cuda"):
        bench.resolve_decode_device("cuda", "cpu", learned_text=False)
    with pytest.raises(ValueError, match="bench.decode_device=meta cannot read learned"):
        bench.resolve_decode_device("meta", "cpu", learned_text=True)


# -- bench.py --------------------------------------------------------------------------------------
def _bench(tmp_path, *overrides):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "bench.py"), f"hydra.run.dir={out}", *overrides]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=600), out


def test_bench_py_writes_decode_long_and_its_table(tmp_path, tiny_model_dir):
    done, out = _bench(tmp_path, f"model.pretrained={tiny_model_dir}", "sparsity.keep=0.25", "bench.new_tokens=2",
                       "bench.repeats=1", "bench.warmup=0", "bench.device=cpu", "bench.decode_lengths=[16,8]")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "bench.json").read_text())
    assert list(record["decode_long"]) == ["8", "16"]
    assert "no-cache TFLOPs" in done.stdout and "KV gen ratio" in done.stdout


@pytest.mark.parametrize("value", ["[0]", "[1024]", "abc"])
def test_bench_py_refuses_bad_decode_lengths(tmp_path, tiny_model_dir, value):
    done, out = _bench(tmp_path, f"model.pretrained={tiny_model_dir}", "bench.device=cpu", f"bench.decode_lengths={value}")
    assert done.returncode != 0 and "bench.decode_lengths" in done.stderr
    assert not (out / "bench.json").exists()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_no_cache_flops_equal_the_real_run(tmp_path, family):
    """M-RoPE positions (3 rows), Qwen2's biased projections, Qwen3-VL's q/k norms and DeepStack
    additions: the meta count still equals FlopCounterMode over the real no-cache steps."""
    from dllava.model.tiny_qwen import save_tiny_qwen

    path = save_tiny_qwen(tmp_path / family, family, seed=0, num_hidden_layers=4)
    model, _ = bench.build_model({"pretrained": str(path), "predictor": PREDICTOR}, {"keep": KEEP, "layer": 2}, None, "cpu", 8)
    T = 7
    record = bench.run_bench(model, "cpu", keep=KEEP, text_tokens=TEXT, new_tokens=2, warmup=0, repeats=1, image_px=112,
                             decode_lengths=[T], decode_device="meta")
    config = model.base.config
    image = bench.bench_image(model.adapter, config, 112)
    ids, mask = bench.make_prompt(config, image, 1, TEXT, "cpu")
    positions = bench.prompt_positions(model, (ids, mask), image, 1)
    assert positions.shape[0] == 3
    with torch.no_grad():
        features = model.encode_images(bench.bench_pixels(image, config, 1, torch.Generator().manual_seed(0)))
    for name, (method, text) in {"dense": ("dense", "off"), "dynamic": ("dynamic", 0.5), "fastv": ("fastv", "off")}.items():
        real, _ = _real_nocache_steps(SparseEngine(model, method=method, keep=KEEP, text=text), ids, mask, positions, features, T - 1)
        assert record["decode_long"][str(T)][name]["nocache_flops"] == sum(real), name
