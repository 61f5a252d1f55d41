"""Loading checkpoints runs no code from them and refuses damaged ones (dllava.training.safe_load)."""

import dataclasses
import io
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from dllava.training.safe_load import (
    CorruptCheckpointError,
    SafeFileSystemReader,
    UnsafeCheckpointError,
    load_sharded,
    verify_sharded_checkpoint,
)
from dllava.training.strategies import AtomicCheckpointIO
from tests.helpers import CONF

ROOT = CONF.parent


class _WritesMarker:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _state(fill: float = 1.0) -> dict:
    """Model and optimizer state as DCP stores it: tensors plus plain values (BYTE_IO items)."""
    return {
        "state_dict": {"w": torch.full((3, 4), fill), "b": torch.full((2,), fill, dtype=torch.bfloat16)},
        "optimizer_0": {"state": {"w": {"step": torch.tensor(fill)}},
                        "param_groups": [{"lr": fill, "betas": (0.9, 0.99), "params": ["w"]}]},
    }


def _dcp_save(state: dict, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(state, checkpoint_id=path)


def _poison_metadata(path: Path, marker: Path) -> None:
    """A genuine ``.metadata`` whose unpickling would also create ``marker``."""
    metadata = pickle.loads((path / ".metadata").read_bytes())
    metadata.planner_data = _WritesMarker(marker)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))


def _poison_item(path: Path, fqn: str, marker: Path) -> None:
    """Point the non-tensor item ``fqn`` at an appended torch archive whose unpickling creates ``marker``."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    metadata = pickle.loads((path / ".metadata").read_bytes())
    info = metadata.storage_data[MetadataIndex(fqn)]
    buffer = io.BytesIO()
    torch.save(_WritesMarker(marker), buffer)
    shard = path / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as handle:
        handle.write(buffer.getvalue())
    metadata.storage_data[MetadataIndex(fqn)] = dataclasses.replace(info, offset=offset, length=len(buffer.getvalue()))
    (path / ".metadata").write_bytes(pickle.dumps(metadata))


def test_genuine_sharded_checkpoint_loads_through_the_safe_reader(tmp_path):
    _dcp_save(_state(2.0), tmp_path / "ckpt")
    target = _state(0.0)
    verify_sharded_checkpoint(tmp_path / "ckpt")
    load_sharded(target, tmp_path / "ckpt")
    assert torch.equal(target["state_dict"]["w"], torch.full((3, 4), 2.0))
    assert target["optimizer_0"]["param_groups"][0]["lr"] == 2.0
    assert target["optimizer_0"]["param_groups"][0]["betas"] == (0.9, 0.99)


def test_crafted_sharded_metadata_is_refused_naming_the_file_and_global(tmp_path):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "code_ran"
    _dcp_save(_state(), ckpt)
    _poison_metadata(ckpt, marker)
    with pytest.raises(UnsafeCheckpointError, match=r"ckpt/\.metadata: refused to load the global (io|builtins)\.open"):
        verify_sharded_checkpoint(ckpt)
    with pytest.raises(CheckpointException, match="refused to load the global"):  # DCP wraps the reader's refusal
        load_sharded(_state(0.0), ckpt)
    assert not marker.exists()


def test_crafted_non_tensor_item_is_refused_and_never_unpickled(tmp_path):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "code_ran"
    _dcp_save(_state(), ckpt)
    _poison_item(ckpt, "optimizer_0.param_groups.0.lr", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"__0_0\.distcp \(item 'optimizer_0\.param_groups\.0\.lr'\)") as err:
        verify_sharded_checkpoint(ckpt)
    assert "weights_only=False" not in str(err.value) and "open" in str(err.value)
    import torch.distributed.checkpoint as dcp

    with pytest.raises(CheckpointException, match="refused to load"):  # the reader alone refuses too
        dcp.load(_state(0.0), storage_reader=SafeFileSystemReader(ckpt))
    assert not marker.exists()


def _crafted_sharded_dir(tmp_path: Path, marker: Path) -> Path:
    ckpt = tmp_path / "crafted.ckpt"
    _dcp_save(_state(), ckpt)
    _poison_metadata(ckpt, marker)
    torch.save({"global_step": 2}, ckpt / "meta.pt")  # Lightning's metadata file: plain and loadable
    return ckpt


@pytest.mark.slow
def test_train_py_resume_from_a_crafted_sharded_checkpoint_runs_no_code(tiny_model_dir, synthetic_dir, tmp_path):
    """``ckpt_path=<dir>`` under trainer=fsdp2 (one CPU process): the checkpoint is refused, nothing runs."""
    marker = tmp_path / "code_ran"
    ckpt = _crafted_sharded_dir(tmp_path, marker)
    cmd = [
        sys.executable, str(ROOT / "train.py"), f"model.pretrained={tiny_model_dir}", "data.synthetic=null",
        f"data.train_urls={synthetic_dir}/train-*.tar", f"data.val_urls={synthetic_dir}/val-*.tar",
        f"data.test_urls={synthetic_dir}/test-*.tar", "data.num_workers=0", "data.batch_size=4",
        "data.epoch_samples=8", "trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.precision=32-true", "trainer.max_steps=4", "trainer.enable_progress_bar=false",
        "callbacks=none", "logger=csv", "test=false", f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={ckpt}",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode != 0
    assert "UnsafeCheckpointError" in result.stderr and f"{ckpt}/.metadata: refused to load the global" in result.stderr
    assert not marker.exists()


def _flip_tensor_byte(path: Path) -> str:
    """Flip one bit inside the first tensor's data of the torch archive ``path``; returns the member."""
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    data[member.header_offset + 30 + name_len + extra_len + member.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return member.filename


def test_bit_flipped_checkpoint_is_refused_naming_file_and_member(tmp_path):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.arange(64, dtype=torch.float32)}}, path)
    assert io_.load_checkpoint(path)["global_step"] == 3  # intact: loads
    member = _flip_tensor_byte(path)
    assert torch.load(path, weights_only=True)["global_step"] == 3  # torch alone loads it silently
    with pytest.raises(CorruptCheckpointError, match=rf"{path} is damaged: archive member '{member}' fails its CRC32"):
        io_.load_checkpoint(path)


def test_checkpoint_with_code_is_refused_without_suggesting_weights_only_false(tmp_path):
    path, marker = tmp_path / "last.ckpt", tmp_path / "code_ran"
    torch.save({"global_step": 1, "x": _WritesMarker(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=rf"{path}: refused to load") as err:
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # weights-only whatever the caller says
    assert "weights_only=False" not in str(err.value) and "weights_only` set to `False" not in str(err.value)
    assert not marker.exists()
