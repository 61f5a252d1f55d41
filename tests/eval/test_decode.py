"""The decoding comparison (eval.py compare.decode=true) on the tiny model: every row at the learned
share, ratios against dense, the metrics' plumbing, and the reference perplexity against HF's forward."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from dllava.eval.loading import load_for_eval
from dllava.inference.engine import SparseEngine
from dllava.inference.text_policies import text_budget
from dllava.sparse.model import DynamicLlava
from tests.conftest import ROOT
from tests.eval.conftest import PREDICTOR, SPARSITY
from tests.helpers import compose

_spec = importlib.util.spec_from_file_location("eval_entry", ROOT / "eval.py")
eval_entry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_entry)


@pytest.fixture(scope="module")
def decisive_dir(tiny_model_dir, tiny_processor, tmp_path_factory):
    """A Dynamic-LLaVA save whose (untrained) text predictor drops some tokens and keeps others."""
    torch.manual_seed(6)  # an init that keeps about half of the generated tokens (seeds 1 and 7 keep almost none)
    model = DynamicLlava(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), SPARSITY, PREDICTOR)
    with torch.no_grad():
        for p in model.predictors().parameters():
            p.mul_(5)
    out = tmp_path_factory.mktemp("decisive") / "hf"
    model.save_pretrained(out)
    tiny_processor.save_pretrained(out)
    return out


def test_decode_comparison_writes_every_row_at_the_learned_share(tmp_path, decisive_dir, synthetic_dir):
    cfg = compose("eval", [
        f"ckpt_path={decisive_dir}", f"data.shards={synthetic_dir}/test-*.tar", "compare.decode=true",
        "decode.answer_kinds=[describe]", "decode.max_new_tokens=24", "data.limit=6", "data.batch_size=4",
        "progress=false",
    ], output_dir=tmp_path)
    metrics = eval_entry.evaluate(cfg)
    report = json.loads((tmp_path / "decode.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["dense", "dynamic", "every_other", "random", "streaming", "h2o"]
    share = report["share"]
    assert 0 < share < 1 and share == pytest.approx(rows["dynamic"]["text_keep"])
    assert metrics["decode/share"] == share
    dense = rows["dense"]
    assert dense["text_keep"] == 1 and dense["kv_ratio"] == dense["ppl_ratio"] == dense["decode_flops_ratio"] == 1
    for name, row in rows.items():
        assert row["samples"] == 6 and math.isfinite(row["ppl"]) and row["ppl"] > 1
        assert 0 <= row["rouge_l"] <= 1 and 0 <= row["bleu"] <= 1
        answers = [json.loads(line) for line in (tmp_path / "arms" / name / "answers.jsonl").read_text().splitlines()]
        assert len(answers) == 6
        if name in ("every_other", "random", "streaming", "h2o"):  # exactly the budget, per answer
            for a in answers:
                fed = a["metadata"]["text_tokens_fed"]
                assert a["metadata"]["text_tokens_kept"] == (text_budget(fed - 1, share) if fed else 0)
        if name != "dense" and row["text_keep"] < 1:
            assert row["kv_ratio"] < 1 and row["decode_flops_ratio"] < 1
    with (tmp_path / "decode_table.csv").open() as handle:
        header = next(csv.reader(handle))
    assert {"method", "kv_ratio", "object_f1", "object_f1_ratio", "ppl", "ppl_ratio", "rouge_l"} <= set(header)
    assert (tmp_path / "decode_pareto.png").stat().st_size > 0
    assert "| h2o |" in (tmp_path / "decode_table.md").read_text()


def test_bad_decode_settings_fail_naming_the_key(tmp_path, decisive_dir):
    for override, message in (("decode.methods=[dense,h20]", "decode.methods"), ("decode.sinks=-1", "decode.sinks")):
        cfg = compose("eval", [f"ckpt_path={decisive_dir}", "compare.decode=true", override], output_dir=tmp_path)
        with pytest.raises(ValueError, match=message):
            eval_entry.evaluate(cfg)


def test_reference_nll_equals_hf_forward_without_pruning(tiny_model_dir, decisive_dir):
    """Dense image tokens and every generated token kept: the teacher-forced NLL through the engine is
    HF's own cross-entropy of the continuation (left-padded batch, references of different lengths)."""
    from tests.inference.test_engine import _prompts

    hf = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    model = load_for_eval(str(decisive_dir), "cpu", None).model
    ids, mask, pixels = _prompts(hf.config)
    references = [[7, 9, 11, 2], [5, 2], [13, 17, 19, 23, 2]]
    engine = SparseEngine(model, method="dense", text="off")
    ours = engine.reference_nll(ids, mask, references, pixel_values=pixels)
    for b, ref in enumerate(references):
        row = torch.cat([ids[b], torch.tensor(ref)])[None]
        row_mask = torch.cat([mask[b], torch.ones(len(ref), dtype=mask.dtype)])[None]
        with torch.no_grad():
            positions = (row_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers a left-padded row
            logits = hf(input_ids=row, attention_mask=row_mask, position_ids=positions,
                        pixel_values=pixels[b : b + 1]).logits[0].float()
        start = ids.shape[1] - 1
        expected = torch.nn.functional.cross_entropy(logits[start : start + len(ref)], torch.tensor(ref), reduction="sum")
        assert ours[b][1] == len(ref)
        assert ours[b][0] == pytest.approx(float(expected), rel=1e-4)
