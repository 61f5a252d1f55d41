"""A small LLaVA-format data set on disk: real JPEG and PNG files, a JSON list, and the bad cases.

Questions use the tiny tokenizer's words, so records also tokenize meaningfully.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Q = "what color is the shape at row one column two ?"


def jpeg_bytes(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_bytes(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def turn(speaker: str, value: str) -> dict[str, str]:
    return {"from": speaker, "value": value}


def single(record_id: str, image: str | None, question: str = f"{Q}\n<image>", answer: str = "red") -> dict[str, Any]:
    record: dict[str, Any] = {"id": record_id, "conversations": [turn("human", question), turn("gpt", answer)]}
    if image is not None:
        record["image"] = image
    return record


def multi_turn(record_id: str, image: str) -> dict[str, Any]:
    """Three rounds, ``<image>`` at the end of the first question (the reader moves it to the front)."""
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            turn("human", f"{Q}\n<image>"), turn("gpt", "red"),
            turn("human", "how many shapes are there ?"), turn("gpt", "two"),
            turn("human", "describe the image in detail ."), turn("gpt", "there are two shapes ."),
        ],
    }


def write_bad_cases(root: Path) -> tuple[Path, Path, list[dict[str, Any]], dict[int, str]]:
    """The converter's test set: (json path, image root, records, expected rejection reason by index).

    Index 4 is text-only: written without an image unless ``--requires-image``.
    """
    images = root / "images"
    (images / "coco").mkdir(parents=True)
    (images / "gqa").mkdir()
    (images / "coco" / "a.jpg").write_bytes(jpeg_bytes(64, 48, 0))
    (images / "gqa" / "b.png").write_bytes(png_bytes(40, 60, 1))
    whole = jpeg_bytes(64, 48, 2)
    (images / "coco" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (images / "coco" / "garbage.jpg").write_bytes(b"\x00not an image at all" * 10)
    records = [
        single("ok-jpg", "coco/a.jpg"),
        multi_turn("multi-png", "gqa/b.png"),
        single("missing", "coco/nope.jpg"),
        single("truncated", "coco/truncated.jpg"),
        single("text-only", None, question="how many shapes are there ?", answer="two"),
        single("no-token", "coco/a.jpg", question=Q),
        {"id": "gpt-first", "image": "coco/a.jpg", "conversations": [turn("gpt", "red"), turn("human", "<image>")]},
        single("garbage", "coco/garbage.jpg"),
    ]
    reasons = {
        2: "missing_image", 3: "unreadable_image", 5: "no_image_token", 6: "malformed_conversation",
        7: "unreadable_image",
    }
    path = root / "mix.json"
    path.write_text(json.dumps(records))
    return path, images, records, reasons


def write_good_set(root: Path, count: int, seed: int = 0) -> tuple[Path, Path, list[dict[str, Any]]]:
    """``count`` valid records, alternating JPEG (96x64) and PNG (64x96), every third one multi-turn."""
    images = root / "images"
    images.mkdir(parents=True)
    records = []
    for i in range(count):
        if i % 2 == 0:
            name = f"img{i:03d}.jpg"
            (images / name).write_bytes(jpeg_bytes(96, 64, seed + i))
        else:
            name = f"img{i:03d}.png"
            (images / name).write_bytes(png_bytes(64, 96, seed + i))
        records.append(multi_turn(f"r{i:03d}", name) if i % 3 == 0 else single(f"r{i:03d}", name))
    path = root / "good.json"
    path.write_text(json.dumps(records))
    return path, images, records
