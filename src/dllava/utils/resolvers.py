"""OmegaConf resolvers the configs use; ``register_resolvers()`` runs before Hydra composes."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def grad_accum(global_batch: int, per_device: int, devices: Any, num_nodes: int = 1) -> int:
    """Accumulation steps that make ``per_device x devices x num_nodes x steps == global_batch``.

    Used as ``${grad_accum:64,${data.batch_size},${trainer.devices},${trainer.num_nodes}}`` so the
    paper's global batch of 64 holds on 1 GPU or 64. ``devices`` must be a count or a list of ids.
    """
    if isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        devices = len(devices)
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"trainer.devices must be a number of devices to derive gradient accumulation, got {devices!r}")
    replicas = int(per_device) * devices * int(num_nodes)
    if int(global_batch) % replicas:
        raise ValueError(
            f"global batch {global_batch} is not a multiple of data.batch_size x trainer.devices x "
            f"trainer.num_nodes = {per_device} x {devices} x {num_nodes}"
        )
    return int(global_batch) // replicas


def sweep_group(task_name: str) -> str | None:
    """W&B group of a multirun job: ``<task_name>-<sweep dir name>``, shared by all jobs of the sweep;
    None (no group) in a single run. Used as ``group: ${sweep_group:${task_name}}``."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return f"{task_name}-{Path(hc.sweep.dir).name}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("grad_accum"):
        OmegaConf.register_new_resolver("grad_accum", grad_accum)
    if not OmegaConf.has_resolver("sweep_group"):
        OmegaConf.register_new_resolver("sweep_group", sweep_group)
