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
Before each checkpoint write, temp files and directories that a killed run left in the checkpoint
directory are removed, only when their writer is gone (:func:`dllava.utils.files.clean_stale_temps`).
Files are created with the umask's permissions (``0644`` under umask 022), like any file.

Loading runs no code from the checkpoint and refuses a damaged one (:mod:`dllava.training.safe_load`):
files are CRC-checked and unpickled weights-only (whatever ``weights_only`` the caller passes); sharded
directories are read through :class:`~dllava.training.safe_load.SafeFileSystemReader` (FSDP2) or
checked by the same reads before Lightning's loader (FSDP1).

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

from dllava.training.safe_load import (
    load_checkpoint_file,
    load_sharded,
    load_weights_only,
    verify_archive,
    verify_sharded_checkpoint,
)
from dllava.utils.files import _fsync_dir, atomic_write, clean_stale_temps


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temp file in the checkpoint's own directory, fsync, then ``os.replace``.

    Local paths only (a URL, e.g. ``s3://``, falls back to Lightning's writer and reader). Loading a
    local file checks the archive's CRCs first and always unpickles weights-only.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        clean_stale_temps(path.parent)
        atomic_write(path, lambda handle: self.write(checkpoint, handle), durable=True)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = lambda storage, loc: storage, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if "://" in str(path) or not Path(path).is_file():
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint_file(path, map_location=map_location)

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
            clean_stale_temps(path.parent)
        self.barrier("dllava_ckpt_tmp_ready")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("dllava_ckpt_written")
        if self.global_rank == 0:
            swap_directory(tmp, path)
        self.barrier("dllava_ckpt_swapped")


def _check_file_loads_weights_only(path: Path) -> None:
    """CRCs, then a weights-only unpickling (``mmap``: tensor data is not read) of a checkpoint file
    that a Lightning loader will unpickle itself."""
    verify_archive(path)
    load_weights_only(path, str(path), map_location="cpu", mmap=True)


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
    """Lightning's ``FSDPStrategy`` (GPU only) whose sharded checkpoints are written atomically.

    Loading: Lightning's loader builds its own DCP reader, and unpickles a full-state file with its lazy
    unpickler, which honours no ``weights_only``; so the checkpoint is first checked by the same reads,
    restricted (:func:`~dllava.training.safe_load.verify_sharded_checkpoint`, or the CRCs and a
    weights-only unpickling of the file), and refused before Lightning reads it if anything is unsafe.
    """

    def _writes_directory(self) -> bool:
        return self._state_dict_type == "sharded"

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            verify_sharded_checkpoint(path)
        else:
            _check_file_loads_weights_only(path)
        return super().load_checkpoint(path, weights_only=True)


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

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """A sharded directory through :class:`~dllava.training.safe_load.SafeFileSystemReader` (no code
        from the checkpoint runs); a file checked (CRCs, weights-only) and loaded by Lightning."""
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            _check_file_loads_weights_only(path)
            return super().load_checkpoint(path, weights_only=True)
        verify_sharded_checkpoint(path)  # every rank: a refusal fails them all before any collective
        return self._load_sharded(path)

    def _load_sharded(self, path: Path) -> dict[str, Any]:
        """What Lightning's ``ModelParallelStrategy`` does for a sharded directory, with our reader:
        model, then each optimizer (keys ``state_dict``, ``optimizer_<i>``, as saved), then ``meta.pt``
        (everything else Lightning restores: loops, schedulers, callbacks), weights-only."""
        from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        module = self.model
        model_state = {"state_dict": get_model_state_dict(module)}
        load_sharded(model_state, path)
        module.load_state_dict(model_state["state_dict"], strict=self.lightning_module.strict_loading)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
            load_sharded(optimizer_state, path)
            set_optimizer_state_dict(
                module, optimizer, optim_state_dict=optimizer_state[key], options=StateDictOptions(cpu_offload=True)
            )
        return load_checkpoint_file(path / _METADATA_FILENAME)
