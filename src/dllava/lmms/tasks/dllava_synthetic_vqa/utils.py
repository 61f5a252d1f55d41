"""Functions of the dllava_synthetic_vqa task (lmms-eval loads this file next to the YAML)."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

from dllava.eval.scoring import exact_match_any, vqa_accuracy


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    with Image.open(io.BytesIO(base64.b64decode(doc["image"]))) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """eval.py's two accuracies of one answer (dllava.eval.runner scores them the same way)."""
    prediction = results[0]
    return {
        "exact_match": float(exact_match_any(prediction, doc["answer"])),
        "vqa_accuracy": float(vqa_accuracy(prediction, doc["answer"])),
    }
