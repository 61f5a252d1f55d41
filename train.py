"""Train a (Dynamic-)LLaVA: `python train.py [model=...] [data=...] [trainer=...] [key=value ...]`.

Reads like a table of contents: compose config -> data, model, callbacks, loggers, trainer -> fit ->
test -> summary.json in the run directory. Everything else lives in src/dllava.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("DLLAVA_ROOT", str(Path(__file__).resolve().parent))

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from dllava.data.datamodule import iter_records, resolve_urls
from dllava.metrics.answers import question_only_baseline
from dllava.utils.resolvers import register_resolvers
from dllava.utils.run import instantiate_group, task_wrapper, write_summary

register_resolvers()

log = logging.getLogger("train")


@task_wrapper
def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg``; returns the final metrics."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    module: L.LightningModule = hydra.utils.instantiate(cfg.module, _convert_="all")
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if cfg.get("train"):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = dict(trainer.callback_metrics)
    if cfg.get("test"):
        trainer.test(module, datamodule=datamodule)
        metrics.update(trainer.callback_metrics)

    if trainer.is_global_zero:
        if module.answer_kinds and hasattr(datamodule, "train_urls"):
            metrics["baseline/question_only_acc"] = question_only_baseline(
                iter_records(resolve_urls(datamodule.train_urls)),
                iter_records(resolve_urls(datamodule.val_urls)),
                kinds=module.answer_kinds,
            )
            for logger in loggers:
                logger.log_metrics({"baseline/question_only_acc": metrics["baseline/question_only_acc"]})
        if cfg.get("export"):
            export_dir = Path(cfg.paths.output_dir) / "hf"
            module.model.save_pretrained(export_dir)  # HF files (+ predictors, sparsity.json)
            datamodule.processor.save_pretrained(export_dir)
            log.info("exported the trained model to %s", export_dir)
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
        write_summary(cfg.paths.output_dir, metrics, ckpt or None)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    value = metrics.get("val/answer_acc")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
