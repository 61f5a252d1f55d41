"""eval.py end to end on the tiny models: answer files in LLaVA's format, eval.json, overlays, the
equal-budget comparison, and a multirun's sweep summary."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys

import pytest
from PIL import Image

from dllava.eval.answers import ANSWER_FIELDS, METADATA_FIELDS, read_answer_file
from tests.conftest import ROOT
from tests.eval.conftest import synthetic_question_lines
from tests.helpers import compose

_spec = importlib.util.spec_from_file_location("eval_entry", ROOT / "eval.py")
eval_entry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_entry)


def _run(tmp_path, overrides):
    cfg = compose("eval", [*overrides, "progress=false"], output_dir=tmp_path)
    return eval_entry.evaluate(cfg)


@pytest.fixture(scope="module")
def question_file(synthetic_dir, tmp_path_factory):
    """A LLaVA question file (and image folder) made from the synthetic test split, ids as integers."""
    folder = tmp_path_factory.mktemp("questions")
    lines = [{**{k: v for k, v in line.items() if k != "answer"}, "category": "default"}
             for line in synthetic_question_lines(synthetic_dir, folder / "images", 6)]
    path = folder / "llava_synthetic.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_answer_file_follows_llavas_schema(tmp_path, dynamic_dir, question_file):
    _run(tmp_path, [f"ckpt_path={dynamic_dir}", f"data.questions={question_file}", "data.image_folder="
                    f"{question_file.parent / 'images'}", "sparsity.keep=0.25", "data.batch_size=4", "overlays=2"])
    path = tmp_path / "answers.jsonl"
    records = read_answer_file(path, questions=question_file)  # every field typed, ids unique, same order
    questions = [json.loads(line) for line in question_file.read_text().splitlines()]
    assert len(records) == len(questions) == 6
    for record, question in zip(records, questions):
        assert list(record) == list(ANSWER_FIELDS)
        assert record["question_id"] == question["question_id"] and isinstance(record["question_id"], int)
        assert record["prompt"] == question["text"]
        assert isinstance(record["text"], str) and record["text"] == record["text"].strip()
        assert isinstance(record["answer_id"], str) and len(record["answer_id"]) == 32
        assert record["model_id"] == f"{dynamic_dir.parent.name}/hf:dynamic@0.25"
        metadata = record["metadata"]
        assert set(METADATA_FIELDS) <= set(metadata)
        assert metadata["image_tokens"] == 64 and metadata["image_tokens_kept"] == 16
        assert 0 <= metadata["text_tokens_kept"] <= metadata["text_tokens_fed"]
    # what LLaVA's converters do with the file (convert_vqav2_for_submission.py, eval_pope.py)
    results = {x["question_id"]: x["text"] for x in (json.loads(line) for line in path.open())}
    assert set(results) == {q["question_id"] for q in questions}
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["samples"] == 6 and summary["scored"] == 0 and summary["accuracy"] is None


def test_shard_evaluation_writes_eval_json_overlays_and_summary(tmp_path, lightning_ckpt, synthetic_dir):
    metrics = _run(tmp_path, [f"ckpt_path={lightning_ckpt}", f"data.shards={synthetic_dir}/test-*.tar", "method=fastv",
                              "sparsity.keep=0.25", "data.limit=10", "overlays=3"])
    summary = json.loads((tmp_path / "eval.json").read_text())
    for key in ("accuracy", "vqa_accuracy", "vision_keep", "text_keep", "prefill_flops", "prefill_flops_paper",
                "kv_bytes", "latency_s"):
        assert summary[key] is not None, key
    assert summary["method"] == "fastv" and summary["vision_keep"] == 0.25 and summary["scored"] == 10
    assert metrics["eval/accuracy"] == summary["accuracy"]
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"]["eval/accuracy"] == summary["accuracy"]
    pictures = sorted((tmp_path / "overlays").glob("*.png"))
    assert len(pictures) == 3 and Image.open(tmp_path / "overlays.png").width > 384


def test_keep_defaults_to_the_trained_one_and_dense_keeps_everything(tmp_path, lightning_ckpt, synthetic_dir):
    _run(tmp_path / "a", [f"ckpt_path={lightning_ckpt}", f"data.shards={synthetic_dir}/test-*.tar", "data.limit=3", "overlays=0"])
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["keep"] == 0.25
    _run(tmp_path / "b", [f"ckpt_path={lightning_ckpt}", f"data.shards={synthetic_dir}/test-*.tar", "data.limit=3",
                          "overlays=0", "method=dense", "sparsity.keep=0.1"])
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["image_tokens_kept"] == 64


def test_equal_budget_comparison_writes_table_pareto_and_overlays(tmp_path, dynamic_dir, tiny_model_dir, synthetic_dir):
    _run(tmp_path, [f"ckpt_path={dynamic_dir}", f"data.shards={synthetic_dir}/test-*.tar", "data.limit=6",
                    "compare.enabled=true", "compare.keeps=[0.25,0.5]", f"compare.dense_ckpt_path={tiny_model_dir}",
                    "overlays=2", "generation.max_new_tokens=2", "compare.overlay_keep=0.2"])
    with (tmp_path / "eval_table.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    arms = [(r["model"], r["method"], r["keep"]) for r in rows]
    trained, dense = "sparse-trained (keep 0.25)", "dense-trained"
    assert arms == [
        (trained, "dense", "1.0"),
        *[(trained, m, k) for m in ("dynamic", "fastv", "random") for k in ("0.25", "0.5")],
        (dense, "dense", "1.0"),
        *[(dense, m, k) for m in ("fastv", "random", "dart", "divprune", "cdpruner", "visionzip", "pdrop") for k in ("0.25", "0.5")],
    ]
    reference = float(next(r for r in rows if r["model"] == dense and r["method"] == "dense")["accuracy"])
    for row in rows:
        kept = 64 if row["method"] == "dense" else int(64 * float(row["keep"]))
        assert float(row["image_tokens_kept"]) == kept
        if reference:
            assert float(row["acc_vs_dense"]) == pytest.approx(float(row["accuracy"]) / reference)
    by_keep = (tmp_path / "eval_by_keep.md").read_text().splitlines()
    assert by_keep[0].startswith("| model | method | keep 0.25 | keep 0.5 | FLOPs ratio @0.25")
    assert len([line for line in by_keep if line.startswith("| ")]) == 1 + len({(r["model"], r["method"]) for r in rows})
    divprune = next(r for r in rows if r["method"] == "divprune" and r["keep"] == "0.5")
    line = next(line for line in by_keep if "| divprune |" in line)
    assert f"{float(divprune['accuracy']):.4f}" in line.split(" | ")[3]
    table = (tmp_path / "eval_table.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(rows) and "acc / dense" in table
    assert Image.open(tmp_path / "pareto.png").size[0] > 500
    assert Image.open(tmp_path / "overlays_keep0.25.png").size[0] > 11 * 192  # the image, then one column per arm (10)
    answers = sorted((tmp_path / "arms").glob("*/*/answers.jsonl"))
    assert len(answers) == len(rows)
    for path in answers:
        read_answer_file(path)


@pytest.mark.slow
def test_multirun_over_methods_and_keeps_gives_a_sweep_summary(tmp_path, dynamic_dir, synthetic_dir):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "eval.py"), "-m", f"ckpt_path={dynamic_dir}", f"data.shards={synthetic_dir}/test-*.tar",
           "data.limit=4", "overlays=0", "progress=false", "method=fastv,random", "sparsity.keep=0.25,0.5",
           f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with (sweep / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    assert {r["overrides"].split("method=")[1].split()[0] for r in rows} == {"fastv", "random"}
    assert all(float(r["eval/image_tokens_kept"]) in (16.0, 32.0) for r in rows)


@pytest.mark.parametrize("method", sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")))
def test_every_method_option_composes_into_a_valid_arm(tmp_path, method):
    from dllava.eval.runner import Arm

    cfg = compose("eval", [f"method={method}", "ckpt_path=x"], output_dir=tmp_path)
    assert cfg.method.name == method
    Arm(cfg.method.name, 1.0, cfg.method.text)  # text policy valid ("off" stays a string, not YAML's false)
    assert cfg.compare.keeps == [0.1, 0.2, 0.35, 0.5] and cfg.data.shards.endswith("synthetic/test-*.tar")


@pytest.fixture(scope="module")
def anyres_setup(tmp_path_factory):
    """A stock tiny LLaVA-NeXT directory (no predictors) and non-square synthetic shards (16 px cells)."""
    from dllava.data.synthetic import generate
    from dllava.model.tiny_next import save_tiny_next

    root = tmp_path_factory.mktemp("anyres_eval")
    model = save_tiny_next(root / "next", "llava_next", num_hidden_layers=3)
    generate(root / "data", train=0, val=0, test=12, seed=0, samples_per_shard=12, cell=16, grid_sizes=[(4, 4), (4, 6), (6, 4)])
    return model, root / "data"


def test_anyres_eval_takes_the_budget_convention_and_reports_the_droppable_share(tmp_path, anyres_setup):
    model, data = anyres_setup
    common = [f"ckpt_path={model}", f"data.shards={data}/test-*.tar", "method=fastv", "sparsity.keep=0.25",
              "data.limit=8", "overlays=2"]
    _run(tmp_path / "per_view", [*common, "sparsity.budget=per_view"])
    summary = json.loads((tmp_path / "per_view" / "eval.json").read_text())
    assert summary["budget"] == "per_view" and summary["samples"] == 8
    records = [json.loads(line) for line in (tmp_path / "per_view" / "answers.jsonl").open()]
    for record in records:
        meta = record["metadata"]
        assert meta["budget"] == "per_view" and meta["image_tokens_fixed"] in (8, 12)  # one newline per stitched row
        # base view 16 -> 4; every 16-token crop (unpadding cuts none of these grids) -> 4
        crops = (meta["image_tokens"] - 16 - meta["image_tokens_fixed"]) // 16
        assert meta["image_tokens_kept"] == meta["image_tokens_fixed"] + 4 * (1 + crops)
    assert summary["vision_keep"] == pytest.approx(0.25)  # of the droppable tokens: newlines are not in the share
    assert len(list((tmp_path / "per_view" / "overlays").glob("*.png"))) == 2
    # the checkpoint has no trained convention but the default: null means global
    _run(tmp_path / "global", common)
    assert json.loads((tmp_path / "global" / "eval.json").read_text())["budget"] == "global"
    # continuing the per_view run under the other convention would mix budgets: refused
    with pytest.raises(ValueError, match="budget=per_view"):
        _run(tmp_path / "per_view", [*common, "resume=true", f"hydra.run.dir={tmp_path / 'per_view'}"])
