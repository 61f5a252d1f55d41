"""The entry point lmms-eval reads (group ``lmms_eval.models`` in pyproject.toml).

lmms-eval imports every entry point of the group when its model registry loads and expects a
``ModelManifest`` (or a callable returning one), not the model class: the class is imported only when
``--model dllava`` is asked for, so this module stays light.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "dllava"


def manifest() -> Any:
    """lmms-eval's description of the ``dllava`` model: a simple (non-chat) model class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="dllava.lmms.model.DllavaLMM")
