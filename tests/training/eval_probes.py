"""Test-only callbacks for the sharded evaluation tests; train.py subprocesses load them by ``_target_``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L


class EvalForwards(L.Callback):
    """Writes ``<out>/rank<r>.json``: per stage (validate, test) the batches, rows, real (valid) rows and
    forward passes through the language model (first decoder layer: every LM forward, generation steps
    included; under FSDP each one is a collective) this rank ran."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.counts: dict[str, dict[str, int]] = {}
        self._hooked = False

    def _stage(self, trainer: L.Trainer) -> str | None:
        if trainer.sanity_checking:
            return None
        return "validate" if trainer.validating else "test" if trainer.testing else None

    def _hook(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._hooked:
            return
        first_layer = pl_module.llava.model.language_model.layers[0]

        def count(*_: Any) -> None:
            stage = self._stage(trainer)
            if stage is not None:
                self._bucket(stage)["lm_forwards"] += 1

        first_layer.register_forward_pre_hook(count)
        self._hooked = True

    def _bucket(self, stage: str) -> dict[str, int]:
        return self.counts.setdefault(stage, {"batches": 0, "rows": 0, "valid": 0, "lm_forwards": 0})

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hook(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hook(trainer, pl_module)

    def _batch(self, trainer: L.Trainer, batch: dict[str, Any]) -> None:
        stage = self._stage(trainer)
        if stage is not None:
            bucket = self._bucket(stage)
            bucket["batches"] += 1
            bucket["rows"] += len(batch["ids"])
            bucket["valid"] += int(batch["valid"].sum())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(trainer, batch)

    def _write(self, trainer: L.Trainer) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.counts))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)


class StallsOneRank(L.Callback):
    """Rank ``rank`` sleeps ``seconds`` when validation starts while the others go on into their forwards
    (collectives under FSDP): to the others it is a rank that skipped those collectives."""

    def __init__(self, rank: int = 1, seconds: float = 60.0) -> None:
        self.rank, self.seconds = rank, seconds

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == self.rank:
            time.sleep(self.seconds)
