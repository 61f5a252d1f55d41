"""The `dllava` lmms-eval model against eval.py on the same questions: lmms-eval's own evaluator drives it
(in process, and once through `python -m lmms_eval` and the package entry point)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.lmms.conftest import SHORT_KINDS, TASK

ROOT = Path(__file__).resolve().parents[2]
TINY_BASE = ROOT / "data" / "tiny_base"


def run_task(lm, task_dir: Path, limit: int | None = None) -> tuple[dict, list[dict]]:
    """lmms-eval's simple_evaluate of the task on ``lm``: (its scores, its logged samples)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    results = simple_evaluate(model=lm, tasks=[TASK], task_manager=manager, log_samples=True, limit=limit)
    return results["results"][TASK], results["samples"][TASK]


def eval_answers(loaded, synthetic_dir: Path, arm, batch_size: int = 8, only: set[str] | None = None) -> dict[str, dict]:
    """eval.py's answer records on the fixture's test split (its shards, its question builder), by id
    (``only``: just these questions)."""
    from dllava.eval.questions import ShardQuestions
    from dllava.eval.runner import evaluate_arm

    questions = ShardQuestions(str(synthetic_dir / "test-*.tar"), loaded.processor, SHORT_KINDS, adapter=loaded.model.adapter)
    if only is not None:
        questions = [q for q in questions if q.question_id in only]
    result = evaluate_arm(loaded, questions, arm, batch_size=batch_size, max_new_tokens=8, warmup=False, progress=False)
    return {r["question_id"]: r for r in result.records}


def doc_ids(task_dir: Path) -> list[str]:
    """The question id of each document, by doc_id (the samples file on disk leaves the docs out)."""
    return [json.loads(line)["question_id"] for line in (task_dir / TASK / f"{TASK}.jsonl").read_text().splitlines()]


def assert_same_as_eval(scores: dict, samples: list[dict], answers: dict[str, dict], task_dir: Path) -> float:
    """Every document's answer and costs are eval.py's for that question; so are both accuracies."""
    assert len(samples) >= 5
    ids = doc_ids(task_dir)
    correct = []
    for sample in samples:
        record = answers[ids[sample["doc_id"]]]
        answer = sample["filtered_resps"]  # a list in memory, its one string in the samples file
        assert (answer[0] if isinstance(answer, list) else answer) == record["text"]
        counts, meta = sample["token_counts"][0], record["metadata"]
        for key in ("image_tokens", "image_tokens_kept", "prefill_flops", "kv_bytes", "text_tokens_kept"):
            assert counts[key] == meta[key], key
        correct.append(meta["correct"])
    accuracy = sum(correct) / len(correct)
    assert scores["exact_match,none"] == pytest.approx(accuracy, abs=1e-12)
    return accuracy


@pytest.mark.parametrize("method, keep", [("dense", None), ("fastv", 0.2)])
def test_trained_tiny_base_scores_in_lmms_eval_what_eval_py_scores(method, keep, task_dir, synthetic_dir):
    """The committed (trained) tiny LLaVA: accuracy well above chance, identical answers on both sides
    (lmms-eval batches 3 at a time, eval.py 8: batching changes nothing)."""
    from dllava.eval.loading import load_for_eval
    from dllava.lmms.model import DllavaLMM

    lm = DllavaLMM(pretrained=str(TINY_BASE), method=method, keep=keep, batch_size=3)
    scores, samples = run_task(lm, task_dir)
    answers = eval_answers(load_for_eval(TINY_BASE, "cpu"), synthetic_dir, lm.arm, only=set(doc_ids(task_dir)))
    accuracy = assert_same_as_eval(scores, samples, answers, task_dir)
    assert accuracy > 0.5  # a trained model, not noise: equal accuracies mean something here
    if method == "fastv":
        assert {s["token_counts"][0]["image_tokens_kept"] for s in samples} == {int(64 * 0.2)}


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision"])
def test_a_stock_hf_checkpoint_of_every_family_answers_as_in_eval_py(family, task_dir, synthetic_dir, tmp_path):
    """A stock HF directory (the family's own config class, save_pretrained, no predictors) evaluated dense
    and with FastV: lmms-eval's answers are eval.py's, question by question."""
    from dllava.eval.loading import load_for_eval
    from dllava.lmms.model import DllavaLMM
    from tests.families.conftest import _save

    path = _save(family, tmp_path / family)
    loaded = load_for_eval(path, "cpu")
    for method, keep in (("dense", None), ("fastv", 0.5)):
        lm = DllavaLMM(loaded=loaded, method=method, keep=keep, batch_size=4)
        scores, samples = run_task(lm, task_dir, limit=6)
        answers = eval_answers(loaded, synthetic_dir, lm.arm, only=set(doc_ids(task_dir)[:6]))
        assert_same_as_eval(scores, samples, answers, task_dir)


def test_method_defaults_to_the_checkpoints_own_sparsifier(dynamic_dir):
    from dllava.lmms.model import DllavaLMM

    learned = DllavaLMM(pretrained=str(dynamic_dir))
    assert (learned.arm.method, learned.arm.keep, learned.arm.text) == ("dynamic", 0.25, "learned")
    assert DllavaLMM(pretrained=str(TINY_BASE)).arm.method == "dense"


@pytest.mark.slow
def test_the_lmms_eval_command_finds_dllava_by_its_entry_point(dynamic_dir, task_dir, synthetic_dir, tmp_path):
    """`python -m lmms_eval --model dllava ...` in a fresh process (the entry point, --model_args parsing,
    results.json and the samples log with the sparsifier's counts), equal to eval.py's answers."""
    from dllava.eval.loading import load_for_eval
    from dllava.eval.runner import arm_for

    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "dllava",
        # as the README writes it: batch size and device in --model_args, which win over the CLI's flags
        "--model_args", f"pretrained={dynamic_dir},method=dynamic,keep=0.2,text=off,batch_size=4,device=cpu",
        "--device", "cpu", "--tasks", TASK, "--include_path", str(task_dir), "--output_path", str(out),
        "--log_samples", "--verbosity", "DEBUG",  # DEBUG: an evaluation error fails the command (else exit 0)
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(next(out.rglob("*results.json")).read_text())
    samples = [json.loads(line) for line in next(out.rglob(f"*samples_{TASK}.jsonl")).read_text().splitlines()]
    loaded = load_for_eval(dynamic_dir, "cpu")
    answers = eval_answers(loaded, synthetic_dir, arm_for(loaded.model, "dynamic", 0.2, "off"), only=set(doc_ids(task_dir)))
    assert_same_as_eval(results["results"][TASK], samples, answers, task_dir)
    assert all(s["token_counts"][0]["method"] == "dynamic" for s in samples)


# -- loglikelihood -------------------------------------------------------------------------------------
def _requests(kind: str, items: list[tuple[str, str]], image) -> list:
    from lmms_eval.api.instance import Instance

    return [
        Instance(request_type=kind, arguments=(context, target, lambda doc: [doc["image"]], i, "t", "test"),
                 idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1, "split": "test"})
        for i, (context, target) in enumerate(items)
    ]


@pytest.fixture(scope="module")
def scene():
    """A synthetic image and questions about it with their right answers."""
    from dllava.data.synthetic import make_record

    record, image = make_record("test", 3, seed=0)
    return record, image


def test_loglikelihood_of_dense_is_hf_forwards_own_loss(scene):
    """Dense: the value is HF's own loss over the continuation (the stock LlavaForConditionalGeneration's
    forward over prompt + continuation, mean over its tokens, as lmms-eval's models report it), and
    greedy says whether argmax agrees."""
    from transformers import LlavaForConditionalGeneration

    from dllava.lmms.model import DllavaLMM

    record, image = scene
    lm = DllavaLMM(pretrained=str(TINY_BASE), method="dense", batch_size=2)
    lm.task_dict = {"t": {"test": [{"image": image}] * 3}}
    question = record["conversations"][0]["value"].replace("<image>\n", "")
    items = [(question, " red"), (question, " blue circle ."), (question, record["conversations"][1]["value"])]
    ours = [r.text for r in lm.loglikelihood(_requests("loglikelihood", items, image))]
    hf = LlavaForConditionalGeneration.from_pretrained(TINY_BASE).eval()
    tokenizer = lm.loaded.processor.tokenizer
    for i, (context, target) in enumerate(items):
        prompt = lm._question(i, context, lambda doc: [image], i, "t", "test")
        ids = torch.tensor([prompt.prompt_ids + tokenizer(target, add_special_tokens=False).input_ids])
        n = len(tokenizer(target, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logits = hf(input_ids=ids, pixel_values=prompt.pixel_values[None]).logits[0].float()
        logp = logits[-n - 1 : -1].log_softmax(-1)
        wanted = ids[0, -n:]
        expected = -float(logp.gather(1, wanted[:, None]).mean())
        assert ours[i][0] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        assert ours[i][1] == bool((logp.argmax(-1) == wanted).all())


def test_loglikelihood_after_pruning_agrees_with_what_generation_answers(scene):
    """FastV at keep 0.2: the answer generate_until gives is greedy under loglikelihood, another is not."""
    from dllava.lmms.model import DllavaLMM

    record, image = scene
    lm = DllavaLMM(pretrained=str(TINY_BASE), method="fastv", keep=0.2)
    lm.task_dict = {"t": {"test": [{"image": image}] * 2}}
    question = record["conversations"][0]["value"].replace("<image>\n", "")
    gen = {"max_new_tokens": 8, "until": ["\n\n"], "do_sample": False}
    answer = lm.generate_until(_requests("generate_until", [(question, gen)], image))[0].text
    wrong = "seven" if answer != "seven" else "eight"
    scores = [r.text for r in lm.loglikelihood(_requests("loglikelihood", [(question, " " + answer), (question, " " + wrong)], image))]
    assert scores[0][1] is True and scores[1][1] is False
    assert scores[0][0] < scores[1][0]  # a loss: lower is likelier


# -- what the model refuses, and what it writes --------------------------------------------------------
def test_bad_settings_and_requests_are_refused_naming_the_problem(scene, tmp_path):
    from dllava.lmms.model import DllavaLMM

    record, image = scene
    with pytest.raises(ValueError, match="pivot_count is not a setting of method=dart"):
        DllavaLMM(pretrained=str(TINY_BASE), method="dart", keep=0.2, pivot_count=3)
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        DllavaLMM(pretrained=str(TINY_BASE), batch_size="auto")
    with pytest.raises(ValueError, match="needs a model with an image predictor"):
        DllavaLMM(pretrained=str(TINY_BASE), method="dynamic")
    lm = DllavaLMM(pretrained=str(TINY_BASE), method="dense")
    lm.task_dict = {"t": {"test": [{"image": image}, {"image": None}]}}
    question = record["conversations"][0]["value"]
    with pytest.raises(ValueError, match="decodes greedily.*temperature=0.7"):
        lm.generate_until(_requests("generate_until", [(question, {"do_sample": True, "temperature": 0.7})], image))
    two = _requests("generate_until", [(question, {"max_new_tokens": 2})], image)
    two[0].arguments = (question, {"max_new_tokens": 2}, lambda doc: [image, image], 0, "t", "test")
    with pytest.raises(ValueError, match=r"task 't' \(test\) doc 0: .*exactly one image, this one has 2"):
        lm.generate_until(two)
    none = _requests("generate_until", [(question, {}), (question, {})], image)
    with pytest.raises(ValueError, match="doc 1: .*exactly one image, this one has 0"):
        lm.generate_until(none)
    with pytest.raises(NotImplementedError, match="generate_until_multi_round are not supported"):
        lm.generate_until_multi_round([])


def test_stats_path_gets_one_line_per_request_and_until_cuts_the_answer(scene, tmp_path):
    from dllava.lmms.model import DllavaLMM, cut_at_stop

    record, image = scene
    stats = tmp_path / "stats.jsonl"
    lm = DllavaLMM(pretrained=str(TINY_BASE), method="random", keep=0.5, stats_path=str(stats))
    lm.task_dict = {"t": {"test": [{"image": image}] * 3}}
    question = record["conversations"][0]["value"].replace("<image>\n", "")
    outs = lm.generate_until(_requests("generate_until", [(question, {"max_new_tokens": 4})] * 3, image))
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    assert [line["doc_id"] for line in lines] == [0, 1, 2]
    assert all(line["image_tokens_kept"] == 32 and line["image_tokens"] == 64 for line in lines)
    assert [o.token_counts.to_dict() for o in outs] == [{k: v for k, v in line.items() if k not in ("task", "doc_id", "model_id")} for line in lines]
    assert cut_at_stop("red . blue", [" ."]) == "red" and cut_at_stop("red", ["\n\n"]) == "red"


def test_a_continuation_is_tokenised_as_it_follows_the_prompt_not_alone():
    """SentencePiece-style tokenizer (a space marker on every word start): "A" right after "ASSISTANT:"
    is not the "▁A" it is alone; joint tokenisation (what lmms-eval's own models do) gives the ids the
    model would see."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from dllava.lmms.model import continuation_ids

    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator(["USER: what is it ? ASSISTANT: A red circle . B blue square"] * 50,
                                vocab_size=80, special_tokens=["<s>", "</s>", "<unk>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trained, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    text = "USER: what is it ? ASSISTANT:"
    prompt = [tokenizer.bos_token_id, *tokenizer(text).input_ids]
    for continuation in ("A", " A red", " blue square ."):
        joint = tokenizer(text + continuation).input_ids[len(prompt) - 1 :]
        assert continuation_ids(tokenizer, prompt, continuation) == joint
    assert continuation_ids(tokenizer, prompt, "A") != tokenizer("A", add_special_tokens=False).input_ids


def test_requests_with_different_settings_come_back_in_order_each_as_if_alone(scene):
    from dllava.lmms.model import DllavaLMM

    record, image = scene
    lm = DllavaLMM(pretrained=str(TINY_BASE), method="fastv", keep=0.5, batch_size=2, progress=False)
    lm.task_dict = {"t": {"test": [{"image": image}] * 5}}
    questions = [turn["value"].replace("<image>\n", "") for turn in record["conversations"][::2]]
    items = [(questions[i % len(questions)], {"max_new_tokens": (1, 6)[i % 2], "until": ["\n\n"]}) for i in range(5)]
    together = [r.text for r in lm.generate_until(_requests("generate_until", items, image))]
    alone = [lm.generate_until(_requests("generate_until", [item], image))[0].text for item in items]
    assert together == alone
    assert [len(t.split()) <= 1 for t in together[::2]] == [True] * 3  # the 1-token requests stayed short


def test_multiple_choice_runs_through_lmms_evals_evaluator(task_dir, tmp_path):
    """A multiple_choice task (loglikelihood of every choice) end to end in lmms-eval: each choice's
    log-probability in lmms-eval's results is the model's own loglikelihood, and the trained model
    picks the right answer far above chance."""
    import shutil

    from dllava.data.synthetic import COLORS, COUNT_WORDS, SHAPES
    from dllava.lmms.model import DllavaLMM

    choices = [*COLORS, *SHAPES, *COUNT_WORDS, "yes", "no"]
    folder = tmp_path / "mc"
    folder.mkdir()
    docs = [json.loads(line) for line in (task_dir / TASK / f"{TASK}.jsonl").read_text().splitlines()]
    (folder / "docs.jsonl").write_text("".join(json.dumps({**d, "target": choices.index(d["answer"])}) + "\n" for d in docs))
    shutil.copy(task_dir / TASK / "utils.py", folder / "utils.py")
    (folder / "mc.yaml").write_text(
        "task: dllava_test_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: docs.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n"
        f"doc_to_choice: {json.dumps(choices)}\n"
        "doc_to_target: target\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n"
    )
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    lm = DllavaLMM(pretrained=str(TINY_BASE), method="fastv", keep=0.5, batch_size=16, progress=False)
    results = simple_evaluate(model=lm, tasks=["dllava_test_choice"], limit=8, log_samples=True,
                              task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    assert results["results"]["dllava_test_choice"]["acc,none"] >= 0.5  # chance: 1/17
    sample = results["samples"]["dllava_test_choice"][3]
    from tests.lmms.conftest import doc_image

    lm.task_dict["t"] = {"test": [{"image": doc_image(docs[sample["doc_id"]])}] * len(choices)}
    direct = [r.text for r in lm.loglikelihood(_requests("loglikelihood", [(sample["arguments"][0], " " + c) for c in choices], None))]
    logged = [tuple(r[0]) for r in sample["resps"]]
    assert [loss for loss, _ in logged] == pytest.approx([loss for loss, _ in direct], rel=1e-5)
    assert [greedy for _, greedy in logged] == [greedy for _, greedy in direct]
