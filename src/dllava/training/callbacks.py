"""Callbacks that belong to the Dynamic-LLaVA recipe."""

from __future__ import annotations

from typing import Any

import lightning as L


def gumbel_tau(step: int, total: int, start: float, end: float) -> float:
    """Exponential decay from ``start`` at step 0 to ``end`` at ``total`` optimizer steps."""
    progress = min(1.0, step / max(1, total))
    return start * (end / start) ** progress


class GumbelTauSchedule(L.Callback):
    """Sets ``pl_module.gumbel_tau`` before every batch from the optimizer step (not the micro-batch).

    The temperatures come from the module's ``sparsity`` config (``tau_start`` -> ``tau_end`` over the
    run's optimizer steps) so they have one source; logged as ``train/gumbel_tau``. A module without
    ``sparsity`` enabled is left alone.
    """

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        sparsity = getattr(pl_module, "sparsity", None)
        if sparsity is None or not sparsity.enabled:
            return
        total = int(trainer.estimated_stepping_batches)
        pl_module.gumbel_tau = gumbel_tau(trainer.global_step, total, sparsity.tau_start, sparsity.tau_end)
        pl_module.log("train/gumbel_tau", pl_module.gumbel_tau, batch_size=1)
