"""Sharded validation and test (FSDP2 on two CPU processes): equal forward passes on every rank whatever
the shard count, metrics that count every sample once, and a collective timeout instead of a hang."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import CONF

ROOT = CONF.parent
ODD = 33  # validation and test samples, one shard each: more ranks than shards, an odd total


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory) -> Path:
    from dllava.data.synthetic import generate

    out = tmp_path_factory.mktemp("odd_shards")
    generate(out, train=64, val=ODD, test=ODD, seed=0, samples_per_shard=64)
    assert len(list(out.glob("val-*.tar"))) == len(list(out.glob("test-*.tar"))) == 1
    return out


def _cmd(tiny_model_dir, shards, run_dir, *extra):
    return [
        sys.executable, str(ROOT / "train.py"),
        f"model.pretrained={tiny_model_dir}", "data.synthetic=null",
        f"data.train_urls={shards}/train-*.tar", f"data.val_urls={shards}/val-*.tar",
        f"data.test_urls={shards}/test-*.tar", "data.num_workers=0", "data.batch_size=4",
        "data.eval_batch_size=4", "data.epoch_samples=16", "module.max_new_tokens=2",
        "trainer.max_steps=2", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
        "callbacks.model_summary=null", "logger=csv", f"hydra.run.dir={run_dir}", *extra,
    ]


SHARDED = ("trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true")
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def _run(tiny_model_dir, shards, run_dir, *extra, timeout=300):
    result = subprocess.run(_cmd(tiny_model_dir, shards, run_dir, *extra), capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT, env=ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((Path(run_dir) / "summary.json").read_text())["metrics"]


@pytest.mark.slow
def test_fsdp2_with_one_val_and_one_test_shard_runs_equal_forwards_on_both_ranks(tiny_model_dir, odd_shards, tmp_path):
    """33 samples in one shard, 2 ranks, 2 loader workers: rank 1 used to read no batch and the run hung
    (FSDP: every forward is a collective). Now both ranks run the same batches and forwards, and every
    sample is scored once."""
    probe = tmp_path / "forwards"
    metrics = _run(tiny_model_dir, odd_shards, tmp_path / "run", *SHARDED, "data.num_workers=2",
                   "+callbacks.probe._target_=tests.training.eval_probes.EvalForwards", f"+callbacks.probe.out={probe}")
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    for stage in ("validate", "test"):
        assert ranks[0][stage]["batches"] == ranks[1][stage]["batches"] > 0, ranks
        assert ranks[0][stage]["lm_forwards"] == ranks[1][stage]["lm_forwards"] > 0, ranks
        assert ranks[0][stage]["rows"] == ranks[1][stage]["rows"] == 17  # ceil(33 / 2)
        assert ranks[0][stage]["valid"] + ranks[1][stage]["valid"] == ODD
    assert metrics["val/samples"] == metrics["test/samples"] == ODD
    assert metrics["val/data_skipped"] == metrics["test/data_skipped"] == 0
    print("forwards per rank:", ranks)


@pytest.mark.slow
def test_sharded_test_metrics_equal_one_process_over_all_samples(tiny_model_dir, odd_shards, tmp_path):
    """The untrained model's test metrics on 2 FSDP2 ranks (padding rows included) equal one process's
    over the same 33 samples with another batch size: each sample counted once, padding never."""
    test_only = ("train=false", "test=true")
    sharded = _run(tiny_model_dir, odd_shards, tmp_path / "sharded", *SHARDED, *test_only)
    single = _run(tiny_model_dir, odd_shards, tmp_path / "single", *test_only, "data.eval_batch_size=11")
    keys = [k for k in single if k.startswith("test/")]
    assert {"test/loss", "test/answer_acc", "test/acc_color", "test/vision_keep", "test/lm_loss"} <= set(keys)
    for key in keys:
        assert sharded[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    assert sharded["test/samples"] == ODD


@pytest.mark.slow
def test_a_rank_that_skips_collectives_fails_the_run_within_the_timeout(tiny_model_dir, odd_shards, tmp_path):
    """Rank 1 stalls while rank 0 enters validation's collectives: with trainer.strategy.timeout_s=20 the
    run ends non-zero soon after, saying why and which setting, instead of hanging. (The timeout also
    bounds the start-up rendezvous, so it leaves room for a loaded machine to start rank 1.)"""
    cmd = _cmd(tiny_model_dir, odd_shards, tmp_path / "run", *SHARDED, "trainer.strategy.timeout_s=20", "test=false",
               "+callbacks.stall._target_=tests.training.eval_probes.StallsOneRank", "+callbacks.stall.seconds=600")
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT, env=ENV)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "trainer.strategy.timeout_s=20 s for the other ranks" in result.stderr, result.stderr[-3000:]
    assert "different numbers of collectives" in result.stderr
    assert "Timed out waiting" in result.stderr  # gloo's own error, from inside validation
    assert elapsed < 300, elapsed  # rank 1 sleeps 600 s: it was killed, not waited for
    print(f"failed after {elapsed:.0f} s")


@pytest.mark.slow
def test_a_validation_split_that_yields_no_sample_fails_naming_the_split_and_shards(tiny_model_dir, odd_shards, tmp_path):
    """Every validation sample text-only (dropped): the run used to 'complete' without val metrics."""
    from dllava.data.shards import convert
    from tests.data.llava_set import single

    (tmp_path / "images").mkdir()
    (tmp_path / "text.json").write_text(json.dumps([single(f"t{i}", None, question="hi ?") for i in range(3)]))
    convert(tmp_path / "text.json", tmp_path / "images", tmp_path / "text", progress=False)
    cmd = _cmd(tiny_model_dir, odd_shards, tmp_path / "run", f"data.val_urls={tmp_path}/text/shard-*.tar",
               "data.epoch_samples=8", "test=false")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert result.returncode != 0
    assert "data.val_urls: the val pass used no sample (3 counted in " in result.stderr, result.stderr[-3000:]
    assert "text/shard-000000.tar" in result.stderr
