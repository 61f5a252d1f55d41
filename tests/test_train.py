"""End-to-end runs of train.py's train(): fast_dev_run, a short run that learns, summary.json, W&B."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import CONF, compose, read_wandb_history, wandb_records, wandb_run_record

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
    import wandb

    wandb.teardown()  # finish() returns before W&B's service has flushed the run file; teardown waits for it
    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    rows = read_wandb_history(run_files[0])
    logged = [r["val/loss"] for r in rows if "val/loss" in r]
    assert logged, f"no val/loss in {len(rows)} history rows with keys {sorted({k for r in rows for k in r})}"
    assert logged[-1] == pytest.approx(float(metrics["val/loss"]), rel=1e-6)
    # the kept-patch overlays of the first validation batch are logged as images
    images = [r for r in rows if "val/kept_patches/filenames" in r]
    assert images and images[0]["val/kept_patches/count"] == 1
    assert list(run_files[0].parent.glob("files/media/images/val/kept_patches_*.png"))


def test_llava_shards_without_shards_points_to_the_converter_not_the_generator(tiny_model_dir, tmp_path):
    overrides = [f"model.pretrained={tiny_model_dir}", "data=llava_shards", f"paths.data_dir={tmp_path}/data",
                 "data.num_workers=0", "callbacks=none", "debug=fdr"]
    with pytest.raises(FileNotFoundError) as error:
        _train(tmp_path, overrides)
    message = str(error.value)
    assert message.startswith("data.train_urls: no shard at") and "dllava-shards" in message
    assert "dllava.data.synthetic" not in message


@pytest.mark.slow
def test_wandb_mode_disabled_in_the_environment_writes_no_wandb_files(tiny_model_dir, synthetic_dir, tmp_path, monkeypatch):
    """logger=wandb is offline by default, but WANDB_MODE=disabled (W&B's off switch) must win."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    metrics = _train(tmp_path, _overrides(tiny_model_dir, synthetic_dir, "logger=wandb", "trainer.max_steps=2",
                                          "data.epoch_samples=16", "test=false", "module.max_new_tokens=1"))
    assert "val/loss" in metrics
    assert os.environ["WANDB_MODE"] == "disabled"  # not rewritten to dryrun for later runs of this process
    assert not (tmp_path / "wandb").exists(), sorted(p.name for p in (tmp_path / "wandb").iterdir())


def _end_processes_tagged(tag: str, timeout: float = 30.0) -> None:
    """SIGKILL the leftovers of a crashed test subprocess: processes whose environment carries ``tag``
    (only descendants of that subprocess inherit it), then wait until they are gone."""
    import time

    def tagged() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if f"DLLAVA_TEST_CRASH={tag}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    deadline = time.monotonic() + timeout
    while (pids := tagged()) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _child_env(**extra: str) -> dict[str, str]:
    """Environment for a train.py subprocess. Not WANDB_SERVICE: an in-process W&B run earlier in this
    pytest session exports its service to children, which would then write their run files
    asynchronously (unflushed when the child exits) and, for a killed job, keep holding its run id."""
    return {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | extra


def _sweep(tmp_path, values, *extra, env=None):
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable, str(ROOT / "train.py"), "-m", f"sparsity.keep={values}",
        *extra, f"hydra.sweep.dir={sweep_dir}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_child_env(**(env or {})))
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open())) if (sweep_dir / "sweep_summary.csv").exists() else None
    return result, sweep_dir, rows


@pytest.mark.slow
def test_keep_ratio_sweep_gives_each_job_a_dir_a_wandb_run_in_one_group_and_a_summary_row(tiny_model_dir, synthetic_dir, tmp_path):
    result, sweep_dir, rows = _sweep(
        tmp_path, "0.25,0.5",
        *_overrides(tiny_model_dir, synthetic_dir, "logger=wandb", "trainer.max_steps=2", "data.epoch_samples=16",
                    "test=false", "trainer.enable_progress_bar=false", "module.max_new_tokens=1",
                    "+trainer.limit_val_batches=1"),
        env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted(sweep_dir.glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["0", "1"]
    runs = []
    for path, keep in zip(summaries, ("sparsity.keep=0.25", "sparsity.keep=0.5")):
        assert keep in (path.parent / ".hydra" / "overrides.yaml").read_text()
        assert "val/loss" in json.loads(path.read_text())["metrics"]
        (run_file,) = path.parent.glob("wandb/offline-run-*/run-*.wandb")
        runs.append(wandb_run_record(run_file))
    assert runs[0].run_id != runs[1].run_id  # one W&B run per job ...
    assert runs[0].run_group == runs[1].run_group == "train-sweep"  # ... grouped by the sweep
    assert [r["job"] for r in rows] == ["0", "1"] and [r["status"] for r in rows] == ["completed"] * 2
    assert "sparsity.keep=0.25" in rows[0]["overrides"] and "sparsity.keep=0.5" in rows[1]["overrides"]
    assert all(float(r["val/loss"]) > 0 for r in rows)


@pytest.mark.slow
def test_a_failing_sweep_job_does_not_stop_the_others_and_its_row_says_failed(tiny_model_dir, synthetic_dir, tmp_path):
    result, sweep_dir, rows = _sweep(tmp_path, "1.5,0.5", *_overrides(tiny_model_dir, synthetic_dir, "debug=fdr"))
    assert result.returncode != 0  # the sweep reports the failure ...
    assert "1 of 2 sweep jobs failed" in result.stderr
    assert [r["status"] for r in rows] == ["failed", "completed"]  # ... after running every job
    assert "sparsity.keep" in rows[0]["error"] and rows[1]["error"] == ""
    assert json.loads((sweep_dir / "0" / "summary.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(tiny_model_dir, synthetic_dir, tmp_path):
    """The second write of last.ckpt (end of epoch 2) dies halfway; epoch 1's last.ckpt still loads,
    and ckpt_path=last in the same run dir resumes from it into the same W&B run."""
    run_dir = tmp_path / "run"
    overrides = [
        *(o for o in _overrides(tiny_model_dir, synthetic_dir) if o != "callbacks=none"),  # default callbacks
        "callbacks.progress_bar=null", "callbacks.model_summary=null", "trainer.enable_progress_bar=false",
        "trainer.max_steps=4", "data.epoch_samples=16", "test=false", "logger=wandb", "module.max_new_tokens=1",
        "+trainer.limit_val_batches=1",
        f"hydra.run.dir={run_dir}",
    ]
    env = _child_env(WANDB_MODE="offline")
    tag = f"{os.getpid()}-{id(tmp_path)}"
    killed = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *overrides,
         "trainer.plugins=[{_target_: tests.training.probes.KilledDuringSecondLastWrite}]"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**env, "DLLAVA_TEST_CRASH": tag},
    )
    _, stderr = killed.communicate(timeout=300)
    _end_processes_tagged(tag)  # the crashed job's W&B service (its own session) would hold the run id
    assert killed.returncode == -9, stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert any(p.name.startswith(".last.ckpt.") for p in ckpts.iterdir())  # the half-written file
    previous = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert previous["global_step"] == 2
    wandb_id = previous["dllava_run"]["wandb_id"]
    assert wandb_id

    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, "ckpt_path=last"],
                             capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 4 and final["dllava_run"]["wandb_id"] == wandb_id
    run_dirs = sorted(run_dir.glob("wandb/offline-run-*"))  # offline-run-<time>-<run id>
    assert len(run_dirs) == 2 and {d.name.rsplit("-", 1)[1] for d in run_dirs} == {wandb_id}
    assert wandb_run_record(next(run_dirs[1].glob("run-*.wandb"))).run_id == wandb_id


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
    assert ckpt["hyper_parameters"]["sparsity"]["attention"] == "auto" and ckpt["dllava_gated_attention"] == "sdpa"
    assert any(k.startswith("model.image_predictor.") for k in ckpt["state_dict"])
    assert any(k.startswith("model.text_predictor.") for k in ckpt["state_dict"])


@pytest.mark.slow
def test_fused_and_eager_gated_softmax_train_the_same_steps(tiny_model_dir, synthetic_dir, tmp_path):
    """Same seed, 12 steps with text sparsification on: every step's loss of ``sparsity.attention=sdpa``
    equals ``eager``'s to 1e-4 relative (fp32; the full 100-step comparison is in the README)."""
    import csv

    losses = {}
    for attention in ("eager", "sdpa"):
        run = tmp_path / attention
        overrides = _overrides(
            tiny_model_dir, synthetic_dir, "logger=csv", "trainer.max_steps=12", "data.epoch_samples=96",
            "trainer.log_every_n_steps=1", "test=false", "sparsity.text_min_len=8", "seed=3",
            f"sparsity.attention={attention}", "+callbacks.gumbel_tau._target_=dllava.training.callbacks.GumbelTauSchedule",
        )
        _train(run, overrides)
        rows = csv.DictReader(next(run.glob("csv/*/metrics.csv")).open())
        losses[attention] = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses["sdpa"]) == len(losses["eager"]) == 12
    for step, (fused, eager) in enumerate(zip(losses["sdpa"], losses["eager"])):
        assert fused == pytest.approx(eager, rel=1e-4), step


BAD_VALUES = [  # (override, the key the error must start with): each fails in train.py's start-up check
    # issue 12 item 3
    ("sparsity.layer=2.5", "sparsity.layer"), ("sparsity.vision=maybe", "sparsity.vision"),
    ("sparsity.keep=abc", "sparsity.keep"), ("trainer.max_steps=-1", "trainer.max_steps"),
    # sparsity
    ("sparsity.keep=1.5", "sparsity.keep"), ("sparsity.keep=0", "sparsity.keep"), ("sparsity.keep=true", "sparsity.keep"),
    ("sparsity.text_keep=-0.1", "sparsity.text_keep"), ("sparsity.text=1", "sparsity.text"),
    ("sparsity.layer=0", "sparsity.layer"), ("sparsity.layer=true", "sparsity.layer"),
    ("sparsity.loss_weight=-1", "sparsity.loss_weight"), ("sparsity.loss_weight=inf", "sparsity.loss_weight"),
    ("sparsity.text_min_len=16.5", "sparsity.text_min_len"), ("sparsity.tau_start=0", "sparsity.tau_start"),
    ("sparsity.tau_end=nan", "sparsity.tau_end"), ("+sparsity.kepp=0.2", "sparsity.kepp"),
    # optim
    ("optim.lr=0", "optim.lr"), ("optim.lr=fast", "optim.lr"), ("optim.predictor_lr=-1e-3", "optim.predictor_lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"), ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=[0.9,1.5]", r"optim.betas\[1\]"), ("optim.eps=0", "optim.eps"),
    ("optim.warmup_ratio=1.0", "optim.warmup_ratio"), ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
    # model
    ("model.dtype=float8", "model.dtype"), ("model.random_init=yes", "model.random_init"),
    ("model.attn_implementation=3", "model.attn_implementation"), ("model.predictor.heads=0", "model.predictor.heads"),
    ("model.predictor.d_model=64.0", "model.predictor.d_model"), ("+model.pretraind=x", "model.pretraind"),
    # module
    ("module.trainable=[vision,decoder]", "module.trainable"), ("module.trainable=llm", "module.trainable"),
    ("module.max_new_tokens=0", "module.max_new_tokens"), ("module.answer_kinds=color", "module.answer_kinds"),
    # data
    ("data.batch_size=0", "data.batch_size"), ("data.batch_size=2.0", "data.batch_size"),
    ("data.eval_batch_size=-1", "data.eval_batch_size"), ("data.num_workers=-1", "data.num_workers"),
    ("data.epoch_samples=ten", "data.epoch_samples"), ("data.shuffle_buffer=-5", "data.shuffle_buffer"),
    ("data.max_length=0", "data.max_length"), ("data.train_urls=[]", "data.train_urls"), ("data.val_urls=7", "data.val_urls"),
    ("data.answer_kinds=[1]", r"data.answer_kinds\[0\]"), ("data.seed=-1", "data.seed"),
    ("+data.synthetic={out:x,train:-1}", "data.synthetic.train"), ("+data.synthetic={out:x,tain:1}", "data.synthetic.tain"),
    # top level
    ("seed=-3", "seed"), ("seed=1.5", "seed"), ("train=yes", "train"), ("test=1", "test"), ("export=maybe", "export"),
    ("ckpt_path=3", "ckpt_path"), ("tags=dev", "tags"),
    # trainer
    ("trainer.max_steps=0", "trainer.max_steps"), ("trainer.max_steps=2.5", "trainer.max_steps"),
    ("trainer.max_epochs=0", "trainer.max_epochs"), ("trainer.devices=0", "trainer.devices"),
    ("trainer.devices=1.5", "trainer.devices"), ("trainer.num_nodes=0", "trainer.num_nodes"),
    ("trainer.precision=31", "trainer.precision"), ("trainer.precision=fp32", "trainer.precision"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch"),
    ("trainer.num_sanity_val_steps=-2", "trainer.num_sanity_val_steps"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"), ("trainer.fast_dev_run=-1", "trainer.fast_dev_run"),
    ("trainer.deterministic=sometimes", "trainer.deterministic"), ("trainer.enable_progress_bar=1", "trainer.enable_progress_bar"),
    ("+trainer.limit_val_batches=1.5", "trainer.limit_val_batches"), ("+trainer.max_step=3", "trainer.max_step"),
    ("trainer=fsdp2 trainer.strategy.activation_checkpointing=maybe", "trainer.strategy.activation_checkpointing"),
    # callbacks and loggers (callbacks=none in the base overrides: these put the default group back)
    ("callbacks=default callbacks.model_checkpoint.save_top_k=-2", "callbacks.model_checkpoint.save_top_k"),
    ("callbacks=default callbacks.last_checkpoint.every_n_train_steps=-1", "callbacks.last_checkpoint.every_n_train_steps"),
    ("callbacks=default callbacks.model_checkpoint.mode=best", "callbacks.model_checkpoint.mode"),
    ("callbacks=default callbacks.progress_bar.refresh_rate=-1", "callbacks.progress_bar.refresh_rate"),
    ("logger=wandb logger.wandb.offline=maybe", "logger.wandb.offline"), ("logger=csv logger.csv.name=3", "logger.csv.name"),
]

# -- run status (issue 12 items 4 and 5) -------------------------------------------------------------
def _exit_codes(run_dir: Path) -> list[int]:
    """The exit code each W&B run (offline files) of ``run_dir`` was finished with, oldest first."""
    codes = []
    for run_file in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        codes += [r.exit.exit_code for r in wandb_records(run_file) if r.WhichOneof("record_type") == "exit"]
    return codes


@pytest.mark.slow
def test_a_diverging_sweep_job_is_recorded_as_diverged_with_its_nan_loss_and_the_sweep_fails(tiny_model_dir, synthetic_dir, tmp_path):
    result, sweep_dir, rows = _sweep(
        tmp_path, "0.5", "optim.lr=1e9,1e-4",
        *_overrides(tiny_model_dir, synthetic_dir, "logger=wandb", "trainer.max_steps=3", "data.epoch_samples=16",
                    "test=false", "trainer.enable_progress_bar=false", "module.max_new_tokens=1",
                    "+trainer.limit_val_batches=1"),
        env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 of 2 sweep jobs failed (jobs 0 (diverged))" in result.stderr
    assert [r["status"] for r in rows] == ["diverged", "completed"]  # the sweep went on after job 0
    summary = json.loads((sweep_dir / "0" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["metrics"]["train/loss"] == "nan"
    assert "non-finite loss at step 1 (loss per rank: nan)" in summary["error"]
    assert rows[0]["train/loss"] == "nan" and rows[0]["error"] == summary["error"]
    assert _exit_codes(sweep_dir / "0") == [1] and _exit_codes(sweep_dir / "1") == [0]


@pytest.mark.slow
def test_a_loss_that_is_nan_on_one_rank_stops_every_rank(tiny_model_dir, synthetic_dir, tmp_path):
    """DDP on 2 CPU processes, rank 1's batch of step 1 is NaN: both ranks stop together (none is left
    waiting in the gradient all-reduce) and the run is recorded as diverged."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, str(ROOT / "train.py"),
        *_overrides(tiny_model_dir, synthetic_dir, "logger=csv", "trainer.max_steps=4", "data.epoch_samples=32",
                    "test=false", "trainer.enable_progress_bar=false", "module.max_new_tokens=1",
                    "+trainer.limit_val_batches=1", "data.batch_size=4"),
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={run_dir}",
        "+callbacks.nan._target_=tests.training.probes.NonFiniteBatchOnRank", "+callbacks.nan.rank=1",
        "+callbacks.nan.step=1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=_child_env())
    assert result.returncode == 1, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged", summary
    losses = summary["error"].split("loss per rank: ")[1].split(")")[0].split(", ")
    assert "step 1" in summary["error"] and losses[1] == "nan" and float(losses[0]) > 0  # rank 0's was finite
    assert summary["metrics"]["train/loss"] == "nan"


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signalled_run_is_recorded_as_interrupted_and_continues_from_its_last_checkpoint(
    tiny_model_dir, synthetic_dir, tmp_path, signum, code
):
    """Ctrl-C (SIGINT) or SLURM preemption (SIGTERM) while training: exit code 128 + signal, summary.json and
    the W&B run say interrupted, the test phase does not run, and ckpt_path=last continues the run."""
    run_dir = tmp_path / "run"
    overrides = [
        *(o for o in _overrides(tiny_model_dir, synthetic_dir) if o != "callbacks=none"),  # default callbacks
        "callbacks.progress_bar=null", "callbacks.model_summary=null", "trainer.enable_progress_bar=false",
        "data.epoch_samples=16", "logger=wandb", "module.max_new_tokens=1", "+trainer.limit_val_batches=1",
        f"hydra.run.dir={run_dir}",
    ]
    env = _child_env(WANDB_MODE="offline")
    run = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides, "trainer.max_steps=100000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        _wait_for(run_dir / "checkpoints" / "last.ckpt", run)  # end of epoch 1: training is running
        run.send_signal(signum)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == code, stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == f"interrupted by {signum.name}"
    assert _exit_codes(run_dir) == [code]
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    assert not any(k.startswith("test/") for row in read_wandb_history(run_file) for k in row)  # no test phase

    step = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, f"trainer.max_steps={step + 2}",
                              "ckpt_path=last", "test=false"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert _exit_codes(run_dir) == [code, 0]


# -- the best accuracy after a resume (item 6); run dirs that would be lost (item 8) -------------------
def _val_accuracies(run_dir: Path) -> list[list[float]]:
    """``val/answer_acc`` of every validation epoch, one list per CSV logger version (run) of ``run_dir``."""
    runs = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        runs.append([float(r["val/answer_acc"]) for r in csv.DictReader(path.open()) if r.get("val/answer_acc")])
    return runs


@pytest.mark.slow
def test_best_accuracy_survives_a_resume_and_run_dirs_are_not_lost(synthetic_dir, tmp_path):
    from dllava.utils.run import RunDirRefused

    run_dir = tmp_path / "run"
    overrides = [
        *(o for o in _overrides(ROOT / "data" / "tiny_base", synthetic_dir) if o != "callbacks=none"),
        "callbacks.progress_bar=null", "callbacks.model_summary=null", "trainer.enable_progress_bar=false",
        "data.epoch_samples=8", "logger=csv", "test=false", "+trainer.limit_val_batches=1",
    ]
    pinned = f"hydra.run.dir={run_dir}"
    _train(run_dir, [*overrides, "trainer.max_steps=2", pinned, "ckpt_path=last"])  # pinned, no checkpoint: fresh
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    with pytest.raises(RunDirRefused, match="Pass ckpt_path=last to continue that run, or another hydra.run.dir"):
        _train(run_dir, [*overrides, "trainer.max_steps=4", pinned])  # would overwrite last.ckpt
    with pytest.raises(RunDirRefused, match=r"pass hydra.run.dir=<its run dir>"):
        _train(tmp_path / "new", [*overrides, "trainer.max_steps=4", "ckpt_path=last"])  # a new clock-named dir
    assert last.read_bytes() == saved and not (tmp_path / "new" / "checkpoints").exists()

    # continue; every validation of the resumed run scores below the best one before the checkpoint
    metrics = _train(run_dir, [*overrides, "trainer.max_steps=4", pinned, "ckpt_path=last",
                               "+callbacks.zero._target_=tests.training.probes.ZeroWeightsOnTrainStart"])
    before, after = _val_accuracies(run_dir)
    assert len(before) == len(after) == 2 and max(after) < max(before), (before, after)
    assert float(metrics["val/answer_acc_best"]) == pytest.approx(max(before + after))
    best = torch.load(json.loads((run_dir / "summary.json").read_text())["ckpt_path"], map_location="cpu", weights_only=True)
    (state,) = [v for k, v in best["callbacks"].items() if "val/answer_acc" in k]
    assert float(metrics["val/answer_acc_best"]) == pytest.approx(float(state["best_model_score"]))


@pytest.mark.parametrize("override, key", BAD_VALUES)
def test_bad_config_value_fails_at_start_naming_the_key(tiny_model_dir, synthetic_dir, tmp_path, override, key):
    """Each wrong type or out-of-range value fails in the start-up check (before data, model or trainer
    exist) with a message that starts with its full key."""
    debug = [] if "callbacks=" in override or "logger=" in override else ["debug=fdr"]  # debug nulls both groups
    with pytest.raises((TypeError, ValueError)) as error:
        _train(tmp_path, _overrides(tiny_model_dir, synthetic_dir, *debug, *override.split()))
    assert re.match(key + r"(?![\w.\[])", str(error.value)), str(error.value)
    assert any(Path(str(entry.path)).name == "startup.py" for entry in error.traceback), "not the start-up check"
    # nothing but the failed run's record (a sweep lists it): no data, checkpoints or logs were made
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and key.replace("\\", "") in summary["error"]


def test_good_values_of_every_type_pass_the_start_up_check(tiny_model_dir, synthetic_dir, tmp_path):
    """An int where a float is meant, -1 devices, a fraction of batches, null optionals: all accepted."""
    from dllava.startup import check_train_config

    for extra in (["optim.lr=1", "sparsity.keep=1", "trainer.devices=-1", "+trainer.limit_val_batches=0.5",
                   "optim.predictor_lr=null", "data.max_length=null", "seed=null", "trainer.max_epochs=-1"],
                  ["trainer=fsdp2", "trainer.precision=32", "trainer.devices=[0,1]", "trainer.deterministic=warn"],
                  ["experiment=paper_7b"], ["data=llava_shards"], ["callbacks=default", "logger=wandb"]):
        check_train_config(compose("train", _overrides(tiny_model_dir, synthetic_dir, *extra), output_dir=tmp_path))


@pytest.mark.parametrize("budget", ["global", "per_view"])
def test_anyres_sparse_run_meets_its_budget_convention(tmp_path, budget):
    """model=tiny_llava_next on the non-square task (ragged counts, newline tokens): a short sparse run
    under each budget convention finishes, its validation keeps the target share of the droppable image
    tokens (newlines never count), and the checkpoint records the convention."""
    from dllava.data.synthetic import generate
    from dllava.model.tiny_next import save_tiny_next

    model_dir = save_tiny_next(tmp_path / "tiny_next", "llava_next", num_hidden_layers=3)
    data = tmp_path / "data"
    generate(data, train=64, val=32, test=0, seed=0, samples_per_shard=32, cell=16, grid_sizes=[(4, 4), (4, 6), (6, 4)])
    overrides = [
        "model=tiny_llava_next", f"model.pretrained={model_dir}", "data.synthetic=null",
        f"data.train_urls={data}/train-*.tar", f"data.val_urls={data}/val-*.tar", f"data.test_urls={data}/val-*.tar",
        "data.num_workers=0",
        "data.batch_size=8", "data.eval_batch_size=16", "callbacks=none", "logger=csv", "test=false",
        "trainer.max_steps=4", "data.epoch_samples=32", f"sparsity.budget={budget}", "sparsity.keep=0.25",
    ]
    metrics = _train(tmp_path / "run", overrides)
    # top-k per sample (global) or per view: int(n * 0.25) of 16-token views and 48-96-token crop grids
    assert abs(float(metrics["val/vision_keep"]) - 0.25) <= 0.05
    assert float(metrics["val/budget_loss_vision"]) < 0.0025
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    ckpt = torch.load(summary["ckpt_path"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["sparsity"]["budget"] == budget
