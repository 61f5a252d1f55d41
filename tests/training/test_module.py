"""The LightningModule's pieces: schedule, parameter groups, frozen tower, answer scoring."""

import math

import pytest
import torch

from dllava.metrics.answers import exact_match, normalize_answer, question_only_baseline
from dllava.training.module import LlavaLitModule, OptimConfig, warmup_cosine


def test_warmup_then_cosine_reaches_min_ratio():
    values = [warmup_cosine(s, total=100, warmup=10, min_ratio=0.1) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_groups_by_name_with_own_lrs_and_frozen_vision_tower(tiny_model_dir):
    module = LlavaLitModule(model={"pretrained": str(tiny_model_dir)}, optim={"lr": 1e-4, "projector_lr": 1e-3})
    module.configure_model()
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert set(groups) == {"llm", "projector"}
    assert groups["projector"]["lr"] == 1e-3 and groups["llm"]["lr"] == 1e-4
    assert not any(p.requires_grad for p in module.llava.model.vision_tower.parameters())
    trainable = sum(p.numel() for g in groups.values() for p in g["params"])
    assert trainable == sum(p.numel() for p in module.llava.parameters() if p.requires_grad)


def test_unfrozen_vision_tower_gets_its_own_group(tiny_model_dir):
    module = LlavaLitModule(model={"pretrained": str(tiny_model_dir)}, optim={"vision_lr": 5e-5},
                            trainable=["vision", "projector", "llm"])
    module.configure_model()
    groups = {g["name"]: g["lr"] for g in module.parameter_groups()}
    assert groups == {"vision": 5e-5, "projector": 1e-4, "llm": 1e-4}


@pytest.mark.parametrize("field, value", [("lr", 0.0), ("warmup_ratio", 1.0), ("weight_decay", -1.0)])
def test_bad_optim_values_name_the_key(field, value):
    with pytest.raises(ValueError, match=f"optim.{field}"):
        OptimConfig(**{field: value})


def test_answers_normalise_case_punctuation_and_articles():
    assert normalize_answer(" The Red. ") == "red"
    assert exact_match("a circle", "circle") and not exact_match("circles", "circle")


def test_question_only_baseline_uses_majority_answer_per_question():
    def rec(q, a, kind="color"):
        return {"conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
                "kinds": [kind]}

    train = [rec("q1", "red"), rec("q1", "red"), rec("q1", "blue"), rec("q2", "two", "count"), rec("q3", "x", "describe")]
    evals = [rec("q1", "red"), rec("q1", "blue"), rec("q2", "three", "count"), rec("q4", "red")]
    assert question_only_baseline(train, evals, kinds=["color"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "trainable, expected", [(["projector", "llm", "predictors"], {"projector", "llm", "predictors"}),
                            (["predictors"], {"predictors"})],
)
def test_stages_train_the_named_parts_with_a_predictor_lr(tiny_model_dir, trainable, expected):
    module = LlavaLitModule(
        model={"pretrained": str(tiny_model_dir), "predictor": {"d_model": 32, "heads": 4, "ff": 64, "layers": 1}},
        optim={"lr": 1e-4, "predictor_lr": 2e-4}, sparsity={"layer": 2}, trainable=trainable,
    )
    module.configure_model()
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert set(groups) == expected
    assert groups["predictors"]["lr"] == 2e-4
    if trainable == ["predictors"]:
        assert not any(p.requires_grad for p in module.llava.parameters())
