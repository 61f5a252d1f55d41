"""One adapter per base-model family (HF ``model_type``); see :mod:`dllava.families.base`."""

from __future__ import annotations

from typing import Any

from dllava.families.base import FamilyAdapter, ImageFeatures, gather_columns, next_positions
from dllava.families.llava import LlavaAdapter
from dllava.families.llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from dllava.families.qwen import Qwen3Adapter, QwenAdapter

ADAPTERS: dict[str, FamilyAdapter] = {adapter.model_type: adapter for adapter in (
    LlavaAdapter(), QwenAdapter(), Qwen3Adapter(), LlavaNextAdapter(), LlavaOnevisionAdapter()
)}


def register(adapter: FamilyAdapter) -> FamilyAdapter:
    """Add a family (its ``model_type`` must be new)."""
    if adapter.model_type in ADAPTERS:
        raise ValueError(f"a family adapter for model_type {adapter.model_type!r} is already registered")
    ADAPTERS[adapter.model_type] = adapter
    return adapter


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter of ``model_type``, or an error listing the supported families."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} has no family adapter; supported: {sorted(ADAPTERS)} "
            "(README, 'Base models': how to add one)"
        ) from None


def get_adapter(model_or_config: Any) -> FamilyAdapter:
    """The adapter of an HF model or config (by its ``model_type``)."""
    config = getattr(model_or_config, "config", model_or_config)
    return adapter_for(getattr(config, "model_type", None))


__all__ = ["ADAPTERS", "FamilyAdapter", "ImageFeatures", "adapter_for", "gather_columns", "get_adapter",
           "next_positions", "register"]
