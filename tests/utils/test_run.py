"""Run plumbing: resume paths, run identity in checkpoints, run status and the failure policy, run dirs."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from dllava.utils.run import (
    RUN_KEY,
    RunDirRefused,
    TrainingDiverged,
    check_run_dir,
    find_last_checkpoint,
    plain_metrics,
    read_run_identity,
    resolve_ckpt_path,
    run_dir_is_pinned,
    task_wrapper,
    write_summary,
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


def test_failing_single_run_is_recorded_and_raises(tmp_path):
    cfg = compose("train", [], output_dir=tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        _failing_task(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: boom"


def _strict_json(path):
    """JSON as the standard defines it: NaN and Infinity are not allowed."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_non_finite_metrics_are_kept_in_the_summary_as_strings(tmp_path):
    metrics = {"train/loss": torch.tensor(float("nan")), "val/loss": 1.5, "a": float("inf"), "b": -float("inf"), "c": "x"}
    assert plain_metrics(metrics) == {"a": "inf", "b": "-inf", "train/loss": "nan", "val/loss": 1.5}
    write_summary(tmp_path, metrics, None, status="diverged")
    summary = _strict_json(tmp_path / "summary.json")
    assert summary["metrics"]["train/loss"] == "nan" and float(summary["metrics"]["a"]) == float("inf")


@task_wrapper
def _diverging_task(cfg):
    raise TrainingDiverged(7, [float("nan"), 2.5], {"train/loss": float("nan"), "val/loss": torch.tensor(1.25)})


def test_diverged_single_run_is_recorded_with_its_metrics_and_raises(tmp_path):
    cfg = compose("train", [], output_dir=tmp_path)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 7 \(loss per rank: nan, 2.5\)"):
        _diverging_task(cfg)
    summary = _strict_json(tmp_path / "summary.json")
    assert summary["status"] == "diverged" and "step 7" in summary["error"]
    assert summary["metrics"] == {"train/loss": "nan", "val/loss": 1.25}


def test_diverged_multirun_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    cfg = _as_multirun_job(tmp_path)
    assert _diverging_task(cfg) == {}
    assert _strict_json(tmp_path / "summary.json")["status"] == "diverged"


def _interrupted_like_lightning():
    """What Lightning's trainer.fit does on Ctrl-C: shut down, then sys.exit(1) inside its except block."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise SystemExit(1)


def _sigterm():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    raise SIGTERMException


@pytest.mark.parametrize(
    "stop, code, signal_name",
    [(_interrupted_like_lightning, 130, "SIGINT"), (lambda: (_ for _ in ()).throw(KeyboardInterrupt), 130, "SIGINT"),
     (_sigterm, 143, "SIGTERM")],
)
@pytest.mark.parametrize("multirun", [False, True])
def test_interrupted_run_is_recorded_and_exits_with_the_signal_code(tmp_path, stop, code, signal_name, multirun):
    task = task_wrapper(lambda cfg: stop())
    cfg = _as_multirun_job(tmp_path) if multirun else compose("train", [], output_dir=tmp_path)
    with pytest.raises(SystemExit) as exc:  # a sweep stops too: Ctrl-C means stop
        task(cfg)
    assert exc.value.code == code
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == f"interrupted by {signal_name}"


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


# -- run dirs (issue 12 item 8) --------------------------------------------------------------------
def test_run_dir_is_pinned_when_its_definition_does_not_use_the_clock(tmp_path):
    compose("train", [], output_dir=tmp_path)
    assert not run_dir_is_pinned()  # the default: logs/train/runs/${now:...}
    compose("train", [f"hydra.run.dir={tmp_path}/run"], output_dir=tmp_path)
    assert run_dir_is_pinned()
    compose("train", ["hydra.run.dir=logs/${task_name}/keep_${sparsity.keep}"], output_dir=tmp_path)
    assert run_dir_is_pinned()  # a preset's or a derived dir: the same command finds it again
    compose("train", ["hydra.run.dir=logs/${now:%H-%M-%S}"], output_dir=tmp_path)
    assert not run_dir_is_pinned()


def test_a_multirun_job_dir_is_pinned_by_the_sweep_dir_or_a_requeueing_launcher(tmp_path):
    _as_multirun_job(tmp_path)
    assert not run_dir_is_pinned()
    _as_multirun_job(tmp_path, sweep_dir=tmp_path / "sweep")
    assert run_dir_is_pinned()
    _as_multirun_job(tmp_path)
    hc = HydraConfig.get()
    with read_write(hc), open_dict(hc):
        hc.launcher = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
    assert run_dir_is_pinned()  # SLURM requeues a job into its own job dir


def _last_checkpoint(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "last.ckpt").write_bytes(b"checkpoint")
    return directory / "last.ckpt"


def test_ckpt_path_last_in_a_new_clock_named_run_dir_is_refused(tmp_path):
    with pytest.raises(RunDirRefused, match=r"pass hydra.run.dir=<its run dir>.*drop ckpt_path=last"):
        check_run_dir("last", tmp_path / "checkpoints", train=True, pinned=False)
    with pytest.raises(RunDirRefused, match=r"pass hydra.sweep.dir=<its sweep dir>"):
        check_run_dir("last", tmp_path / "checkpoints", train=True, pinned=False, multirun=True)


def test_ckpt_path_last_in_a_pinned_run_dir_starts_fresh_or_continues(tmp_path):
    check_run_dir("last", tmp_path / "checkpoints", train=True, pinned=True)  # first SLURM submission
    _last_checkpoint(tmp_path / "checkpoints")
    check_run_dir("last", tmp_path / "checkpoints", train=True, pinned=True)
    check_run_dir("last", tmp_path / "checkpoints", train=True, pinned=False)  # found: nothing is lost


def test_a_new_run_over_existing_checkpoints_is_refused(tmp_path):
    ckpt = _last_checkpoint(tmp_path / "checkpoints")
    with pytest.raises(RunDirRefused, match=r"already holds checkpoints \(last.ckpt\).*Pass ckpt_path=last to continue"):
        check_run_dir(None, tmp_path / "checkpoints", train=True, pinned=True)
    with pytest.raises(RunDirRefused, match=r"or another hydra.run.dir"):
        check_run_dir(None, tmp_path / "checkpoints", train=True, pinned=False)
    assert ckpt.read_bytes() == b"checkpoint"
    check_run_dir(None, tmp_path / "checkpoints", train=False, pinned=True)  # test only: writes no checkpoint
    check_run_dir(None, tmp_path / "empty", train=True, pinned=False)  # a new run dir
    check_run_dir(str(ckpt), tmp_path / "checkpoints", train=True, pinned=True)  # an explicit checkpoint


@task_wrapper
def _refused_task(cfg):
    check_run_dir(None, Path(cfg.paths.output_dir) / "checkpoints", train=True, pinned=True)


def test_a_refused_run_writes_nothing_and_stops_a_sweep_too(tmp_path):
    _last_checkpoint(tmp_path / "checkpoints")
    (tmp_path / "summary.json").write_text('{"status": "completed"}')
    with pytest.raises(RunDirRefused):
        _refused_task(_as_multirun_job(tmp_path))
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "completed"}


def test_run_identity_of_a_file_that_is_not_a_checkpoint_says_so_without_torch_advice(tmp_path):
    from dllava.training.safe_load import NotAnArchiveError

    readme = tmp_path / "README.md"
    readme.write_text("# not a checkpoint\n")
    with pytest.raises(NotAnArchiveError, match="not a torch checkpoint archive") as err:
        read_run_identity(readme)
    assert "weights_only" not in str(err.value)
