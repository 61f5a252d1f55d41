"""The reader benchmark runs end to end on a few generated samples (timings are not checked)."""

import json

from dllava.data.bench import main, workers_needed


def test_bench_writes_rates_and_workers_needed(tmp_path):
    out = tmp_path / "bench.json"
    report = main(["--samples", "16", "--workers", "0", "--image-size", "56", "--samples-per-shard", "8",
                   "--out", str(out)])
    assert json.loads(out.read_text()) == report
    row = report["results"][0]
    assert row["samples"] == 16 and row["samples_per_s"] > 0
    assert report["image_tokens"] == 16 and report["workers_per_gpu"] >= 1


def test_workers_needed_rounds_up():
    assert workers_needed(per_worker=5.0, per_gpu_batch=8, step_time_s=1.0) == 2
    assert workers_needed(per_worker=48.0, per_gpu_batch=8, step_time_s=1.25) == 1
