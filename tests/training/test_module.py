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


def _eval_module(tiny_model_dir, sharded):
    predictor = {"d_model": 64, "heads": 4, "ff": 256, "layers": 2}  # conf/model/tiny.yaml
    module = LlavaLitModule(model={"pretrained": str(tiny_model_dir), "predictor": predictor}, sparsity={"text_min_len": 16},
                            max_new_tokens=2)
    torch.manual_seed(0)  # the predictors are freshly initialised: the same weights in every module
    module.configure_model()
    module.eval()
    module._sharded = sharded  # sharded: generation runs on every row, padding included
    return module


def _computed(module, split="val"):
    return {name: float(m.compute()) for name, m in module.eval_metrics[split].items() if m.update_called}


def test_eval_metrics_count_real_samples_once_and_padding_never(tiny_model_dir, synthetic_dir):
    """The same 6 samples scored as one batch, and as padded batches (one all padding, as a rank whose
    share ran out gets): equal metrics, no NaN from the padding-only batch's 0/0 loss."""
    import webdataset as wds

    from dllava.data.datamodule import LlavaDataModule, collate, decode_sample

    dm = LlavaDataModule(train_urls=f"{synthetic_dir}/val-*.tar", val_urls=f"{synthetic_dir}/val-*.tar",
                         processor=str(tiny_model_dir), num_workers=0)
    dm.setup("validate")
    stream = wds.WebDataset(f"{synthetic_dir}/val-000000.tar", shardshuffle=False, empty_check=False, nodesplitter=None)
    samples = [dm.preprocess(decode_sample(s)) for _, s in zip(range(6), stream)]
    padding = dm.preprocess.padding()
    pad_id = dm.processor.tokenizer.pad_token_id

    whole = _eval_module(tiny_model_dir, sharded=False)
    with torch.no_grad():
        whole._eval_step(collate(samples, pad_id), "val")
    padded = _eval_module(tiny_model_dir, sharded=True)
    with torch.no_grad():
        for rows in (samples[:4] + [padding], [padding, padding], [padding] + samples[4:]):
            padded._eval_step(collate(rows, pad_id), "val")
    expected, got = _computed(whole), _computed(padded)
    assert {"loss", "answer_acc", "vision_keep", "budget_loss_vision", "lm_loss"} <= set(expected)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
    assert padded._eval_tally["val"][:2] == [6, 10]  # scored samples, rows seen
