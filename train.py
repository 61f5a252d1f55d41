"""Train a (Dynamic-)LLaVA: `python train.py [model=...] [data=...] [trainer=...] [key=value ...]`.

Reads like a table of contents: compose config -> data, model, callbacks, loggers, trainer -> fit ->
test -> summary.json in the run directory. Everything else lives in src/dllava.

Resume: ``ckpt_path=last`` (the newest last checkpoint in this run dir; pin it with
``hydra.run.dir=<run dir>``) or ``ckpt_path=<checkpoint>`` restores model, optimizer, scheduler, loop
position and the W&B run. A run that would lose a run dir is refused (``ckpt_path=last`` in a new
clock-named dir; ``ckpt_path=null`` where checkpoints exist): see dllava.utils.run.check_run_dir.
Sweeps: ``python train.py -m key=a,b`` (see dllava.utils.sweep). Run status (completed, diverged,
failed, interrupted) and exit codes: dllava.utils.run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("DLLAVA_ROOT", str(Path(__file__).resolve().parent))

import hydra
import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from dllava.data.datamodule import iter_records, resolve_urls
from dllava.metrics.answers import question_only_baseline
from dllava.startup import check_train_config
from dllava.utils.resolvers import register_resolvers
from dllava.utils.run import (
    check_run_dir,
    instantiate_group,
    is_multirun,
    read_run_identity,
    resolve_ckpt_path,
    run_dir_is_pinned,
    task_wrapper,
    write_summary,
)

register_resolvers()

log = logging.getLogger("train")


@task_wrapper
def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg``; returns the final metrics."""
    check_train_config(cfg)  # every value's type and range, named by its key, before any work
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    check_run_dir(cfg.get("ckpt_path"), checkpoint_dir(cfg), bool(cfg.get("train")), run_dir_pinned(cfg), is_multirun())
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir(cfg))
    if ckpt_path is not None:
        continue_wandb_run(cfg, ckpt_path)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    module: L.LightningModule = hydra.utils.instantiate(cfg.module, _convert_="all")
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if cfg.get("train"):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if trainer.received_sigterm:  # SIGTERM in the last step: Lightning ends the fit as if done
            raise SIGTERMException()
    metrics = dict(trainer.callback_metrics)
    if cfg.get("test"):
        trainer.test(module, datamodule=datamodule)
        metrics.update(trainer.callback_metrics)

    exported = export_model(module, datamodule, Path(cfg.paths.output_dir) / "hf") if cfg.get("export") else None
    if trainer.is_global_zero:
        if module.answer_kinds and hasattr(datamodule, "train_urls"):
            metrics["baseline/question_only_acc"] = question_only_baseline(
                iter_records(resolve_urls(datamodule.train_urls)),
                iter_records(resolve_urls(datamodule.val_urls)),
                kinds=module.answer_kinds,
            )
            for logger in loggers:
                logger.log_metrics({"baseline/question_only_acc": metrics["baseline/question_only_acc"]})
        if exported is not None:
            log.info("exported the trained model to %s", exported)
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
        write_summary(cfg.paths.output_dir, metrics, ckpt or None)
    return metrics


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where ``ckpt_path=last`` looks: the last-checkpoint callback's dirpath, else <run dir>/checkpoints."""
    dirpath = OmegaConf.select(cfg, "callbacks.last_checkpoint.dirpath")
    return Path(dirpath) if dirpath else Path(cfg.paths.output_dir) / "checkpoints"


def run_dir_pinned(cfg: DictConfig) -> bool:
    """``ckpt_path=last`` finds this run again: its run dir is pinned (see
    :func:`dllava.utils.run.run_dir_is_pinned`) or its checkpoints go to a directory outside it."""
    inside = checkpoint_dir(cfg).resolve().is_relative_to(Path(cfg.paths.output_dir).resolve())
    return run_dir_is_pinned() or not inside


def continue_wandb_run(cfg: DictConfig, ckpt_path: str) -> None:
    """Log a resumed run into the W&B run its checkpoint came from (unless logger.wandb.id is set)."""
    wandb_cfg = OmegaConf.select(cfg, "logger.wandb")
    if wandb_cfg is None or wandb_cfg.get("id"):
        return
    run_id = read_run_identity(ckpt_path).get("wandb_id")
    if run_id:
        with open_dict(cfg):
            cfg.logger.wandb.id = run_id
            cfg.logger.wandb.resume = "allow"
        log.info("resuming W&B run %s", run_id)


def export_model(module: L.LightningModule, datamodule: L.LightningDataModule, export_dir: Path) -> Path | None:
    """``save_pretrained`` of the trained model into ``export_dir`` on rank 0. Sharded parameters are
    gathered first (a collective, so every rank calls this) into an unsharded copy on rank 0's CPU."""
    from dllava.training.sharding import full_state_dict, is_sharded, unsharded_copy

    model = module.model
    if is_sharded(model):
        state = full_state_dict(model)
        model = unsharded_copy(model, state) if module.trainer.is_global_zero else None
    if not module.trainer.is_global_zero:
        return None
    model.save_pretrained(export_dir)  # HF files (+ predictors, sparsity.json)
    datamodule.processor.save_pretrained(export_dir)
    return export_dir


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    value = metrics.get("val/answer_acc")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
