"""Run plumbing: resume paths, run identity in checkpoints, the multirun failure policy."""

import json
import os
import time

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from dllava.utils.run import (
    RUN_KEY,
    find_last_checkpoint,
    read_run_identity,
    resolve_ckpt_path,
    task_wrapper,
)
from tests.helpers import compose


def test_ckpt_path_last_picks_the_newest_last_checkpoint(tmp_path):
    for name in ("step_000004.ckpt", "last.ckpt", "last-v1.ckpt", ".last.ckpt.x1y2.tmp"):
        (tmp_path / name).write_bytes(b"x")
    os.utime(tmp_path / "last.ckpt", (time.time() - 60, time.time() - 60))
    assert find_last_checkpoint(tmp_path) == tmp_path / "last-v1.ckpt"
    assert resolve_ckpt_path("last", tmp_path) == str(tmp_path / "last-v1.ckpt")


def test_ckpt_path_last_without_a_checkpoint_starts_fresh(tmp_path):
    assert resolve_ckpt_path("last", tmp_path / "missing") is None
    assert resolve_ckpt_path(None, tmp_path) is None


def test_missing_ckpt_path_fails_naming_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path="):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)


def test_run_identity_is_read_from_files_and_sharded_directories(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, RUN_KEY: {"wandb_id": "abc123"}}, tmp_path / "a.ckpt")
    (tmp_path / "b.ckpt").mkdir()
    torch.save({"global_step": 3, RUN_KEY: {"wandb_id": "def456"}}, tmp_path / "b.ckpt" / "meta.pt")
    assert read_run_identity(tmp_path / "a.ckpt") == {"wandb_id": "abc123"}
    assert read_run_identity(tmp_path / "b.ckpt") == {"wandb_id": "def456"}
    torch.save({"state_dict": {}}, tmp_path / "old.ckpt")  # written before run identities existed
    assert read_run_identity(tmp_path / "old.ckpt") == {}


@task_wrapper
def _failing_task(cfg):
    raise RuntimeError("boom")


def _as_multirun_job(tmp_path, overrides=("sparsity.keep=0.5",), sweep_dir=None):
    """Compose like a job of `train.py -m ...` (compose alone sets up a single run)."""
    cfg = compose("train", [], output_dir=tmp_path)
    hc = HydraConfig.get()
    with read_write(hc), open_dict(hc):
        hc.mode = RunMode.MULTIRUN
        hc.overrides.task = list(overrides)
        if sweep_dir is not None:
            hc.sweep.dir = str(sweep_dir)
    return cfg


def test_failing_single_run_raises(tmp_path):
    cfg = compose("train", [], output_dir=tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        _failing_task(cfg)
    assert not (tmp_path / "summary.json").exists()


def test_failing_multirun_job_is_recorded_and_returns(tmp_path):
    cfg = _as_multirun_job(tmp_path)
    assert _failing_task(cfg) == {}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: boom"
    assert summary["overrides"] == ["sparsity.keep=0.5"] and summary["metrics"] == {}


def test_wandb_group_names_the_sweep_only_in_multirun(tmp_path):
    single = compose("train", ["logger=wandb"], output_dir=tmp_path)
    assert OmegaConf.to_container(single.logger, resolve=True)["wandb"]["group"] is None
    job = _as_multirun_job(tmp_path, sweep_dir=tmp_path / "multiruns" / "keep_sweep_2026-01-01")
    assert OmegaConf.to_container(job.logger, resolve=True)["wandb"]["group"] == "train-keep_sweep_2026-01-01"
