"""Crash-safe checkpoint writes: a checkpoint appears at its path complete, or not at all."""

import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from dllava.training.strategies import (
    AtomicCheckpointIO,
    FSDP2Strategy,
    _AtomicShardedSave,
    recover_directory,
    swap_directory,
    temporary_sibling,
)
from dllava.utils.run import find_last_checkpoint


def test_atomic_io_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 2 and torch.equal(loaded["w"], torch.zeros(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def _write_then_die(path: str) -> None:
    class Dies(AtomicCheckpointIO):
        def write(self, checkpoint, handle):
            handle.write(b"half a checkpoint")
            handle.flush()
            os._exit(1)

    Dies().save_checkpoint({"global_step": 2}, path)


def test_process_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    child = multiprocessing.get_context("fork").Process(target=_write_then_die, args=(str(path),))
    child.start()
    child.join()
    assert child.exitcode == 1
    assert torch.load(path, weights_only=True)["global_step"] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.")  # the half-written temp file
    assert find_last_checkpoint(tmp_path) == path  # ckpt_path=last never picks the temp file


def test_exception_mid_write_removes_the_temp_file(tmp_path):
    class Fails(AtomicCheckpointIO):
        def write(self, checkpoint, handle):
            handle.write(b"partial")
            raise OSError("disk full")

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    with pytest.raises(OSError, match="disk full"):
        Fails().save_checkpoint({"global_step": 2}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class _FakeShardedParent:
    """Stands in for Lightning's sharded save: every 'rank' writes a file into the directory."""

    global_rank = 0
    die_after_first_file = False

    def broadcast(self, obj):
        return obj

    def barrier(self, name=None):
        pass

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        directory = Path(filepath)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "__0_0.distcp").write_text(str(checkpoint["global_step"]))
        if self.die_after_first_file:
            os._exit(1)
        (directory / "meta.pt").write_text(str(checkpoint["global_step"]))


class _FakeSharded(_AtomicShardedSave, _FakeShardedParent):
    def _writes_directory(self):
        return True


def _sharded_save_then_die(path: str) -> None:
    strategy = _FakeSharded()
    strategy.die_after_first_file = True
    strategy.save_checkpoint({"global_step": 2}, path)


def test_sharded_save_is_swapped_in_whole_or_not_at_all(tmp_path):
    path = tmp_path / "last.ckpt"
    _FakeSharded().save_checkpoint({"global_step": 1}, path)
    assert (path / "meta.pt").read_text() == "1" and not temporary_sibling(path).exists()

    child = multiprocessing.get_context("fork").Process(target=_sharded_save_then_die, args=(str(path),))
    child.start()
    child.join()
    assert child.exitcode == 1
    assert (path / "meta.pt").read_text() == "1" and (path / "__0_0.distcp").read_text() == "1"
    assert temporary_sibling(path).is_dir()  # the unfinished write, beside it

    _FakeSharded().save_checkpoint({"global_step": 3}, path)  # the next save clears it and succeeds
    assert (path / "meta.pt").read_text() == "3" and not temporary_sibling(path).exists()


def test_swap_interrupted_between_renames_is_recovered(tmp_path):
    path, new = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.tmp"
    for directory, step in ((path, "1"), (new, "2")):
        directory.mkdir()
        (directory / "meta.pt").write_text(step)
    os.replace(path, tmp_path / ".last.ckpt.old")  # the crash happened right after the first rename
    assert find_last_checkpoint(tmp_path) == path  # ckpt_path=last puts the previous one back
    assert (path / "meta.pt").read_text() == "1" and not new.exists()

    new.mkdir()
    (new / "meta.pt").write_text("2")
    swap_directory(new, path)
    assert (path / "meta.pt").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    recover_directory(path)  # nothing to do
    assert (path / "meta.pt").read_text() == "2"


def test_fsdp2_strategy_shards_over_all_processes_only():
    with pytest.raises(TypeError, match="tensor_parallel_size"):
        FSDP2Strategy(tensor_parallel_size=2)
    strategy = FSDP2Strategy(activation_checkpointing=True)
    assert strategy.activation_checkpointing and strategy._writes_directory()


def test_collective_timeout_is_seconds_above_zero():
    from datetime import timedelta

    from dllava.training.strategies import collective_timeout

    assert collective_timeout(90) == timedelta(seconds=90)
    for bad in (0, -1, "soon", True):
        with pytest.raises(ValueError, match="trainer.strategy.timeout_s must be a number of seconds > 0"):
            collective_timeout(bad)


def test_a_timed_out_collective_is_explained_once_and_other_errors_are_left_alone():
    from dllava.training.strategies import explain_collective_timeout

    gloo = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete")
    assert explain_collective_timeout(gloo, 5)
    assert str(gloo).startswith("a collective operation (all-reduce, all-gather, barrier) waited longer than "
                                "trainer.strategy.timeout_s=5 s")
    assert "different numbers of collectives" in str(gloo) and str(gloo).endswith("for recv operation to complete")
    assert not explain_collective_timeout(gloo, 5)  # once
    store = torch.distributed.DistStoreError("Timed out after 6 seconds waiting for clients. 1/2 clients joined.")
    assert explain_collective_timeout(store, 5) and "not every rank joined" in str(store)
    for other in (ValueError("bad value"), RuntimeError("DataLoader worker timed out after 5 seconds")):
        message = str(other)
        assert not explain_collective_timeout(other, 5) and str(other) == message


@pytest.mark.parametrize("trainer", ["ddp", "fsdp2"])
def test_distributed_trainer_configs_set_a_collective_timeout(trainer, tmp_path):
    import hydra

    from tests.helpers import compose

    cfg = compose("train", [f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.strategy.timeout_s=42"],
                  output_dir=tmp_path)
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert strategy.timeout_s == 42 and strategy._timeout.total_seconds() == 42
