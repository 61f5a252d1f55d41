"""One arm of an evaluation: answers from the sparse engine, realised budgets, FLOPs and KV accounting."""

import numpy as np
import pytest
import torch

from dllava.eval.loading import load_for_eval
from dllava.eval.questions import ShardQuestions, collate_prompts, object_patches
from dllava.eval.runner import Arm, evaluate_arm
from dllava.inference import flops
from dllava.inference.engine import SparseEngine
from dllava.inference.methods import pdrop


@pytest.fixture(scope="module")
def loaded(dynamic_dir):
    return load_for_eval(dynamic_dir, device="cpu")


@pytest.fixture(scope="module")
def questions(loaded, synthetic_dir):
    return list(ShardQuestions(str(synthetic_dir / "test-*.tar"), loaded.processor, ["color", "shape", "count", "exist"], limit=12))


def test_shard_questions_are_the_final_short_questions_with_their_answers(questions):
    assert len(questions) == 12
    assert all(q.kind in {"color", "shape", "count", "exist"} for q in questions)
    assert all(q.reference and q.prompt.endswith("?") for q in questions)
    assert all(q.pixel_values.shape == (3, 96, 96) for q in questions)
    assert all(2 <= len(q.evidence) <= 4 for q in questions)  # the scene's objects, one patch each


def test_object_patches_are_the_coloured_patches(questions):
    from dllava.eval.overlay import pixels_to_image

    for q in questions:
        image = np.asarray(pixels_to_image(q.pixel_values)).astype(int)
        patches = image.reshape(8, 12, 8, 12, 3).transpose(0, 2, 1, 3, 4).reshape(64, 144, 3)
        colourful = (patches.max(-1) - patches.min(-1) > 60).sum(-1) > 10  # grey background vs coloured shapes
        assert sorted(np.flatnonzero(colourful).tolist()) == q.evidence


def test_object_patches_follow_the_padding_to_a_square():
    # a 40 x 20 image is padded to 40 x 40 (10 px above): a box centred at (30, 5) lands in row 1, column 3 of 4
    assert object_patches([{"box": [25, 0, 35, 10]}], (40, 20), grid=4) == [1 * 4 + 3]


def test_object_tokens_are_the_patches_each_box_covers():
    """A small object inside one 12 px patch covers one token, a large one filling its 24 px cell the four
    tokens of that cell (the hard task's redundant tokens); checked on generated hard scenes against the
    generator's own cell and size."""
    import numpy as np

    from dllava.data.synthetic import make_scene
    from dllava.eval.questions import object_tokens

    assert object_tokens([{"box": [26, 2, 34, 10]}, {"box": [49, 25, 71, 47]}], (96, 96), 8) == [[2], [20, 21, 28, 29]]
    scenes = [make_scene(np.random.default_rng(i), objects=(6, 10), large_share=0.5) for i in range(20)]
    for scene in scenes:
        for obj, tokens in zip(scene, object_tokens(scene, (96, 96), 8)):
            row, col = obj["row"], obj["col"]
            cell = [(2 * row + r) * 8 + 2 * col + c for r in (0, 1) for c in (0, 1)]
            if obj["large"]:
                assert tokens == cell, obj
            else:
                assert len(tokens) == 1 and tokens[0] in cell, obj


@pytest.mark.parametrize("method,keep", [("dynamic", 0.25), ("fastv", 0.25), ("random", 0.1), ("dense", 1.0)])
def test_arm_keeps_exactly_its_budget_and_counts_its_cost(loaded, questions, method, keep):
    result = evaluate_arm(loaded, questions, Arm(method, keep), batch_size=5, max_new_tokens=3, progress=False, warmup=False)
    s = result.summary
    kept = 64 if method == "dense" else int(64 * keep)
    assert s["samples"] == s["scored"] == 12
    assert s["image_tokens_kept"] == kept and s["vision_keep"] == pytest.approx(kept / 64)
    assert all(r["metadata"]["image_tokens_kept"] == kept for r in result.records)
    assert 0 <= s["accuracy"] <= 1 and 0 <= s["vqa_accuracy"] <= 1
    assert s["accuracy"] == pytest.approx(sum(r["metadata"]["correct"] for r in result.records) / 12)
    if method == "dense":
        assert s["prefill_flops"] == s["prefill_flops_dense"] and s["kv_ratio"] == 1.0
        assert s["object_recall"] == 1.0 and s["objects_seen"] == 1.0
    else:
        assert s["prefill_flops"] < s["prefill_flops_dense"] and s["kv_bytes"] < s["kv_bytes_dense"]
    for record, question in zip(result.records, questions):  # an object is seen when any of its tokens is kept
        meta = record["metadata"]
        assert meta["objects"] == len(question.scene) and 0 <= meta["objects_seen"] <= meta["objects"]
    assert s["latency_s"] > 0 and s["prefill_flops_paper"] > 0


BASELINES = ("dart", "divprune", "cdpruner", "visionzip", "pdrop")


@pytest.mark.parametrize("method", BASELINES)
def test_every_baseline_keeps_what_dynamic_keeps_per_question(loaded, questions, method):
    """The equal-budget promise read back from the answer files' metadata: every question keeps the
    image tokens ``dynamic`` keeps (PDrop: the same image-token-layers from K on, reported as their mean),
    and the prefill FLOPs follow the recorded cuts (before the LLM: every layer runs the kept tokens)."""
    arm = dict(batch_size=5, max_new_tokens=2, progress=False, warmup=False)
    reference = evaluate_arm(loaded, questions, Arm("dynamic", 0.25, "off"), **arm)
    result = evaluate_arm(loaded, questions, Arm(method, 0.25), **arm)
    shape = flops.DecoderShape.from_config(loaded.model.text_config)
    layers, k = shape.layers, 2
    for ours, theirs in zip(result.records, reference.records):
        meta, dynamic = ours["metadata"], theirs["metadata"]
        assert meta["image_tokens_kept"] == dynamic["image_tokens_kept"] == 16
        cuts = meta["image_cuts"]
        per_layer = []
        for i in range(layers):
            per_layer.append(next((n for layer, n in reversed(cuts) if layer <= i), 64))
        assert sum(per_layer[k:]) <= (layers - k) * 16
        assert sum(per_layer[k:]) / (layers - k) == meta["image_tokens_kept"]
        n = meta["prefill_flops_dense"]
        if method in ("divprune", "cdpruner", "visionzip"):
            assert cuts == [[0, 16]] and meta["prefill_flops"] < dynamic["prefill_flops"]
        elif method == "dart":
            assert cuts == [[k, 16]]
        else:
            assert cuts[0][0] == k and [c for _, c in cuts] == sorted((c for _, c in cuts), reverse=True)
            assert cuts == [list(stage) for stage in pdrop.schedule(64, 0.25, k, layers)]  # every stage recorded
        assert meta["prefill_flops"] < n
    assert result.summary["image_tokens_kept"] == reference.summary["image_tokens_kept"]


def test_answers_are_the_engines_greedy_tokens(loaded, questions):
    result = evaluate_arm(loaded, questions, Arm("fastv", 0.25), batch_size=4, max_new_tokens=3, progress=False, warmup=False)
    tokenizer = loaded.processor.tokenizer
    ids, mask, pixels = collate_prompts(questions[:4], tokenizer.pad_token_id)
    out = SparseEngine(loaded.model, method="fastv", keep=0.25, text="off").generate(
        ids, mask, pixels, max_new_tokens=3, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    expected = [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True).strip() for row, n in zip(out.sequences, out.lengths)]
    assert [r["text"] for r in result.records[:4]] == expected


def test_prefill_flops_follow_the_full_count_with_realised_tokens(loaded, questions):
    result = evaluate_arm(loaded, questions[:1], Arm("random", 0.25), max_new_tokens=1, progress=False, warmup=False)
    shape = flops.DecoderShape.from_config(loaded.model.llava.config.text_config)
    n = len(questions[0].prompt_ids)
    assert result.records[0]["metadata"]["prefill_flops"] == flops.prefill_flops(shape, 2, n, n - 64 + 16)


def test_examples_hold_the_keep_masks_generation_used(loaded, questions):
    result = evaluate_arm(loaded, questions, Arm("random", 0.25), batch_size=5, max_new_tokens=1, examples=7, progress=False, warmup=False)
    assert len(result.examples) == 7
    ids, mask, pixels = collate_prompts(questions[5:10], loaded.processor.tokenizer.pad_token_id)
    state = SparseEngine(loaded.model, method="random", keep=0.25, text="off").start(ids, mask, pixels)[1]
    assert torch.equal(result.examples[5][1], state.image_keep[0])  # second batch, first row
    assert all(int(keep.sum()) == 16 for _, keep, _ in result.examples)


def test_arm_rejects_a_dense_budget_and_bad_methods():
    with pytest.raises(ValueError, match="keep"):
        Arm("dense", 0.2)
    with pytest.raises(ValueError, match="method"):
        Arm("h2o", 0.2)


def test_dynamic_on_a_dense_model_says_what_is_missing(tiny_model_dir, questions):
    dense = load_for_eval(tiny_model_dir, device="cpu")
    with pytest.raises(ValueError, match="image predictor"):
        evaluate_arm(dense, questions, Arm("dynamic", 0.2), progress=False)
