"""Loggers as ``conf/logger/`` builds them."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger, except that ``WANDB_MODE=disabled`` in the environment wins.

    ``conf/logger/wandb.yaml`` runs offline by default, and Lightning's ``offline=True`` overwrites
    ``WANDB_MODE`` with ``dryrun`` when the run starts, so a job started with ``WANDB_MODE=disabled``
    (W&B's documented switch to turn it off) still wrote offline run files. Here that switch turns the
    run into W&B's disabled run: metrics go nowhere, nothing is written under ``<run dir>/wandb``.
    """

    def __init__(self, *args: Any, offline: bool = False, **kwargs: Any) -> None:
        if os.environ.get("WANDB_MODE", "").strip().lower() == "disabled":
            offline = False  # else Lightning sets WANDB_MODE=dryrun
            kwargs["mode"] = "disabled"
        super().__init__(*args, offline=offline, **kwargs)
