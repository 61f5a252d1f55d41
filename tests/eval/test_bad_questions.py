"""eval.py survives bad input and interruptions: bad questions are skipped and listed (file and line, or
shard and key), the rest answered; answers reach the disk batch by batch; an interrupted run continues
(``resume=true``) to the same answers as an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import webdataset as wds

from dllava.eval.answers import AnswerFileError, read_answer_file, read_partial_answer_file
from dllava.eval.runner import NoQuestions
from tests.conftest import ROOT
from tests.eval.conftest import synthetic_question_lines
from tests.eval.test_eval_entry import _run


@pytest.fixture(scope="module")
def synthetic_questions(synthetic_dir, tmp_path_factory):
    """Eight questions of the synthetic test split: (image folder, JSONL lines as dicts with answers)."""
    folder = tmp_path_factory.mktemp("robust") / "images"
    return folder, synthetic_question_lines(synthetic_dir, folder, 8)


def _args(ckpt, questions, images, *more):
    return [f"ckpt_path={ckpt}", f"data.questions={questions}", f"data.image_folder={images}", "sparsity.keep=0.25",
            "data.batch_size=2", "generation.max_new_tokens=3", "overlays=0", *more]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bad_question_lines_are_skipped_and_listed_and_the_others_answered(tmp_path, dynamic_dir, synthetic_questions, caplog):
    images, good = synthetic_questions
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    (folder / "page.png").write_text("<!doctype html><html><body>404</body></html>")  # an HTML page saved as an image
    whole = (folder / "1.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    q = lambda qid, **kw: json.dumps({"question_id": qid, "image": "0.png", "text": "what color ?", **kw})  # noqa: E731
    lines = [
        json.dumps(good[0]),  # 1
        "",  # 2
        "   ",  # 3
        '{"question_id": 7, "image": "0.png", "text": "what',  # 4: cut off, not JSON
        json.dumps(good[1]),  # 5
        q(2, image="nope.png"),  # 6
        json.dumps({"question_id": 3, "image": "0.png"}),  # 7: no text
        q(4, image="page.png"),  # 8
        q(5, text=7),  # 9
        q(6, image=["0.png"]),  # 10
        q([1]),  # 11
        q(1000),  # 12: duplicate of line 1
        None,  # 13: not UTF-8
        "[1, 2]",  # 14
        q(9, image="cut.png"),  # 15: truncated PNG
        q(10, answer=["red"]),  # 16: answer not a string
        json.dumps(good[2]),  # 17
    ]
    raw = [b'{"question_id": 8, "image": "0.png", "text": "caf\xe9"}' if line is None else line.encode() for line in lines]
    path = tmp_path / "questions.jsonl"
    path.write_bytes(b"\n".join(raw) + b"\n")
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="eval"):
        metrics = _run(out, _args(dynamic_dir, path, folder))

    answers = read_answer_file(out / "answers.jsonl")
    assert [a["question_id"] for a in answers] == [1000, 1001, 1002]
    skipped = _jsonl(out / "skipped.jsonl")
    assert [(s["line"], s["question_id"], s["reason"]) for s in skipped] == [
        (4, None, "not_json"), (6, 2, "missing_image"), (7, 3, "missing_field"), (8, 4, "unreadable_image"),
        (9, 5, "wrong_type"), (10, 6, "wrong_type"), (11, [1], "wrong_type"), (12, 1000, "duplicate_question_id"),
        (13, None, "not_utf8"), (14, None, "not_an_object"), (15, 9, "unreadable_image"), (16, 10, "wrong_type"),
    ]
    assert all(s["source"] == str(path) and s["detail"] for s in skipped)
    by_line = {s["line"]: s["detail"] for s in skipped}
    assert by_line[8] == f"{folder / 'page.png'}: cannot identify image file (not an image format PIL reads)"
    assert "text must be a string, got int 7" in by_line[9] and "line 1" in by_line[12]
    assert str(folder / "nope.png") in by_line[6] and "['image']" not in by_line[7] and "'text'" in by_line[7]
    summary = json.loads((out / "eval.json").read_text())
    assert summary["samples"] == 3 and summary["skipped"] == 12
    assert summary["skipped_reasons"] == {
        "duplicate_question_id": 1, "missing_field": 1, "missing_image": 1, "not_an_object": 1, "not_json": 1,
        "not_utf8": 1, "unreadable_image": 2, "wrong_type": 4,
    }
    assert metrics["eval/skipped"] == 12 and metrics["eval/skipped_wrong_type"] == 4
    assert json.loads((out / "summary.json").read_text())["metrics"]["eval/skipped"] == 12
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("12 question(s) skipped" in m and f"{path} line 4" in m and "skipped.jsonl" in m for m in warning)


def test_nothing_answerable_fails_with_the_reasons_instead_of_an_empty_success(tmp_path, dynamic_dir, synthetic_questions):
    images, _ = synthetic_questions
    path = tmp_path / "questions.jsonl"
    path.write_text('{"question_id": 1, "image": "nope.png", "text": "q"}\n\nnot json\n')
    out = tmp_path / "run"
    with pytest.raises(NoQuestions, match=r"2 question\(s\) skipped \(1 missing_image, 1 not_json\); first: .* line 1"):
        _run(out, _args(dynamic_dir, path, images))
    assert [s["line"] for s in _jsonl(out / "skipped.jsonl")] == [1, 3]
    assert not (out / "eval.json").exists()


def _shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def test_corrupt_samples_in_eval_shards_are_skipped_with_shard_and_key(tmp_path, lightning_ckpt, synthetic_dir):
    source = str(synthetic_dir / "test-000000.tar")
    raws = [dict(r) for r in wds.WebDataset(source, shardshuffle=False, empty_check=False)][:8]
    members = [{k: v for k, v in r.items() if not k.startswith("__") or k == "__key__"} for r in raws]
    image_key = next(k for k in members[0] if k in ("png", "jpg"))
    members[1][image_key] = b"<html>not an image</html>"
    members[2]["json"] = b"{not json"
    del members[3][image_key]  # text-only: nothing to show the model
    members[4]["json"] = json.dumps({**json.loads(members[4]["json"]), "id": json.loads(members[0]["json"])["id"]}).encode()
    members[5]["json"] = json.dumps({**json.loads(members[5]["json"]), "id": [5]}).encode()
    first = tmp_path / "a-000000.tar"
    _shard(first, members[:6])
    whole = tmp_path / "whole.tar"  # the second shard breaks off inside its second sample's last member
    _shard(whole, members[6:8])
    with tarfile.open(whole) as tar:
        last = tar.getmembers()[-1]
        assert last.name.startswith(members[7]["__key__"])
        cut = last.offset_data + last.size // 2
    (tmp_path / "a-000001.tar").write_bytes(whole.read_bytes()[:cut])

    out = tmp_path / "run"
    _run(out, [f"ckpt_path={lightning_ckpt}", f"data.shards={tmp_path}/a-*.tar", "data.answer_kinds=null",
               "overlays=0", "generation.max_new_tokens=2"])
    keys = [m["__key__"] for m in members]
    ids = [json.loads(m["json"])["id"] if i != 2 else None for i, m in enumerate(members)]
    assert [a["question_id"] for a in read_answer_file(out / "answers.jsonl")] == [ids[0], ids[6]]
    skipped = _jsonl(out / "skipped.jsonl")
    assert [(s["source"], s["key"], s["question_id"], s["reason"]) for s in skipped] == [
        (str(first), keys[1], None, "corrupt_sample"),
        (str(first), keys[2], None, "corrupt_sample"),
        (str(first), keys[3], ids[3], "no_image"),
        (str(first), keys[4], ids[0], "duplicate_question_id"),
        (str(first), keys[5], [5], "wrong_type"),
        (str(tmp_path / "a-000001.tar"), keys[6], None, "broken_shard"),
    ]
    assert skipped[0]["detail"].endswith("member: cannot identify image file (not an image format PIL reads)")
    assert ids[5] == [5] and "after key" in skipped[-1]["detail"]
    summary = json.loads((out / "eval.json").read_text())
    assert summary["samples"] == 2 and summary["skipped"] == 6


def test_a_torn_last_answer_line_is_dropped_and_damage_elsewhere_refused(tmp_path):
    path = tmp_path / "answers.jsonl"
    good = {"question_id": 1, "prompt": "p", "text": "t", "answer_id": "a", "model_id": "m", "metadata": {}}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "question_id": 2})[:30])
    records, torn = read_partial_answer_file(path)
    assert records == [good] and torn == 30
    assert path.read_text() == json.dumps(good) + "\n"  # truncated: appending continues on a clean line
    path.write_text("{broken\n" + json.dumps(good) + "\n")
    with pytest.raises(AnswerFileError, match="answers.jsonl:1: not JSON"):
        read_partial_answer_file(path)
    assert read_partial_answer_file(tmp_path / "none.jsonl") == ([], 0)


def test_an_answer_file_is_never_overwritten_and_only_the_same_arm_continues(tmp_path, dynamic_dir, synthetic_questions):
    images, good = synthetic_questions
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in good[:3]))
    out = tmp_path / "run"
    _run(out, _args(dynamic_dir, path, images))
    before = (out / "answers.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="already holds answers: pass resume=true"):
        _run(out, _args(dynamic_dir, path, images))
    with pytest.raises(ValueError, match="method=dynamic keep=0.25 .* not of .*fastv@0.25"):
        _run(out, _args(dynamic_dir, path, images, "method=fastv", "resume=true"))
    assert (out / "answers.jsonl").read_bytes() == before
    _run(out, _args(dynamic_dir, path, images, "resume=true"))  # everything answered: nothing asked again
    summary = json.loads((out / "eval.json").read_text())
    assert (summary["samples"], summary["answered_earlier"], summary["latency_s"]) == (3, 3, None)
    assert (out / "answers.jsonl").read_bytes() == before


def _lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_interrupted_evaluation_keeps_its_answers_and_continues_to_the_uninterrupted_result(
    tmp_path, dynamic_dir, synthetic_questions
):
    images, good = synthetic_questions
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in good))
    reference = tmp_path / "reference"
    _run(reference, _args(dynamic_dir, path, folder))

    # question 5's image is a FIFO: reading it blocks once the first two batches (4 answers) are written
    (folder / "4.png").unlink()
    os.mkfifo(folder / "4.png")
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "eval.py"), *_args(dynamic_dir, path, folder), "progress=false",
           f"hydra.run.dir={run}"]
    # SIGINT as in a terminal: a suite started in the background of a non-interactive shell (`... &`)
    # ignores SIGINT, every child inherits that, and Python then installs no KeyboardInterrupt handler
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while _lines(run / "answers.jsonl") < 4 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        assert process.poll() is None, process.stdout.read()[-3000:]  # blocked on the FIFO, answers on disk
        process.send_signal(signal.SIGINT)  # Ctrl-C
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0, output[-3000:]
    kept = read_answer_file(run / "answers.jsonl")
    assert [a["question_id"] for a in kept] == [1000, 1001, 1002, 1003]  # every finished batch survived
    with (run / "answers.jsonl").open("a") as handle:  # and a crash in the middle of writing the next one
        handle.write(json.dumps(kept[0])[:40].replace("1000", "1004"))

    (folder / "4.png").unlink()
    shutil.copy(images / "4.png", folder / "4.png")
    metrics = _run(run, _args(dynamic_dir, path, folder, "resume=true"))
    assert (run / "answers.jsonl").read_bytes() == (reference / "answers.jsonl").read_bytes()
    done, ref = (json.loads((d / "eval.json").read_text()) for d in (run, reference))
    assert done["answered_earlier"] == 4 and ref["answered_earlier"] == 0 and done["samples"] == ref["samples"] == 8
    timing = {"latency_s", "seconds", "answered_earlier"}
    assert {k: v for k, v in done.items() if k not in timing} == {k: v for k, v in ref.items() if k not in timing}
    assert metrics["eval/samples"] == 8
