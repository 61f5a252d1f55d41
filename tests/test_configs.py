"""Every option of every config group composes, and the objects it names instantiate."""

import re
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import CONF, compose

GROUPS = ["model", "data", "sparsity", "stage", "trainer", "logger", "callbacks", "experiment", "debug", "hparams_search"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose("train", [f"{group}={option}"], output_dir=tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["paths"]["output_dir"] == str(tmp_path)
    assert container["module"]["model"] == container["model"]


GPU_ONLY_TRAINERS = {"fsdp"}  # Lightning refuses FSDPStrategy on CPU


@pytest.mark.parametrize("option", [p.stem for p in sorted((CONF / "trainer").glob("*.yaml")) if p.stem not in GPU_ONLY_TRAINERS])
def test_trainer_options_instantiate(option, tmp_path):
    cfg = compose("train", [f"trainer={option}", "trainer.accelerator=cpu"], output_dir=tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert trainer.max_steps == cfg.trainer.max_steps
    assert type(trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"


def test_fsdp_trainer_composes_and_its_strategy_instantiates_on_cpu(tmp_path):
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from torch.distributed.fsdp import ShardingStrategy

    from dllava.training.sharding import FamilyUnits
    from dllava.training.strategies import FSDPStrategy

    cfg = compose("train", ["experiment=paper_7b", "trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=2"], output_dir=tmp_path)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.num_nodes == 2
    assert cfg.trainer.accumulate_grad_batches == 1  # the paper's global batch 64 = 8 x 4 GPUs x 2 nodes
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    # the family's own blocks (tests/training/test_sharding.py: what FSDP's traversal wraps per family)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], FamilyUnits) and strategy.kwargs["auto_wrap_policy"].parts == "all"
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert isinstance(checkpointed, FamilyUnits) and checkpointed.parts == "decoder"
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "sharded"
    assert strategy.kwargs["use_orig_params"] is True  # per-part learning rates by parameter name
    from dllava.training.sharding import materialize_empty

    assert strategy.kwargs["sync_module_states"] and strategy.kwargs["param_init_fn"] is materialize_empty
    # the whole trainer instantiates too (GPU-less here, so on the CPU accelerator; fit needs GPUs)
    trainer = hydra.utils.instantiate(cfg.trainer, accelerator="cpu", logger=False, enable_progress_bar=False)
    assert trainer.strategy is not strategy and isinstance(trainer.strategy, FSDPStrategy)
    assert isinstance(trainer.precision_plugin, FSDPPrecision)
    assert trainer.precision_plugin.mixed_precision_config.param_dtype == torch.bfloat16  # compute in bf16
    assert trainer.num_nodes == 2


def test_fsdp2_trainer_instantiates_on_two_cpu_processes(tmp_path):
    from dllava.training.strategies import FSDP2Strategy

    cfg = compose("train", ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2"], output_dir=tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, FSDP2Strategy) and trainer.num_devices == 2


def test_slurm_launcher_takes_its_size_from_the_trainer(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    overrides = ["hydra/launcher=slurm", "trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)
    assert launcher["max_num_timeout"] >= 1  # preempted or timed-out jobs are requeued


def test_keep_sweep_is_a_multirun_over_keep_ratios(tmp_path):
    compose("train", ["hparams_search=keep_sweep"], output_dir=tmp_path)
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    assert str(hc.mode) == "RunMode.MULTIRUN" and "keep_sweep_" in hc.sweep.dir
    assert hc.sweeper.params["sparsity.keep"] == "0.2,0.35,0.5"
    assert "sweep_summary" in hc.callbacks


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
    last = [c for c in callbacks if type(c).__name__ == "ModelCheckpoint" and c.monitor is None]
    assert len(last) == 1 and last[0].filename == "last"  # what ckpt_path=last resumes from


def test_root_dir_points_at_the_checkout(tmp_path):
    cfg = compose("train", [], output_dir=tmp_path)
    assert Path(cfg.paths.root_dir).resolve() == CONF.parent
    assert Path(cfg.model.pretrained).resolve() == CONF.parent / "data" / "tiny_base"


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_passes_the_start_up_check(group, option, tmp_path):
    """The start-up check refuses no shipped configuration, except model=mid, a bench-only model
    (random weights, no tokenizer) that train.py cannot read data with."""
    from dllava.startup import check_train_config

    cfg = compose("train", [f"{group}={option}"], output_dir=tmp_path)
    if (group, option) == ("model", "mid"):
        with pytest.raises(ValueError, match=r"^data.processor is null"):
            check_train_config(cfg)
    else:
        check_train_config(cfg)


def _load_entry(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_entry", CONF.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("override, key", [
    ("sparsity.keep=1.5", "sparsity.keep"), ("sparsity.keep=half", "sparsity.keep"), ("method.text=sometimes", "method.text"),
    ("generation.max_new_tokens=0", "generation.max_new_tokens"), ("data.batch_size=2.5", "data.batch_size"),
    ("data.limit=0", "data.limit"), ("data.max_length=-1", "data.max_length"), ("data.questions=3", "data.questions"),
    ("data.answer_kinds=color", "data.answer_kinds"), ("overlays=-1", "overlays"), ("progress=maybe", "progress"), ("resume=maybe", "resume"),
    ("device=gpu9", "device"), ("dtype=float64", "dtype"), ("seed=-1", "seed"), ("compare.enabled=1", "compare.enabled"),
    ("compare.keeps=[0.2,2]", r"compare.keeps\[1\]"), ("compare.keeps=[]", "compare.keeps"),
    ("compare.methods=[fastv,foo]", r"compare.methods\[1\]"), ("compare.overlay_keep=0", "compare.overlay_keep"),
])
def test_bad_eval_value_fails_at_start_naming_the_key(override, key, tmp_path):
    """eval.py checks its values before loading the checkpoint (here one that does not exist)."""
    evaluate = _load_entry("eval").evaluate
    with pytest.raises((TypeError, ValueError)) as error:
        evaluate(compose("eval", ["ckpt_path=/nonexistent/ckpt", override], output_dir=tmp_path))
    assert re.match(key + r"(?![\w.\[])", str(error.value)), str(error.value)


def test_eval_without_ckpt_path_says_it_is_required(tmp_path):
    from dllava.startup import check_eval_config

    with pytest.raises(ValueError, match=r"^ckpt_path is required"):
        check_eval_config(compose("eval", [], output_dir=tmp_path))


@pytest.mark.parametrize("override, key", [
    ("bench.batch_size=0", "bench.batch_size"), ("bench.new_tokens=1.5", "bench.new_tokens"),
    ("bench.text_keep_rate=2", "bench.text_keep_rate"), ("bench.repeats=0", "bench.repeats"),
    ("bench.warmup=-1", "bench.warmup"), ("bench.cpu_max_gib=0", "bench.cpu_max_gib"), ("bench.device=tpu7", "bench.device"),
    ("bench.image_size=0", "bench.image_size"), ("sparsity.layer=2.5", "sparsity.layer"), ("model.random_init=maybe", "model.random_init"),
    ("model.predictor.heads=0", "model.predictor.heads"),
])
def test_bad_bench_value_fails_at_start_naming_the_key(override, key, tmp_path):
    main = _load_entry("bench").main  # @hydra.main runs the task directly when given a config
    with pytest.raises((TypeError, ValueError)) as error:
        main(compose("bench", [override], output_dir=tmp_path))
    assert re.match(key + r"(?![\w.\[])", str(error.value)), str(error.value)


@pytest.mark.parametrize("config, overrides", [
    ("eval", ["ckpt_path=x"]), ("eval", ["ckpt_path=x", "method=dense", "compare.enabled=true", "device=cpu"]),
    ("eval", ["ckpt_path=x", "method=random", "sparsity.keep=1", "dtype=bfloat16"]),
    ("bench", []), ("bench", ["model=mid"]), ("bench", ["model=dllava_7b", "model.random_init=true", "bench.device=meta"]),
    ("bench", ["model=dllava_qwen2_5_vl_7b", "model.random_init=true", "bench.image_size=1008"]),
    ("bench", ["model=dllava_qwen3_vl_8b", "model.random_init=true"]),
    ("bench", ["model=dllava_llava_next_7b", "model.random_init=true", "sparsity.budget=per_view"]),
    ("bench", ["model=dllava_llava_onevision_7b", "model.random_init=true"]),
])
def test_shipped_eval_and_bench_configs_pass_the_start_up_check(config, overrides, tmp_path):
    from dllava.startup import check_bench_config, check_eval_config

    {"eval": check_eval_config, "bench": check_bench_config}[config](compose(config, overrides, output_dir=tmp_path))


@pytest.mark.parametrize("overrides", [
    ["model=dllava_qwen2_5_vl_7b", "sparsity.keep=0.25", "trainer=fsdp", "trainer.devices=8"],
    ["experiment=paper_qwen2_5_vl_7b", "trainer=fsdp", "trainer.devices=8"],
    ["model=dllava_qwen3_vl_8b", "trainer=fsdp2", "trainer.devices=8"],
])
def test_qwen_analogue_of_the_paper_command_composes_and_passes_the_start_up_check(overrides, tmp_path):
    """The Qwen analogue of `train.py model=dllava_7b ... trainer=fsdp`: the family's model config, the
    FSDP strategy wrapping that family's blocks, the start-up checks; the model itself builds on meta."""
    from dllava.model.loading import ModelSource, build_empty
    from dllava.sparse.model import DynamicVLM
    from dllava.startup import check_train_config

    cfg = compose("train", overrides, output_dir=tmp_path)
    check_train_config(cfg)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    predictor = model.pop("predictor")
    base = build_empty(ModelSource(**{**model, "random_init": True}), "meta")
    with torch.device("meta"):
        dynamic = DynamicVLM(base, OmegaConf.to_container(cfg.sparsity, resolve=True), predictor)
    assert dynamic.adapter.model_type == model["architecture"]["model_type"]
    assert dynamic.image_predictor is not None and dynamic.sparsity.layer == cfg.sparsity.layer
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ in ("FSDPStrategy", "FSDP2Strategy")
