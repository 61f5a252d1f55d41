"""Plumbing shared by the Hydra entry points: object instantiation, W&B hygiene, summary.json, resume.

Run status. Every run ends with ``summary.json`` (rank 0) and its W&B run finished with an exit code:

* ``completed``: the task returned (W&B exit code 0, process exit code 0);
* ``diverged``: a training loss was NaN or inf (:class:`TrainingDiverged`, raised by the LightningModule
  on every rank together); the error names the step and the loss, the metrics logged so far are kept;
* ``failed``: any other exception;
* ``interrupted``: Ctrl-C (SIGINT; exit code 130) or SIGTERM (SLURM preemption, ``scancel``; exit code
  143). Lightning stops a SIGTERM'd fit at the end of the running step and, on Ctrl-C, shuts the trainer
  down and calls ``sys.exit(1)``; either way nothing after the fit runs (no test, no export). No
  checkpoint is written on the way out: ``ckpt_path=last`` continues from the newest ``last.ckpt``
  (end of the last epoch, or ``every_n_train_steps``), whose atomic write a signal cannot tear.

Failure policy. A single run that does not complete exits non-zero (the exception propagates after
``summary.json`` is written). A job of a Hydra multirun that fails or diverges is recorded and returns,
so the launcher goes on with the other jobs; at the end the sweep's ``sweep_summary.csv`` lists its
status and the sweep exits non-zero (:mod:`dllava.utils.sweep`). An interrupt stops the whole sweep
(``python -m dllava.utils.sweep <sweep dir>`` then writes the table). A refused run dir
(:class:`RunDirRefused`, a usage error) stops a sweep too and leaves the checkpoints and ``summary.json``
of the run dir it protects as they were.

Non-finite metrics. JSON has no NaN: ``summary.json`` keeps a NaN or infinite metric as the string
``"nan"``, ``"inf"`` or ``"-inf"`` (``float()`` reads each back; so do pandas and the csv module's
readers of ``sweep_summary.csv``), so a diverged run's summary shows what happened instead of dropping
the key.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
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


class TrainingDiverged(RuntimeError):
    """A non-finite training loss: the run stops with status ``diverged`` (see the module docstring).

    ``losses``: the step's loss on every rank; ``metrics``: what was logged up to then, for the summary.
    """

    def __init__(self, step: int, losses: list[float], metrics: dict[str, Any] | None = None) -> None:
        self.step = step
        self.losses = list(losses)
        self.metrics = dict(metrics or {})
        shown = ", ".join(str(v) for v in self.losses)
        super().__init__(
            f"training diverged: non-finite loss at step {step} (loss per rank: {shown}); lower optim.lr "
            "(or the per-part *_lr), add warmup (optim.warmup_ratio), or check the data"
        )


class RunDirRefused(RuntimeError):
    """Starting this run would lose a run directory (see :func:`check_run_dir`); no summary is written."""


SIGNAL_EXIT_CODES = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}


def _exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or while handling (Lightning answers a
    KeyboardInterrupt with ``sys.exit(1)`` inside its ``except`` block)."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def run_outcome(err: BaseException) -> tuple[str, int]:
    """(summary status, process and W&B exit code) of a run ended by ``err``."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    for cause in _exception_chain(err):
        if isinstance(cause, TrainingDiverged):
            return "diverged", 1
        if isinstance(cause, KeyboardInterrupt):
            return "interrupted", SIGNAL_EXIT_CODES[signal.SIGINT]
        if isinstance(cause, SIGTERMException):
            return "interrupted", SIGNAL_EXIT_CODES[signal.SIGTERM]
    return "failed", 1


def describe_error(err: BaseException) -> str:
    """One line for ``summary.json``: the exception, or the signal that interrupted the run."""
    status, code = run_outcome(err)
    if status == "interrupted":
        return f"interrupted by {signal.Signals(code - 128).name}"
    cause = next((c for c in _exception_chain(err) if not isinstance(c, SystemExit)), err)
    return f"{type(cause).__name__}: {cause}"


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Record how the run ended (summary.json, W&B exit code, process exit code), log its run dir.

    See the module docstring for the statuses and the failure policy.
    """

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        exit_code = 0
        try:
            return task(cfg)
        except RunDirRefused:
            exit_code = 1
            raise  # a usage error, the same for every job: stop (a sweep too) and write nothing
        except BaseException as err:
            status, exit_code = run_outcome(err)
            _record_failure(cfg, err, status)
            if status == "interrupted":
                raise SystemExit(exit_code) from err  # a sweep stops too
            if not is_multirun():
                raise
            log.error("sweep job %s (recorded in %s/summary.json); the sweep goes on", status, _output_dir(cfg))
            return {}
        finally:
            log.info("output dir: %s", _output_dir(cfg))
            finish_wandb(exit_code=exit_code)

    return wrapped


def _record_failure(cfg: DictConfig, err: BaseException, status: str) -> None:
    """Log a run that did not complete and write its ``summary.json`` (rank 0)."""
    if status == "interrupted":
        log.warning("run %s: %s", status, describe_error(err))
    else:
        log.error("run %s", status, exc_info=err)
    output_dir = _output_dir(cfg)
    if output_dir is not None and is_global_zero():
        metrics = err.metrics if isinstance(err, TrainingDiverged) else {}
        write_summary(output_dir, metrics, None, status=status, error=describe_error(err))


def _output_dir(cfg: DictConfig) -> str | None:
    try:
        return cfg.paths.output_dir if OmegaConf.is_config(cfg) and "paths" in cfg else None
    except Exception:  # an unresolvable interpolation must not hide the original error
        return None


def plain_metrics(metrics: dict[str, Any]) -> dict[str, float | str]:
    """Tensors and numbers -> JSON-safe values: finite ones as floats, NaN and infinities as the strings
    ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has no NaN; a diverged run must keep its NaN loss)."""
    out: dict[str, float | str] = {}
    for key, value in metrics.items():
        try:
            number = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            continue
        out[key] = number if math.isfinite(number) else str(number)
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
    """``summary.json``: status (completed/diverged/failed/interrupted), the job's overrides, final callback
    metrics (:func:`plain_metrics`), the best checkpoint path, and the error of a run that did not complete."""
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


def run_dir_is_pinned() -> bool:
    """Whether running the same command again finds this job's run dir again.

    The run dir (``hydra.run.dir``; in a multirun ``hydra.sweep.dir``, the parent of the job dirs) is
    pinned when its definition does not use the clock (``${now:...}``, as the default does): given on
    the command line, set by a preset, or derived from the config. A job of a submitit launcher
    (``hydra/launcher=slurm``) counts as pinned: SLURM requeues it into its own job dir. Outside Hydra
    there is nothing to check (True).
    """
    hc = hydra_config()
    if hc is None:
        return True
    if hc.mode == RunMode.MULTIRUN:
        if "submitit" in str(OmegaConf.select(hc, "launcher._target_", default="")):
            return True
        node = "sweep"
    else:
        node = "run"
    definition = OmegaConf.to_container(hc[node], resolve=False).get("dir")
    return "${now:" not in str(definition)


def check_run_dir(ckpt_path: str | None, checkpoint_dir: str | Path, train: bool, pinned: bool, multirun: bool = False) -> None:
    """Refuse (:class:`RunDirRefused`) the two ways a run dir is lost, saying what to pass:

    * ``ckpt_path=last`` finds no last checkpoint and the run dir is not pinned (:func:`run_dir_is_pinned`):
      a new, clock-named run dir was made, so the run that was meant to continue is elsewhere. With a
      pinned run dir this starts fresh (a first SLURM submission);
    * ``ckpt_path=null`` with ``train=true`` where ``checkpoint_dir`` already holds a ``last*.ckpt``:
      the new run would overwrite the old run's checkpoints.
    """
    if multirun:
        dir_key, name, example = "hydra.sweep.dir", "sweep dir", "logs/train/multiruns/<time>"
    else:
        dir_key, name, example = "hydra.run.dir", "run dir", "logs/train/runs/<time>"
    if ckpt_path is not None and str(ckpt_path) == "last" and not pinned and find_last_checkpoint(checkpoint_dir) is None:
        raise RunDirRefused(
            f"ckpt_path=last: {dir_key} was not given, so this run got a new run dir named by the clock "
            f"({checkpoint_dir} holds no checkpoint) and would quietly start from scratch. To continue a run, "
            f"pass {dir_key}=<its {name}> (e.g. {example}); to start a new run, drop ckpt_path=last."
        )
    if ckpt_path is None and train:
        found = find_last_checkpoint(checkpoint_dir)
        if found is not None:
            raise RunDirRefused(
                f"{checkpoint_dir} already holds checkpoints ({found.name}) and ckpt_path is not set: this run "
                f"would overwrite them. Pass ckpt_path=last to continue that run, or another {dir_key} "
                "for a new one."
            )


def read_run_identity(ckpt_path: str | Path) -> dict[str, Any]:
    """What a checkpoint records about its run (``{"wandb_id": ...}``), without loading its tensors."""
    import zipfile

    from dllava.training.safe_load import NotAnArchiveError, load_weights_only

    path = Path(ckpt_path)
    meta = path / "meta.pt" if path.is_dir() else path  # sharded: Lightning's metadata file
    if not meta.is_file():
        return {}
    if not zipfile.is_zipfile(meta):  # the full CRC check comes with the load itself (AtomicCheckpointIO)
        raise NotAnArchiveError(f"ckpt_path: {meta} is not a torch checkpoint archive")
    checkpoint = load_weights_only(meta, str(meta), map_location="cpu", mmap=not path.is_dir())
    return dict(checkpoint.get(RUN_KEY) or {})
