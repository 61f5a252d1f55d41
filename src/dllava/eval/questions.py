"""Questions to evaluate on: webdataset shards of LLaVA conversation records, or a LLaVA question file.

Both become :class:`Question` items with the generation prompt the model was trained on (the vicuna_v1
template, ``<image>`` at the front of the first turn, ending in ``ASSISTANT:``) and CLIP-preprocessed
pixels, built by the same :class:`~dllava.data.datamodule.SamplePreprocessor` as training and
validation use.

* **Shards** (``data.shards``): each record's final question is asked after its earlier rounds, and its
  final answer is the reference. ``data.answer_kinds`` keeps only records whose final kind is listed
  (the synthetic task's short answers; validation scores the same ones); null keeps every record.
  ``question_id`` is the record's ``id``. A record with a ``scene`` (the synthetic task's object boxes)
  also says which image tokens show an object (``Question.evidence``), so an evaluation can report how
  many of them each method keeps.
* **Question file** (``data.questions``, LLaVA's ``llava_*.jsonl``): one JSON object a line with
  ``question_id``, ``image`` (a path under ``data.image_folder``) and ``text`` (asked as
  ``<image>\\n<text>``, as ``model_vqa_loader.py`` does). An optional ``answer`` (string) or ``answers``
  (list of human answers) field is used as the reference for accuracy; without it only the answer
  file and the costs are produced.

Items stream in order; a source can be iterated again (each pass re-reads it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import webdataset as wds
from PIL import Image

from dllava.data.conversation import encode_conversation
from dllava.data.datamodule import SamplePreprocessor, count_image_tokens, decode_sample, resolve_urls


@dataclass
class Question:
    """One question, ready for the model."""

    question_id: Any
    prompt: str  # the question text as asked (LLaVA's answer-file "prompt")
    prompt_ids: list[int]  # full generation prompt: system, earlier rounds, <image> tokens, question, "ASSISTANT:"
    pixel_values: torch.Tensor  # (3, H, W) CLIP-normalised
    reference: str | list[str] | None = None
    kind: str = "all"
    evidence: list[int] | None = None  # image tokens (patches) that show an object, when the record says


def object_patches(scene: Sequence[dict[str, Any]], image_size: tuple[int, int], grid: int) -> list[int]:
    """Row-major patch indices under the centres of a scene's object boxes (``[x0, y0, x1, y1]`` in image
    pixels; the synthetic task's ``scene``), on the ``grid`` x ``grid`` patches of the square the image is
    padded to (as :func:`~dllava.data.datamodule.expand_to_square` centres it)."""
    width, height = image_size
    side = max(width, height)
    dx, dy = (side - width) / 2, (side - height) / 2
    patches = []
    for obj in scene:
        x0, y0, x1, y1 = obj["box"]
        col = min(grid - 1, int(((x0 + x1) / 2 + dx) * grid / side))
        row = min(grid - 1, int(((y0 + y1) / 2 + dy) * grid / side))
        patches.append(row * grid + col)
    return sorted(set(patches))


class ShardQuestions:
    """Final questions of the records in webdataset shards, in shard order."""

    def __init__(
        self,
        urls: str | Sequence[str],
        processor: Any,
        answer_kinds: Sequence[str] | None = None,
        limit: int | None = None,
        max_length: int | None = None,
    ) -> None:
        self.urls = resolve_urls(urls, "data.shards")
        self.answer_kinds = None if answer_kinds is None else set(answer_kinds)
        self.limit = limit
        n_image = count_image_tokens(processor)
        self.grid = math.isqrt(n_image)
        self.preprocess = SamplePreprocessor(processor, n_image, max_length or processor.tokenizer.model_max_length)

    def __iter__(self) -> Iterator[Question]:
        dataset = wds.WebDataset(self.urls, shardshuffle=False, empty_check=False, nodesplitter=None)
        count = 0
        for raw in dataset:
            if self.limit is not None and count >= self.limit:
                return
            sample = decode_sample(raw)
            kinds = sample["record"].get("kinds") or ["all"]
            if self.answer_kinds is not None and kinds[-1] not in self.answer_kinds:
                continue
            item = self.preprocess(sample)
            count += 1
            scene = sample["record"].get("scene")
            yield Question(
                question_id=item["id"],
                prompt=item["question"],
                prompt_ids=item["prompt_ids"],
                pixel_values=item["pixel_values"],
                reference=item["answer"],
                kind=item["kind"],
                evidence=object_patches(scene, sample["image"].size, self.grid) if scene else None,
            )


class QuestionFile:
    """A LLaVA question JSONL (``question_id``, ``image``, ``text``) with its image folder."""

    def __init__(
        self,
        path: str | Path,
        image_folder: str | Path | None,
        processor: Any,
        limit: int | None = None,
        max_length: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data.questions={str(path)!r} does not exist")
        self.image_folder = Path(image_folder) if image_folder else self.path.parent
        self.limit = limit
        self.tokenizer = processor.tokenizer
        self.num_image_tokens = count_image_tokens(processor)
        self.max_length = max_length or self.tokenizer.model_max_length
        self.preprocess = SamplePreprocessor(processor, self.num_image_tokens, self.max_length)

    def records(self) -> Iterator[dict[str, Any]]:
        with self.path.open() as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                missing = [k for k in ("question_id", "image", "text") if k not in record]
                if missing:
                    raise ValueError(f"{self.path}:{number}: question record lacks {missing}")
                yield record

    def __iter__(self) -> Iterator[Question]:
        for count, record in enumerate(self.records()):
            if self.limit is not None and count >= self.limit:
                return
            image_path = self.image_folder / record["image"]
            if not image_path.is_file():
                raise FileNotFoundError(f"question {record['question_id']!r}: image {image_path} not found (data.image_folder)")
            with Image.open(image_path) as image:
                image = image.convert("RGB")
            text = record["text"]
            turns = [{"from": "human", "value": f"<image>\n{text}"}]
            ids = encode_conversation(turns, self.tokenizer, self.num_image_tokens, for_generation=True, max_length=self.max_length)
            reference = record.get("answers", record.get("answer"))
            yield Question(
                question_id=record["question_id"],
                prompt=text,
                prompt_ids=ids.input_ids,
                pixel_values=self.preprocess.pixel_values(image),
                reference=reference,
                kind=str(record.get("category", "all")),
            )


def question_source(data: dict[str, Any], processor: Any) -> Iterable[Question]:
    """The source ``data`` (the ``data`` node of conf/eval.yaml) names: a question file, else shards."""
    limit = data.get("limit")
    max_length = data.get("max_length")
    if data.get("questions"):
        return QuestionFile(data["questions"], data.get("image_folder"), processor, limit, max_length)
    if not data.get("shards"):
        raise ValueError("set data.shards (webdataset shards) or data.questions (a LLaVA question JSONL)")
    return ShardQuestions(data["shards"], processor, data.get("answer_kinds"), limit, max_length)


def batches(questions: Iterable[Question], batch_size: int) -> Iterator[list[Question]]:
    if batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
    batch: list[Question] = []
    for question in questions:
        batch.append(question)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def collate_prompts(batch: Sequence[Question], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (B, N) and stacked pixels (B, 3, H, W)."""
    width = max(len(q.prompt_ids) for q in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, q in enumerate(batch):
        n = len(q.prompt_ids)
        ids[i, width - n :] = torch.tensor(q.prompt_ids)
        mask[i, width - n :] = 1
    return ids, mask, torch.stack([q.pixel_values for q in batch])
