"""One loading path for every base model: the committed tiny LLaVA and llava-hf/llava-1.5-7b-hf alike.

A model config (``conf/model/*.yaml``) names a ``pretrained`` directory or hub id, loaded with HF's
``from_pretrained``, or an ``architecture`` (``LlavaConfig`` keyword arguments) to build with random
weights (``random_init``), which is how 7B-shaped models are benchmarked without a download.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

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


def load_config(source: ModelSource) -> LlavaConfig:
    """The ``LlavaConfig`` for ``source``: from the pretrained directory, else from ``architecture``."""
    _check_pretrained(source)
    if source.pretrained is not None and (_is_local(source.pretrained) or source.architecture is None):
        return AutoConfig.from_pretrained(source.pretrained)
    arch = dict(source.architecture or {})
    return LlavaConfig(**arch)


def load_llava(source: ModelSource | dict[str, Any]) -> LlavaForConditionalGeneration:
    """Build or load the HF LLaVA described by ``source`` (a ``ModelSource`` or its dict)."""
    if isinstance(source, dict):
        source = ModelSource(**source)
    _check_pretrained(source)
    if source.random_init:
        config = load_config(source)
        config._attn_implementation = source.attn_implementation
        previous = torch.get_default_dtype()
        torch.set_default_dtype(source.torch_dtype)
        try:
            return LlavaForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(previous)
    try:
        return LlavaForConditionalGeneration.from_pretrained(
            source.pretrained, dtype=source.torch_dtype, attn_implementation=source.attn_implementation
        )
    except OSError as err:
        raise OSError(
            f"could not load model.pretrained={source.pretrained!r}: not a local directory and not in the HF "
            f"cache (set HF_HUB_OFFLINE=0 and log in to download it). Cause: {err}"
        ) from err


def load_processor(pretrained: str) -> Any:
    """HF ``LlavaProcessor`` (tokenizer + image processor) saved beside the weights."""
    if pretrained.startswith(("/", ".", "~")) and not _is_local(pretrained):
        raise FileNotFoundError(f"processor directory {pretrained!r} does not exist")
    return AutoProcessor.from_pretrained(pretrained)
