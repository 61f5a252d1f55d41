"""Plumbing shared by the Hydra entry points: object instantiation, W&B hygiene, summary.json, resume.

Failure policy. A single run that fails exits non-zero (the exception propagates). A job of a Hydra
multirun that fails is recorded instead (``summary.json`` with ``status: failed`` and the error, the W&B
run marked failed) and returns, so the launcher goes on with the other jobs; at the end the sweep's
``sweep_summary.csv`` lists it as failed and the sweep exits non-zero (:mod:`dllava.utils.sweep`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Key of the run identity (W&B run id) inside Lightning checkpoints; written by the LightningModule.
RUN_KEY = "dllava_run"


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every child with a ``_target_`` (callbacks/, logger/ are dicts keyed by name)."""
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"expected a mapping of named configs, got {type(cfg).__name__}")
    return [hydra.utils.instantiate(child) for child in cfg.values() if isinstance(child, DictConfig) and "_target_" in child]


def finish_wandb(exit_code: int = 0) -> None:
    """Close an active W&B run so the next multirun job starts its own (wandb#1314)."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def hydra_config() -> DictConfig | None:
    """The running job's Hydra config, or None outside a Hydra job."""
    return HydraConfig.get() if HydraConfig.initialized() else None


def is_multirun() -> bool:
    """True inside a job of ``python train.py -m ...`` (or a preset that sets ``hydra.mode``)."""
    hc = hydra_config()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def job_overrides() -> list[str]:
    """The command-line overrides that made this job (its row in a sweep summary)."""
    hc = hydra_config()
    return list(hc.overrides.task) if hc is not None else []


def is_global_zero() -> bool:
    """Rank 0 of the job (before a trainer exists, from the launcher's environment variables)."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Log failures with their run dir and always finish W&B; in a multirun, record a failure and return.

    See the module docstring for the failure policy.
    """

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        failed = False
        try:
            return task(cfg)
        except Exception as err:
            failed = True
            log.exception("task failed")
            if not is_multirun():
                raise
            output_dir = _output_dir(cfg)
            if output_dir is not None and is_global_zero():
                write_summary(output_dir, {}, None, status="failed", error=f"{type(err).__name__}: {err}")
            log.error("sweep job failed (recorded in %s/summary.json); the sweep goes on", output_dir)
            return {}
        finally:
            log.info("output dir: %s", _output_dir(cfg))
            finish_wandb(exit_code=1 if failed else 0)

    return wrapped


def _output_dir(cfg: DictConfig) -> str | None:
    try:
        return cfg.paths.output_dir if OmegaConf.is_config(cfg) and "paths" in cfg else None
    except Exception:  # an unresolvable interpolation must not hide the original error
        return None


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
    """Write JSON through a temp file and rename, so a reader never sees half a file; the file gets the
    umask's permissions (:func:`dllava.utils.files.atomic_write`)."""
    from dllava.utils.files import atomic_write_text

    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def write_summary(
    output_dir: str | Path,
    metrics: dict[str, Any],
    ckpt_path: str | None,
    status: str = "completed",
    error: str | None = None,
) -> Path:
    """``summary.json``: status (completed/failed), the job's overrides, final callback metrics as floats,
    the best checkpoint path, and the error of a failed job."""
    payload = {"status": status, "overrides": job_overrides(), "metrics": plain_metrics(metrics), "ckpt_path": ckpt_path}
    if error is not None:
        payload["error"] = error
    return write_json_atomic(Path(output_dir) / "summary.json", payload)


# -- resume ----------------------------------------------------------------------------------------
def find_last_checkpoint(directory: str | Path) -> Path | None:
    """The newest ``last*.ckpt`` (file, or sharded directory) in ``directory``, as ``ckpt_path=last`` picks.

    A sharded save interrupted between its two renames is put back first
    (:func:`dllava.training.strategies.recover_directory`); temp files start with a dot and never match.
    """
    from dllava.training.strategies import recover_directory

    directory = Path(directory)
    if not directory.is_dir():
        return None
    for old in directory.glob(".last*.ckpt.old"):
        recover_directory(directory / old.name[1 : -len(".old")])
    found = [p for p in directory.iterdir() if p.suffix == ".ckpt" and p.name.startswith("last")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: str | Path) -> str | None:
    """``ckpt_path``: null (fresh start), ``last`` (the newest last checkpoint of this run dir, or a
    fresh start when there is none yet, as after a first SLURM submission), or a checkpoint path."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        found = find_last_checkpoint(checkpoint_dir)
        if found is None:
            log.warning("ckpt_path=last: no last checkpoint in %s yet; starting from scratch", checkpoint_dir)
            return None
        log.info("ckpt_path=last resumes from %s", found)
        return str(found)
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path!r} does not exist. Give a checkpoint file or sharded checkpoint directory, "
            "or ckpt_path=last with hydra.run.dir=<the run dir to continue>."
        )
    return str(path)


def read_run_identity(ckpt_path: str | Path) -> dict[str, Any]:
    """What a checkpoint records about its run (``{"wandb_id": ...}``), without loading its tensors."""
    import torch

    path = Path(ckpt_path)
    meta = path / "meta.pt" if path.is_dir() else path  # sharded: Lightning's metadata file
    if not meta.is_file():
        return {}
    checkpoint = torch.load(meta, map_location="cpu", weights_only=True, mmap=not path.is_dir())
    return dict(checkpoint.get(RUN_KEY) or {})
