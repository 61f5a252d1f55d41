"""Test-only objects that train.py subprocesses load by Hydra ``_target_`` (tests/ is on their path)."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch

from dllava.training.sharding import parameter_types
from dllava.training.strategies import AtomicCheckpointIO


class ParameterTypes(L.Callback):
    """Writes ``<out>/rank<r>.json``: every parameter's type when training starts (after sharding)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        payload = {"world_size": trainer.world_size, "types": parameter_types(pl_module)}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))


class KilledDuringSecondLastWrite(AtomicCheckpointIO):
    """Writes half of the checkpoint, then SIGKILLs its own process, when ``last.ckpt`` already exists:
    a crash in the middle of replacing the previous last checkpoint."""

    def write(self, checkpoint: dict[str, Any], handle: IO[bytes]) -> None:
        target = Path(handle.name).name  # .last.ckpt.<random>.tmp
        if target.startswith(".last.ckpt.") and (Path(handle.name).parent / "last.ckpt").exists():
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        super().write(checkpoint, handle)


class NonFiniteBatchOnRank(L.Callback):
    """Fills one rank's pixels with NaN at one step, so that rank alone computes a NaN loss (a data-parallel
    run where only one rank diverges)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch["pixel_values"].fill_(float("nan"))


class ZeroWeightsOnTrainStart(L.Callback):
    """Zeroes every weight when training starts (after the sanity check): a resumed run whose later
    validations all score below the best before its checkpoint."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            for param in pl_module.parameters():
                param.zero_()


class TrainedBatches(L.Callback):
    """Appends one JSON line per trained batch to ``<out>/rank<r>.jsonl``: global step, epoch, the
    batch index Lightning passes to the step (it seeds the step's randomness) and the sample ids."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        line = {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch_idx": batch_idx,
                "ids": list(batch["ids"])}
        with (self.out / f"rank{trainer.global_rank}.jsonl").open("a") as handle:
            handle.write(json.dumps(line) + "\n")
