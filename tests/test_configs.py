"""Every option of every config group composes, and the objects it names instantiate."""

from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

from tests.helpers import CONF, compose

GROUPS = ["model", "data", "sparsity", "stage", "trainer", "logger", "callbacks", "experiment", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose("train", [f"{group}={option}"], output_dir=tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["paths"]["output_dir"] == str(tmp_path)
    assert container["module"]["model"] == container["model"]


@pytest.mark.parametrize("option", [p.stem for p in sorted((CONF / "trainer").glob("*.yaml"))])
def test_trainer_options_instantiate(option, tmp_path):
    cfg = compose("train", [f"trainer={option}", "trainer.accelerator=cpu"], output_dir=tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("option", ["wandb", "csv"])
def test_logger_options_instantiate(option, tmp_path):
    from dllava.utils.run import finish_wandb, instantiate_group

    cfg = compose("train", [f"logger={option}"], output_dir=tmp_path)
    loggers = instantiate_group(cfg.logger)
    assert len(loggers) == 1
    finish_wandb()


def test_default_callbacks_instantiate(tmp_path):
    from dllava.utils.run import instantiate_group

    cfg = compose("train", [], output_dir=tmp_path)
    callbacks = instantiate_group(cfg.callbacks)
    names = {type(c).__name__ for c in callbacks}
    assert {"ModelCheckpoint", "TQDMProgressBar", "ModelSummary"} <= names


def test_root_dir_points_at_the_checkout(tmp_path):
    cfg = compose("train", [], output_dir=tmp_path)
    assert Path(cfg.paths.root_dir).resolve() == CONF.parent
    assert Path(cfg.model.pretrained).resolve() == CONF.parent / "data" / "tiny_base"
