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
STEPS, EPOCH_STEPS = 8, 4  # resume at an epoch boundary: 4 steps = 32 samples / (4 per device x 2 ranks)
# Measured: resumed and uninterrupted runs are bit-identical (max |diff| 0.0 in weights, optimizer state
# and losses); the tolerance only leaves room for a platform whose kernels are not deterministic.
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
        "data.eval_batch_size=16", "data.epoch_samples=32", "module.max_new_tokens=2",
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


@pytest.mark.slow
def test_fsdp2_trains_sharded_on_two_cpu_processes_and_resumes_exactly(tiny_model_dir, even_shards, tmp_path):
    probe = tmp_path / "param_types"
    full = _run(tiny_model_dir, even_shards, tmp_path / "full", "callbacks.model_checkpoint.save_top_k=-1",
                "export=true", "+callbacks.probe._target_=tests.training.probes.ParameterTypes",
                f"+callbacks.probe.out={probe}")

    # every parameter of the model is a DTensor sharded over the 2 processes, on both ranks
    for rank in (0, 1):
        report = json.loads((probe / f"rank{rank}.json").read_text())
        assert report["world_size"] == 2 and report["types"]
        assert set(report["types"].values()) == {"DTensor"}, report["types"]
    ckpts = tmp_path / "full" / "checkpoints"
    halfway = ckpts / f"step_{EPOCH_STEPS:06d}.ckpt"
    assert sorted(p.name for p in halfway.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]

    # stop at step N (the run above left its state there), resume in a fresh pair of processes to 2N
    resumed = _run(tiny_model_dir, even_shards, tmp_path / "resumed", f"ckpt_path={halfway}")
    for key in ("train/loss", "train/lm_loss", "train/gumbel_tau", "val/loss", "val/vision_keep"):
        assert resumed["metrics"][key] == pytest.approx(full["metrics"][key], abs=TOLERANCE), key
    end_full = _full_checkpoint(ckpts / "last.ckpt")
    end_resumed = _full_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert _max_diff(end_full["state_dict"], end_resumed["state_dict"]) <= TOLERANCE
    adam_full, adam_resumed = end_full["optimizer_0"]["state"], end_resumed["optimizer_0"]["state"]
    for name in adam_full:
        assert int(adam_resumed[name]["step"]) == STEPS
        assert _max_diff(adam_full[name], adam_resumed[name]) <= TOLERANCE
    meta = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)
    assert meta["global_step"] == STEPS and meta["lr_schedulers"][0]["last_epoch"] == STEPS

    # export gathered the sharded weights into ordinary HF files equal to the final checkpoint
    from dllava.sparse.model import DynamicLlava

    exported = DynamicLlava.from_pretrained(tmp_path / "full" / "hf").state_dict()
    final = {k.removeprefix("model."): v for k, v in end_full["state_dict"].items()}
    assert _max_diff({k: exported[k] for k in final}, final) == 0.0
