"""FSDP2 on two CPU processes (gloo): sharded parameters, sharded checkpoints, exact resume, export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import CONF

ROOT = CONF.parent
EPOCH_STEPS = 2  # 16 samples / (4 per device x 2 ranks)
STEPS = 4 * EPOCH_STEPS
MID = 2 * EPOCH_STEPS + 1  # one batch into epoch 3
# Measured: resumed (at the ends of epochs 1, 2 and 3, and at MID) and uninterrupted runs are
# bit-identical (max |diff| 0.0 in weights, optimizer state and losses); the tolerance only leaves room
# for a platform whose kernels are not deterministic.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory) -> Path:
    """Validation and test in 2 shards each, so both ranks read the same number of batches."""
    from dllava.data.synthetic import generate

    out = tmp_path_factory.mktemp("even_shards")
    generate(out, train=128, val=32, test=32, seed=0, samples_per_shard=16)
    return out


def _run(tiny_model_dir, shards, run_dir, *extra, timeout=240):
    cmd = [
        sys.executable, str(ROOT / "train.py"),
        f"model.pretrained={tiny_model_dir}", "data.synthetic=null",
        f"data.train_urls={shards}/train-*.tar", f"data.val_urls={shards}/val-*.tar",
        f"data.test_urls={shards}/test-*.tar", "data.num_workers=0", "data.batch_size=4",
        "data.eval_batch_size=16", "data.epoch_samples=16", "module.max_new_tokens=2",
        "trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        f"trainer.max_steps={STEPS}", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
        "callbacks.model_summary=null", "logger=csv", "test=false", f"hydra.run.dir={run_dir}", *extra,
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _full_checkpoint(directory: Path) -> dict:
    """A sharded (DCP) checkpoint directory gathered into one state dict in this process (safe reader)."""
    from dllava.training.safe_load import read_sharded_full

    return read_sharded_full(directory)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() if a[k].numel() else 0.0 for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, even_shards, tmp_path_factory) -> tuple[dict, Path]:
    """The uninterrupted run: a sharded checkpoint at every epoch end and at MID, its summary and run dir."""
    run_dir = tmp_path_factory.mktemp("fsdp2_full")
    probe = run_dir / "param_types"
    summary = _run(
        tiny_model_dir, even_shards, run_dir, "callbacks.model_checkpoint.save_top_k=-1", "export=true",
        "+callbacks.probe._target_=tests.training.probes.ParameterTypes", f"+callbacks.probe.out={probe}",
        "+callbacks.mid_epoch._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.mid_epoch.dirpath={run_dir}/checkpoints/mid", f"+callbacks.mid_epoch.every_n_train_steps={MID}",
        "+callbacks.mid_epoch.save_top_k=-1", "+callbacks.mid_epoch.filename=mid",
    )
    return summary, run_dir


@pytest.mark.slow
def test_fsdp2_trains_sharded_on_two_cpu_processes_and_exports(uninterrupted):
    _, run_dir = uninterrupted
    # every parameter of the model is a DTensor sharded over the 2 processes, on both ranks
    for rank in (0, 1):
        report = json.loads((run_dir / "param_types" / f"rank{rank}.json").read_text())
        assert report["world_size"] == 2 and report["types"]
        assert set(report["types"].values()) == {"DTensor"}, report["types"]
    ckpts = run_dir / "checkpoints"
    halfway = ckpts / f"step_{EPOCH_STEPS:06d}.ckpt"
    assert sorted(p.name for p in halfway.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]

    # export gathered the sharded weights into ordinary HF files equal to the final checkpoint
    from dllava.sparse.model import DynamicLlava

    end_full = _full_checkpoint(ckpts / "last.ckpt")
    exported = DynamicLlava.from_pretrained(run_dir / "hf").state_dict()
    final = {k.removeprefix("model."): v for k, v in end_full["state_dict"].items()}
    assert _max_diff({k: exported[k] for k in final}, final) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "resume_step", [EPOCH_STEPS, 2 * EPOCH_STEPS, 3 * EPOCH_STEPS, MID], ids=["epoch1", "epoch2", "epoch3", "mid_epoch3"]
)
def test_fsdp2_resume_reproduces_the_uninterrupted_run_exactly(uninterrupted, tiny_model_dir, even_shards, tmp_path, resume_step):
    """Stop at ``resume_step`` (the uninterrupted run's checkpoint there), resume in a fresh pair of processes."""
    full, run_dir = uninterrupted
    ckpts = run_dir / "checkpoints"
    ckpt = ckpts / "mid" / "mid.ckpt" if resume_step == MID else ckpts / f"step_{resume_step:06d}.ckpt"
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    assert meta["global_step"] == resume_step
    position = meta["LlavaDataModule"]["train_position"]  # every rank's data position, gathered
    assert len(position["consumed"]) == 2 and position["layout"]["world_size"] == 2

    resumed = _run(tiny_model_dir, even_shards, tmp_path / "resumed", f"ckpt_path={ckpt}")
    for key in ("train/loss", "train/lm_loss", "train/gumbel_tau", "val/loss", "val/vision_keep"):
        assert resumed["metrics"][key] == pytest.approx(full["metrics"][key], abs=TOLERANCE), key
    end_full = _full_checkpoint(ckpts / "last.ckpt")
    end_resumed = _full_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    weights = _max_diff(end_full["state_dict"], end_resumed["state_dict"])
    adam_full, adam_resumed = end_full["optimizer_0"]["state"], end_resumed["optimizer_0"]["state"]
    adam = max(_max_diff(adam_full[name], adam_resumed[name]) for name in adam_full)
    print(f"FSDP2 resumed at step {resume_step}: max |diff| weights {weights}, AdamW state {adam}")
    assert weights <= TOLERANCE and adam <= TOLERANCE
    assert all(int(adam_resumed[name]["step"]) == STEPS for name in adam_full)
    meta = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)
    assert meta["global_step"] == STEPS and meta["lr_schedulers"][0]["last_epoch"] == STEPS
