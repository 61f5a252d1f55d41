"""LLaVA's answer-file format (JSONL), written by ``eval.py`` and checked by :func:`read_answer_file`.

One JSON object per line, in question-file order, as ``llava/eval/model_vqa_loader.py`` writes it::

    {"question_id": <as in the question file>, "prompt": <the question text>, "text": <the answer>,
     "answer_id": <unique id>, "model_id": <model name>, "metadata": {...}}

LLaVA's converters and scorers (``convert_vqav2_for_submission.py``, ``convert_gqa_for_eval.py``,
``eval_textvqa.py``, ``eval_pope.py``) read ``question_id``, ``text`` and ``prompt`` and rely on the order
for POPE. ``metadata`` is free-form there; ours records what the sparsifier did for that question
(kept image and generated tokens, KV bytes, prefill FLOPs), plus the reference answer when known.
``answer_id`` is a deterministic UUID of (model, question), so re-running an evaluation reproduces
the file byte for byte (LLaVA draws a random ``shortuuid``; nothing reads it).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

from dllava.utils.files import atomic_write_text

ANSWER_FIELDS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")
METADATA_FIELDS = ("method", "keep", "image_tokens", "image_tokens_kept", "text_tokens_fed", "text_tokens_kept")
_NAMESPACE = uuid.UUID("6f1c3e55-3b7d-4f53-9a53-0d1a5c2b8e11")


def answer_id(model_id: str, question_id: Any) -> str:
    """A stable unique id for one answer (hex, 32 characters)."""
    return uuid.uuid5(_NAMESPACE, f"{model_id}\x00{question_id!r}").hex


def answer_record(question_id: Any, prompt: str, text: str, model_id: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """One line of the answer file; ``text`` is stripped as LLaVA strips its decoded output."""
    return {
        "question_id": question_id,
        "prompt": prompt,
        "text": text.strip(),
        "answer_id": answer_id(model_id, question_id),
        "model_id": model_id,
        "metadata": metadata,
    }


def write_answer_file(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write the whole file at once: a temporary file beside it, then a rename, so a crash leaves the
    previous version (eval.py rewrites the appended file in question order at the end); the file gets the
    umask's permissions (:func:`dllava.utils.files.atomic_write`)."""
    return atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


class AnswerAppender:
    """Appends answers batch by batch, each batch flushed and synced before the next is computed, so an
    interrupted evaluation (a crash, Ctrl-C, a killed job) keeps every finished batch on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.path.open("a")

    def __call__(self, records: Sequence[dict[str, Any]]) -> None:
        self.handle.write("".join(json.dumps(record) + "\n" for record in records))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "AnswerAppender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_partial_answer_file(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The answers an interrupted evaluation left in ``path`` (a missing file: none), for continuing it.

    Returns ``(records, torn)``. A last line without its newline was cut off mid-write: it is
    truncated from the file (``torn`` is its length in bytes) and its question is answered again. A
    complete line that is not a valid answer is damage, not an interruption: :class:`AnswerFileError`.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    records = []
    for number, line in enumerate(data[:complete].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AnswerFileError(f"{path}:{number}: not JSON ({err}); move the file away to start over") from None
        records.append(check_answer_record(record, f"{path}:{number}"))
    torn = len(data) - complete
    if torn:
        os.truncate(path, complete)
    return records, torn


class AnswerFileError(ValueError):
    """An answer file that LLaVA's scripts would reject or misread."""


def check_answer_record(record: Any, where: str = "record") -> dict[str, Any]:
    """Raise :class:`AnswerFileError` unless ``record`` has every field of LLaVA's schema, typed as its
    scripts use them; return it."""
    if not isinstance(record, dict):
        raise AnswerFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ANSWER_FIELDS if k not in record]
    if missing:
        raise AnswerFileError(f"{where}: missing fields {missing}")
    qid = record["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise AnswerFileError(f"{where}: question_id must be an int or a string, got {qid!r}")
    for key in ("prompt", "text", "answer_id", "model_id"):
        if not isinstance(record[key], str):
            raise AnswerFileError(f"{where}: {key} must be a string, got {type(record[key]).__name__}")
    if not record["answer_id"] or not record["model_id"]:
        raise AnswerFileError(f"{where}: answer_id and model_id must not be empty")
    if not isinstance(record["metadata"], dict):
        raise AnswerFileError(f"{where}: metadata must be an object, got {type(record['metadata']).__name__}")
    return record


def read_answer_file(path: str | Path, questions: str | Path | None = None) -> list[dict[str, Any]]:
    """Read and check an answer file; with ``questions`` (a LLaVA question JSONL) also check that it
    answers exactly those questions, once each, in their order."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise AnswerFileError(f"{path}:{number}: not JSON ({err})") from None
        records.append(check_answer_record(record, f"{path}:{number}"))
    ids = [r["answer_id"] for r in records]
    if len(set(ids)) != len(ids):
        raise AnswerFileError(f"{path}: answer_id values are not unique")
    if questions is not None:
        expected = [json.loads(line)["question_id"] for line in Path(questions).read_text().splitlines() if line.strip()]
        found = [r["question_id"] for r in records]
        if found != expected:
            raise AnswerFileError(f"{path}: question ids differ from {questions} (count {len(found)} vs {len(expected)}, or order)")
    return records
