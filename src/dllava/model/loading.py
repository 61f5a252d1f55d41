"""One loading path for every base model: the committed tiny models, llava-1.5-7b and Qwen alike.

A model config (``conf/model/*.yaml``) names a ``pretrained`` directory or hub id, loaded with HF's
``from_pretrained``, or an ``architecture`` (the family's HF config keyword arguments, its family named
by ``model_type``; default ``llava``) to build with random weights (``random_init``), which is how
7B-shaped models are benchmarked without a download. The family (and so the HF class) always comes
from the config's ``model_type`` through :mod:`dllava.families`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from dllava.families import adapter_for

from dllava.utils.checks import check_bool, check_choice, check_mapping, check_str

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    """Where the base LLaVA comes from. Field names are the keys of ``conf/model/*.yaml``."""

    pretrained: str | None = None
    architecture: dict[str, Any] | None = field(default=None)
    random_init: bool = False
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    name: str | None = None

    def __post_init__(self) -> None:
        check_str("model.pretrained", self.pretrained, optional=True)
        check_mapping("model.architecture", self.architecture, optional=True)
        check_bool("model.random_init", self.random_init)
        check_choice("model.dtype", self.dtype, sorted(DTYPES))
        check_str("model.attn_implementation", self.attn_implementation)
        check_str("model.name", self.name, optional=True)
        if self.pretrained is None and self.architecture is None:
            raise ValueError("model.pretrained or model.architecture must be set")
        if self.pretrained is None and not self.random_init:
            raise ValueError("model.architecture alone has no weights: set model.random_init=true or model.pretrained")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def _check_pretrained(source: ModelSource) -> None:
    """Fail early, naming the key, when a local-looking path is missing."""
    path = source.pretrained
    if path is None or _is_local(path):
        return
    if path.startswith(("/", ".", "~")):
        raise FileNotFoundError(
            f"model.pretrained={path!r} does not exist. data/tiny_base is committed (restore it from git); "
            "the inputs of its recipe come from `python -m dllava.model.tiny` and "
            "`python -m dllava.model.vision_pretrain` (see conf/experiment/tiny_base.yaml)."
        )


class NotInLocalCache(OSError):
    """A hub id whose files could not be loaded: not in the local HF cache and not downloadable now."""


def _hub_error(pretrained: str, err: OSError) -> OSError:
    """``err`` for a hub id, said plainly: where the files were looked for and the two ways out."""
    from huggingface_hub import constants

    if _is_local(pretrained):
        return err  # a local directory's own problem (a missing file, a bad config): keep HF's message
    why = ("HF_HUB_OFFLINE=1 forbids downloads" if constants.HF_HUB_OFFLINE
           else "it could not be downloaded (no network, or a gated repo without a token)")
    return NotInLocalCache(
        f"model.pretrained={pretrained!r}: the weights of {pretrained} are not in the local HF cache "
        f"({constants.HF_HUB_CACHE}) and {why}. Download them once with network access (`hf download "
        f"{pretrained}`, or a run with HF_HUB_OFFLINE=0), or set model.pretrained=<local directory> holding "
        f"a save_pretrained copy of the model and its processor. Cause: {err}"
    )


def _from_hub(load: Any, pretrained: str, **kwargs: Any) -> Any:
    """``load(pretrained, **kwargs)`` (an HF ``from_pretrained``) with :func:`_hub_error`'s message."""
    try:
        return load(pretrained, **kwargs)
    except OSError as err:
        error = _hub_error(pretrained, err)
        if error is err:
            raise
        raise error from err


def load_config(source: ModelSource) -> Any:
    """The HF config for ``source``: from the pretrained directory, else from ``architecture`` (built
    by the config class of the family its ``model_type`` names, default ``llava``)."""
    _check_pretrained(source)
    if source.pretrained is not None and (_is_local(source.pretrained) or source.architecture is None):
        return _from_hub(AutoConfig.from_pretrained, source.pretrained)
    arch = dict(source.architecture or {})
    return adapter_for(arch.pop("model_type", "llava")).config_class()(**arch)


def build_empty(source: ModelSource, device: str | torch.device | None = None) -> torch.nn.Module:
    """The base model of ``source`` with freshly initialised weights (on ``device``; ``meta``: shapes
    and dtype only, no memory), in ``source``'s dtype and attention implementation."""
    config = load_config(source)
    config._attn_implementation = source.attn_implementation
    model_class = adapter_for(config.model_type).model_class()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(source.torch_dtype)
    try:
        if device is None:
            return model_class(config)
        with torch.device(device):
            return model_class(config)
    finally:
        torch.set_default_dtype(previous)


def load_base_model(source: ModelSource | dict[str, Any]) -> torch.nn.Module:
    """Build or load the HF base model described by ``source`` (a ``ModelSource`` or its dict)."""
    if isinstance(source, dict):
        source = ModelSource(**source)
    _check_pretrained(source)
    if source.random_init:
        return build_empty(source)
    model_type = load_config(source).model_type
    return _from_hub(
        adapter_for(model_type).model_class().from_pretrained, source.pretrained, dtype=source.torch_dtype,
        attn_implementation=source.attn_implementation,
    )


load_llava = load_base_model  # its name before the family seam


def processor_family(pretrained: str) -> Any:
    """The family adapter of the model whose processor is saved at ``pretrained`` (from its config)."""
    return adapter_for(_from_hub(AutoConfig.from_pretrained, pretrained).model_type)


def load_processor(pretrained: str) -> Any:
    """The family's processor (tokenizer + image processor) saved beside the weights."""
    if pretrained.startswith(("/", ".", "~")) and not _is_local(pretrained):
        raise FileNotFoundError(f"processor directory {pretrained!r} does not exist")
    return _from_hub(processor_family(pretrained).load_processor, pretrained)
