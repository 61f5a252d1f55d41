"""The synthetic shapes VQA task: LLaVA schema, evidence confined to cells, balanced answers, shards."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from dllava.data.synthetic import (
    CLASSIC_KINDS,
    COLORS,
    COUNT_WORDS,
    FINAL_KINDS,
    LONG_KINDS,
    ONE_WORD_KINDS,
    POSITION_WORDS,
    RGB,
    SHAPES,
    SHORT_ANSWER_SUFFIX,
    SHORT_ANSWER_SUFFIX_WORDS,
    SHORT_KINDS,
    UNIQUE_KINDS,
    WIDE_POSITION_WORDS,
    WIDE_WORDS,
    WORDS,
    _jpeg,
    describe_in_detail,
    quadrant,
    generate,
    main,
    make_conversation,
    make_record,
    read_info,
    with_short_suffix,
    without_short_suffix,
    write_split,
)

CELL = 24  # defaults: image_size=96, grid=4
POSITION = r"row (\w+) column (\w+)"


def _records(split: str, n: int, seed: int = 0, **geometry) -> list[dict]:
    return [make_conversation(split, i, seed, **geometry) for i in range(n)]


def _rounds(record: dict) -> list[tuple[str, str, str]]:
    """(kind, question without the image placeholder, answer) per round."""
    turns = record["conversations"]
    questions = [t["value"].removeprefix("<image>\n") for t in turns[0::2]]
    answers = [t["value"] for t in turns[1::2]]
    return list(zip(record["kinds"], questions, answers))


def _cell(question: str) -> tuple[int, int]:
    row, col = re.search(POSITION, question).groups()
    return POSITION_WORDS.index(row), POSITION_WORDS.index(col)


def _expected_answer(kind: str, question: str, scene: list[dict]) -> str:
    """The answer recomputed from the scene alone, independently of the generator's code."""
    by_cell = {(o["row"], o["col"]): o for o in scene}
    if kind == "color":
        return by_cell[_cell(question)]["color"]
    if kind == "shape":
        return by_cell[_cell(question)]["shape"]
    if kind == "count":
        colour = re.fullmatch(r"how many (\w+) shapes are there \?", question).group(1)
        return COUNT_WORDS[sum(o["color"] == colour for o in scene)]
    if kind == "exist":
        colour, shape = re.fullmatch(r"is there a (\w+) (\w+) \?", question).groups()
        return "yes" if any(o["color"] == colour and o["shape"] == shape for o in scene) else "no"
    assert kind == "describe" and question == "describe the image in detail ."
    ordered = sorted(scene, key=lambda o: (o["row"], o["col"]))
    parts = [f"a {o['color']} {o['shape']} at row {POSITION_WORDS[o['row']]} column {POSITION_WORDS[o['col']]} ."
             for o in ordered]
    return f"there are {COUNT_WORDS[len(scene)]} shapes . " + " ".join(parts)


def _payload_hashes(out: Path) -> dict[str, str]:
    """sha256 of every member's bytes (jpg and json) in every shard, by member name."""
    hashes = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                hashes[f"{shard.name}/{member.name}"] = hashlib.sha256(tar.extractfile(member).read()).hexdigest()
    return hashes


# -- records -----------------------------------------------------------------------------------------
def test_records_follow_llava_schema():
    rounds_seen = Counter()
    for record in _records("train", 300):
        assert set(record) == {"id", "image", "conversations", "kinds", "scene"}
        assert re.fullmatch(r"train-\d{7}", record["id"]) and "." not in record["id"]
        assert record["image"] == f"train/{record['id']}.jpg"
        turns = record["conversations"]
        assert len(turns) % 2 == 0 and len(turns) // 2 == len(record["kinds"])
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        rounds_seen[len(record["kinds"])] += 1
    assert set(rounds_seen) == {1, 2, 3}


def test_earlier_rounds_are_short_and_final_kind_is_uniform():
    finals = Counter()
    for record in _records("train", 2000):
        assert all(kind in SHORT_KINDS for kind in record["kinds"][:-1])
        finals[record["kinds"][-1]] += 1
    assert set(finals) == set(SHORT_KINDS + ("describe",))  # detail only when asked for
    assert all(abs(n / 2000 - 0.2) < 0.04 for n in finals.values()), finals


def test_detailed_descriptions_are_long_and_say_everything_about_the_scene():
    """150-400 words; every object's colour, shape, cell and quadrant, and one sentence per other object."""
    lengths, chats = [], Counter()
    for record in _records("train", 1500, kinds=LONG_KINDS + SHORT_KINDS):
        if record["kinds"][-1] != "detail":
            continue
        scene, answer = record["scene"], record["conversations"][-1]["value"]
        assert answer == describe_in_detail(scene, 24)
        words = answer.split()
        lengths.append(len(words))
        assert len(scene) >= 3
        for obj in scene:
            vertical, horizontal = quadrant(obj, 24)
            where = f"at row {POSITION_WORDS[obj['row']]} column {POSITION_WORDS[obj['col']]} , in the "
            assert f"a {obj['color']} {obj['shape']} . it is {where}{('top', 'bottom')[vertical]} " in answer
            assert f"{('left', 'right')[horizontal]} corner of its cell" in answer
        n = len(scene)
        assert answer.count(" it is ") == n + n * (n - 1)  # where it is, and relative to each other object
        chats[len(record["kinds"])] += 1
    assert 150 <= min(lengths) and max(lengths) <= 400, (min(lengths), max(lengths))
    assert set(chats) == {1, 2, 3, 7, 8} and chats[7] + chats[8] > 0.3 * sum(chats.values()), chats


def test_relations_compare_rows_then_columns():
    a = {"color": "red", "shape": "circle", "row": 0, "col": 1, "box": [38, 6, 47, 15]}
    b = {"color": "blue", "shape": "square", "row": 2, "col": 3, "box": [78, 54, 88, 64]}
    c = {"color": "green", "shape": "diamond", "row": 0, "col": 3, "box": [78, 6, 88, 16]}
    text = describe_in_detail([a, b, c], 24)
    assert "it is above and to the left of the blue square ." in text
    assert "it is to the left of the green diamond in the same row ." in text
    assert "it is below the green diamond in the same column ." in text
    assert "the first shape is a red circle . it is at row one column two , in the top right corner" in text


def test_a_detail_kind_with_too_few_short_kinds_stays_single_round():
    for i in range(200):
        assert len(make_conversation("train", i, 0, kinds=["color", "detail"])["kinds"]) <= 3


def test_no_question_repeats_within_a_record():
    for record in _records("train", 500):
        questions = [q for _, q, _ in _rounds(record)]
        assert len(set(questions)) == len(questions)


def test_records_are_deterministic_by_seed_split_and_index():
    record, image = make_record("val", 7, seed=3)
    again, image_again = make_record("val", 7, seed=3)
    assert record == again and image.tobytes() == image_again.tobytes()
    assert make_conversation("val", 7, seed=3) == record  # the image-free path gives the same record
    assert make_record("val", 7, seed=4)[0]["scene"] != record["scene"]
    assert make_record("test", 7, seed=3)[0]["scene"] != record["scene"]


# -- scenes and images -------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size, grid", [(96, 4), (72, 3), (48, 2)])
def test_objects_stay_inside_one_quadrant_of_their_cell(image_size, grid):
    """Each object lies inside one quadrant (one vision patch) of its own cell, 1 px from its edges."""
    cell = image_size // grid
    quadrant = cell // 2
    for record in _records("train", 300, image_size=image_size, grid=grid):
        scene = record["scene"]
        assert 2 <= len(scene) <= 4
        assert len({(o["row"], o["col"]) for o in scene}) == len(scene)
        for obj in scene:
            assert obj["color"] in COLORS and obj["shape"] in SHAPES
            x0, y0, x1, y1 = obj["box"]
            left = obj["col"] * cell + (x0 - obj["col"] * cell) // quadrant * quadrant
            top = obj["row"] * cell + (y0 - obj["row"] * cell) // quadrant * quadrant
            assert obj["col"] * cell <= left < (obj["col"] + 1) * cell, obj
            assert obj["row"] * cell <= top < (obj["row"] + 1) * cell, obj
            assert left + 1 <= x0 and x1 <= left + quadrant - 1, obj
            assert top + 1 <= y0 and y1 <= top + quadrant - 1, obj
            assert x1 - x0 == y1 - y0 and quadrant - 3 <= x1 - x0 <= quadrant - 2


def test_each_object_fits_one_12px_patch_at_default_size():
    records = _records("train", 300)
    sizes = {o["box"][2] - o["box"][0] for r in records for o in r["scene"]}
    assert sizes == {9, 10}
    patches = {(o["box"][0] // 12, o["box"][1] // 12) == ((o["box"][2] - 1) // 12, (o["box"][3] - 1) // 12)
               for r in records for o in r["scene"]}
    assert patches == {True}


def test_colour_appears_only_inside_object_boxes_even_after_jpeg():
    """Empty cells hold grey texture only, so every patch outside the objects' cells is uninformative."""
    for index in range(30):
        record, image = make_record("train", index, seed=0)
        assert image.size == (96, 96) and image.mode == "RGB"
        pixels = np.asarray(image).astype(int)
        saturation = pixels.max(axis=2) - pixels.min(axis=2)
        inside = np.zeros(saturation.shape, dtype=bool)
        for obj in record["scene"]:
            x0, y0, x1, y1 = obj["box"]
            inside[y0:y1, x0:x1] = True
            assert saturation[y0:y1, x0:x1].max() > 100  # the shape is drawn, saturated
        assert saturation[~inside].max() == 0
        grey = pixels[~inside, 0]
        assert 60 <= grey.mean() <= 180 and grey.std() > 3  # textured, not flat
        decoded = np.asarray(Image.open(io.BytesIO(_jpeg(image)))).astype(int)
        occupied = {(o["row"], o["col"]) for o in record["scene"]}
        for row in range(4):
            for col in range(4):
                if (row, col) not in occupied:
                    block = decoded[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]
                    assert (block.max(axis=2) - block.min(axis=2)).max() <= 8


# -- questions and answers ---------------------------------------------------------------------------
def test_answers_match_scene():
    kinds = Counter()
    for record in _records("train", 300):
        occupied = {(o["row"], o["col"]) for o in record["scene"]}
        for kind, question, answer in _rounds(record):
            if kind in ("color", "shape"):
                assert _cell(question) in occupied
            assert answer == _expected_answer(kind, question, record["scene"]), (kind, question)
            kinds[kind] += 1
    assert set(kinds) == set(CLASSIC_KINDS)


def test_text_is_lowercase_single_spaced_with_separate_punctuation():
    for record in _records("train", 300):
        for kind, question, answer in _rounds(record):
            for text in (question, answer):
                assert text == text.lower() and text == " ".join(text.split())
                assert re.fullmatch(r"[a-z]+( ([a-z]+|[.?]))*", text), text
            assert question.endswith(" ?") or question.endswith(" .")
            if kind in SHORT_KINDS:
                assert " " not in answer and not answer.endswith(".")
            else:
                assert answer.startswith("there are ") and answer.endswith(" .")


def test_every_token_is_in_words():
    assert list(WORDS) == sorted(set(WORDS)) and "?" in WORDS and "." in WORDS
    tokens = {tok for r in _records("train", 300) for _, q, a in _rounds(r) for tok in (q + " " + a).split()}
    assert tokens <= set(WORDS), tokens - set(WORDS)


def test_short_answer_distributions_are_balanced():
    answers = defaultdict(Counter)
    for record in _records("train", 2000):
        for kind, _, answer in _rounds(record):
            answers[kind][answer] += 1
    counts, exists = answers["count"], answers["exist"]
    assert set(counts) == {"zero", "one", "two", "three"}
    assert all(abs(n / counts.total() - 0.25) <= 0.06 for n in counts.values()), counts
    assert abs(exists["yes"] / exists.total() - 0.5) <= 0.06, exists
    assert set(answers["color"]) == set(COLORS) and set(answers["shape"]) == set(SHAPES)


def test_half_of_exist_nos_are_near_misses_or_more():
    near = no = 0
    for record in _records("train", 2000):
        for kind, question, answer in _rounds(record):
            if kind == "exist" and answer == "no":
                colour, shape = re.fullmatch(r"is there a (\w+) (\w+) \?", question).groups()
                no += 1
                near += any(o["color"] == colour or o["shape"] == shape for o in record["scene"])
    assert near / no >= 0.5


def _baseline_accuracy(train: list[dict], val: list[dict]) -> float:
    """Exact match of the majority train answer per question text on val's final short questions."""
    by_question = defaultdict(Counter)
    for record in train:
        for kind, question, answer in _rounds(record):
            if kind in SHORT_KINDS:
                by_question[question][answer] += 1
    majority = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    finals = [_rounds(r)[-1] for r in val if r["kinds"][-1] in SHORT_KINDS]
    return sum(majority.get(q) == a for _, q, a in finals) / len(finals)


def test_question_only_baseline_is_low():
    assert _baseline_accuracy(_records("train", 3000), _records("val", 1000)) <= 0.35


# -- shards ------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_shards(tmp_path):
    sizes = dict(train=20, val=6, test=5, seed=1, samples_per_shard=4)
    generate(tmp_path / "serial", **sizes, workers=1)
    generate(tmp_path / "parallel", **sizes, workers=2)
    serial, parallel = _payload_hashes(tmp_path / "serial"), _payload_hashes(tmp_path / "parallel")
    assert len(serial) == 2 * (20 + 6 + 5) and serial == parallel
    for name in (tmp_path / "serial").glob("*.tar"):  # the tar files themselves match too
        assert name.read_bytes() == (tmp_path / "parallel" / name.name).read_bytes()
    generate(tmp_path / "other", **{**sizes, "seed": 2})
    assert _payload_hashes(tmp_path / "other") != serial


def test_shards_read_back_with_webdataset(tmp_path):
    shards = write_split(tmp_path, "val", 10, seed=0, samples_per_shard=4)
    assert shards == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    samples = list(wds.WebDataset([str(tmp_path / s) for s in shards], shardshuffle=False))
    assert len(samples) == 10
    for index, sample in enumerate(samples):
        assert {"jpg", "json"} <= set(sample)
        record = json.loads(sample["json"])
        assert sample["__key__"] == record["id"] == f"val-{index:07d}"
        assert record == make_conversation("val", index, seed=0)
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.size == (96, 96) and image.mode == "RGB"
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_info_json_lists_shards(tmp_path):
    assert read_info(tmp_path) is None
    info = generate(tmp_path, train=9, val=4, test=0, seed=5, samples_per_shard=4)
    assert read_info(tmp_path) == info
    assert info == {
        "version": 1, "seed": 5, "image_size": 96, "grid": 4, "samples_per_shard": 4,
        "kinds": ["color", "shape", "count", "exist", "describe"],
        "splits": {
            "train": {"records": 9, "shards": ["train-000000.tar", "train-000001.tar", "train-000002.tar"]},
            "val": {"records": 4, "shards": ["val-000000.tar"]},
            "test": {"records": 0, "shards": []},
        },
    }
    with tarfile.open(tmp_path / "train-000002.tar") as tar:
        assert len(tar.getnames()) == 2  # the last shard holds the remaining record (jpg + json)


def test_an_info_json_from_before_kinds_existed_reads_as_all_five_kinds(tmp_path):
    info = generate(tmp_path, train=1, val=0, test=0, seed=0)
    del info["kinds"]
    (tmp_path / "info.json").write_text(json.dumps(info))
    assert read_info(tmp_path)["kinds"] == list(CLASSIC_KINDS)


def test_regenerating_smaller_removes_stale_shards(tmp_path):
    generate(tmp_path, train=12, val=0, test=0, samples_per_shard=4)
    generate(tmp_path, train=5, val=0, test=0, samples_per_shard=4)
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]


@pytest.mark.parametrize("kinds", [["shape"], ["describe"], ["count", "describe"]])
def test_a_kinds_subset_asks_only_those_kinds_and_answers_them_from_the_scene(kinds):
    records = [make_conversation("train", i, seed=0, kinds=kinds) for i in range(200)]
    asked = Counter(kind for r in records for kind in r["kinds"])
    assert set(asked) == set(kinds)
    for record in records:
        for kind, question, answer in _rounds(record):
            assert answer == _expected_answer(kind, question, record["scene"])


def test_the_default_kinds_give_the_same_records_as_naming_all_five():
    assert _records("val", 50) == [make_conversation("val", i, 0, kinds=CLASSIC_KINDS) for i in range(50)]


# -- validation and CLI ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(grid=5), "grid must be in 2..4"),
        (dict(image_size=100, grid=3), "divisible by grid"),
        (dict(image_size=40, grid=4), "cells must be an even number of >= 16 px"),
        (dict(split="dev"), "split must be one of"),
        (dict(seed=-1), "--seed must be >= 0, got -1"),
        (dict(kinds=["shape", "size"]), "kinds must be a non-empty subset"),
        (dict(kinds=[]), "kinds must be a non-empty subset"),
    ],
)
def test_bad_record_arguments_are_rejected_with_reason(kwargs, message):
    args = {"split": "train", "index": 0, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_record(**args)


def test_write_split_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="--train must be >= 0, got -1"):
        write_split(tmp_path, "train", -1, seed=0)
    with pytest.raises(ValueError, match="--samples-per-shard must be >= 1, got 0"):
        write_split(tmp_path, "train", 3, seed=0, samples_per_shard=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train", "-1"], "--train must be >= 0, got -1"),
        (["--test", "-3"], "--test must be >= 0, got -3"),
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--samples-per-shard", "0"], "--samples-per-shard must be >= 1, got 0"),
        (["--grid", "5"], "grid must be in 2..4"),
        (["--image-size", "100", "--grid", "3"], "divisible by grid"),
        (["--kinds", "shape,colour"], "kinds must be a non-empty subset"),
    ],
)
def test_cli_rejects_bad_arguments_with_reason(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert read_info(tmp_path) is None


def test_cli_writes_shards_and_info(tmp_path, capsys):
    main(["--out", str(tmp_path), "--train", "3", "--val", "2", "--test", "1", "--seed", "4",
          "--samples-per-shard", "2", "--workers", "2"])
    assert json.loads(capsys.readouterr().out) == {"train": 3, "val": 2, "test": 1}
    info = read_info(tmp_path)
    assert info["seed"] == 4 and info["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar"]


# -- layouts for other vision towers (cell, grid_sizes) ----------------------------------------------
QWEN_SIZES = [(4, 4), (4, 6), (6, 4)]


def _wide_cell(question: str) -> tuple[int, int]:
    row, col = re.search(POSITION, question).groups()
    return WIDE_POSITION_WORDS.index(row), WIDE_POSITION_WORDS.index(col)


def test_default_records_are_byte_identical_to_those_before_layouts_existed():
    """Digest of records and raw pixels computed with the generator before ``cell`` / ``grid_sizes``
    were added (commit f92b306), so the default task (and the trained tiny base) is unchanged."""
    digest = hashlib.sha256()
    for split, seed, geometry in (("train", 0, {}), ("val", 5, {}), ("test", 1, dict(image_size=72, grid=3))):
        for index in range(8):
            record, image = make_record(split, index, seed, **geometry)
            digest.update(json.dumps(record, sort_keys=True).encode())
            digest.update(image.tobytes())
    assert digest.hexdigest() == "382fa963e495adf11c7f2c42ff280f8c1181da06850029b5fd5cf1288fe867b9"


def test_a_single_explicit_layout_equal_to_the_default_changes_nothing():
    for index in range(10):
        record, image = make_record("train", index, 0)
        same, same_image = make_record("train", index, 0, cell=24, grid_sizes=[(4, 4)])
        assert record == same and image.tobytes() == same_image.tobytes()


@pytest.mark.parametrize("cell, patch", [(28, 14), (32, 16)])
def test_images_have_the_drawn_layouts_size_and_token_grid(cell, patch):
    """Each record's image is rows x cols cells of ``cell`` px; with a Qwen-style processor (patch
    ``cell / 2``, merge 2) one merged token is one cell, so token counts differ within a batch."""
    processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, min_pixels=16 * 16, max_pixels=512 * 512)
    seen = Counter()
    for index in range(30):
        record, image = make_record("train", index, 0, cell=cell, grid_sizes=QWEN_SIZES)
        rows = {o["row"] for o in record["scene"]}
        cols = {o["col"] for o in record["scene"]}
        width, height = image.size
        assert (height // cell, width // cell) in QWEN_SIZES and width % cell == 0 and height % cell == 0
        assert max(rows) < height // cell and max(cols) < width // cell
        grid = processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
        assert grid == [1, 2 * height // cell, 2 * width // cell]  # unresized: tokens = cells
        seen[(height // cell, width // cell)] += 1
    assert set(seen) == set(QWEN_SIZES)


@pytest.mark.parametrize("cell, grid_sizes", [(28, QWEN_SIZES), (32, QWEN_SIZES), (28, [(2, 6), (6, 6)])])
def test_layout_objects_stay_inside_one_patch_of_their_cell(cell, grid_sizes):
    quadrant = cell // 2
    for index in range(200):
        record = make_conversation("train", index, 0, cell=cell, grid_sizes=grid_sizes)
        assert len({(o["row"], o["col"]) for o in record["scene"]}) == len(record["scene"])
        for obj in record["scene"]:
            x0, y0, x1, y1 = obj["box"]
            assert x0 // quadrant == (x1 - 1) // quadrant and y0 // quadrant == (y1 - 1) // quadrant, obj  # one patch
            assert (y0 // cell, x0 // cell) == (obj["row"], obj["col"]), obj  # in its own cell
            left, top = x0 // quadrant * quadrant, y0 // quadrant * quadrant
            assert left + 1 <= x0 and x1 <= left + quadrant - 1 and top + 1 <= y0 and y1 <= top + quadrant - 1, obj


def test_layout_images_have_colour_only_inside_boxes():
    for index in range(12):
        record, image = make_record("val", index, 0, cell=28, grid_sizes=QWEN_SIZES)
        pixels = np.asarray(image).astype(int)
        saturation = pixels.max(axis=2) - pixels.min(axis=2)
        inside = np.zeros(saturation.shape, dtype=bool)
        for obj in record["scene"]:
            x0, y0, x1, y1 = obj["box"]
            inside[y0:y1, x0:x1] = True
            assert saturation[y0:y1, x0:x1].max() > 100
        assert saturation[~inside].max() == 0


def test_layout_answers_name_rows_and_columns_in_words():
    positions = set()
    for record in _records("train", 300, cell=28, grid_sizes=[(6, 6)]):
        for kind, question, answer in _rounds(record):
            tokens = set((question + " " + answer).split())
            assert tokens <= set(WIDE_WORDS), tokens - set(WIDE_WORDS)
            if kind in ("color", "shape"):
                row, col = _wide_cell(question)
                obj = next(o for o in record["scene"] if (o["row"], o["col"]) == (row, col))
                assert answer == obj[kind if kind == "shape" else "color"]
                positions |= {row, col}
    assert positions == set(range(6))  # "five" and "six" are used
    assert set(WORDS) < set(WIDE_WORDS) and set(WIDE_WORDS) - set(WORDS) == {"five", "six"}


def test_layout_records_are_deterministic_by_seed(tmp_path):
    options = dict(cell=32, grid_sizes=QWEN_SIZES)
    record, image = make_record("test", 4, 2, **options)
    again, image_again = make_record("test", 4, 2, **options)
    assert record == again and image.tobytes() == image_again.tobytes()
    assert make_conversation("test", 4, 2, **options) == record
    sizes = [make_record("test", i, 2, **options)[1].size for i in range(12)]
    assert sizes != [make_record("test", i, 3, **options)[1].size for i in range(12)]  # the draw follows the seed
    generate(tmp_path / "serial", train=6, val=2, test=0, seed=1, samples_per_shard=2, workers=1, **options)
    generate(tmp_path / "parallel", train=6, val=2, test=0, seed=1, samples_per_shard=2, workers=2, **options)
    assert _payload_hashes(tmp_path / "serial") == _payload_hashes(tmp_path / "parallel")


def test_layout_info_json_and_ensure_synthetic_name_the_options(tmp_path):
    from dllava.data.datamodule import ensure_synthetic

    info = generate(tmp_path, train=2, val=1, test=0, seed=0, cell=28, grid_sizes=[(4, 6)])
    assert info["cell"] == 28 and info["grid_sizes"] == [[4, 6]] and read_info(tmp_path) == info
    spec = dict(train=2, val=1, test=0, seed=0)
    assert ensure_synthetic(str(tmp_path), **spec, cell=28, grid_sizes=[[4, 6]]) == info
    with pytest.raises(ValueError, match="cell: on disk 28, configured None"):
        ensure_synthetic(str(tmp_path), **spec, cell=None, grid_sizes=None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cell=27), "cell must be an even number of >= 16 px"),
        (dict(cell=14), "cell must be an even number of >= 16 px"),
        (dict(cell=28, grid_sizes=[(4, 7)]), "2..6 rows and columns"),
        (dict(cell=28, grid_sizes=[(1, 4)]), "2..6 rows and columns"),
        (dict(cell=28, grid_sizes=[]), "at least one"),
    ],
)
def test_bad_layouts_are_rejected_with_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_record("train", 0, 0, **kwargs)


def test_badly_typed_layouts_are_rejected_with_reason():
    with pytest.raises(TypeError, match="integer pairs"):
        make_record("train", 0, 0, cell=28, grid_sizes=["4x4"])
    with pytest.raises(TypeError, match="cell must be an integer"):
        make_record("train", 0, 0, cell=28.0)


def test_cli_writes_layout_shards(tmp_path, capsys):
    main(["--out", str(tmp_path), "--train", "4", "--val", "1", "--test", "0", "--cell", "32", "--grid-sizes", "4x4, 4x6"])
    capsys.readouterr()
    info = read_info(tmp_path)
    assert info["cell"] == 32 and info["grid_sizes"] == [[4, 4], [4, 6]]
    for sample in wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False):
        assert Image.open(io.BytesIO(sample["jpg"])).size in {(128, 128), (192, 128)}
    for args, message in ((["--grid-sizes", "4by4"], "ROWSxCOLS"), (["--cell", "28", "--grid-sizes", "7x4"], "2..6")):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "bad"), *args])
        assert message in capsys.readouterr().err


def test_datamodule_spec_check_names_bad_layout_keys():
    from dllava.data.datamodule import check_synthetic_spec

    check_synthetic_spec({"out": "x", "cell": 28, "grid_sizes": [[4, 4], [4, 6]]})
    check_synthetic_spec({"out": "x", "cell": None, "grid_sizes": None})
    for spec, error, message in (
        ({"out": "x", "cell": "28"}, TypeError, "data.synthetic.cell"),
        ({"out": "x", "cell": 27}, ValueError, "data.synthetic.cell must be even"),
        ({"out": "x", "grid_sizes": [[4, 7]]}, ValueError, r"data.synthetic.grid_sizes\[0\]"),
        ({"out": "x", "grid_sizes": "4x4"}, ValueError, "non-empty list of \\[rows, cols\\] pairs"),
        ({"out": "x", "grid_sizes": [[4]]}, ValueError, r"grid_sizes\[0\] must be a \[rows, cols\] pair"),
    ):
        with pytest.raises(error, match=message):
            check_synthetic_spec(spec)



# -- the hard task (objects, large_share, color_by_shape / shape_by_color; conf/data/synthetic_hard.yaml) --
HARD_KINDS = ["color", "shape", "count", "exist", "color_by_shape", "shape_by_color"]
HARD = {"kinds": HARD_KINDS, "objects": [6, 10], "large_share": 0.5}


def _hard_records(split: str, n: int, seed: int = 0, **options) -> list[dict]:
    return [make_conversation(split, i, seed, **{**HARD, **options}) for i in range(n)]


def _named(question: str, pattern: str) -> str:
    return re.fullmatch(pattern, question).group(1)


def _targets(kind: str, question: str, scene: list[dict]) -> list[dict]:
    """The objects a single-object question is about, found from the question text and the scene alone."""
    if kind in ("color", "shape"):
        return [o for o in scene if (o["row"], o["col"]) == _cell(question)]
    if kind == "color_by_shape":
        return [o for o in scene if o["shape"] == _named(question, r"what color is the (\w+) \?")]
    assert kind == "shape_by_color"
    return [o for o in scene if o["color"] == _named(question, r"what shape is the (\w+) one \?")]


def _expected_hard_answer(kind: str, question: str, scene: list[dict]) -> str:
    if kind in ("count", "exist"):
        return _expected_answer(kind, question, scene)
    (target,) = _targets(kind, question, scene)  # exactly one object
    return target["shape"] if kind in ("shape", "shape_by_color") else target["color"]


def test_default_shards_are_byte_identical_to_those_before_the_hard_options(tmp_path):
    """Digest of every file (shards and info.json) of a small default generation, computed with the
    generator before ``objects`` / ``large_share`` / the unique kinds were added (commit 9977125)."""
    generate(tmp_path, train=6, val=3, test=2, seed=0, samples_per_shard=4)
    digest = hashlib.sha256()
    for path in sorted(p for p in tmp_path.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    assert digest.hexdigest() == "a829ece9277246483cffde8c9fe71e348abb4c7cfa9ae9ca657445e2e0ead981"


def test_explicit_default_scene_options_change_nothing():
    for index in range(10):
        record, image = make_record("train", index, 0)
        same, same_image = make_record("train", index, 0, objects=[2, 4], large_share=None)
        assert record == same and image.tobytes() == same_image.tobytes()


def test_hard_scenes_have_the_configured_object_counts_and_sizes():
    """6-10 objects in distinct cells; about half fill their cell (20-22 px, >= 9 px of each of its four
    12 px patches), the rest sit inside one patch as in the default task."""
    counts, large = Counter(), Counter()
    for record in _hard_records("train", 400):
        scene = record["scene"]
        counts[len(scene)] += 1
        assert len({(o["row"], o["col"]) for o in scene}) == len(scene)
        for obj in scene:
            x0, y0, x1, y1 = obj["box"]
            left, top = obj["col"] * CELL, obj["row"] * CELL
            assert left + 1 <= x0 and x1 <= left + CELL - 1 and top + 1 <= y0 and y1 <= top + CELL - 1, obj
            assert x1 - x0 == y1 - y0
            large[obj["large"]] += 1
            if obj["large"]:
                assert 20 <= x1 - x0 <= 22, obj
                for px, py in ((left, top), (left + 12, top), (left, top + 12), (left + 12, top + 12)):
                    assert min(x1, px + 12) - max(x0, px) >= 9 and min(y1, py + 12) - max(y0, py) >= 9, obj
            else:
                assert 9 <= x1 - x0 <= 10 and x0 // 12 == (x1 - 1) // 12 and y0 // 12 == (y1 - 1) // 12, obj
    assert set(counts) == set(range(6, 11)) and all(n >= 50 for n in counts.values()), counts
    assert abs(large[True] / large.total() - 0.5) <= 0.05, large
    # without large_share the crowded scenes hold small objects only, and no "large" key
    plain = make_conversation("train", 0, 0, kinds=HARD_KINDS, objects=[6, 10])
    assert 6 <= len(plain["scene"]) <= 10 and all("large" not in o and o["box"][2] - o["box"][0] <= 10 for o in plain["scene"])
    assert all(o["large"] for o in make_conversation("train", 1, 0, **{**HARD, "large_share": 1.0})["scene"])


def test_hard_images_show_every_large_object_in_all_four_of_its_patches():
    """Colour only inside the boxes (JPEG-decoded pixels as the shards hold them); a large object's colour
    covers at least 15 px of each of its cell's four patches: four redundant tokens per large object."""
    for index in range(12):
        record, image = make_record("val", index, 0, **HARD)
        pixels = np.asarray(image).astype(int)
        saturation = pixels.max(axis=2) - pixels.min(axis=2)
        inside = np.zeros(saturation.shape, dtype=bool)
        decoded = np.asarray(Image.open(io.BytesIO(_jpeg(image)))).astype(int)
        for obj in record["scene"]:
            x0, y0, x1, y1 = obj["box"]
            inside[y0:y1, x0:x1] = True
            assert saturation[y0:y1, x0:x1].max() > 100
            if obj["large"]:
                colour = np.array(RGB[obj["color"]])
                near = np.abs(decoded - colour).max(axis=2) <= 40
                for py in (obj["row"] * CELL, obj["row"] * CELL + 12):
                    for px in (obj["col"] * CELL, obj["col"] * CELL + 12):
                        assert near[py:py + 12, px:px + 12].sum() >= 15, (obj, px, py)
        assert saturation[~inside].max() == 0


def test_hard_answers_are_recomputed_from_the_scene_and_single_object_questions_name_one_object():
    kinds = Counter()
    for record in _hard_records("train", 400):
        scene = record["scene"]
        for kind, question, answer in _rounds(record):
            kinds[kind] += 1
            assert answer == _expected_hard_answer(kind, question, scene), (kind, question, scene)
            if kind in ("color", "shape", *UNIQUE_KINDS):
                assert len(_targets(kind, question, scene)) == 1, (kind, question, scene)
            assert " " not in answer
    assert set(kinds) == set(HARD_KINDS)


def test_hard_tokens_are_words_the_tiny_tokenizers_know():
    """No new word of its own: every question and answer of the hard task is in WORDS, so even the 66-word
    tokenizer of the first tiny models has an id for each (and check_tokenizer_knows accepts the spec without
    LLaVA-1.5's short-answer suffix; with it, the preset's default, only the full tokenizer knows every word)."""
    from dllava.data.datamodule import check_tokenizer_knows
    from dllava.model.tiny import build_tiny_tokenizer

    tokens = {tok for r in _hard_records("train", 300) for _, q, a in _rounds(r) for tok in (q + " " + a).split()}
    assert tokens <= set(WORDS), tokens - set(WORDS)
    for full in (True, False):
        tokenizer = build_tiny_tokenizer(full=full)
        assert all(tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id for t in tokens)
        check_tokenizer_knows(tokenizer, {"out": "x", **HARD}, "the tiny tokenizer")
    check_tokenizer_knows(build_tiny_tokenizer(full=True), {"out": "x", **HARD, "short_suffix": True}, "the tiny tokenizer")
    with pytest.raises(ValueError, match="'Answer'.*short_suffix=true.*short_suffix=false"):
        check_tokenizer_knows(build_tiny_tokenizer(), {"out": "x", **HARD, "short_suffix": True}, "the 66 words")


def test_hard_answer_distributions_are_balanced():
    answers, finals = defaultdict(Counter), Counter()
    for record in _hard_records("train", 3000):
        finals[record["kinds"][-1]] += 1
        for kind, _, answer in _rounds(record):
            answers[kind][answer] += 1
    assert all(abs(n / finals.total() - 1 / 6) <= 0.03 for n in finals.values()) and set(finals) == set(HARD_KINDS), finals
    for kind, values, tolerance in (
        ("color", COLORS, 0.04), ("color_by_shape", COLORS, 0.04), ("shape", SHAPES, 0.05),
        ("shape_by_color", SHAPES, 0.05), ("count", COUNT_WORDS, 0.04), ("exist", ("yes", "no"), 0.05),
    ):
        seen = answers[kind]
        assert set(seen) == set(values), (kind, seen)
        assert all(abs(n / seen.total() - 1 / len(values)) <= tolerance for n in seen.values()), (kind, seen)


def test_hard_exist_noes_are_near_misses_that_need_binding():
    """In crowded scenes nearly every "no" names a colour or a shape that is there, and most name both
    (on different objects): answering needs the one object, not the colours or shapes present."""
    near = both = no = 0
    for record in _hard_records("train", 2000):
        for kind, question, answer in _rounds(record):
            if kind == "exist" and answer == "no":
                colour, shape = re.fullmatch(r"is there a (\w+) (\w+) \?", question).groups()
                has_colour = any(o["color"] == colour for o in record["scene"])
                has_shape = any(o["shape"] == shape for o in record["scene"])
                no, near, both = no + 1, near + (has_colour or has_shape), both + (has_colour and has_shape)
    assert near / no >= 0.95 and both / no >= 0.45, (near / no, both / no)


def test_hard_question_only_baseline_is_low():
    """The majority train answer per question text (what train.py logs as baseline/question_only_acc)
    scores about 0.24 on the hard task's final one-word answers (0.2365 on 20,000 / 2,000 records)."""
    from dllava.metrics.answers import question_only_baseline

    accuracy = question_only_baseline(_hard_records("train", 3000), _hard_records("val", 1000), HARD_KINDS)
    assert 0.18 <= accuracy <= 0.30, accuracy


def test_hard_records_are_deterministic_and_follow_the_options():
    record, image = make_record("test", 3, 2, **HARD)
    again, image_again = make_record("test", 3, 2, **HARD)
    assert record == again and image.tobytes() == image_again.tobytes()
    assert make_conversation("test", 3, 2, **HARD) == record
    assert make_record("test", 3, 3, **HARD)[0]["scene"] != record["scene"]
    assert set(ONE_WORD_KINDS) == set(HARD_KINDS)


def test_the_hard_preset_composes_and_generates_shards_the_cli_writes_too(tmp_path, capsys):
    """conf/data/synthetic_hard.yaml = synthetic.yaml plus the hard options; a small generation through
    the datamodule's path (ensure_synthetic) equals the CLI's with the same options, byte for byte."""
    from omegaconf import OmegaConf

    from dllava.data.datamodule import check_synthetic_spec, ensure_synthetic
    from tests.helpers import compose

    cfg = compose("train", ["data=synthetic_hard"], output_dir=tmp_path)
    base = compose("train", [], output_dir=tmp_path)
    assert cfg.data.synthetic.out.endswith("/synthetic_hard") and base.data.synthetic.out.endswith("/synthetic")
    assert list(cfg.data.synthetic.kinds) == HARD_KINDS == list(cfg.data.answer_kinds) == list(cfg.module.answer_kinds)
    assert list(cfg.data.synthetic.objects) == [6, 10] and cfg.data.synthetic.large_share == 0.5
    differs = {k for k in cfg.data.synthetic if k not in base.data.synthetic or cfg.data.synthetic[k] != base.data.synthetic[k]}
    assert differs == {"out", "kinds", "objects", "large_share"}
    assert {k for k in cfg.data if k != "synthetic" and cfg.data[k] != base.data[k]} == {"train_urls", "val_urls", "test_urls", "answer_kinds"}
    spec = cfg.data.synthetic  # as hydra.utils.instantiate hands it to LlavaDataModule (a DictConfig)
    check_synthetic_spec(spec)
    sizes = {"train": 24, "val": 8, "test": 4, "samples_per_shard": 16, "workers": 1}
    small = OmegaConf.merge(spec, {"out": str(tmp_path / "preset"), **sizes})
    info = ensure_synthetic(**small)
    assert info["objects"] == [6, 10] and info["large_share"] == 0.5 and info["kinds"] == HARD_KINDS
    assert ensure_synthetic(**small) == info  # a matching generation is found again, not rewritten
    assert info["short_suffix"] is True  # inherited from synthetic.yaml
    main(["--out", str(tmp_path / "cli"), "--train", "24", "--val", "8", "--test", "4", "--samples-per-shard", "16",
          "--objects", "6,10", "--large-share", "0.5", "--kinds", ",".join(HARD_KINDS), "--short-suffix"])
    assert json.loads(capsys.readouterr().out) == {"train": 24, "val": 8, "test": 4}
    assert read_info(tmp_path / "cli") == info
    assert _payload_hashes(tmp_path / "cli") == _payload_hashes(tmp_path / "preset")
    records = [json.loads(s["json"]) for s in wds.WebDataset(str(tmp_path / "preset" / "train-000000.tar"), shardshuffle=False)]
    assert len(records) == 16 and all(6 <= len(r["scene"]) <= 10 for r in records)
    with pytest.raises(ValueError, match="objects: on disk \\[6, 10\\], configured None"):
        ensure_synthetic(**{**OmegaConf.to_container(small), "objects": None})


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"objects": [0, 4]}, ValueError, r"1 <= min <= max <= 16"),
        ({"objects": [6, 5]}, ValueError, r"1 <= min <= max <= 16"),
        ({"objects": [6, 17]}, ValueError, r"1 <= min <= max <= 16"),
        ({"objects": [6]}, TypeError, "objects must be a \\[min, max\\] pair"),
        ({"objects": "6,10"}, TypeError, "objects must be a \\[min, max\\] pair"),
        ({"large_share": 1.5}, ValueError, "large_share must be in \\[0, 1\\]"),
        ({"large_share": "half"}, TypeError, "large_share must be a number"),
        ({"objects": [6, 10], "kinds": ["color", "describe"]}, ValueError, "describe at most 4 objects"),
        ({"objects": [1, 2], "kinds": ["color", "detail"]}, ValueError, "detail kind needs scenes of >= 3"),
    ],
)
def test_bad_scene_options_are_rejected_with_reason(kwargs, error, message):
    with pytest.raises(error, match=message):
        make_record("train", 0, 0, **kwargs)


def test_cli_and_datamodule_reject_bad_scene_options(tmp_path, capsys):
    from dllava.data.datamodule import check_synthetic_spec

    for args, message in ((["--objects", "6-10"], "MIN,MAX"), (["--objects", "6,20"], "max <= 16"),
                          (["--large-share", "2"], "large_share must be in [0, 1]"),
                          (["--objects", "6,10", "--kinds", "color,describe"], "describe at most 4 objects")):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "bad"), *args])
        assert message in capsys.readouterr().err
    assert read_info(tmp_path / "bad") is None
    check_synthetic_spec({"out": "x", "objects": [6, 10], "large_share": 0.5})
    check_synthetic_spec({"out": "x", "objects": None, "large_share": None})
    for spec, error, message in (
        ({"out": "x", "objects": [6]}, ValueError, "data.synthetic.objects must be a \\[min, max\\] pair"),
        ({"out": "x", "objects": [0, 4]}, ValueError, r"data.synthetic.objects\[0\]"),
        ({"out": "x", "objects": [6, 5]}, ValueError, r"data.synthetic.objects\[1\]"),
        ({"out": "x", "large_share": 1.5}, ValueError, "data.synthetic.large_share"),
        ({"out": "x", "large_share": "half"}, TypeError, "data.synthetic.large_share"),
    ):
        with pytest.raises(error, match=message):
            check_synthetic_spec(spec)


# -- LLaVA-1.5's short-answer suffix (short_suffix) ---------------------------------------------------
DEFAULT_KINDS = ["color", "shape", "count", "exist", "describe", "detail"]  # conf/data/synthetic.yaml's
SUFFIXED = {"kinds": DEFAULT_KINDS, "short_suffix": True}


def test_short_suffix_ends_every_one_word_question_in_every_round_and_no_description():
    """LLaVA-1.5's mix665k convention: "<question>\\nAnswer the question using a single word or phrase." on
    every short-answer question, first round or later; the records are otherwise those without the option."""
    assert SHORT_ANSWER_SUFFIX == "Answer the question using a single word or phrase."
    later_rounds, kinds_seen = Counter(), set()
    for index, options in [(i, {"kinds": DEFAULT_KINDS}) for i in range(300)] + [(i, HARD) for i in range(100)]:
        record = make_conversation("train", index, 0, **options, short_suffix=True)
        plain = make_conversation("train", index, 0, **options)
        kinds_seen |= set(record["kinds"])
        assert {k: v for k, v in record.items() if k != "conversations"} == {k: v for k, v in plain.items() if k != "conversations"}
        assert record["conversations"][1::2] == plain["conversations"][1::2]  # the answers
        for n, (kind, turn, before) in enumerate(zip(record["kinds"], record["conversations"][0::2], plain["conversations"][0::2])):
            if kind in ONE_WORD_KINDS:
                assert turn["value"] == with_short_suffix(before["value"]) == before["value"] + "\n" + SHORT_ANSWER_SUFFIX
                assert without_short_suffix(turn["value"]) == before["value"]
                later_rounds[n > 0] += 1
            else:
                assert kind in LONG_KINDS and turn == before and SHORT_ANSWER_SUFFIX not in turn["value"]
    assert later_rounds[True] > 0 and later_rounds[False] > 0 and kinds_seen == set(FINAL_KINDS)
    assert without_short_suffix("how many red shapes are there ?") == "how many red shapes are there ?"


def test_the_default_records_have_no_suffix_and_parse_as_before():
    """Off by default in the Python API and the CLI (the configs turn it on): the checksums above stay
    valid; questions without the suffix parse with the same patterns, and so do suffixed ones once it is cut."""
    for index in range(20):
        assert make_conversation("val", index, 0) == make_conversation("val", index, 0, short_suffix=False)
    for record in (make_conversation("train", i, 0, kinds=SHORT_KINDS, short_suffix=True) for i in range(100)):
        for kind, question, answer in _rounds(record):
            assert question.endswith("\n" + SHORT_ANSWER_SUFFIX)
            assert answer == _expected_answer(kind, without_short_suffix(question), record["scene"])


def test_suffixed_shards_are_deterministic_and_record_the_option_in_info_json(tmp_path, capsys):
    sizes = dict(train=6, val=2, test=0, seed=1, samples_per_shard=4)
    info = generate(tmp_path / "api", **sizes, short_suffix=True)
    assert info["short_suffix"] is True and read_info(tmp_path / "api") == info
    plain = generate(tmp_path / "plain", **sizes)
    assert "short_suffix" not in plain and "short_suffix" not in json.loads((tmp_path / "plain" / "info.json").read_text())
    main(["--out", str(tmp_path / "cli"), "--train", "6", "--val", "2", "--test", "0", "--seed", "1",
          "--samples-per-shard", "4", "--short-suffix"])
    capsys.readouterr()
    assert read_info(tmp_path / "cli") == info and _payload_hashes(tmp_path / "cli") == _payload_hashes(tmp_path / "api")
    records = [json.loads(s["json"]) for s in wds.WebDataset(str(tmp_path / "api" / "train-000000.tar"), shardshuffle=False)]
    assert records == [make_conversation("train", i, 1, short_suffix=True) for i in range(4)]
    with pytest.raises(TypeError, match="short_suffix must be true or false"):
        make_record("train", 0, 0, short_suffix="false")


def test_a_generation_with_the_other_suffix_setting_is_refused_naming_it(tmp_path):
    """An existing data dir written without the suffix (every one before the option) is not reused by a
    config that asks for it, and the other way round; the error names the difference."""
    from dllava.data.datamodule import ensure_synthetic

    spec = dict(train=2, val=1, test=0, seed=0, samples_per_shard=4)
    generate(tmp_path / "plain", **spec)
    generate(tmp_path / "suffixed", **spec, short_suffix=True)
    assert ensure_synthetic(str(tmp_path / "plain"), **spec, short_suffix=False)["splits"]["train"]["records"] == 2
    assert ensure_synthetic(str(tmp_path / "plain"), **spec)  # a spec without the key means no suffix
    assert ensure_synthetic(str(tmp_path / "suffixed"), **spec, short_suffix=True)["short_suffix"] is True
    with pytest.raises(ValueError, match=r"short_suffix: on disk False, configured True.*Delete it to regenerate"):
        ensure_synthetic(str(tmp_path / "plain"), **spec, short_suffix=True)
    with pytest.raises(ValueError, match=r"short_suffix: on disk True, configured False"):
        ensure_synthetic(str(tmp_path / "suffixed"), **spec)


def test_the_configs_turn_the_suffix_on_but_where_the_tokenizer_predates_its_words(tmp_path):
    """conf/data/synthetic.yaml (and the hard preset) ask for the suffix; the tiny LLaVA-NeXT and Qwen2.5-VL
    presets, whose word-level tokenizers predate its words, and their base recipes do not."""
    from omegaconf import OmegaConf

    from dllava.data.datamodule import check_synthetic_spec
    from tests.helpers import compose

    for overrides, on in (([], True), (["data=synthetic_hard"], True), (["experiment=tiny_base"], True),
                          (["model=tiny_llava_next"], False), (["model=tiny_qwen2_5_vl"], False),
                          (["experiment=tiny_qwen_base"], False), (["experiment=tiny_qwen_base_shapes"], False)):
        cfg = compose("train", overrides, output_dir=tmp_path)
        assert cfg.data.synthetic.short_suffix is on, overrides
        check_synthetic_spec(OmegaConf.to_container(cfg.data.synthetic, resolve=True))
    with pytest.raises(TypeError, match="data.synthetic.short_suffix"):
        check_synthetic_spec({"out": "x", "short_suffix": "yes"})


def test_the_tokenizer_check_asks_for_the_suffix_words_only_when_a_one_word_kind_carries_them():
    from dllava.data.datamodule import check_tokenizer_knows
    from dllava.model.tiny import build_tiny_tokenizer

    classic, full = build_tiny_tokenizer(), build_tiny_tokenizer(full=True)
    assert [w for w in SHORT_ANSWER_SUFFIX_WORDS if w not in WORDS] == ["Answer", "question", "using", "single", "word", "or", "phrase"]
    check_tokenizer_knows(classic, {"kinds": ["color", "describe"], "short_suffix": False}, "classic")
    check_tokenizer_knows(classic, {"kinds": ["describe"], "short_suffix": True}, "classic")  # no one-word question
    with pytest.raises(ValueError, match=r"\['Answer', 'or', 'phrase', 'question', 'single', 'using', 'word'\]"):
        check_tokenizer_knows(classic, {"kinds": ["color", "describe"], "short_suffix": True}, "classic")
    check_tokenizer_knows(full, {"kinds": list(FINAL_KINDS), "short_suffix": True}, "full")
    record = make_conversation("test", 1, 0, **SUFFIXED)
    assert any(SHORT_ANSWER_SUFFIX in turn["value"] for turn in record["conversations"])
    for turn in record["conversations"]:
        ids = full(turn["value"], add_special_tokens=False)["input_ids"]
        assert full.unk_token_id not in ids and full.decode(ids).split() == turn["value"].replace("phrase.", "phrase .").split()


def test_the_question_only_baseline_groups_suffixed_questions_as_before():
    """train.py's baseline/question_only_acc groups by question text: the suffix is the same on every
    one-word question, so the groups (and the baseline) do not change."""
    from dllava.metrics.answers import question_only_baseline

    def records(split, n, suffix):
        return [make_conversation(split, i, 0, short_suffix=suffix) for i in range(n)]

    plain = question_only_baseline(records("train", 1500, False), records("val", 400, False), SHORT_KINDS)
    suffixed = question_only_baseline(records("train", 1500, True), records("val", 400, True), SHORT_KINDS)
    assert suffixed == plain <= 0.35
