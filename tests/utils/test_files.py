"""Atomic writes with the umask's permissions, and cleaning only the stale temp files of ours."""

import multiprocessing
import os
import socket
import stat
import time
from pathlib import Path

import pytest
import torch

from dllava.training.strategies import AtomicCheckpointIO, _AtomicShardedSave
from dllava.utils.files import STALE_AFTER_S, clean_stale_temps, temp_path
from dllava.utils.run import write_json_atomic
from dllava.utils.sweep import write_sweep_summary


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the previous one back."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664)])
def test_checkpoints_summaries_and_sweep_tables_get_the_umask_permissions(umask, tmp_path, mask, expected):
    umask(mask)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(2)}, ckpt)
    summary = write_json_atomic(tmp_path / "0" / "summary.json", {"status": "completed", "metrics": {}})
    eval_json = write_json_atomic(tmp_path / "eval.json", {"accuracy": 1.0})
    table, _ = write_sweep_summary(tmp_path)
    for path in (ckpt, summary, eval_json, table):
        assert _mode(path) == expected, f"{path.name}: {oct(_mode(path))}"
    assert AtomicCheckpointIO().load_checkpoint(ckpt)["global_step"] == 1


class _RealDirectoryParent:
    """Stands in for Lightning's sharded save: writes a directory with ordinary mkdir/open, as DCP does."""

    global_rank = 0

    def broadcast(self, obj):
        return obj

    def barrier(self, name=None):
        pass

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        Path(filepath).mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, Path(filepath) / "meta.pt")


class _Sharded(_AtomicShardedSave, _RealDirectoryParent):
    def _writes_directory(self):
        return True


@pytest.mark.parametrize("mask, expected_dir, expected_file", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_sharded_checkpoint_directories_get_the_umask_permissions(umask, tmp_path, mask, expected_dir, expected_file):
    umask(mask)
    path = tmp_path / "last.ckpt"
    _Sharded().save_checkpoint({"global_step": 1}, path)
    assert _mode(path) == expected_dir and _mode(path / "meta.pt") == expected_file


def _dead_pid() -> int:
    child = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    child.start()
    child.join()
    return child.pid


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (then, then))


def test_stale_temp_files_are_removed_and_live_ones_kept(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".last.ckpt.{_dead_pid()}@{host}.0a1b2c3d.tmp"  # its writer was killed
    live = tmp_path / f".last.ckpt.{os.getppid()}@{host}.0a1b2c3d.tmp"  # another live process writes it
    elsewhere_fresh = tmp_path / ".last.ckpt.4242@other-node.0a1b2c3d.tmp"  # can't tell: recent, kept
    elsewhere_old = tmp_path / ".step_000004.ckpt.4242@other-node.0a1b2c3d.tmp"
    legacy_old = tmp_path / ".last.ckpt.k3j4_x9q.tmp"  # mkstemp name of an earlier version
    legacy_fresh = tmp_path / ".last.ckpt.abcdefgh.tmp"
    sharded_old, sharded_fresh = tmp_path / ".step_000004.ckpt.tmp", tmp_path / ".last.ckpt.tmp"
    others = [tmp_path / name for name in ("last.ckpt", ".hidden.tmp", "notes.tmp", ".last.ckpt.old")]
    for path in (dead, live, elsewhere_fresh, elsewhere_old, legacy_old, legacy_fresh, *others):
        path.write_bytes(b"x")
    for directory in (sharded_old, sharded_fresh):
        directory.mkdir()
        (directory / "__0_0.distcp").write_bytes(b"x")
    for path in (elsewhere_old, legacy_old, sharded_old, *others):
        _age(path, STALE_AFTER_S + 60)

    removed = clean_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(p.name for p in (dead, elsewhere_old, legacy_old, sharded_old))
    for path in (live, elsewhere_fresh, legacy_fresh, sharded_fresh, *others):
        assert path.exists(), path.name


def test_writing_a_checkpoint_cleans_what_a_killed_write_left(tmp_path):
    path = tmp_path / "last.ckpt"
    leftover = Path(str(temp_path(path)).replace(f".{os.getpid()}@", f".{_dead_pid()}@"))
    leftover.write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    old_sharded = tmp_path / ".step_000002.ckpt.tmp"
    old_sharded.mkdir()
    _age(old_sharded, STALE_AFTER_S + 60)
    _Sharded().save_checkpoint({"global_step": 4}, tmp_path / "step_000004.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step_000004.ckpt"]
