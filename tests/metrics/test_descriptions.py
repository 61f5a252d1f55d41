"""Parsing and scoring generated scene descriptions (dllava.metrics.descriptions)."""

from __future__ import annotations

import numpy as np
import pytest
from torchmetrics.functional.text.bleu import bleu_score
from torchmetrics.functional.text.rouge import rouge_score

from dllava.data.conversation import final_exchange
from dllava.data.synthetic import (
    COLORS,
    DETAIL_WORDS,
    ORDINALS,
    WIDE_WORDS,
    describe,
    describe_in_detail,
    make_conversation,
    quadrant,
)
from dllava.metrics.descriptions import (
    DescribedObject,
    ParsedDescription,
    aggregate_attribute_accuracy,
    aggregate_object_scores,
    attribute_accuracy,
    object_scores,
    parse_description,
    text_overlap,
)

# (make_conversation options, cell px): the default 96 px / 4 x 4 task, and Qwen-style layouts whose rows and
# columns go up to "six".
LAYOUTS = [({}, 24), ({"cell": 28, "grid_sizes": [(4, 6), (6, 4), (6, 6)]}, 28)]


def _records(kind: str, count: int = 30):
    for options, cell in LAYOUTS:
        for index in range(count):
            yield make_conversation("val", index, seed=3, kinds=[kind], **options), cell


def _ordered(scene):
    return sorted(scene, key=lambda o: (o["row"], o["col"]))


def _key(obj):
    return (obj["color"], obj["shape"], obj["row"], obj["col"])


def _quadrant_words(obj, cell):
    vertical, horizontal = quadrant(obj, cell)
    return f"{('top', 'bottom')[vertical]} {('left', 'right')[horizontal]}"


def _split(text: str) -> list[str]:
    """A reference answer's sentences, without their full stops."""
    assert text.endswith(" .")
    return text[: -len(" .")].split(" . ")


def _join(sentences: list[str]) -> str:
    return " . ".join(sentences) + " ."


def _blocks(sentences: list[str]) -> list[list[int]]:
    """Sentence indices of each object of a detail answer (identity, location, relations)."""
    starts = [i for i, s in enumerate(sentences) if s.split()[:2] in (["the", o] for o in ORDINALS)]
    return [list(range(a, b)) for a, b in zip(starts, starts[1:] + [len(sentences)])]


def _obj(color, shape, row, col, vq=0, hq=0, cell=24):
    """A scene object in (row, col), in quadrant (vq, hq) of its cell (0 = top / left)."""
    x0, y0 = col * cell + hq * cell // 2 + 1, row * cell + vq * cell // 2 + 1
    return {"color": color, "shape": shape, "row": row, "col": col, "box": [x0, y0, x0 + 9, y0 + 9]}


def _perfect(scores):
    return scores["precision"] == scores["recall"] == scores["f1"] == 1.0 and scores["tp"] == scores["reference"]


# -- the parser recovers references -------------------------------------------------------------------
def test_detail_answers_parse_back_to_their_scenes():
    wide = False
    for record, cell in _records("detail"):
        scene = record["scene"]
        _, answer = final_exchange(record["conversations"])
        assert answer == describe_in_detail(scene, cell)
        parsed = parse_description(answer)
        n = len(scene)
        assert parsed.count == n
        assert parsed.keys == [_key(o) for o in _ordered(scene)]
        for obj, truth in zip(parsed.objects, _ordered(scene)):
            assert obj.quadrant == _quadrant_words(truth, cell)
            assert len(obj.relations) == n - 1
        assert _perfect(object_scores(parsed.objects, scene))
        acc = attribute_accuracy(parsed.objects, scene, cell)
        assert acc["quadrant_accuracy"] == 1.0 and acc["quadrant_total"] == n
        assert acc["relation_correct"] == acc["relation_total"]
        assert acc["relation_total"] + acc["relation_skipped"] == n * (n - 1)
        wide = wide or any(max(o["row"], o["col"]) >= 4 for o in scene)
    assert wide, "no record used rows / columns five or six"


def test_describe_answers_parse_back_to_their_scenes():
    for record, _ in _records("describe"):
        scene = record["scene"]
        _, answer = final_exchange(record["conversations"])
        assert answer == describe(scene)
        parsed = parse_description(answer)
        assert parsed.count == len(scene)
        assert parsed.keys == [_key(o) for o in _ordered(scene)]
        assert all(o.quadrant is None and o.relations == () for o in parsed.objects)
        assert _perfect(object_scores(parsed.objects, scene))
    for record, cell in _records("detail", count=10):  # the describe grammar of detail scenes too
        assert _perfect(object_scores(parse_description(describe(record["scene"])).objects, record["scene"]))


def test_object_scores_accepts_tuples():
    scene = [_obj("red", "circle", 0, 1), _obj("blue", "square", 1, 0)]
    assert _perfect(object_scores([("blue", "square", 1, 0), ("red", "circle", 0, 1)], scene))


# -- F1 drops as it should ------------------------------------------------------------------------------
def test_deleting_an_objects_sentences_costs_recall_only():
    for record, cell in _records("detail", count=6):
        scene = record["scene"]
        n = len(scene)
        detail, short = _split(describe_in_detail(scene, cell)), _split(describe(scene))
        for k, block in enumerate(_blocks(detail)):
            texts = (
                _join([s for i, s in enumerate(detail) if i not in block]),
                _join(short[: k + 1] + short[k + 2 :]),  # short[0] is the count sentence
            )
            for text in texts:
                parsed = parse_description(text)
                assert parsed.count == n
                scores = object_scores(parsed.objects, scene)
                assert (scores["tp"], scores["predicted"], scores["reference"]) == (n - 1, n - 1, n)
                assert scores["precision"] == 1.0
                assert scores["recall"] == pytest.approx((n - 1) / n)
                assert scores["f1"] == pytest.approx(2 * (n - 1) / (2 * n - 1))


def test_swapping_a_colour_costs_one_true_positive():
    for record, cell in _records("detail", count=6):
        scene = record["scene"]
        n = len(scene)
        ordered = _ordered(scene)
        detail, short = _split(describe_in_detail(scene, cell)), _split(describe(scene))
        for k, block in enumerate(_blocks(detail)):
            old = ordered[k]["color"]
            new = COLORS[(COLORS.index(old) + 1) % len(COLORS)]
            swapped_detail = list(detail)
            swapped_detail[block[0]] = detail[block[0]].replace(f" {old} ", f" {new} ")
            swapped_short = list(short)
            swapped_short[k + 1] = short[k + 1].replace(f"a {old} ", f"a {new} ")
            for text in (_join(swapped_detail), _join(swapped_short)):
                scores = object_scores(parse_description(text).objects, scene)
                assert (scores["tp"], scores["predicted"], scores["reference"]) == (n - 1, n, n)
                assert scores["precision"] == scores["recall"] == scores["f1"] == pytest.approx((n - 1) / n)
            acc = attribute_accuracy(parse_description(_join(swapped_detail)).objects, scene, cell)
            assert acc["quadrant_total"] == n - 1 and acc["quadrant_accuracy"] == 1.0


def test_duplicated_sentences():
    for record, cell in _records("detail", count=6):
        scene = record["scene"]
        n = len(scene)
        detail, short = _split(describe_in_detail(scene, cell)), _split(describe(scene))
        reference_acc = attribute_accuracy(parse_description(_join(detail)).objects, scene, cell)
        for k, block in enumerate(_blocks(detail)):
            identity, location, relation = block[0], block[1], block[2]
            # a repeated object (describe sentence, or detail identity + location): one false positive
            pair = detail[: location + 1] + [detail[identity], detail[location]] + detail[location + 1 :]
            for text in (_join(short[: k + 2] + short[k + 1 :]), _join(pair)):
                scores = object_scores(parse_description(text).objects, scene)
                assert (scores["tp"], scores["predicted"], scores["reference"]) == (n, n + 1, n)
                assert scores["precision"] == pytest.approx(n / (n + 1)) and scores["recall"] == 1.0
            # a repeated identity or location sentence alone adds no object
            for i in (identity, location):
                parsed = parse_description(_join(detail[: i + 1] + detail[i:]))
                assert parsed.keys == [_key(o) for o in _ordered(scene)]
            # a repeated relation sentence is judged twice
            acc = attribute_accuracy(
                parse_description(_join(detail[: relation + 1] + detail[relation:])).objects, scene, cell
            )
            judged = acc["relation_total"] - reference_acc["relation_total"]
            skipped = acc["relation_skipped"] - reference_acc["relation_skipped"]
            assert judged + skipped == 1 and acc["relation_correct"] == acc["relation_total"]


def test_hand_worked_precision_recall():
    scene = [_obj("red", "circle", 0, 1), _obj("blue", "square", 1, 0), _obj("green", "diamond", 2, 3)]
    text = (
        "there are four shapes . a red circle at row one column two . a red circle at row one column two . "
        "a blue square at row two column two . a green diamond at row three column four ."
    )
    parsed = parse_description(text)
    assert parsed.count == 4
    assert parsed.keys == [("red", "circle", 0, 1), ("red", "circle", 0, 1), ("blue", "square", 1, 1),
                           ("green", "diamond", 2, 3)]
    scores = object_scores(parsed.objects, scene)
    # tp: the red circle once (its repeat is a false positive) and the green diamond; the blue square's cell is wrong
    assert (scores["tp"], scores["predicted"], scores["reference"]) == (2, 4, 3)
    assert scores["precision"] == pytest.approx(1 / 2)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(4 / 7)  # 2 * 1/2 * 2/3 / (1/2 + 2/3)

    empty = object_scores(parse_description("").objects, scene)
    assert empty == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "predicted": 0, "reference": 3}
    assert object_scores([], [])["f1"] == 1.0
    assert object_scores([("red", "circle", 0, 0)], [])["f1"] == 0.0
    # multiset matching: a repeat is a true positive only as often as the scene holds the object
    twice = [_obj("red", "circle", 0, 1), _obj("red", "circle", 0, 1)]
    assert object_scores([("red", "circle", 0, 1)] * 3, twice)["tp"] == 2
    assert object_scores([("red", "circle", 0, 1)], twice)["tp"] == 1

    total = aggregate_object_scores([scores, empty])
    # micro: tp 2, predicted 4, reference 6 -> P 1/2, R 1/3, F1 2/5; mean per-sample F1 (4/7 + 0) / 2
    assert (total["tp"], total["predicted"], total["reference"], total["samples"]) == (2, 4, 6, 2)
    assert total["precision"] == pytest.approx(1 / 2)
    assert total["recall"] == pytest.approx(1 / 3)
    assert total["f1"] == pytest.approx(2 / 5)
    assert total["mean_f1"] == pytest.approx(2 / 7)
    with pytest.raises(ValueError):
        aggregate_object_scores([])


# -- quadrants and relations ----------------------------------------------------------------------------
def test_attribute_accuracy_hand_worked():
    scene = [
        _obj("red", "circle", 0, 0),  # top left
        _obj("blue", "square", 0, 2, vq=1, hq=1),  # bottom right
        _obj("red", "circle", 2, 0),  # top left; a second red circle: relations to "the red circle" are ambiguous
        _obj("green", "diamond", 2, 2, vq=0, hq=1),  # top right
    ]
    text = (
        "there are four shapes in the image , each in its own cell . "
        "the first shape is a blue square . it is at row one column three , in the bottom left corner of its cell . "
        "it is to the right of the red circle in the same row . "  # skipped: two red circles
        "it is above the green diamond in the same column . "  # right
        "it is below the green diamond in the same column . "  # wrong direction
        "it is to the left of the purple triangle . "  # wrong: no purple triangle
        "it is to the left of the blue square in the same row . "  # wrong: itself
        "the second shape is a green diamond . it is at row three column three , in the top right corner of its cell . "
        "it is below the blue square in the same column . "  # right
        "the third shape is a red circle . it is at row three column one , in the top left corner of its cell . "
        "it is to the left of the green diamond . "  # wrong: it is in the same row
        "the fourth shape is a red circle . it is at row four column four , in the top left corner of its cell . "
        "it is above the blue square . "  # not judged: this object is not in the scene
        "the first shape is a green diamond . it is at row three column three , in the top left corner of its cell . "
        "it is above the blue square in the same column ."  # not judged: a repeat of a matched object
    )
    parsed = parse_description(text)
    assert len(parsed.objects) == 5
    acc = attribute_accuracy(parsed.objects, scene, cell=24)
    assert acc == {
        "quadrant_accuracy": pytest.approx(2 / 3),
        "quadrant_correct": 2,
        "quadrant_total": 3,
        "relation_accuracy": pytest.approx(2 / 6),
        "relation_correct": 2,
        "relation_total": 6,
        "relation_skipped": 1,
    }
    nothing = attribute_accuracy([], scene, cell=24)
    assert nothing["quadrant_accuracy"] is None and nothing["relation_accuracy"] is None
    total = aggregate_attribute_accuracy([acc, nothing, acc])
    assert (total["quadrant_correct"], total["quadrant_total"]) == (4, 6)
    assert total["relation_accuracy"] == pytest.approx(1 / 3) and total["relation_skipped"] == 2


def test_wrong_quadrant_and_relation_in_a_reference():
    for record, cell in _records("detail", count=4):
        scene = record["scene"]
        detail = _split(describe_in_detail(scene, cell))
        first = _blocks(detail)[0]
        location = detail[first[1]]
        flipped = location.replace("top", "TMP").replace("bottom", "top").replace("TMP", "bottom")
        relation = detail[first[2]]
        swapped = relation.replace("left", "TMP").replace("right", "left").replace("TMP", "right")
        swapped = swapped.replace("above", "TMP").replace("below", "above").replace("TMP", "below")
        edited = list(detail)
        edited[first[1]], edited[first[2]] = flipped, swapped
        parsed = parse_description(_join(detail))
        reference = attribute_accuracy(parsed.objects, scene, cell)
        acc = attribute_accuracy(parse_description(_join(edited)).objects, scene, cell)
        assert acc["quadrant_correct"] == reference["quadrant_correct"] - 1
        assert acc["quadrant_total"] == reference["quadrant_total"]
        other = parsed.objects[0].relations[0]
        ambiguous = sum((o["color"], o["shape"]) == (other.other_color, other.other_shape) for o in scene) > 1
        assert reference["relation_correct"] - acc["relation_correct"] == (0 if ambiguous else 1)
        assert acc["relation_total"] == reference["relation_total"]
        assert acc["relation_skipped"] == reference["relation_skipped"]


# -- tolerance ------------------------------------------------------------------------------------------
def test_missing_full_stops_case_and_glued_punctuation():
    for record, cell in _records("detail", count=5):
        scene = record["scene"]
        truth = [_key(o) for o in _ordered(scene)]
        for text in (describe_in_detail(scene, cell), describe(scene)):
            variants = (
                text.replace(" .", ""),  # no full stops at all
                text.replace(" .", ".").replace(" ,", ",").upper(),  # "Circle." and "TWO,"
                text.replace(" . ", " .</s> <unk> . "),  # leftover special tokens between sentences
                "  \n".join(text.split(" . ")),
            )
            for variant in variants:
                parsed = parse_description(variant)
                assert parsed.keys == truth, variant
                assert parsed.count == len(scene)
        no_stops = parse_description(describe_in_detail(scene, cell).replace(" .", ""))
        assert attribute_accuracy(no_stops.objects, scene, cell)["quadrant_accuracy"] == 1.0


def test_garbage_never_raises():
    scene = [_obj("red", "circle", 0, 1), _obj("blue", "square", 1, 0)]
    vocab = list(WIDE_WORDS) + list(DETAIL_WORDS) + [".", ",", "<unk>", "</s>", "seven", "zebra"]
    rng = np.random.default_rng(0)
    texts = [
        "", " ", ".", " . . . ", ",,,", "there are", "there are shapes", "it is", "the first shape is a",
        "it is at row one column two", "the first shape is a red circle", "a red circle at row", "\x00\uffff\u00e9",
        "a red circle at row seven column two .", "there are 3 shapes . a red circle at row 1 column 2 .",
        None, 42, b"a red circle at row one column two", ["a red circle"],
    ]
    texts += [" ".join(rng.choice(vocab, size=int(rng.integers(0, 120)))) for _ in range(300)]
    for text in texts:
        parsed = parse_description(text)
        assert isinstance(parsed, ParsedDescription)
        assert parsed.count is None or 0 <= parsed.count <= 4
        for obj in parsed.objects:
            assert isinstance(obj, DescribedObject) and 0 <= obj.row < 6 and 0 <= obj.col < 6
        scores = object_scores(parsed.objects, scene)
        assert 0.0 <= scores["f1"] <= 1.0
        attribute_accuracy(parsed.objects, scene, cell=24)
    assert parse_description(None) == ParsedDescription(count=None, objects=[])


def test_truncated_references_read_only_true_objects():
    for record, cell in _records("detail", count=3):
        scene = record["scene"]
        for text in (describe_in_detail(scene, cell), describe(scene)):
            read = 0
            for end in range(len(text) + 1):
                parsed = parse_description(text[:end])
                scores = object_scores(parsed.objects, scene)
                assert scores["tp"] == scores["predicted"]  # a cut-off object is never misread
                assert len(parsed.objects) >= read
                read = len(parsed.objects)
                truth = {_key(o): o for o in scene}
                for obj in parsed.objects:
                    assert obj.quadrant in (None, _quadrant_words(truth[obj.key], cell))
            assert read == len(scene)


# -- text overlap ---------------------------------------------------------------------------------------
def test_text_overlap_identical_and_matches_torchmetrics():
    references, predictions = [], []
    for record, cell in _records("detail", count=3):
        scene = record["scene"]
        detail = describe_in_detail(scene, cell)
        references += [detail, describe(scene)]
        sentences = _split(detail)
        predictions += [_join(sentences[: len(sentences) // 2] + sentences[len(sentences) // 2 + 2 :]),
                        describe(scene).replace(scene[0]["color"], "purple", 1)[:60]]
    same = text_overlap(references, references)
    assert same == {"rouge_l": 1.0, "bleu": 1.0}
    assert all(type(v) is float for v in same.values())

    got = text_overlap(predictions, references)
    rouge = rouge_score(predictions, references, rouge_keys="rougeL")["rougeL_fmeasure"]
    bleu = bleu_score(predictions, [[r] for r in references], n_gram=4)
    assert got["rouge_l"] == pytest.approx(float(rouge)) and got["bleu"] == pytest.approx(float(bleu))
    assert 0.0 < got["bleu"] < 1.0 and 0.0 < got["rouge_l"] < 1.0

    with pytest.raises(ValueError):
        text_overlap(predictions, references[:-1])
    with pytest.raises(ValueError):
        text_overlap([], [])
