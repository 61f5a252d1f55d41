"""End-to-end runs of train.py's train(): fast_dev_run, a short run that learns, summary.json, W&B."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import CONF, compose, read_wandb_history

ROOT = CONF.parent


def _overrides(tiny_model_dir, synthetic_dir, *extra):
    return [
        f"model.pretrained={tiny_model_dir}",
        "data.synthetic=null",
        f"data.train_urls={synthetic_dir}/train-*.tar",
        f"data.val_urls={synthetic_dir}/val-*.tar",
        f"data.test_urls={synthetic_dir}/test-*.tar",
        "data.num_workers=0",
        "data.batch_size=8",
        "data.eval_batch_size=32",
        "callbacks=none",
        *extra,
    ]


def _train(tmp_path, overrides):
    from train import train

    cfg = compose("train", overrides, output_dir=tmp_path)
    return train(cfg)


def test_fast_dev_run_completes(tiny_model_dir, synthetic_dir, tmp_path):
    metrics = _train(tmp_path, _overrides(tiny_model_dir, synthetic_dir, "debug=fdr"))
    assert "train/loss" in metrics


@pytest.mark.slow
def test_short_run_lowers_val_loss_and_writes_summary(tiny_model_dir, synthetic_dir, tmp_path):
    overrides = _overrides(
        tiny_model_dir, synthetic_dir, "logger=csv", "trainer.max_steps=30", "data.epoch_samples=240",
        "optim.lr=2e-3", "optim.warmup_ratio=0.0", "test=false",
    )
    import hydra

    from train import train

    cfg = compose("train", overrides, output_dir=tmp_path)
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    module = hydra.utils.instantiate(cfg.module, _convert_="all")
    before = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False).validate(module, dm)
    metrics = train(cfg)
    assert metrics["val/loss"] < 0.8 * before[0]["val/loss"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["val/loss"] == pytest.approx(float(metrics["val/loss"]))
    assert 0.0 <= summary["metrics"]["baseline/question_only_acc"] <= 1.0
    assert "val/answer_acc" in summary["metrics"] and "ckpt_path" in summary


@pytest.mark.slow
def test_wandb_offline_run_files_hold_logged_metrics(tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    metrics = _train(tmp_path, _overrides(tiny_model_dir, synthetic_dir, "logger=wandb", "trainer.max_steps=4",
                                          "data.epoch_samples=32", "test=false"))
    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    rows = read_wandb_history(run_files[0])
    logged = [r["val/loss"] for r in rows if "val/loss" in r]
    assert logged and logged[-1] == pytest.approx(float(metrics["val/loss"]), rel=1e-6)


@pytest.mark.slow
def test_multirun_sweep_gives_each_job_its_own_dir_and_summary(tiny_model_dir, synthetic_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable, str(ROOT / "train.py"), "-m", "optim.lr=1e-4,1e-3",
        *_overrides(tiny_model_dir, synthetic_dir, "logger=csv", "trainer.max_steps=2", "data.epoch_samples=16",
                    "test=false", "trainer.enable_progress_bar=false"),
        f"hydra.sweep.dir={sweep_dir}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted(sweep_dir.glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["0", "1"]
    for path, lr in zip(summaries, ("optim.lr=0.0001", "optim.lr=0.001")):
        assert lr in (path.parent / ".hydra" / "overrides.yaml").read_text()
        assert "val/loss" in json.loads(path.read_text())["metrics"]


@pytest.mark.slow
def test_sparse_run_logs_tau_keep_ratios_and_exports_predictors(tiny_model_dir, synthetic_dir, tmp_path):
    import csv

    from dllava.sparse.model import DynamicLlava

    overrides = _overrides(
        tiny_model_dir, synthetic_dir, "logger=csv", "trainer.max_steps=8", "data.epoch_samples=64",
        "trainer.log_every_n_steps=1", "test=false", "export=true", "sparsity.text_min_len=8",
        "+callbacks.gumbel_tau._target_=dllava.training.callbacks.GumbelTauSchedule",
    )
    metrics = _train(tmp_path, overrides)
    for key in ("val/vision_keep", "val/text_keep", "val/budget_loss_vision", "val/budget_loss_text", "val/lm_loss"):
        assert key in metrics, key
    assert 0.0 <= float(metrics["val/vision_keep"]) <= 1.0
    rows = list(csv.DictReader(next(tmp_path.glob("csv/*/metrics.csv")).open()))
    taus = [float(r["train/gumbel_tau"]) for r in rows if r.get("train/gumbel_tau")]
    assert taus[0] == pytest.approx(1.0) and all(a > b for a, b in zip(taus, taus[1:]))
    assert any(r.get("train/budget_loss_vision") for r in rows) and any(r.get("train/lm_loss") for r in rows)
    reloaded = DynamicLlava.from_pretrained(tmp_path / "hf")  # the export reloads with its predictors
    assert reloaded.sparsity.text_min_len == 8 and reloaded.image_predictor is not None
    ckpt = torch.load(json.loads((tmp_path / "summary.json").read_text())["ckpt_path"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["sparsity"]["text_min_len"] == 8
    assert any(k.startswith("model.image_predictor.") for k in ckpt["state_dict"])
    assert any(k.startswith("model.text_predictor.") for k in ckpt["state_dict"])


@pytest.mark.parametrize(
    "override, key", [("sparsity.keep=1.5", "sparsity.keep"), ("sparsity.layer=3", "sparsity.layer"),
                      ("module.trainable=[vision,decoder]", "module.trainable")],
)
def test_bad_sparsity_config_fails_at_start_naming_the_key(tiny_model_dir, synthetic_dir, tmp_path, override, key):
    from hydra.errors import InstantiationException

    with pytest.raises((ValueError, InstantiationException), match=key):  # hydra wraps constructor errors
        _train(tmp_path, _overrides(tiny_model_dir, synthetic_dir, "debug=fdr", override))
