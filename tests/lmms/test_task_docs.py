"""The dllava_synthetic_vqa task's documents, the committed docs file, and the built-in tasks the README
names (their generation settings are ones the dllava model accepts)."""

from __future__ import annotations

import base64
import json

import pytest

from tests.lmms.conftest import SHORT_KINDS, TASK

# every lmms-eval task the README's commands name
README_TASKS = ("gqa", "pope", "textvqa_val", "mme", "mmbench_en_dev", "docvqa_val", "chartqa", "ocrbench", "ai2d",
                "realworldqa", "mmstar")


def test_docs_are_the_single_round_short_questions_with_the_shards_own_image_bytes(synthetic_dir):
    from dllava.data.datamodule import resolve_urls
    from dllava.data.reader import shard_samples
    from dllava.lmms.task_docs import task_docs

    docs = {d["question_id"]: d for d in task_docs(str(synthetic_dir / "test-*.tar"))}
    seen = 0
    for url in resolve_urls(str(synthetic_dir / "test-*.tar")):
        for sample in shard_samples(url):
            record = json.loads(sample["json"])
            single_short = len(record["conversations"]) == 2 and record["kinds"][-1] in SHORT_KINDS
            assert (record["id"] in docs) == single_short
            if single_short:
                doc = docs[record["id"]]
                assert "<image>\n" + doc["question"] == record["conversations"][0]["value"]
                assert doc["answer"] == record["conversations"][1]["value"] and doc["kind"] == record["kinds"][-1]
                assert base64.b64decode(doc["image"]) == sample["jpg"]
                seen += 1
    assert seen == len(docs) > 5


def test_no_matching_record_is_refused(synthetic_dir, tmp_path):
    from dllava.lmms.task_docs import write_task_docs

    with pytest.raises(ValueError, match=r"no single-round record of kinds \['detail'\]"):
        write_task_docs(str(synthetic_dir / "test-*.tar"), tmp_path / "docs.jsonl", kinds=["detail"])
    assert not (tmp_path / "docs.jsonl").exists()


def test_the_committed_docs_are_the_default_tasks_test_split():
    """Each committed document is record `question_id` of the default generation (seed 0, the Hydra
    data config's kinds and suffix), its image the JPEG the generator writes for it."""
    from omegaconf import OmegaConf

    from dllava.data import synthetic
    from dllava.lmms import TASKS_DIR

    cfg = OmegaConf.load(TASKS_DIR.parents[3] / "conf" / "data" / "synthetic.yaml").synthetic
    options = {k: v for k, v in OmegaConf.to_container(cfg).items() if k in ("short_suffix",)}
    lines = (TASKS_DIR / TASK / f"{TASK}.jsonl").read_text().splitlines()
    assert len(lines) > 50
    for line in lines[:: max(1, len(lines) // 12)]:  # a dozen spread over the file (rendering is slow-ish)
        doc = json.loads(line)
        index = int(doc["question_id"].split("-")[1])
        record, image = synthetic.make_record("test", index, seed=cfg.seed, kinds=list(cfg.kinds), **options)
        assert record["conversations"] == [
            {"from": "human", "value": "<image>\n" + doc["question"]}, {"from": "gpt", "value": doc["answer"]}
        ]
        assert base64.b64decode(doc["image"]) == synthetic._jpeg(image)


def test_the_readme_tasks_ask_for_what_the_model_accepts():
    """Built-in tasks named in the README (their YAML only; the datasets are on the hub): each asks for
    generation, greedily, so DllavaLMM does not refuse it."""
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import load_yaml_config

    from dllava.lmms.model import greedy_length

    index = TaskManager().task_index
    for name in README_TASKS:
        config = load_yaml_config(index[name]["yaml_path"], mode="simple")
        assert config["output_type"] == "generate_until", name
        max_new_tokens, _ = greedy_length(dict(config.get("generation_kwargs") or {}), name)
        assert max_new_tokens >= 16, name
