"""Plumbing shared by the Hydra entry points: object instantiation, W&B hygiene, summary.json."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every child with a ``_target_`` (callbacks/, logger/ are dicts keyed by name)."""
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"expected a mapping of named configs, got {type(cfg).__name__}")
    return [hydra.utils.instantiate(child) for child in cfg.values() if isinstance(child, DictConfig) and "_target_" in child]


def finish_wandb() -> None:
    """Close an active W&B run so the next multirun job starts its own (wandb#1314)."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Log failures with their run dir and always finish W&B, even when the task raises."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception:
            log.exception("task failed")
            raise
        finally:
            output_dir = cfg.get("paths", {}).get("output_dir") if OmegaConf.is_config(cfg) else None
            log.info("output dir: %s", output_dir)
            finish_wandb()

    return wrapped


def plain_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Tensors and numbers -> plain floats (JSON-safe; NaN and inf become None-free strings are avoided)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return dict(sorted(out.items()))


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write JSON through a temp file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def write_summary(output_dir: str | Path, metrics: dict[str, Any], ckpt_path: str | None) -> Path:
    """``summary.json``: the final callback metrics as floats plus the checkpoint path."""
    return write_json_atomic(Path(output_dir) / "summary.json", {"metrics": plain_metrics(metrics), "ckpt_path": ckpt_path})
