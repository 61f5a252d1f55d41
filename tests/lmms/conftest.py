"""lmms-eval fixtures: skipped without the lmms extra; lmms-eval's dataset cache in a temporary folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval is not installed: pip install -e '.[lmms]' && pip install --no-deps lmms-eval==0.7.3 (make setup does)",
)

from tests.eval.conftest import dynamic_dir  # noqa: E402,F401  (a save_pretrained directory with predictors)

TASK = "dllava_synthetic_vqa"
SHORT_KINDS = ["color", "shape", "count", "exist"]


@pytest.fixture(scope="session", autouse=True)
def datasets_cache(tmp_path_factory):
    """lmms-eval loads the task's JSON through `datasets`, which caches under HF_DATASETS_CACHE."""
    cache = tmp_path_factory.mktemp("hf_datasets")
    old = {key: os.environ.get(key) for key in ("HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_DATASETS_CACHE=str(cache), HF_DATASETS_OFFLINE="1")
    yield cache
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def task_dir(synthetic_dir, tmp_path_factory) -> Path:
    """The dllava_synthetic_vqa task (the project's YAML and utils) over the fixture shards' test split."""
    from dllava.lmms import TASKS_DIR
    from dllava.lmms.task_docs import write_task_docs

    root = tmp_path_factory.mktemp("lmms_tasks")
    folder = root / TASK
    folder.mkdir()
    for name in (f"{TASK}.yaml", "utils.py"):
        shutil.copy(TASKS_DIR / TASK / name, folder / name)
    write_task_docs(str(synthetic_dir / "test-*.tar"), folder / f"{TASK}.jsonl")
    return root


def doc_image(doc: dict):
    """A task document's image, decoded as the task's doc_to_visual decodes it."""
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(doc["image"]))) as image:
        return image.convert("RGB")
