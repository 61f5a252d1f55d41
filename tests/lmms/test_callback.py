"""callbacks=lmms_eval: lmms-eval on the model train.py just trained, in the same process."""

from __future__ import annotations

import json

import pytest

from tests.lmms.conftest import TASK


@pytest.mark.slow
def test_the_trained_model_is_scored_at_the_end_and_equals_its_export_scored_afterwards(
    tiny_model_dir, synthetic_dir, task_dir, tmp_path
):
    from dllava.lmms.model import DllavaLMM
    from tests.lmms.test_model import run_task
    from tests.test_train import _overrides, _train

    overrides = [o for o in _overrides(tiny_model_dir, synthetic_dir) if o != "callbacks=none"]
    metrics = _train(tmp_path, [
        *overrides, "callbacks=lmms_eval", f"callbacks.lmms_eval.include_path={task_dir}",
        "callbacks.lmms_eval.log_samples=true", "callbacks.lmms_eval.batch_size=4",
        "trainer.max_steps=2", "data.epoch_samples=16", "export=true",
        "logger=csv",  # a failed or lmms-evaluated run with W&B disabled, then an offline W&B run later in the
                       # same process: the latter wrote no run files (seen in the suite; see the issue 18 note)
    ])
    summary = json.loads((tmp_path / "summary.json").read_text())
    saved = json.loads((tmp_path / "lmms_eval.json").read_text())
    score = saved["results"][TASK]["exact_match,none"]
    assert summary["metrics"][f"lmms/{TASK}/exact_match"] == pytest.approx(score)
    assert float(metrics[f"lmms/{TASK}/vqa_accuracy"]) == pytest.approx(saved["results"][TASK]["vqa_accuracy,none"])
    # the exported model, evaluated afterwards by the lmms-eval model class, answers the same
    scores, samples = run_task(DllavaLMM(pretrained=str(tmp_path / "hf"), batch_size=4), task_dir)
    assert [s["filtered_resps"] for s in samples] == [s["filtered_resps"] for s in saved["samples"][TASK]]
    assert scores["exact_match,none"] == pytest.approx(score)
    assert {s["token_counts"][0]["method"] for s in samples} == {"dynamic"}


def test_an_unknown_task_is_refused_before_training(tiny_model_dir, synthetic_dir, task_dir, tmp_path):
    from tests.test_train import _overrides, _train

    overrides = [o for o in _overrides(tiny_model_dir, synthetic_dir) if o != "callbacks=none"]
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['gqa'\].*include_defaults=true"):
        _train(tmp_path, [*overrides, "callbacks=lmms_eval", f"callbacks.lmms_eval.include_path={task_dir}",
                          "callbacks.lmms_eval.tasks=[gqa]", "trainer.max_steps=2", "logger=csv"])
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained
