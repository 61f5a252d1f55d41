"""Shared fixtures: tiny models and shards built here, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DLLAVA_ROOT", str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_processor():
    from dllava.model.tiny import build_tiny_processor

    return build_tiny_processor()


@pytest.fixture(scope="session")
def tiny_image():
    from PIL import Image

    return Image.new("RGB", (96, 96), (120, 120, 120))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An untrained tiny LLaVA saved with save_pretrained (3 decoder layers: K=2 leaves one gated layer)."""
    from dllava.model.tiny import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), seed=0, num_hidden_layers=3)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic shard set: 256 train, 64 val, 64 test records in shards of 64."""
    from dllava.data.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(out, train=256, val=64, test=64, seed=0, samples_per_shard=64)
    return out
