"""Run lmms-eval tasks on the model a training run just trained: ``python train.py callbacks=lmms_eval``.

At the end of a completed fit (``on_train_end``: the model still on its training device; not after an
interrupted or failed fit), the trained model is wrapped,
in memory, as the ``dllava`` lmms-eval model (:class:`~dllava.lmms.model.DllavaLMM`, the same class
``--model dllava`` builds) and ``lmms_eval.evaluator.simple_evaluate`` runs ``tasks`` on it. The scores
go to every logger as ``lmms/<task>/<metric>`` at the last step, into ``trainer.callback_metrics`` (so
``summary.json`` holds them) and, with the per-request samples when ``log_samples``, to
``<output_dir>/lmms_eval.json``.

``include_path`` (default: dllava's own tasks, ``dllava_synthetic_vqa``) names the folders of local
tasks (list :data:`dllava.lmms.TASKS_DIR` too to keep dllava's); ``include_defaults=false`` skips indexing lmms-eval's ~2000 built-in tasks (3 s) when only local
tasks run. What can be checked before training is, at the fit's start: lmms-eval importable, one process
(under DDP/FSDP every rank holds part of the model or a copy; evaluate the exported checkpoint with
``python -m lmms_eval`` instead), and every task name known. An error during the evaluation itself fails
the run after the checkpoints written so far.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch

from dllava.lmms import TASKS_DIR

log = logging.getLogger(__name__)


class LmmsEvalCallback(L.Callback):
    """lmms-eval ``tasks`` on the trained model at the end of fit (module docstring)."""

    def __init__(
        self,
        tasks: Sequence[str],
        output_dir: str | None = None,
        include_path: str | Sequence[str] | None = None,
        include_defaults: bool = True,
        method: str | None = None,
        keep: float | None = None,
        text: str | float | None = None,
        batch_size: int = 16,
        limit: int | float | None = None,
        log_samples: bool = False,
    ) -> None:
        if isinstance(tasks, str) or not tasks:
            raise ValueError(f"callbacks.lmms_eval.tasks must be a non-empty list of task names, got {tasks!r}")
        self.tasks = [str(t) for t in tasks]
        self.output_dir = Path(output_dir) if output_dir else None
        paths = [include_path] if isinstance(include_path, str) else list(include_path or [TASKS_DIR])
        self.include_path = [str(p) for p in paths]
        self.include_defaults = include_defaults
        self.settings = dict(method=method, keep=keep, text=text, batch_size=batch_size)
        self.limit = limit
        self.log_samples = log_samples
        self.results: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            raise RuntimeError(
                f"callbacks=lmms_eval runs in one process, this run has {trainer.world_size}: evaluate the "
                "exported checkpoint with `python -m lmms_eval --model dllava ...` instead (README, lmms-eval)"
            )
        try:  # fail before training, not after it
            import lmms_eval.tasks  # noqa: F401
        except ImportError as err:
            raise ImportError(
                f"callbacks=lmms_eval needs lmms-eval ({err}): pip install -e '.[lmms]' and then "
                "pip install --no-deps lmms-eval==0.7.3 (make setup does both)"
            ) from None
        missing = [p for p in self.include_path if not Path(p).is_dir()]
        if missing:
            raise FileNotFoundError(f"callbacks.lmms_eval.include_path: {missing[0]} is not a directory")
        known = set(self._task_manager().all_tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            where = " (lmms-eval's built-in tasks are indexed only with include_defaults=true)" if not self.include_defaults else ""
            raise ValueError(f"callbacks.lmms_eval.tasks: unknown task(s) {unknown} in {self.include_path}{where}")

    def _task_manager(self) -> Any:
        from lmms_eval.tasks import TaskManager

        return TaskManager(include_path=self.include_path, include_defaults=self.include_defaults)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or trainer.received_sigterm or not trainer.is_global_zero:
            return
        from lmms_eval.evaluator import simple_evaluate

        from dllava.eval.loading import LoadedModel
        from dllava.lmms.model import DllavaLMM
        from dllava.model.loading import load_processor

        model = pl_module.model
        was_training = model.training
        model.eval()
        loaded = LoadedModel(model=model, processor=load_processor(pl_module.source.pretrained),
                             name=f"step_{trainer.global_step}", path=str(self.output_dir or ""), device=str(pl_module.device))
        try:
            lm = DllavaLMM(loaded=loaded, **self.settings)
            manager = self._task_manager()
            with torch.no_grad():
                results = simple_evaluate(model=lm, tasks=self.tasks, task_manager=manager, limit=self.limit,
                                          log_samples=self.log_samples)
        finally:
            model.train(was_training)
        if results is None:
            raise RuntimeError(f"lmms-eval returned no results for {self.tasks}")
        self.results = results
        metrics = flat_scores(results)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            keep = {k: results[k] for k in ("results", "configs", "n-samples", "samples") if k in results}
            (self.output_dir / "lmms_eval.json").write_text(json.dumps(keep, indent=2, default=str) + "\n")
        log.info("lmms-eval: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def flat_scores(results: dict[str, Any]) -> dict[str, float]:
    """``{"lmms/<task>/<metric>": value}`` from lmms-eval's results (filter suffixes ``,none`` dropped;
    standard errors and non-numbers left out)."""
    flat = {}
    for task, scores in results.get("results", {}).items():
        for key, value in scores.items():
            metric, _, filter_name = key.partition(",")
            if "_stderr" in metric or not isinstance(value, numbers.Real) or isinstance(value, bool):
                continue
            if math.isnan(value):
                continue
            name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
            flat[f"lmms/{task}/{name}"] = float(value)
    return flat
