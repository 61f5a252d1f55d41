"""Distributed strategies as config (``trainer=ddp|fsdp|fsdp2``) with crash-safe checkpoint writes.

A checkpoint is written beside its final path under a hidden temporary name and renamed into place only
once it is complete, so a run killed mid-write leaves the previous checkpoint at that path loadable:

* files (one process, DDP, full-state FSDP) go through :class:`AtomicCheckpointIO`, plugged into every
  trainer by ``conf/trainer/default.yaml``. Lightning's own ``TorchCheckpointIO`` serialises the whole
  checkpoint into memory and moves it from the system temp dir, which is a copy (not a rename) when
  that is another filesystem, as on most clusters;
* sharded checkpoints (a directory written by every rank) go through :class:`FSDPStrategy` and
  :class:`FSDP2Strategy`, which write ``.<name>.tmp/`` and swap it in with :func:`swap_directory`.

Temporary names start with a dot, so ``ckpt_path=last`` (which matches ``last*.ckpt``) never picks one.

No hang: every strategy here takes ``timeout_s``, the longest a collective (all-reduce, all-gather,
barrier) may wait for the other ranks. Ranks that run different numbers of collectives (unequal batches
under FSDP, a rank that died) would otherwise wait forever, and a blocked collective also defers the
Python SIGTERM handler, so ``kill`` alone does not end such a run. A timed-out collective fails the run
with an error that names the likely cause and the setting (:func:`explain_collective_timeout`), and the
process that launched the other ranks kills them when it exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy as _LightningDDPStrategy
from lightning.pytorch.strategies import FSDPStrategy as _LightningFSDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default; a 7B checkpoint write on rank 0 fits well inside


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk, not only the file."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temp file in the checkpoint's own directory, fsync, then ``os.replace``.

    Local paths only (a URL, e.g. ``s3://``, falls back to Lightning's writer). Loading is Lightning's,
    with ``weights_only`` as the trainer passes it (train.py passes True).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as handle:
                self.write(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def write(self, checkpoint: dict[str, Any], handle: IO[bytes]) -> None:
        """Serialise ``checkpoint`` into the open temp file ``handle.name`` (a seam for crash tests)."""
        torch.save(checkpoint, handle)


def temporary_sibling(path: str | Path) -> Path:
    """Where a checkpoint directory is written before :func:`swap_directory` moves it to ``path``."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp"


def swap_directory(tmp: Path, path: Path) -> None:
    """Move the complete checkpoint ``tmp`` to ``path``, replacing what was there.

    A directory cannot be renamed over a non-empty one, so the previous checkpoint is first renamed to
    ``.<name>.old``; between the two renames (microseconds, no data written) ``path`` is briefly absent
    and the previous checkpoint sits at ``.<name>.old``, which :func:`recover_directory` restores.
    """
    path = Path(path)
    old = path.parent / f".{path.name}.old"
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    if path.is_dir():
        os.replace(path, old)
    elif path.exists():
        path.unlink()
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_directory(path: str | Path) -> None:
    """Undo a swap interrupted between its two renames; drop an unfinished temp dir."""
    path = Path(path)
    old = path.parent / f".{path.name}.old"
    if not path.exists() and old.is_dir():
        os.replace(old, path)
    tmp = temporary_sibling(path)
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)


class _AtomicShardedSave:
    """Mixin for Lightning strategies that write a directory from every rank (``save_checkpoint``).

    All ranks write into the same temp directory (the parent's ``save_checkpoint`` broadcasts rank 0's
    path), wait for each other, and rank 0 swaps it into place; then everyone waits again so no rank
    reads or removes a checkpoint that is still moving.
    """

    def _writes_directory(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if not self._writes_directory():
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # a file: AtomicCheckpointIO
        path = Path(self.broadcast(str(filepath)))
        tmp = temporary_sibling(path)
        if self.global_rank == 0:
            recover_directory(path)
        self.barrier("dllava_ckpt_tmp_ready")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("dllava_ckpt_written")
        if self.global_rank == 0:
            swap_directory(tmp, path)
        self.barrier("dllava_ckpt_swapped")


def collective_timeout(seconds: float) -> timedelta:
    """``trainer.strategy.timeout_s`` as the ``timedelta`` torch.distributed takes; must be > 0."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"trainer.strategy.timeout_s must be a number of seconds > 0, got {seconds!r}")
    return timedelta(seconds=float(seconds))


def is_collective_timeout(exn: BaseException) -> bool:
    """A collective or rendezvous that gave up waiting: torch.distributed's own errors (``DistError``)
    about a timeout, or gloo's plain ``RuntimeError`` ("[.../gloo/...] Timed out waiting ..."); not any
    error that mentions a timeout (a DataLoader's, a download's). Under NCCL the watchdog usually aborts
    the process itself at the timeout, with its own "Watchdog caught collective operation timeout"."""
    if not isinstance(exn, RuntimeError):
        return False
    message = str(exn).lower()
    if isinstance(exn, torch.distributed.DistError):
        return "timed out" in message or "timeout" in message
    return "gloo" in message and "timed out" in message


def explain_collective_timeout(exn: BaseException, timeout_s: float) -> bool:
    """Prefix a timed-out collective's error with its likely cause and the setting; True if it was one."""
    if not is_collective_timeout(exn) or getattr(exn, "_dllava_explained", False):
        return False
    if isinstance(exn, torch.distributed.DistStoreError):  # the start-up rendezvous, not a collective
        hint = (
            f"not every rank joined the process group within trainer.strategy.timeout_s={timeout_s:g} s: a "
            "rank failed or was slow to start (see its log), or the rendezvous address is wrong."
        )
    else:
        hint = (
            f"a collective operation (all-reduce, all-gather, barrier) waited longer than "
            f"trainer.strategy.timeout_s={timeout_s:g} s for the other ranks. Most likely the ranks ran "
            "different numbers of collectives (e.g. unequal numbers of batches or forward passes, or another "
            "rank failed or stopped; see its log); if one rank is just slow at this point (a long checkpoint "
            "write), raise trainer.strategy.timeout_s."
        )
    exn.args = (f"{hint} Original error: {exn.args[0] if exn.args else exn}", *exn.args[1:])
    exn._dllava_explained = True  # type: ignore[attr-defined]
    return True


class _FailsInsteadOfHanging:
    """Mixin for Lightning's distributed strategies: a collective timeout in seconds (``timeout_s``),
    explained when it fires, and the ranks this process launched killed when it exits after a failure
    (a rank stalled outside a collective would otherwise outlive it)."""

    def __init__(self, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> None:
        if "timeout" in kwargs:
            raise TypeError(f"{type(self).__name__} takes timeout_s (seconds), not timeout")
        super().__init__(*args, timeout=collective_timeout(timeout_s), **kwargs)
        self.timeout_s = float(timeout_s)
        self._kill_registered = False

    def on_exception(self, exception: BaseException) -> None:
        explain_collective_timeout(exception, self.timeout_s)
        super().on_exception(exception)  # type: ignore[misc]
        launcher = getattr(self, "launcher", None)
        if isinstance(launcher, _SubprocessScriptLauncher) and not self._kill_registered:
            # at exit, not now: Lightning's child observer kills this process too once a child dies, and
            # the run's failure must be recorded (logs, summary, W&B) first
            atexit.register(launcher.kill, signal.SIGKILL)
            self._kill_registered = True


class DDPStrategy(_FailsInsteadOfHanging, _LightningDDPStrategy):
    """Lightning's ``DDPStrategy`` with a collective timeout in seconds that fails the run clearly."""


class FSDPStrategy(_FailsInsteadOfHanging, _AtomicShardedSave, _LightningFSDPStrategy):
    """Lightning's ``FSDPStrategy`` (GPU only) whose sharded checkpoints are written atomically."""

    def _writes_directory(self) -> bool:
        return self._state_dict_type == "sharded"


class FSDP2Strategy(_FailsInsteadOfHanging, _AtomicShardedSave, ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over all processes: Lightning's ``ModelParallelStrategy`` with pure data
    parallelism (``data_parallel_size = world size``, no tensor parallelism) and atomic sharded saves.

    Runs on GPUs (NCCL) and on CPU (gloo). The LightningModule shards itself in ``configure_model``
    (:func:`dllava.training.sharding.shard_fsdp2`) with the options held here:
    ``activation_checkpointing`` recomputes every decoder layer in backward.
    """

    def __init__(self, activation_checkpointing: bool = False, save_distributed_checkpoint: bool = True, **kwargs: Any) -> None:
        for key in ("data_parallel_size", "tensor_parallel_size"):
            if key in kwargs:
                raise TypeError(f"{type(self).__name__} shards over all processes; {key} is not configurable")
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        # world size is known only now (devices x num_nodes); 'auto' would mean one DP group per node
        self._data_parallel_size = self.num_processes * self.num_nodes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def _writes_directory(self) -> bool:
        return self._save_distributed_checkpoint
