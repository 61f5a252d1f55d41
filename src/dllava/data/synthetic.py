"""The built-in shapes VQA task, written as webdataset shards of LLaVA conversation records.

Design (see ../shared/CALIBRATION.md):
* The image is a grid of cells (4x4 of 24 px by default; with 12 px patches each cell is exactly 2x2
  patches). 2-4 coloured shapes sit inside distinct cells on a textured grey background, so all the
  evidence lives in at most 16 of 64 patches and the rest is uninformative: a sparsifier that keeps
  the right 25% loses nothing, a random one loses objects.
* Short questions (colour or shape at a cell, count of a colour, is there a <colour> <shape>) need
  the image and only a few regions of it; their answers are balanced so that the best answer per
  question text (the question-only baseline) stays near 0.3.
* ``describe`` answers list every object and its cell (tens of tokens), for text sparsification.

Record ``i`` of a split draws from its own RNG seeded by ``(seed, split, i)``, so shards are
byte-identical whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
POSITION_WORDS = ("one", "two", "three", "four")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
SHORT_KINDS = ("color", "shape", "count", "exist")
LONG_KINDS = ("describe",)
FINAL_KINDS = SHORT_KINDS + LONG_KINDS
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
MIN_OBJECTS, MAX_OBJECTS = 2, 4

_TEMPLATE_WORDS = (
    "what color is the shape at row column ? what shape is at how many shapes are there ? is there a ? "
    "yes no describe the image in detail . there are shapes . a at row column"
)
WORDS: tuple[str, ...] = tuple(
    sorted(set(_TEMPLATE_WORDS.split()) | set(COLORS) | set(SHAPES) | set(POSITION_WORDS) | set(COUNT_WORDS))
)


# -- scenes ------------------------------------------------------------------------------------------
def make_scene(rng: np.random.Generator, image_size: int = 96, grid: int = 4) -> list[dict[str, Any]]:
    """2-4 objects in distinct cells, each a colour, a shape and a box strictly inside its cell."""
    _check_geometry(image_size, grid)
    cell = image_size // grid
    count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = rng.choice(grid * grid, size=count, replace=False)
    scene = []
    for index in sorted(int(c) for c in cells):
        row, col = divmod(index, grid)
        size = int(rng.integers(int(cell * 2 / 3), int(cell * 5 / 6) + 1))
        x0 = col * cell + int(rng.integers(1, cell - size))
        y0 = row * cell + int(rng.integers(1, cell - size))
        scene.append(
            {
                "color": COLORS[int(rng.integers(len(COLORS)))],
                "shape": SHAPES[int(rng.integers(len(SHAPES)))],
                "row": row,
                "col": col,
                "box": [x0, y0, x0 + size, y0 + size],
            }
        )
    return scene


def _check_geometry(image_size: int, grid: int) -> None:
    if not 1 <= grid <= len(POSITION_WORDS):
        raise ValueError(f"grid must be in 1..{len(POSITION_WORDS)} (positions are named in words), got {grid}")
    if image_size % grid or image_size // grid < 8:
        raise ValueError(f"image_size must be a multiple of grid with cells of >= 8 px, got {image_size} / {grid}")


def render(scene: list[dict[str, Any]], rng: np.random.Generator, image_size: int = 96) -> Image.Image:
    """Textured grey background (blocky noise, slightly blurred) with the scene's filled shapes."""
    base = int(rng.integers(90, 151))
    blocks = rng.integers(-15, 16, size=(image_size // 4, image_size // 4))
    noise = np.kron(blocks, np.ones((4, 4), dtype=np.int64)) + rng.integers(-6, 7, size=(image_size, image_size))
    grey = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.stack([grey] * 3, axis=-1)).filter(ImageFilter.GaussianBlur(0.8))
    draw = ImageDraw.Draw(image)
    for obj in scene:
        x0, y0, x1, y1 = obj["box"]
        fill = RGB[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        else:
            cx, cy = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
            draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=fill)
    return image


# -- questions ---------------------------------------------------------------------------------------
def _where(obj: dict[str, Any]) -> str:
    return f"row {POSITION_WORDS[obj['row']]} column {POSITION_WORDS[obj['col']]}"


def describe(scene: list[dict[str, Any]]) -> str:
    """Every object in reading order: 'there are three shapes . a red circle at row one column two . ...'"""
    parts = [f"there are {COUNT_WORDS[len(scene)]} shapes ."]
    for obj in sorted(scene, key=lambda o: (o["row"], o["col"])):
        parts.append(f"a {obj['color']} {obj['shape']} at {_where(obj)} .")
    return " ".join(parts)


def draw_answer(kind: str, rng: np.random.Generator) -> int | None:
    """The answer a count (0-3) or exist (1 yes / 0 no) round must have, drawn before the scene.

    Drawing it first and redrawing scenes until one admits it keeps these answers uniform, so the
    question alone never predicts them.
    """
    if kind == "count":
        return int(rng.integers(0, 4))
    if kind == "exist":
        return int(rng.random() < 0.5)
    return None


def ask(
    kind: str, scene: list[dict[str, Any]], rng: np.random.Generator, wanted: int | None = None
) -> tuple[str, str] | None:
    """One (question, answer) of ``kind`` about ``scene``; None when the scene cannot give ``wanted``.

    ``wanted`` comes from ``draw_answer`` (drawn here when None).
    """
    if wanted is None:
        wanted = draw_answer(kind, rng)
    if kind in ("color", "shape"):
        obj = scene[int(rng.integers(len(scene)))]
        if kind == "color":
            return f"what color is the shape at {_where(obj)} ?", obj["color"]
        return f"what shape is at {_where(obj)} ?", obj["shape"]
    if kind == "count":
        colours = [c for c in COLORS if sum(o["color"] == c for o in scene) == wanted]
        if not colours:
            return None
        colour = colours[int(rng.integers(len(colours)))]
        return f"how many {colour} shapes are there ?", COUNT_WORDS[wanted]
    if kind == "exist":
        present = {(o["color"], o["shape"]) for o in scene}
        if wanted:
            colour, shape = sorted(present)[int(rng.integers(len(present)))]
            return f"is there a {colour} {shape} ?", "yes"
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        pool = near if near and rng.random() < 0.5 else absent
        colour, shape = pool[int(rng.integers(len(pool)))]
        return f"is there a {colour} {shape} ?", "no"
    if kind == "describe":
        return "describe the image in detail .", describe(scene)
    raise ValueError(f"unknown question kind {kind!r}")


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLIT_INDEX:
        raise ValueError(f"split must be one of {sorted(SPLIT_INDEX)}, got {split!r}")
    return np.random.default_rng([seed, SPLIT_INDEX[split], index])


def make_conversation(
    split: str, index: int, seed: int, image_size: int = 96, grid: int = 4
) -> tuple[dict[str, Any], np.random.Generator]:
    """The record (without rendering) and the RNG positioned to render its image."""
    rng = _rng(seed, split, index)
    rounds = int(rng.integers(1, 4))
    final = FINAL_KINDS[int(rng.integers(len(FINAL_KINDS)))]
    # Earlier rounds: distinct short kinds other than the final one (two "how many ... three"
    # questions could never share one scene).
    others = [k for k in SHORT_KINDS if k != final]
    kinds = [others[int(i)] for i in rng.permutation(len(others))[: rounds - 1]] + [final]
    wanted = [draw_answer(kind, rng) for kind in kinds]
    for _ in range(1000):
        scene = make_scene(rng, image_size, grid)
        exchanges = _exchanges(kinds, wanted, scene, rng)
        if exchanges is not None:
            break
    else:  # pragma: no cover - a 4-object scene always admits every kind within a few draws
        raise RuntimeError(f"could not build record {split}-{index}")
    record_id = f"{split}-{index:07d}"
    conversations = []
    for n, (question, answer) in enumerate(exchanges):
        conversations.append({"from": "human", "value": f"<image>\n{question}" if n == 0 else question})
        conversations.append({"from": "gpt", "value": answer})
    record = {
        "id": record_id,
        "image": f"{split}/{record_id}.jpg",
        "conversations": conversations,
        "kinds": kinds,
        "scene": scene,
    }
    return record, rng


def _exchanges(
    kinds: list[str], wanted: list[int | None], scene: list[dict[str, Any]], rng: np.random.Generator
) -> list[tuple[str, str]] | None:
    asked: list[tuple[str, str]] = []
    for kind, answer in zip(kinds, wanted):
        for _ in range(20):
            exchange = ask(kind, scene, rng, answer)
            if exchange is None:
                return None
            if exchange[0] not in {q for q, _ in asked}:
                asked.append(exchange)
                break
        else:
            return None
    return asked


def make_record(
    split: str, index: int, seed: int, image_size: int = 96, grid: int = 4
) -> tuple[dict[str, Any], Image.Image]:
    """Record ``index`` of ``split`` and its image, deterministic in ``(seed, split, index)``."""
    record, rng = make_conversation(split, index, seed, image_size, grid)
    return record, render(record["scene"], rng, image_size)


# -- shards ------------------------------------------------------------------------------------------
def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write_shard(task: tuple[Path, str, int, int, int, int, int, int]) -> int:
    out, split, shard, start, stop, seed, image_size, grid = task
    path = out / f"{split}-{shard:06d}.tar"
    tmp = path.with_name(f".{path.name}.tmp")
    with wds.TarWriter(str(tmp)) as sink:
        for index in range(start, stop):
            record, image = make_record(split, index, seed, image_size, grid)
            sink.write({"__key__": record["id"], "jpg": _jpeg(image), "json": json.dumps(record).encode("utf-8")})
    os.replace(tmp, path)
    return stop - start


def write_split(
    out: str | Path,
    split: str,
    num_records: int,
    seed: int,
    image_size: int = 96,
    grid: int = 4,
    samples_per_shard: int = 1000,
    workers: int = 1,
    progress: tqdm | None = None,
) -> list[str]:
    """Write ``num_records`` records of ``split`` as shards under ``out``; returns the shard names."""
    _check_geometry(image_size, grid)
    _rng(seed, split, 0)
    if num_records < 0:
        raise ValueError(f"--{split} must be >= 0, got {num_records}")
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [
        (out, split, n, start, min(start + samples_per_shard, num_records), seed, image_size, grid)
        for n, start in enumerate(range(0, num_records, samples_per_shard))
    ]
    if workers > 1 and len(tasks) > 1:
        with Pool(min(workers, len(tasks))) as pool:
            for done in pool.imap(_write_shard, tasks):
                if progress is not None:
                    progress.update(done)
    else:
        for task in tasks:
            done = _write_shard(task)
            if progress is not None:
                progress.update(done)
    return [f"{split}-{task[2]:06d}.tar" for task in tasks]


def generate(
    out: str | Path,
    train: int,
    val: int,
    test: int,
    seed: int = 0,
    image_size: int = 96,
    grid: int = 4,
    samples_per_shard: int = 1000,
    workers: int = 1,
) -> dict[str, Any]:
    """Write all three splits and ``info.json`` (last, atomically: its presence means complete)."""
    out = Path(out)
    sizes = {"train": train, "val": val, "test": test}
    info: dict[str, Any] = {
        "version": 1, "seed": seed, "image_size": image_size, "grid": grid,
        "samples_per_shard": samples_per_shard, "splits": {},
    }
    with tqdm(total=sum(sizes.values()), desc=f"synthetic -> {out}", unit="rec") as progress:
        for split, count in sizes.items():
            shards = write_split(out, split, count, seed, image_size, grid, samples_per_shard, workers, progress)
            info["splits"][split] = {"records": count, "shards": shards}
    tmp = out / ".info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / "info.json")
    return info


def read_info(out: str | Path) -> dict[str, Any] | None:
    """The generation's ``info.json``, or None when there is no complete generation in ``out``."""
    path = Path(out) / "info.json"
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic shapes VQA task as webdataset shards.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--val", type=int, default=512)
    parser.add_argument("--test", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    for name in ("train", "val", "test"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    try:
        _check_geometry(args.image_size, args.grid)
    except ValueError as err:
        parser.error(str(err))
    info = generate(args.out, args.train, args.val, args.test, args.seed, args.image_size, args.grid,
                    args.samples_per_shard, args.workers)
    print(json.dumps({split: s["records"] for split, s in info["splits"].items()}))


if __name__ == "__main__":
    main()
