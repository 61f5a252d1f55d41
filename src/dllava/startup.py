"""Start-up checks of the composed configs of train.py, eval.py and bench.py, before any work starts.

Each entry point calls its check first, so a wrong value fails with its full key (``trainer.max_steps
must be an integer >= 1, got -1``) before data is generated, a model is loaded or a run directory
fills up. The settings classes check their own fields when they are created (``SparsityConfig``,
``PredictorConfig``, ``OptimConfig``, ``ModelSource``, ``LlavaDataModule``, ``DynamicLitModule``, so
they stay checked without Hydra); here they are created once more from the config, which also refuses
keys they do not have. What only the entry points read (top-level keys, the Lightning ``Trainer``'s
arguments, callbacks and loggers, eval's and bench's own keys) is checked here. The helpers are in
:mod:`dllava.utils.checks`.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from dllava.utils.checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_keys,
    check_mapping,
    check_str,
    check_str_list,
    check_urls,
    describe,
    is_int,
    is_number,
)

Check = Callable[[str, Any], Any]
SEED_MAX = 2**32 - 1  # Lightning's seed_everything range


def _plain(cfg: DictConfig, key: str) -> Any:
    """The resolved plain-Python value of ``cfg.<key>`` (None when absent)."""
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) or OmegaConf.is_list(value) else value


def _apply(prefix: str, values: Mapping[str, Any], checks: Mapping[str, Check]) -> None:
    """Run ``checks[name]`` on every value present in ``values`` (keys ``<prefix>.<name>``)."""
    for name, check in checks.items():
        if name in values:
            check(f"{prefix}.{name}" if prefix else name, values[name])


def _target_is(values: Mapping[str, Any], target: str) -> bool:
    return str(values.get("_target_", "")).endswith(target)


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _arguments_of(values: Mapping[str, Any]) -> dict[str, Any]:
    """A Hydra node's constructor arguments (without ``_target_``, ``_convert_``...)."""
    return {k: v for k, v in values.items() if not k.startswith("_")}


def _arguments(fn: Callable[..., Any]) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


# -- value kinds shared by several keys ------------------------------------------------------------
def _int(low: int | None = None, optional: bool = False, also: Sequence[int] = ()) -> Check:
    return lambda key, value: check_int(key, value, low=low, optional=optional, also=also)


def _bool(optional: bool = False) -> Check:
    return lambda key, value: check_bool(key, value, optional=optional)


def _str(optional: bool = False, nonempty: bool = True) -> Check:
    return lambda key, value: check_str(key, value, optional=optional, nonempty=nonempty)


def _count_or_fraction(key: str, value: Any, low_int: int = 0) -> None:
    """Lightning's batch limits: an integer count >= ``low_int`` or a fraction in [0, 1]; null: all."""
    if value is None or is_int(value):
        check_int(key, value, low=low_int, optional=True)
    elif is_number(value):
        check_float(key, value, low=0, high=1)
    else:
        raise TypeError(f"{key} must be an integer >= {low_int} (batches), a number in [0, 1] (a fraction) or null, "
                        f"got {describe(value)}")


def check_devices(key: str, value: Any) -> None:
    """``trainer.devices``: ``auto``, a count >= 1, -1 (all), or a list of device indices."""
    if value == "auto" or (is_int(value) and (value >= 1 or value == -1)):
        return
    if isinstance(value, str) and value.replace(",", "").strip().isdigit():  # "0,1" as Lightning parses it
        return
    if isinstance(value, Sequence) and not isinstance(value, str) and value and all(is_int(v) and v >= 0 for v in value):
        if len(set(value)) != len(value):
            raise ValueError(f"{key} lists a device twice: {list(value)}")
        return
    raise (TypeError if not (is_int(value) or isinstance(value, (str, list))) else ValueError)(
        f"{key} must be auto, a device count >= 1, -1 (all devices) or a list of device indices, got {describe(value)}"
    )


def lightning_precisions() -> list[Any]:
    """The ``precision`` values Lightning accepts (its own type declaration, flattened)."""
    from lightning.fabric.connector import _PRECISION_INPUT

    def flat(tp: Any) -> list[Any]:
        args = typing.get_args(tp)
        return [v for a in args for v in (flat(a) if typing.get_args(a) else [a])] if args else [tp]

    return flat(_PRECISION_INPUT)


def _fast_dev_run(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        check_int(key, value, low=0)


def _deterministic(key: str, value: Any) -> None:
    if value is not None and value != "warn":
        check_bool(key, value)


def _val_check_interval(key: str, value: Any) -> None:
    if is_int(value):
        check_int(key, value, low=1)
    else:
        check_float(key, value, low=0, high=1, low_open=True, optional=True)


TRAINER_CHECKS: dict[str, Check] = {
    # the warmup/cosine schedule and the Gumbel temperature are laid out over max_steps
    "max_steps": _int(low=1),
    "max_epochs": _int(low=1, optional=True, also=(-1,)),
    "min_steps": _int(low=0, optional=True),
    "min_epochs": _int(low=0, optional=True),
    "accelerator": _str(),
    "devices": check_devices,
    "num_nodes": _int(low=1),
    "precision": lambda key, value: check_choice(key, value, lightning_precisions()),
    "fast_dev_run": _fast_dev_run,
    "check_val_every_n_epoch": _int(low=1, optional=True),
    "val_check_interval": _val_check_interval,
    "num_sanity_val_steps": _int(low=0, also=(-1,)),
    "log_every_n_steps": _int(low=1),
    "accumulate_grad_batches": _int(low=1),
    "gradient_clip_val": lambda key, value: check_float(key, value, low=0, optional=True),
    "gradient_clip_algorithm": lambda key, value: check_choice(key, value, ["norm", "value"], optional=True),
    "limit_train_batches": _count_or_fraction,
    "limit_val_batches": _count_or_fraction,
    "limit_test_batches": _count_or_fraction,
    "limit_predict_batches": _count_or_fraction,
    "overfit_batches": _count_or_fraction,
    "deterministic": _deterministic,
    "benchmark": _bool(optional=True),
    "enable_checkpointing": _bool(optional=True),
    "enable_progress_bar": _bool(optional=True),
    "enable_model_summary": _bool(optional=True),
    "inference_mode": _bool(),
    "use_distributed_sampler": _bool(),
    "detect_anomaly": _bool(),
    "barebones": _bool(),
    "sync_batchnorm": _bool(),
    "reload_dataloaders_every_n_epochs": _int(low=0),
    "default_root_dir": _str(optional=True),
}


STRATEGY_CHECKS: dict[str, Check] = {
    # FSDP2Strategy (trainer=fsdp2)
    "activation_checkpointing": _bool(),
    "save_distributed_checkpoint": _bool(),
    # FSDPStrategy (trainer=fsdp)
    "sharding_strategy": lambda key, value: check_choice(
        key, value, ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"]),
    "state_dict_type": lambda key, value: check_choice(key, value, ["full", "sharded"]),
    "use_orig_params": _bool(),
    "limit_all_gathers": _bool(),
    "cpu_offload": _bool(),
    "sync_module_states": _bool(),
}


def check_trainer(values: Mapping[str, Any], prefix: str = "trainer") -> None:
    """The Lightning ``Trainer`` arguments of ``trainer:``: known names, types and ranges."""
    if _target_is(values, "Trainer"):
        import lightning

        check_keys(prefix, _arguments_of(values), _arguments(lightning.Trainer.__init__))
    _apply(prefix, values, TRAINER_CHECKS)
    strategy = values.get("strategy")
    if isinstance(strategy, Mapping):
        _apply(f"{prefix}.strategy", strategy, STRATEGY_CHECKS)
    elif strategy is not None:
        check_str(f"{prefix}.strategy", strategy)


CHECKPOINT_CHECKS: dict[str, Check] = {
    "dirpath": _str(optional=True),
    "filename": _str(optional=True),
    "monitor": _str(optional=True),
    "mode": lambda key, value: check_choice(key, value, ["min", "max"]),
    "save_top_k": _int(low=0, also=(-1,)),
    "save_last": lambda key, value: check_choice(key, value, [True, False, "link"], optional=True),
    "every_n_epochs": _int(low=0, optional=True),
    "every_n_train_steps": _int(low=0, optional=True),
    "auto_insert_metric_name": _bool(),
    "save_weights_only": _bool(),
    "save_on_train_epoch_end": _bool(optional=True),
    "enable_version_counter": _bool(),
    "verbose": _bool(),
}


def check_callbacks(values: Mapping[str, Any] | None) -> None:
    """Arguments of the configured callbacks Lightning does not name clearly when wrong."""
    for name, spec in (values or {}).items():
        if not isinstance(spec, Mapping):
            continue
        prefix = f"callbacks.{name}"
        if _target_is(spec, "ModelCheckpoint"):
            _apply(prefix, spec, CHECKPOINT_CHECKS)
        elif _target_is(spec, "TQDMProgressBar"):
            _apply(prefix, spec, {"refresh_rate": _int(low=0)})
        elif _target_is(spec, "ModelSummary"):
            _apply(prefix, spec, {"max_depth": _int(low=0, also=(-1,))})


LOGGER_CHECKS: dict[str, Check] = {
    "save_dir": _str(optional=True),
    "offline": _bool(),
    "id": _str(optional=True),
    "project": _str(optional=True),
    "name": _str(optional=True),
    "group": _str(optional=True),
    "job_type": _str(optional=True),
    "tags": lambda key, value: check_str_list(key, value, optional=True),
    "log_model": lambda key, value: check_choice(key, value, [True, False, "all"]),
    "prefix": _str(nonempty=False),
    "version": lambda key, value: None,
}


def check_loggers(values: Mapping[str, Any] | None) -> None:
    for name, spec in (values or {}).items():
        if isinstance(spec, Mapping):
            _apply(f"logger.{name}", spec, LOGGER_CHECKS)


def check_model(values: Any, prefix: str = "model") -> None:
    """``model:`` (a ``ModelSource`` plus the optional ``predictor`` sizes)."""
    from dllava.model.loading import ModelSource
    from dllava.sparse.config import PredictorConfig

    check_mapping(prefix, values)
    check_keys(prefix, values, [*_fields(ModelSource), "predictor"])
    ModelSource(**{k: v for k, v in values.items() if k != "predictor"})
    if values.get("predictor") is not None:
        check_mapping(f"{prefix}.predictor", values["predictor"])
        check_keys(f"{prefix}.predictor", values["predictor"], _fields(PredictorConfig))
        PredictorConfig(**values["predictor"])


def check_sparsity(values: Any) -> None:
    from dllava.sparse.config import SparsityConfig

    check_mapping("sparsity", values)
    check_keys("sparsity", values, _fields(SparsityConfig))
    SparsityConfig(**values)


def check_paths(cfg: DictConfig) -> None:
    """``paths.*``: directories, as strings."""
    paths = check_mapping("paths", _plain(cfg, "paths"))
    _apply("paths", paths, {name: _str() for name in paths})


def check_seed(key: str, value: Any) -> None:
    """A seed Lightning's ``seed_everything`` accepts, or null (random, not reproducible)."""
    check_int(key, value, low=0, optional=True)
    if value is not None and value > SEED_MAX:
        raise ValueError(f"{key} must be an integer in [0, {SEED_MAX}] or null, got {value}")


def check_run_keys(cfg: DictConfig) -> None:
    """Top-level keys every entry point shares."""
    present = {k: _plain(cfg, k) for k in ("task_name", "seed", "tags") if k in cfg}
    _apply("", present, {"task_name": _str(), "seed": check_seed, "tags": lambda k, v: check_str_list(k, v, optional=True)})


def check_train_config(cfg: DictConfig) -> None:
    """Every value of train.py's composed config that it or the classes it builds read."""
    from dllava.training.module import DynamicLitModule, OptimConfig

    check_run_keys(cfg)
    _apply("", {k: _plain(cfg, k) for k in ("train", "test", "export", "ckpt_path") if k in cfg}, {
        "train": _bool(), "test": _bool(), "export": _bool(), "ckpt_path": _str(optional=True),
    })
    optim = check_mapping("optim", _plain(cfg, "optim"))
    check_keys("optim", optim, _fields(OptimConfig))
    OptimConfig(**optim)
    check_sparsity(_plain(cfg, "sparsity"))
    check_model(_plain(cfg, "model"))
    data = check_mapping("data", _plain(cfg, "data"))
    if _target_is(data, "LlavaDataModule"):  # its constructor checks every value and does nothing else
        from dllava.data.datamodule import LlavaDataModule

        check_keys("data", _arguments_of(data), _arguments(LlavaDataModule.__init__))
        LlavaDataModule(**_arguments_of(data))
    module = check_mapping("module", _plain(cfg, "module"))
    if _target_is(module, "DynamicLitModule") or _target_is(module, "LlavaLitModule"):  # (its former name)
        # its constructor checks its values; the model is built later
        check_keys("module", _arguments_of(module), _arguments(DynamicLitModule.__init__))
        DynamicLitModule(**_arguments_of(module))
    check_paths(cfg)
    check_trainer(check_mapping("trainer", _plain(cfg, "trainer")))
    check_callbacks(_plain(cfg, "callbacks"))
    check_loggers(_plain(cfg, "logger"))


# -- eval.py and bench.py -----------------------------------------------------------------------------
DTYPE_NAMES = ["float32", "bfloat16", "float16"]


def check_device(key: str, value: Any, extra: Sequence[str] = ()) -> None:
    """``auto`` (or one of ``extra``), else a name torch parses as a device (``cpu``, ``cuda:1``)."""
    import torch

    check_str(key, value)
    if value in ("auto", *extra):
        return
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        choices = ", ".join(["auto", *extra, "cpu", "cuda", "cuda:<index>"])
        raise ValueError(f"{key} must be one of {choices}, got {value!r}") from None


def _keep(optional: bool = False) -> Check:
    return lambda key, value: check_float(key, value, low=0, high=1, low_open=True, optional=optional)


def _keeps(key: str, value: Any) -> None:
    if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"{key} must be a non-empty list of keep ratios in (0, 1], got {describe(value)}")
    for index, keep in enumerate(value):
        check_float(f"{key}[{index}]", keep, low=0, high=1, low_open=True)


def _text_policy(key: str, value: Any) -> None:
    """``method.text``: learned, off (YAML's bare ``off`` is false), an output-side baseline at the
    checkpoint's ``text_keep`` (random, streaming, h2o) or a keep rate in (0, 1]."""
    from dllava.inference.text_policies import BUDGET_POLICIES

    if value is False or value in ("learned", "off", *BUDGET_POLICIES):
        return
    if not is_number(value):
        raise ValueError(
            f"{key} must be learned, off, {', '.join(BUDGET_POLICIES)} or a keep rate in (0, 1], got {describe(value)}"
        )
    check_float(key, value, low=0, high=1, low_open=True)


def check_eval_config(cfg: DictConfig) -> None:
    """The values eval.py reads (``conf/eval.yaml``, ``conf/method/``)."""
    from dllava.inference.selection import IMAGE_METHODS
    from dllava.sparse.decisions import BUDGETS

    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ValueError("ckpt_path is required: ckpt_path=<a .ckpt file or a save_pretrained directory>")
    check_run_keys(cfg)
    top = {k: _plain(cfg, k) for k in ("ckpt_path", "device", "dtype", "model_id", "overlays", "progress", "resume") if k in cfg}
    _apply("", top, {
        "ckpt_path": _str(), "device": check_device, "model_id": _str(optional=True),
        "dtype": lambda key, value: check_choice(key, value, DTYPE_NAMES, optional=True),
        "overlays": _int(low=0), "progress": _bool(), "resume": _bool(),
    })
    _apply("sparsity", _plain(cfg, "sparsity") or {}, {
        "keep": _keep(optional=True),
        "budget": lambda key, value: check_choice(key, value, list(BUDGETS), optional=True),
    })
    method = _plain(cfg, "method") or {}
    _apply("method", method, {
        "name": lambda key, value: check_choice(key, value, list(IMAGE_METHODS)), "text": _text_policy,
        "prune_layer": _int(low=0, optional=True),
        "options": lambda key, value: check_mapping(key, value, optional=True),
    })
    check_keys("method", method, ("name", "text", "prune_layer", "options"))
    if method.get("options"):
        from dllava.inference.selection import check_options

        check_options(method.get("name"), method["options"])
    _apply("data", _plain(cfg, "data") or {}, {
        "shards": lambda key, value: check_urls(key, value, optional=True),
        "questions": _str(optional=True),
        "image_folder": _str(optional=True),
        "answer_kinds": lambda key, value: check_str_list(key, value, optional=True),
        "limit": _int(low=1, optional=True),
        "batch_size": _int(low=1),
        "max_length": _int(low=1, optional=True),
    })
    _apply("generation", _plain(cfg, "generation") or {}, {"max_new_tokens": _int(low=1)})
    _apply("compare", _plain(cfg, "compare") or {}, {
        "enabled": _bool(),
        "methods": lambda key, value: check_str_list(key, value, choices=IMAGE_METHODS, nonempty=True),
        "keeps": _keeps,
        "dense_ckpt_path": _str(optional=True),
        "dense_ckpt_methods": lambda key, value: check_str_list(key, value, choices=IMAGE_METHODS),
        "overlay_keep": _keep(optional=True),
        "decode": _bool(),
    })
    from dllava.eval.decode import ROWS

    _apply("decode", _plain(cfg, "decode") or {}, {
        "methods": lambda key, value: check_str_list(key, value, choices=ROWS, nonempty=True),
        "answer_kinds": lambda key, value: check_str_list(key, value, optional=True),
        "max_new_tokens": _int(low=1),
        "sinks": _int(low=0),
        "cell": _int(low=2),
    })
    if cfg.compare.get("decode") and cfg.compare.get("enabled"):
        raise ValueError("compare.enabled=true and compare.decode=true are two comparisons: run one at a time")


def check_bench_config(cfg: DictConfig) -> None:
    """The values bench.py reads (``conf/bench.yaml`` with its model and sparsity groups)."""
    from dllava.bench.inference import check_decode_lengths
    from dllava.inference.selection import IMAGE_METHODS

    check_run_keys(cfg)
    check_model(_plain(cfg, "model"))
    check_sparsity(_plain(cfg, "sparsity"))
    _apply("bench", check_mapping("bench", _plain(cfg, "bench")), {
        "predictors": _str(optional=True),
        "device": lambda key, value: check_device(key, value, extra=("meta",)),
        "cpu_max_gib": lambda key, value: check_float(key, value, low=0, low_open=True),
        "batch_size": _int(low=1),
        "text_tokens": _int(low=0),
        "image_size": _int(low=1, optional=True),
        "new_tokens": _int(low=1),
        "text_keep_rate": _keep(optional=True),
        "warmup": _int(low=0),
        "repeats": _int(low=1),
        "decode_lengths": lambda key, value: check_decode_lengths(value),
        "decode_device": lambda key, value: check_device(key, value, extra=("meta",)),
        "baselines": lambda key, value: check_str_list(key, value, choices=[
            m for m in IMAGE_METHODS if m not in ("dense", "dynamic")]),
    })
