"""The built-in shapes VQA task, written as webdataset shards of LLaVA conversation records.

Design (measurements behind it: ../shared/CALIBRATION.md):

* Evidence is confined to object cells. The image is a ``grid`` x ``grid`` array of cells (4 x 4 cells
  of 24 px by default; with 12 px patches each cell is exactly 2 x 2 patches). 2-4 coloured shapes sit
  strictly inside distinct cells on a grey textured background with the same statistics everywhere, so
  at most 16 of 64 patches carry anything and the rest is uninformative. A sparsifier that keeps the
  right 25% of patches loses nothing; one that keeps a random 25% loses objects.
* Answers are balanced, so the question-only baseline (the best answer per question text) stays near
  0.3: colour and shape are asked of occupied cells (uniform over 6 colours / 4 shapes), count draws its
  answer uniformly from zero..three before choosing the colour, exist is yes half the time and its
  "no"s are often near misses.
* ``describe`` answers list every object and its cell (tens of tokens), for text sparsification.
* LLaVA-1.5's short-answer prompt (``short_suffix``): every one-word question, in every round, ends with
  "\\nAnswer the question using a single word or phrase." (:data:`SHORT_ANSWER_SUFFIX`), as the VQAv2 / GQA
  questions of llava_v1_5_mix665k.json and its evaluation question files do, so a LLaVA question file asks
  the way the shards do; descriptions never carry it. Only the question text changes (no draw depends on
  it). Off by default here and in the CLI (records byte-identical to earlier versions); the configs turn it on.
* Other vision towers (:class:`Layout`): ``cell`` sets the cell side directly (28 px = one merged
  Qwen2.5-VL token of 2 x 2 14-px patches, 32 px for Qwen3-VL's 16-px patches; an object still sits in one
  quadrant = one patch) and ``grid_sizes`` lists (rows, cols) choices, up to 6 x 6, one drawn per record,
  so a batch holds images of different sizes and token counts. Rows and columns five and six are named
  "five" and "six" (:data:`WIDE_WORDS`). Without either option the records and shards are those of the
  square ``image_size`` / ``grid`` task, byte for byte.

The hard task (``objects`` / ``large_share`` and the :data:`UNIQUE_KINDS`; preset
conf/data/synthetic_hard.yaml). The default task cannot tell pruning methods apart: its 2-4 objects fit a
0.2 keep (12 of 64 tokens) and any predictor that finds non-background patches keeps them all. The hard
task keeps the geometry (96 px, 4 x 4 cells of 2 x 2 patches, 64 tokens) and the words, and changes the
scenes and questions so that each family of methods has a place to win:

* Crowding: ``objects=[6, 10]`` (mean 8 of 16 cells). Even one token per object exceeds a 0.1 keep
  (6 tokens) in every scene but the 6-object ones (20%), and all object tokens (mean 20, 5-95% 12-30) exceed
  a 0.2 keep (12 tokens) in 90% of scenes: a selection loses objects, and which ones decides the answers.
* Redundancy: ``large_share=0.5`` of the objects fill their whole cell (20-22 px boxes covering all four
  patches, >= 9 px of each), so four tokens show the same object. A saliency top-k spends its budget on
  those; one token per object (diversity / merging methods, DivPrune, VisionZip) covers more objects.
  The small half stays inside one patch (one token carries colour and shape, as in the default task).
  Objects carry ``"large"``. Caveat (make_scene): shapes split over four tokens were hard for the tiny
  LLM; colours and counts read from any one of them.
* One object among many: ``color`` / ``shape`` by cell, ``color_by_shape`` ("what color is the triangle
  ?", exactly one triangle in the scene) and ``shape_by_color`` ("what shape is the red one ?", exactly
  one red object), ``count`` answered zero..four (uniform; the answers of a record sum to at most
  COUNTED_CROWDED), ``exist`` with the default yes/no and near-miss draw, which in crowded scenes makes
  98% of the noes near misses and 57% binding misses (the colour and the shape are both there, on other
  objects). Here the question says which tokens matter (instruction-aware keeping). Every answer is one
  word, uniform within its kind (count: 0.19-0.21 per answer), and the final kind is uniform over the six,
  so the question-only baseline (majority train answer per question text) is about 0.24: 0.2385 on
  20,000 train / 2,000 val records (color 0.16, shape 0.23, count 0.20, exist 0.47, color_by_shape 0.16,
  shape_by_color 0.22), 0.23-0.29 with 3,000 / 1,000 records over seeds. ``describe`` / ``detail`` are refused
  with more than four objects (their count words and ordinals stop at four).
* Every word of its questions and answers is already in :data:`WORDS`: the tiny tokenizers need no new word
  (but the suffix's, with ``short_suffix``: :data:`SHORT_ANSWER_SUFFIX_WORDS`).

Record ``i`` of a split draws everything (conversation, then pixels) from its own RNG seeded by
``(seed, split, i)``, so shards are byte-identical whatever the number of worker processes.

CLI: ``python -m dllava.data.synthetic --out data/synthetic --train 20000 --val 512 --test 512``
(what train.py generates: add ``--kinds color,shape,count,exist,describe,detail --short-suffix``;
Qwen2.5-VL sizes: ``--cell 28 --grid-sizes 4x4,4x6,6x4``; the hard task: ``--objects 6,10 --large-share 0.5
--kinds color,shape,count,exist,color_by_shape,shape_by_color``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
from collections import Counter
from collections.abc import Collection, Sequence
from multiprocessing import Pool
from pathlib import Path
from typing import Any, NamedTuple

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
WIDE_POSITION_WORDS = POSITION_WORDS + ("five", "six")  # rows / columns of a grid_sizes layout
MAX_SIDE = len(WIDE_POSITION_WORDS)
COUNT_WORDS = ("zero", "one", "two", "three", "four")
SHORT_KINDS = ("color", "shape", "count", "exist")
LONG_KINDS = ("describe", "detail")
# One-word questions about the only object of a shape / of a colour ("what color is the triangle ?"), made
# for crowded scenes (``objects``): the question, not the image, says which of many objects matters.
UNIQUE_KINDS = ("color_by_shape", "shape_by_color")
ONE_WORD_KINDS = SHORT_KINDS + UNIQUE_KINDS  # every kind with a one-word answer, scored by exact match
FINAL_KINDS = SHORT_KINDS + LONG_KINDS + UNIQUE_KINDS
CLASSIC_KINDS = SHORT_KINDS + ("describe",)  # the kinds generations drew from before ``detail`` existed
ORDINALS = ("first", "second", "third", "fourth")
DETAIL_MIN_OBJECTS = 3  # detailed descriptions run 150-400 tokens only with 3-4 objects
CHAT_ROUNDS = (7, 8)  # a detailed description ends a chat of this many rounds half of the time
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
MIN_OBJECTS, MAX_OBJECTS = 2, 4
MAX_ROUNDS = 3
COUNT_ANSWERS = 4  # count answers are zero..three, drawn uniformly
MAX_SCENE_DRAWS = 1000  # the rarest plans (count "two" twice, "three" with "one") need 30-45 draws on average
COUNTED_CROWDED = 6  # cap on a crowded record's count answers summed (two "four"s would need ~300 scene draws)
SHARD_MTIME = 0  # fixed tar member times: shards are byte-identical across runs, not just their payloads

# Fixed words of every question and answer template; the variable slots are filled from the tuples above.
_TEMPLATE_TEXT = (
    "what color is the shape at row column ? | what shape is at row column ? | how many shapes are there ? | "
    "is there a ? | yes no | describe the image in detail . | there are shapes . a at row column ."
)
WORDS: tuple[str, ...] = tuple(
    sorted(
        set(_TEMPLATE_TEXT.replace("|", " ").split())
        | set(COLORS)
        | set(SHAPES)
        | set(POSITION_WORDS)
        | set(COUNT_WORDS)
    )
)

# Every word of any layout's records: WORDS plus the rows / columns five and six. WORDS itself stays the
# square task's vocabulary (tiny LLaVA tokenizers are built from it).
WIDE_WORDS: tuple[str, ...] = tuple(sorted(set(WORDS) | set(WIDE_POSITION_WORDS)))

# Words only the ``detail`` kind uses. They come after WORDS (tiny tokenizers append them after ``<image>``),
# so a tokenizer built before the kind existed is a prefix of one built now and its ids stay valid.
_DETAIL_TEXT = (
    "describe the image in full detail . there are shapes each its own cell . the first second third fourth shape is a at row column , in the "
    "top bottom left right corner of its cell . it is above below and to the in the same row column as"
)
DETAIL_WORDS: tuple[str, ...] = tuple(sorted(set(_DETAIL_TEXT.split()) - set(WIDE_WORDS)))

# LLaVA-1.5's short-answer instruction: the VQAv2 / GQA / ... questions of llava_v1_5_mix665k.json and of its
# evaluation question files end with "\n" + this text. With ``short_suffix`` every one-word question
# (ONE_WORD_KINDS, in every round) ends with it too, so a LLaVA question file asks the way the shards do.
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
# Its words as the word-level tiny tokenizers split them (words and runs of punctuation), in text order. Case
# matters there: "Answer" is a new word. The ones not in WORDS come after DETAIL_WORDS and the rows five and
# six in the full tiny vocabulary (appended last, so older tiny checkpoints stay valid prefixes).
SHORT_ANSWER_SUFFIX_WORDS: tuple[str, ...] = tuple(dict.fromkeys(re.findall(r"\w+|[^\w\s]+", SHORT_ANSWER_SUFFIX)))


def with_short_suffix(question: str) -> str:
    """``question`` as LLaVA-1.5 asks for a short answer: followed by a newline and SHORT_ANSWER_SUFFIX."""
    return f"{question}\n{SHORT_ANSWER_SUFFIX}"


def without_short_suffix(question: str) -> str:
    """``question`` with a trailing LLaVA-1.5 short-answer suffix removed (unchanged without one)."""
    return question.removesuffix(f"\n{SHORT_ANSWER_SUFFIX}")

Scene = list[dict[str, Any]]


class Layout(NamedTuple):
    """An image of ``rows`` x ``cols`` cells of ``cell`` px: ``cols * cell`` px wide, ``rows * cell`` high."""

    rows: int
    cols: int
    cell: int

    @property
    def width(self) -> int:
        return self.cols * self.cell

    @property
    def height(self) -> int:
        return self.rows * self.cell


# -- validation --------------------------------------------------------------------------------------
def check_geometry(image_size: int, grid: int) -> None:
    """Raise unless the grid can hold MAX_OBJECTS objects in cells of at least 8 px named in words."""
    if not 2 <= grid <= len(POSITION_WORDS):
        raise ValueError(f"grid must be in 2..{len(POSITION_WORDS)} (rows and columns are named in words), got {grid}")
    if image_size % grid:
        raise ValueError(f"image_size must be divisible by grid, got image_size={image_size}, grid={grid}")
    if image_size // grid < 16 or (image_size // grid) % 2:
        raise ValueError(f"cells must be an even number of >= 16 px (objects sit in a quadrant), got image_size={image_size} / grid={grid}")


def check_layout(layout: Layout) -> Layout:
    """Raise unless rows and columns are 2..MAX_SIDE (named in words) and cells an even number of >= 16 px."""
    rows, cols, cell = layout
    if not (2 <= rows <= MAX_SIDE and 2 <= cols <= MAX_SIDE):
        raise ValueError(f"grid sizes must have 2..{MAX_SIDE} rows and columns (named in words), got {rows}x{cols}")
    if cell < 16 or cell % 2:
        raise ValueError(f"cell must be an even number of >= 16 px (objects sit in a quadrant), got {cell}")
    return layout


def layouts(
    image_size: int = 96, grid: int = 4, cell: int | None = None, grid_sizes: Sequence[Sequence[int]] | None = None
) -> tuple[Layout, ...]:
    """The layouts records draw from: the square ``grid`` x ``grid`` of ``image_size`` px by default;
    ``cell`` replaces the cell side ``image_size // grid`` (``image_size`` is then unused) and
    ``grid_sizes`` (``[(rows, cols), ...]``) replaces the single square grid."""
    if cell is None:
        check_geometry(image_size, grid)
        cell = image_size // grid
    if not isinstance(cell, int) or isinstance(cell, bool):
        raise TypeError(f"cell must be an integer number of px, got {cell!r}")
    if grid_sizes is None:
        grid_sizes = [(grid, grid)]
    if not grid_sizes:
        raise ValueError("grid_sizes must list at least one (rows, cols)")
    found = []
    for size in grid_sizes:
        pair = not isinstance(size, (str, bytes)) and len(size) == 2
        if not pair or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
            raise TypeError(f"grid_sizes entries must be (rows, cols) integer pairs, got {size!r}")
        found.append(check_layout(Layout(size[0], size[1], cell)))
    return tuple(found)


def parse_grid_sizes(text: str) -> list[tuple[int, int]]:
    """``"4x4,4x6,6x4"`` -> ``[(4, 4), (4, 6), (6, 4)]`` (the CLI's ``--grid-sizes``)."""
    sizes = []
    for item in (part.strip() for part in text.split(",")):
        match = re.fullmatch(r"(\d+)x(\d+)", item)
        if not match:
            raise ValueError(f"--grid-sizes takes ROWSxCOLS items separated by commas (e.g. 4x4,4x6), got {item!r}")
        sizes.append((int(match.group(1)), int(match.group(2))))
    return sizes


def parse_objects(text: str) -> tuple[int, int]:
    """``"6,10"`` -> ``(6, 10)`` (the CLI's ``--objects``)."""
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--objects takes MIN,MAX (e.g. 6,10), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def check_kinds(kinds: Collection[str]) -> tuple[str, ...]:
    """The question kinds a generation draws from, in canonical order; raises on an unknown or empty set."""
    unknown = sorted(set(kinds) - set(FINAL_KINDS))
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {list(FINAL_KINDS)}, got {list(kinds)}")
    return tuple(k for k in FINAL_KINDS if k in kinds)


def check_short_suffix(short_suffix: Any) -> bool:
    """``short_suffix`` as a bool; raises TypeError on anything else (a string "false" would read as true)."""
    if not isinstance(short_suffix, bool):
        raise TypeError(f"short_suffix must be true or false, got {short_suffix!r}")
    return short_suffix


def _check_split(split: str) -> None:
    if split not in SPLIT_INDEX:
        raise ValueError(f"split must be one of {list(SPLIT_INDEX)}, got {split!r}")


def _check_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"--{name} must be >= {minimum}, got {value}")


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    _check_split(split)
    _check_at_least("seed", seed, 0)  # numpy seeds must be non-negative
    return np.random.default_rng([seed, SPLIT_INDEX[split], index])


# -- scenes ------------------------------------------------------------------------------------------
def check_scene_options(
    objects: Sequence[int] | None, large_share: float | None, choices: Sequence[Layout] = (), kinds: Collection[str] = ()
) -> tuple[int, int, float]:
    """``(fewest, most, large_share)`` of the scenes: ``objects`` ``[min, max]`` (None: 2-4) and ``large_share``
    (None: 0), checked against the layouts (``choices``: at most one object per cell of the smallest) and the
    kinds (``describe`` / ``detail`` name at most four objects). Raises ValueError / TypeError with the reason."""
    if objects is None:
        fewest, most = MIN_OBJECTS, MAX_OBJECTS
    else:
        pair = not isinstance(objects, (str, bytes)) and isinstance(objects, Sequence) and len(objects) == 2
        if not pair or not all(isinstance(v, int) and not isinstance(v, bool) for v in objects):
            raise TypeError(f"objects must be a [min, max] pair of integers, got {objects!r}")
        fewest, most = int(objects[0]), int(objects[1])
        cells = min((c.rows * c.cols for c in choices), default=MAX_SIDE * MAX_SIDE)
        if not 1 <= fewest <= most <= cells:
            raise ValueError(f"objects must be [min, max] with 1 <= min <= max <= {cells} (one object per cell), got {list(objects)}")
    if large_share is None:
        share = 0.0
    else:
        if isinstance(large_share, bool) or not isinstance(large_share, (int, float)):
            raise TypeError(f"large_share must be a number in [0, 1], got {large_share!r}")
        share = float(large_share)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"large_share must be in [0, 1], got {large_share}")
    long = sorted(set(kinds) & set(LONG_KINDS))
    if long and most > MAX_OBJECTS:
        raise ValueError(f"kinds {long} describe at most {MAX_OBJECTS} objects (count words, ordinals); objects allows {most}")
    if "detail" in kinds and most < DETAIL_MIN_OBJECTS:
        raise ValueError(f"the detail kind needs scenes of >= {DETAIL_MIN_OBJECTS} objects; objects allows at most {most}")
    return fewest, most, share


def count_answers(most: int = MAX_OBJECTS) -> int:
    """How many count answers (zero, one, ...) are drawn from, uniformly: zero..three for the default 2-4
    objects, zero..four (every count word) once scenes can hold five or more."""
    return min(len(COUNT_WORDS), most)


def make_scene(
    rng: np.random.Generator,
    image_size: int = 96,
    grid: int = 4,
    layout: Layout | None = None,
    objects: Sequence[int] | None = None,
    large_share: float | None = None,
) -> Scene:
    """2-4 objects (``objects``: [min, max]) in distinct cells, in reading order, each inside one quadrant
    of its cell, or (a ``large_share`` of them) filling the whole cell.

    A cell is 2 x 2 vision patches (24 px cells, 12 px patches by default) and an object is drawn inside
    one of its four quadrants, chosen at random: its whole outline falls in a single patch, so one image
    token carries both its colour and its shape. Objects spread over 2 x 2 patches (16-22 px boxes) were
    tried first: on the H100 a tiny LLaVA then learned colours, counts and positions but stayed at chance
    on shapes, whose cues were split across four tokens (a linear probe on the cell's tokens found them,
    the LLM never did).

    Each box ``[x0, y0, x1, y1]`` is half-open in pixels (PIL crop convention), quadrant - 3 to
    quadrant - 2 px wide (9-10 px), at least 1 px inside its quadrant on every side. ``layout`` (rows, cols,
    cell) replaces the square ``image_size`` / ``grid``.

    With ``large_share`` set, each object is large with that probability: a box of cell - 4 to cell - 2 px
    (20-22 px), at least 1 px inside its cell, so it covers all four patches of the cell (at least
    quadrant - 3 = 9 px of each): four tokens show the same object (redundant tokens). Every object then
    carries ``"large": true / false``; without the option the scene (and the RNG draws) are as before.
    """
    if layout is None:
        check_geometry(image_size, grid)
        layout = Layout(grid, grid, image_size // grid)
    rows, cols, cell = check_layout(layout)
    fewest, most, share = check_scene_options(objects, large_share, (layout,))
    quadrant = cell // 2
    count = int(rng.integers(fewest, most + 1))
    cells = sorted(int(c) for c in rng.choice(rows * cols, size=count, replace=False))
    scene = []
    for index in cells:
        row, col = divmod(index, cols)
        large = bool(share) and bool(rng.random() < share)  # drawn only when the option is on
        if large:
            size = int(rng.integers(cell - 4, cell - 2 + 1))
            x0 = col * cell + int(rng.integers(1, cell - size))  # >= 1 px margin inside the cell
            y0 = row * cell + int(rng.integers(1, cell - size))
        else:
            qy, qx = divmod(int(rng.integers(4)), 2)
            size = int(rng.integers(quadrant - 3, quadrant - 2 + 1))
            x0 = col * cell + qx * quadrant + int(rng.integers(1, quadrant - size))  # >= 1 px margin
            y0 = row * cell + qy * quadrant + int(rng.integers(1, quadrant - size))
        obj = {
            "color": COLORS[int(rng.integers(len(COLORS)))],
            "shape": SHAPES[int(rng.integers(len(SHAPES)))],
            "row": row,
            "col": col,
            "box": [x0, y0, x0 + size, y0 + size],
        }
        if large_share is not None:
            obj["large"] = large
        scene.append(obj)
    return scene


def render(scene: Scene, rng: np.random.Generator, image_size: int = 96, layout: Layout | None = None) -> Image.Image:
    """The scene's filled shapes on a textured grey background (``image_size`` square, or ``layout``'s
    width x height).

    The background is a grey level in [90, 150] plus blocky noise (4 px blocks, +-15) and fine noise
    (+-6), slightly blurred: texture everywhere, grey only, so it cannot be mistaken for an object.
    """
    height, width = (image_size, image_size) if layout is None else (layout.height, layout.width)
    base = int(rng.integers(90, 151))
    blocks = rng.integers(-15, 16, size=(-(-height // 4), -(-width // 4)))
    coarse = np.kron(blocks, np.ones((4, 4), dtype=np.int64))[:height, :width]
    fine = rng.integers(-6, 7, size=(height, width))
    grey = np.clip(base + coarse + fine, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)).filter(ImageFilter.GaussianBlur(0.8))
    draw = ImageDraw.Draw(image)
    for obj in scene:
        _draw_shape(draw, obj["shape"], obj["box"], RGB[obj["color"]])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: list[int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    right, bottom = x1 - 1, y1 - 1  # PIL's shape coordinates are inclusive
    cx, cy = (x0 + right) / 2, (y0 + bottom) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, right, bottom], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, right, bottom], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (right, bottom), (x0, bottom)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (right, cy), (cx, bottom), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# -- questions ---------------------------------------------------------------------------------------
def _where(obj: dict[str, Any]) -> str:
    return f"row {WIDE_POSITION_WORDS[obj['row']]} column {WIDE_POSITION_WORDS[obj['col']]}"


def describe(scene: Scene) -> str:
    """Every object in reading order: 'there are three shapes . a red circle at row one column two . ...'"""
    parts = [f"there are {COUNT_WORDS[len(scene)]} shapes ."]
    for obj in sorted(scene, key=lambda o: (o["row"], o["col"])):
        parts.append(f"a {obj['color']} {obj['shape']} at {_where(obj)} .")
    return " ".join(parts)


def quadrant(obj: dict[str, Any], cell: int) -> tuple[int, int]:
    """(vertical, horizontal) quadrant of its cell the object sits in: 0 = top / left, 1 = bottom / right."""
    x0, y0 = obj["box"][:2]
    half = cell // 2
    return int(y0 - obj["row"] * cell >= half), int(x0 - obj["col"] * cell >= half)


def _relation(obj: dict[str, Any], other: dict[str, Any]) -> str:
    """Where ``obj`` is relative to ``other`` (never the same cell), as one sentence."""
    name = f"the {other['color']} {other['shape']}"
    vertical = "above" if obj["row"] < other["row"] else "below"
    horizontal = "left" if obj["col"] < other["col"] else "right"
    if obj["row"] == other["row"]:
        return f"it is to the {horizontal} of {name} in the same row ."
    if obj["col"] == other["col"]:
        return f"it is {vertical} {name} in the same column ."
    return f"it is {vertical} and to the {horizontal} of {name} ."


def describe_in_detail(scene: Scene, cell: int) -> str:
    """The ``detail`` answer (150-400 words for 3-4 objects): the count, then every object in reading
    order with its colour, shape, cell and quadrant, and where it is relative to every other object.

    'there are three shapes in the image , each in its own cell . the first shape is a red circle . it is at row one column two , in the top
    left corner of its cell . it is above and to the left of the blue square . ...'
    """
    ordered = sorted(scene, key=lambda o: (o["row"], o["col"]))
    parts = [f"there are {COUNT_WORDS[len(scene)]} shapes in the image , each in its own cell ."]
    for n, obj in enumerate(ordered):
        vertical, horizontal = quadrant(obj, cell)
        parts.append(f"the {ORDINALS[n]} shape is a {obj['color']} {obj['shape']} .")
        parts.append(
            f"it is at {_where(obj)} , in the {('top', 'bottom')[vertical]} {('left', 'right')[horizontal]} "
            "corner of its cell ."
        )
        parts.extend(_relation(obj, other) for other in ordered if other is not obj)
    return " ".join(parts)


def ask(
    kind: str,
    scene: Scene,
    rng: np.random.Generator,
    answer: str | None = None,
    exclude: Collection[str] = (),
    cell: int = 24,
    counts: int = COUNT_ANSWERS,
) -> tuple[str, str] | None:
    """One (question, answer) of ``kind`` about ``scene``, its question not in ``exclude``.

    ``answer`` fixes the answer of a count ("zero".."three", or up to the ``counts``-th count word) or exist
    ("yes"/"no") question; it is drawn here when None. Returns None when the scene has no fresh question
    with that answer: the caller then draws a new scene but keeps the answer, which is what keeps count
    and exist answers balanced. ``color_by_shape`` / ``shape_by_color`` ask about a shape / colour that
    exactly one object of the scene has (None when there is none).
    """
    if kind == "color":
        options = [(f"what color is the shape at {_where(o)} ?", o["color"]) for o in scene]
    elif kind == "shape":
        options = [(f"what shape is at {_where(o)} ?", o["shape"]) for o in scene]
    elif kind == "count":
        options = _count_options(scene, answer or draw_answer(kind, rng, counts))
    elif kind == "exist":
        options = _exist_options(scene, answer or draw_answer(kind, rng), rng)
    elif kind == "color_by_shape":
        options = [(f"what color is the {o['shape']} ?", o["color"]) for o in _only_ones(scene, "shape")]
    elif kind == "shape_by_color":
        options = [(f"what shape is the {o['color']} one ?", o["shape"]) for o in _only_ones(scene, "color")]
    elif kind == "describe":
        options = [("describe the image in detail .", describe(scene))]
    elif kind == "detail":
        fits = len(scene) >= DETAIL_MIN_OBJECTS
        options = [("describe the image in full detail .", describe_in_detail(scene, cell))] if fits else []
    else:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {FINAL_KINDS}")
    options = [(q, a) for q, a in options if q not in exclude]
    return options[int(rng.integers(len(options)))] if options else None


def _only_ones(scene: Scene, attribute: str) -> list[dict[str, Any]]:
    """The objects whose ``attribute`` ("shape" or "color") no other object of the scene shares."""
    seen = Counter(o[attribute] for o in scene)
    return [o for o in scene if seen[o[attribute]] == 1]


def draw_answer(kind: str, rng: np.random.Generator, counts: int = COUNT_ANSWERS) -> str | None:
    """The answer of a count (uniform over the first ``counts`` count words: zero..three by default) or
    exist (yes/no) round, drawn before its scene."""
    if kind == "count":
        return COUNT_WORDS[int(rng.integers(counts))]
    if kind == "exist":
        return "yes" if rng.random() < 0.5 else "no"
    return None


def _count_options(scene: Scene, answer: str) -> list[tuple[str, str]]:
    wanted = COUNT_WORDS.index(answer)
    colours = [c for c in COLORS if sum(o["color"] == c for o in scene) == wanted]
    return [(f"how many {c} shapes are there ?", answer) for c in colours]


def _exist_options(scene: Scene, answer: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Present pairs for "yes"; for "no", half the time only near misses (the colour or the shape is there)."""
    present = sorted({(o["color"], o["shape"]) for o in scene})
    if answer == "yes":
        pairs = present
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        pairs = near if rng.random() < 0.5 else absent  # a scene always has near misses (>= 1 object)
    return [(f"is there a {c} {s} ?", answer) for c, s in pairs]


def _draw_plan(
    rng: np.random.Generator, kinds: tuple[str, ...] = CLASSIC_KINDS, most: int = MAX_OBJECTS, counted: int | None = None
) -> list[tuple[str, str | None]]:
    """1-3 rounds of (kind, fixed answer or None): short kinds first, the final kind uniform over ``kinds``
    (the classic five by default; without a short kind, a single round). A ``detail`` final round ends a chat of
    CHAT_ROUNDS rounds half of the time when at least three short kinds are drawn from (the short rounds
    cycle through them in a random order, so no scene of 3-4 objects runs out of questions).

    Count answers that no scene could serve together (counts of distinct colours summing past
    MAX_OBJECTS, e.g. "three" twice) are redrawn. ``most`` (scenes of up to that many objects) sets how
    many count answers are drawn from (:func:`count_answers`) and ``counted`` the cap on their sum
    (default ``most``; crowded scenes use a lower one so that rare joint counts do not need thousands of
    scene draws). One-word kinds (``ONE_WORD_KINDS``) may come before the final round.
    """
    short = tuple(k for k in kinds if k in ONE_WORD_KINDS)
    counts, counted = count_answers(most), most if counted is None else counted
    rounds = int(rng.integers(1, MAX_ROUNDS + 1)) if short else 1
    chosen = [short[int(rng.integers(len(short)))] for _ in range(rounds - 1)]
    chosen.append(kinds[int(rng.integers(len(kinds)))])
    if chosen[-1] == "detail" and len(short) >= 3 and rng.random() < 0.5:  # draws only for detail
        rounds = int(rng.integers(CHAT_ROUNDS[0], CHAT_ROUNDS[1] + 1))
        cycle = [short[int(i)] for i in rng.permutation(len(short))]
        chosen = [cycle[i % len(cycle)] for i in range(rounds - 1)] + ["detail"]
    plan: list[tuple[str, str | None]] = []
    for kind in chosen:
        answer = draw_answer(kind, rng, counts)
        while kind == "count" and _objects_counted(plan) + COUNT_WORDS.index(answer) > counted:
            answer = draw_answer(kind, rng, counts)  # terminates: "zero" always fits
        plan.append((kind, answer))
    return plan


def _objects_counted(plan: list[tuple[str, str | None]]) -> int:
    return sum(COUNT_WORDS.index(answer) for kind, answer in plan if kind == "count")


def _exchanges(
    plan: list[tuple[str, str | None]], scene: Scene, rng: np.random.Generator, cell: int, counts: int = COUNT_ANSWERS
) -> list[tuple[str, str]] | None:
    """One distinct question per round of ``plan``, or None when this scene cannot serve them all."""
    asked: list[tuple[str, str]] = []
    for kind, answer in plan:
        exchange = ask(kind, scene, rng, answer, exclude={q for q, _ in asked}, cell=cell, counts=counts)
        if exchange is None:
            return None
        asked.append(exchange)
    return asked


def _draw_layout(rng: np.random.Generator, choices: tuple[Layout, ...]) -> Layout:
    """The record's layout: drawn (first, from the record's RNG) only when there is a choice, so the
    single-layout task draws exactly what it drew before layouts existed."""
    return choices[int(rng.integers(len(choices)))] if len(choices) > 1 else choices[0]


class SceneOptions(NamedTuple):
    """What the scenes hold: ``objects`` ([min, max], None: 2-4) and ``large_share`` (None: no large
    objects and no ``large`` key), as given (and recorded in info.json), plus the checked ``most``."""

    objects: tuple[int, int] | None = None
    large_share: float | None = None

    @property
    def most(self) -> int:
        return MAX_OBJECTS if self.objects is None else self.objects[1]

    @property
    def counted(self) -> int:
        """Cap on the sum of a record's count answers: the most objects a default scene holds; crowded
        scenes (``objects``) cap it at COUNTED_CROWDED (the rarest plans then need ~25 scene draws on average)."""
        return MAX_OBJECTS if self.objects is None else min(self.most, COUNTED_CROWDED)


def scene_options(
    objects: Sequence[int] | None = None,
    large_share: float | None = None,
    choices: Sequence[Layout] = (),
    kinds: Collection[str] = (),
) -> SceneOptions:
    """Checked :class:`SceneOptions` (:func:`check_scene_options`), as plain tuples and floats."""
    fewest, most, share = check_scene_options(objects, large_share, choices, kinds)
    return SceneOptions(None if objects is None else (fewest, most), None if large_share is None else share)


def _conversation(
    rng: np.random.Generator,
    split: str,
    index: int,
    layout: Layout,
    kinds: tuple[str, ...],
    options: SceneOptions | None = None,
    short_suffix: bool = False,
) -> dict[str, Any]:
    options = options or SceneOptions()
    counts = count_answers(options.most)
    plan = _draw_plan(rng, kinds, options.most, options.counted)
    for _ in range(MAX_SCENE_DRAWS):
        scene = make_scene(rng, layout=layout, objects=options.objects, large_share=options.large_share)
        exchanges = _exchanges(plan, scene, rng, layout.cell, counts)
        if exchanges is not None:
            break
    else:  # pragma: no cover - failing 1000 draws has probability below 1e-15
        raise RuntimeError(f"could not build record {split}-{index} in {MAX_SCENE_DRAWS} scene draws")
    record_id = f"{split}-{index:07d}"
    conversations = []
    for n, ((kind, _), (question, answer)) in enumerate(zip(plan, exchanges)):
        if short_suffix and kind in ONE_WORD_KINDS:  # text only: no RNG draw depends on it
            question = with_short_suffix(question)
        conversations.append({"from": "human", "value": f"<image>\n{question}" if n == 0 else question})
        conversations.append({"from": "gpt", "value": answer})
    return {
        "id": record_id,
        "image": f"{split}/{record_id}.jpg",
        "conversations": conversations,
        "kinds": [kind for kind, _ in plan],
        "scene": scene,
    }


def make_conversation(
    split: str,
    index: int,
    seed: int,
    image_size: int = 96,
    grid: int = 4,
    kinds: Collection[str] = CLASSIC_KINDS,
    cell: int | None = None,
    grid_sizes: Sequence[Sequence[int]] | None = None,
    objects: Sequence[int] | None = None,
    large_share: float | None = None,
    short_suffix: bool = False,
) -> dict[str, Any]:
    """The record of :func:`make_record` without rendering its image (fast, for statistics)."""
    choices = layouts(image_size, grid, cell, grid_sizes)
    kinds = check_kinds(kinds)
    options = scene_options(objects, large_share, choices, kinds)
    rng = _rng(seed, split, index)
    return _conversation(rng, split, index, _draw_layout(rng, choices), kinds, options, check_short_suffix(short_suffix))


def make_record(
    split: str,
    index: int,
    seed: int,
    image_size: int = 96,
    grid: int = 4,
    kinds: Collection[str] = CLASSIC_KINDS,
    cell: int | None = None,
    grid_sizes: Sequence[Sequence[int]] | None = None,
    objects: Sequence[int] | None = None,
    large_share: float | None = None,
    short_suffix: bool = False,
) -> tuple[dict[str, Any], Image.Image]:
    """Record ``index`` of ``split`` (LLaVA mix665k schema plus ``kinds`` and ``scene``) and its RGB image.

    ``kinds`` restricts the questions (e.g. ``["shape"]`` for a curriculum stage); the default draws
    from the five kinds that predate ``detail`` (records stay byte-identical; ask for it by name). ``cell`` and ``grid_sizes`` choose other layouts (:func:`layouts`).
    ``objects`` / ``large_share`` make crowded scenes with cell-filling objects (the hard task, module docstring).
    ``short_suffix`` ends every one-word question with LLaVA-1.5's :data:`SHORT_ANSWER_SUFFIX` (after a
    newline); off by default, so records stay byte-identical to those before it (the configs turn it on)."""
    choices = layouts(image_size, grid, cell, grid_sizes)
    kinds = check_kinds(kinds)
    options = scene_options(objects, large_share, choices, kinds)
    rng = _rng(seed, split, index)
    layout = _draw_layout(rng, choices)
    record = _conversation(rng, split, index, layout, kinds, options, check_short_suffix(short_suffix))
    return record, render(record["scene"], rng, layout=layout)  # pixels draw after the conversation


# -- shards ------------------------------------------------------------------------------------------
def _jpeg(image: Image.Image) -> bytes:
    # 4:4:4 keeps colour inside 8 px JPEG blocks; 4:2:0 would smear it over 16 px, across cell borders.
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def _sample(record: dict[str, Any], image: Image.Image) -> dict[str, Any]:
    return {"__key__": record["id"], "jpg": _jpeg(image), "json": json.dumps(record).encode("utf-8")}


def _shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def _write_shard(
    task: tuple[Path, str, int, int, int, int, int, int, tuple[str, ...], int | None, Any, SceneOptions, bool],
) -> int:
    """Write one shard under a temporary name, then move it into place; returns its record count."""
    out, split, shard, start, stop, seed, image_size, grid, kinds, cell, grid_sizes, options, short_suffix = task
    path = out / _shard_name(split, shard)
    tmp = out / f".{path.name}.{os.getpid()}.tmp"  # dot-prefixed: shard globs never match it
    with wds.TarWriter(str(tmp), mtime=SHARD_MTIME) as sink:
        for index in range(start, stop):
            record = make_record(split, index, seed, image_size, grid, kinds, cell, grid_sizes, *options, short_suffix=short_suffix)
            sink.write(_sample(*record))
    os.replace(tmp, path)
    return stop - start


def _remove_stale_shards(out: Path, split: str, keep: list[str]) -> None:
    """Drop shards of an earlier, larger generation so that ``{split}-*.tar`` globs see only this one."""
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
    for path in out.glob(f"{split}-*.tar"):
        if pattern.fullmatch(path.name) and path.name not in keep:
            path.unlink()


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
    kinds: Collection[str] = CLASSIC_KINDS,
    cell: int | None = None,
    grid_sizes: Sequence[Sequence[int]] | None = None,
    objects: Sequence[int] | None = None,
    large_share: float | None = None,
    short_suffix: bool = False,
) -> list[str]:
    """Write ``num_records`` records of ``split`` as shards under ``out``; returns the shard file names.

    One task per shard, spread over ``workers`` processes; every record has its own RNG, so the bytes
    do not depend on ``workers``. ``progress`` (optional) is advanced by each finished shard's records.
    ``cell`` / ``grid_sizes``: other layouts (:func:`layouts`); ``objects`` / ``large_share``: the scenes
    (:func:`make_scene`); ``short_suffix``: LLaVA-1.5's short-answer suffix (:func:`make_record`).
    """
    _check_split(split)
    choices = layouts(image_size, grid, cell, grid_sizes)
    _check_at_least(split, num_records, 0)
    _check_at_least("seed", seed, 0)
    _check_at_least("samples-per-shard", samples_per_shard, 1)
    _check_at_least("workers", workers, 1)
    kinds = check_kinds(kinds)
    options = scene_options(objects, large_share, choices, kinds)
    short_suffix = check_short_suffix(short_suffix)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [
        (out, split, shard, start, min(start + samples_per_shard, num_records), seed, image_size, grid, kinds,
         cell, grid_sizes, options, short_suffix)
        for shard, start in enumerate(range(0, num_records, samples_per_shard))
    ]
    if workers > 1 and len(tasks) > 1:
        with Pool(min(workers, len(tasks))) as pool:
            for done in pool.imap_unordered(_write_shard, tasks):
                if progress is not None:
                    progress.update(done)
    else:
        for task in tasks:
            done = _write_shard(task)
            if progress is not None:
                progress.update(done)
    names = [_shard_name(split, task[2]) for task in tasks]
    _remove_stale_shards(out, split, names)
    return names


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
    kinds: Collection[str] = CLASSIC_KINDS,
    cell: int | None = None,
    grid_sizes: Sequence[Sequence[int]] | None = None,
    objects: Sequence[int] | None = None,
    large_share: float | None = None,
    short_suffix: bool = False,
) -> dict[str, Any]:
    """Write all three splits, then ``info.json`` (atomically, last: its presence means complete).

    ``info.json`` names ``cell``, ``grid_sizes``, ``objects`` and ``large_share`` only when they are set, and
    ``short_suffix`` only when it is on (a file without it was written without the suffix:
    :func:`generation_short_suffix`),
    so the default generation's file is unchanged."""
    sizes = {"train": train, "val": val, "test": test}
    for split, count in sizes.items():
        _check_at_least(split, count, 0)
    choices = layouts(image_size, grid, cell, grid_sizes)
    kinds = check_kinds(kinds)
    options = scene_options(objects, large_share, choices, kinds)
    short_suffix = check_short_suffix(short_suffix)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "info.json").unlink(missing_ok=True)  # an interrupted regeneration must not look complete
    info: dict[str, Any] = {
        "version": 1,
        "seed": seed,
        "image_size": image_size,
        "grid": grid,
        "samples_per_shard": samples_per_shard,
        "kinds": list(kinds),
        "splits": {},
    }
    if cell is not None:
        info["cell"] = cell
    if grid_sizes is not None:
        info["grid_sizes"] = [list(size) for size in grid_sizes]
    if options.objects is not None:
        info["objects"] = list(options.objects)
    if options.large_share is not None:
        info["large_share"] = options.large_share
    if short_suffix:
        info["short_suffix"] = True
    with tqdm(total=sum(sizes.values()), desc=f"synthetic -> {out}", unit="rec") as progress:
        for split, count in sizes.items():
            shards = write_split(
                out, split, count, seed, image_size, grid, samples_per_shard, workers, progress, kinds, cell, grid_sizes,
                *options, short_suffix=short_suffix,
            )
            info["splits"][split] = {"records": count, "shards": shards}
    tmp = out / f".info.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / "info.json")
    return info


def read_info(out: str | Path) -> dict[str, Any] | None:
    """The generation's ``info.json``, or None when ``out`` holds no complete generation."""
    path = Path(out) / "info.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    info.setdefault("kinds", list(CLASSIC_KINDS))  # generations from before kinds existed drew from these five
    return info


def generation_short_suffix(info: dict[str, Any]) -> bool:
    """Whether the generation of ``info`` (:func:`read_info`) wrote LLaVA-1.5's short-answer suffix: only
    generations with the option on name it, so an info.json without the key (older ones too) means no."""
    return bool(info.get("short_suffix", False))


# -- CLI ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dllava.data.synthetic",
        description="Write the synthetic shapes VQA task as webdataset shards of LLaVA records.",
    )
    parser.add_argument("--out", required=True, help="output directory (shards and info.json)")
    parser.add_argument("--train", type=int, default=20000, help="train records (default 20000)")
    parser.add_argument("--val", type=int, default=512, help="val records (default 512)")
    parser.add_argument("--test", type=int, default=512, help="test records (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=96, help="image side in px (default 96)")
    parser.add_argument("--grid", type=int, default=4, help="cells per side, 2..4 (default 4)")
    parser.add_argument("--cell", type=int, default=None,
                        help="px per cell, overriding image-size/grid (28 for Qwen2.5-VL, 32 for Qwen3-VL)")
    parser.add_argument("--grid-sizes", default=None,
                        help="comma-separated ROWSxCOLS choices (2..6), one drawn per record, e.g. 4x4,4x6,6x4")
    parser.add_argument("--objects", default=None,
                        help="MIN,MAX objects per scene (default 2,4; the hard task: 6,10), at most one per cell")
    parser.add_argument("--large-share", type=float, default=None,
                        help="share of objects drawn filling their whole cell, 2x2 patches (default none; hard: 0.5)")
    parser.add_argument("--short-suffix", action=argparse.BooleanOptionalAction, default=False,
                        help="end every one-word question with a newline and LLaVA-1.5's short-answer instruction "
                        f"'{SHORT_ANSWER_SUFFIX}' (conf/data/synthetic.yaml turns it on; default off, the records of "
                        "earlier versions)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards (default 1)")
    parser.add_argument(
        "--kinds", default=",".join(CLASSIC_KINDS),
        help=f"comma-separated question kinds to draw from, of {','.join(FINAL_KINDS)} (default: {','.join(CLASSIC_KINDS)})",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Validate the arguments (exit 2 with the reason), generate, and print the record counts."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        for name in ("train", "val", "test", "seed"):
            _check_at_least(name, getattr(args, name), 0)
        _check_at_least("samples-per-shard", args.samples_per_shard, 1)
        _check_at_least("workers", args.workers, 1)
        grid_sizes = None if args.grid_sizes is None else parse_grid_sizes(args.grid_sizes)
        choices = layouts(args.image_size, args.grid, args.cell, grid_sizes)
        kinds = check_kinds([k for k in args.kinds.split(",") if k])
        objects = None if args.objects is None else parse_objects(args.objects)
        scene_options(objects, args.large_share, choices, kinds)
    except ValueError as err:
        parser.error(str(err))
    info = generate(
        args.out, args.train, args.val, args.test, args.seed, args.image_size, args.grid,
        args.samples_per_shard, args.workers, kinds, args.cell, grid_sizes, objects, args.large_share,
        args.short_suffix,
    )
    print(json.dumps({split: entry["records"] for split, entry in info["splits"].items()}))


if __name__ == "__main__":
    main()
