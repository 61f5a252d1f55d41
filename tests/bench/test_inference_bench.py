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
