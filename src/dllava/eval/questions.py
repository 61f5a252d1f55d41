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

Items stream in order; a source can be iterated again (each pass re-reads it). Bad questions never stop
a pass: each is skipped and listed in the source's ``skipped`` (file and line, or shard and key, with a
reason code below and a detail); ``eval.py`` writes the list to ``skipped.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from PIL import Image

from dllava.data.conversation import ImageSpanTruncated
from dllava.data.datamodule import SamplePreprocessor, collate_pixels, decode_sample, resolve_urls
from dllava.data.reader import TextOnlySample, shard_samples
from dllava.data.records import image_error


# Why a question was skipped: the ``reason`` of skipped.jsonl and the keys of eval.json's skipped_reasons.
NOT_UTF8 = "not_utf8"
NOT_JSON = "not_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
DUPLICATE_ID = "duplicate_question_id"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
NO_IMAGE = "no_image"
TOO_LONG = "too_long"
CORRUPT_SAMPLE = "corrupt_sample"
BROKEN_SHARD = "broken_shard"


PIXEL_EXTRAS = ("image_grid_thw", "image_sizes")  # pixel inputs beside pixel_values, by family


@dataclass
class Question:
    """One question, ready for the model."""

    question_id: Any
    prompt: str  # the question text as asked (LLaVA's answer-file "prompt")
    prompt_ids: list[int]  # full generation prompt: system, earlier rounds, <image> tokens, question, "ASSISTANT:"
    pixel_values: torch.Tensor  # LLaVA: (3, H, W) CLIP-normalised; Qwen: (patches, C*T*P*P) flattened
    reference: str | list[str] | None = None
    kind: str = "all"
    evidence: list[int] | None = None  # image tokens (patches) that show an object, when the record says
    objects: list[list[int]] | None = None  # per object, the image tokens its box covers (:func:`object_tokens`)
    image_grid_thw: torch.Tensor | None = None  # (1, 3) for families with dynamic resolution (Qwen)
    grid: Any = None  # how this image's keep row is drawn: (rows, cols) of its tokens, or the family's PanelGrid
    image_sizes: torch.Tensor | None = None  # (2,) (height, width) for anyres families (LLaVA-NeXT/OneVision)
    scene: list[dict[str, Any]] | None = None  # the synthetic task's objects, when the record has them

    @property
    def pixels(self) -> dict[str, torch.Tensor]:
        """The model's pixel inputs for this one image."""
        found = {"pixel_values": self.pixel_values}
        for key in PIXEL_EXTRAS:
            if getattr(self, key) is not None:
                found[key] = getattr(self, key)
        return found


def object_patches(
    scene: Sequence[dict[str, Any]], image_size: tuple[int, int], grid: int | tuple[int, int], square: bool = True
) -> list[int]:
    """Row-major token indices under the centres of a scene's object boxes (``[x0, y0, x1, y1]`` in image
    pixels; the synthetic task's ``scene``) on a ``grid`` of (rows, cols) tokens (an int: square): with
    ``square`` the grid covers the square the image is padded to (as
    :func:`~dllava.data.datamodule.expand_to_square` centres it, LLaVA), else the image itself (Qwen,
    whose processor keeps the aspect ratio)."""
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    width, height = image_size
    if square:
        side = max(width, height)
        dx, dy, width, height = (side - width) / 2, (side - height) / 2, side, side
    else:
        dx = dy = 0.0
    patches = []
    for obj in scene:
        x0, y0, x1, y1 = obj["box"]
        col = min(cols - 1, int(((x0 + x1) / 2 + dx) * cols / width))
        row = min(rows - 1, int(((y0 + y1) / 2 + dy) * rows / height))
        patches.append(row * cols + col)
    return sorted(set(patches))


def object_tokens(
    scene: Sequence[dict[str, Any]], image_size: tuple[int, int], grid: int | tuple[int, int], square: bool = True
) -> list[list[int]]:
    """Per object of a scene, the row-major tokens its box covers (geometry as :func:`object_patches`): a
    token counts when the box overlaps at least a quarter of its width and a quarter of its height, so an
    object drawn inside one patch has one token and one filling a cell of 2 x 2 patches has four. What
    ``objects_seen`` reads: an object is seen when any of its tokens survives."""
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    width, height = image_size
    dx = dy = 0.0
    if square:
        side = max(width, height)
        dx, dy, width, height = (side - width) / 2, (side - height) / 2, side, side
    cell_w, cell_h = width / cols, height / rows
    found = []
    for obj in scene:
        x0, y0, x1, y1 = obj["box"]
        x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
        tokens = []
        for row in range(rows):
            overlap_h = min(y1, (row + 1) * cell_h) - max(y0, row * cell_h)
            if overlap_h < cell_h / 4:
                continue
            for col in range(cols):
                if min(x1, (col + 1) * cell_w) - max(x0, col * cell_w) >= cell_w / 4:
                    tokens.append(row * cols + col)
        found.append(tokens or [object_patches([obj], image_size, grid, square)[0]])  # a tiny object: its centre's
    return found


class BadQuestion(Exception):
    """A question that cannot be asked; ``reason`` is one of the codes above, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def question_key(question_id: Any) -> str:
    """A question id as a comparable key: its JSON text, so ``1`` and ``"1"`` stay distinct (as they are
    to LLaVA's scorers) and an id read back from an answer file matches the question's."""
    return json.dumps(question_id)


def check_question_id(question_id: Any, field: str = "question_id") -> None:
    """An id must be an int or a string: what answer files and LLaVA's converters key their dicts by."""
    if isinstance(question_id, bool) or not isinstance(question_id, (int, str)):
        raise BadQuestion(WRONG_TYPE, f"{field} must be an int or a string, got {_show(question_id)}")


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


class _Pass:
    """Bookkeeping of one pass over a source: the skipped questions and the ids handed out so far.

    Duplicates: the first record with a ``question_id`` keeps it (whatever became of it, even if its
    image turns out missing); every later record with the same id is skipped as
    ``duplicate_question_id``, naming where the first one was. One answer per id is what answer
    files, LLaVA's scorers and a continued run (``resume=true``) rely on.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.skipped: list[dict[str, Any]] = []
        self.first: dict[str, str] = {}

    def claim(self, question_id: Any, where: str) -> None:
        key = question_key(question_id)
        if key in self.first:
            raise BadQuestion(DUPLICATE_ID, f"question_id {question_id!r} already used at {self.first[key]}; the first is kept")
        self.first[key] = where

    def skip(self, source: str, place: dict[str, Any], question_id: Any, bad: BadQuestion) -> None:
        self.skipped.append({"source": source, **place, "question_id": question_id, "reason": bad.reason, "detail": bad.detail})


class ShardQuestions:
    """Final questions of the records in webdataset shards, in shard order.

    A sample that cannot be decoded or asked (corrupt JSON or image, no image, prompt too long, an id
    of the wrong type or used before) is skipped and listed in ``skipped`` (shard and key, reason);
    a shard that breaks off (truncated, not a tar) is listed once with the last key read, its
    remaining samples lost. ``skipped`` is rebuilt by every pass.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        processor: Any,
        answer_kinds: Sequence[str] | None = None,
        limit: int | None = None,
        max_length: int | None = None,
        adapter: Any = None,
    ) -> None:
        self.urls = resolve_urls(urls, "data.shards")
        self.answer_kinds = None if answer_kinds is None else set(answer_kinds)
        self.limit = limit
        self.preprocess = make_preprocessor(processor, max_length, adapter)
        self.skipped: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[Question]:
        state = _Pass("data.shards")
        self.skipped = state.skipped
        count = 0
        for url in self.urls:
            for raw in self._samples(url, state):
                if self.limit is not None and count >= self.limit:
                    return
                key = raw.get("__key__")
                question_id = None
                try:
                    sample = _decode(raw)
                    record = sample["record"]
                    if not self._wanted(record):
                        continue
                    question_id = record.get("id", sample["key"])
                    check_question_id(question_id, "the record's id")
                    state.claim(question_id, f"{url} key {key}")
                    question = self._question(sample)
                except BadQuestion as bad:
                    state.skip(url, {"key": key}, question_id, bad)
                    continue
                count += 1
                yield question

    @staticmethod
    def _samples(url: str, state: _Pass) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard; a shard that cannot be read or breaks off is listed, not fatal."""
        key = None
        try:
            for raw in shard_samples(url):
                key = raw.get("__key__")
                yield raw
        except Exception as err:  # tarfile, gzip and I/O errors: the rest of this shard is lost
            after = f"after key {key}" if key is not None else "before its first sample"
            bad = BadQuestion(BROKEN_SHARD, f"shard unreadable {after} ({type(err).__name__}: {err}); its remaining samples are lost")
            state.skip(url, {"key": key}, None, bad)

    def _wanted(self, record: dict[str, Any]) -> bool:
        kinds = record.get("kinds") or ["all"]
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise BadQuestion(WRONG_TYPE, f"'kinds' must be a list of strings, got {_show(kinds)}")
        return self.answer_kinds is None or kinds[-1] in self.answer_kinds

    def _question(self, sample: dict[str, Any]) -> Question:
        try:
            item = self.preprocess(sample)
        except TextOnlySample as err:
            raise BadQuestion(NO_IMAGE, str(err)) from None
        except ImageSpanTruncated as err:
            raise BadQuestion(TOO_LONG, f"{err} (data.max_length)") from None
        except Exception as err:  # a record the conversation template cannot render
            raise BadQuestion(CORRUPT_SAMPLE, f"{type(err).__name__}: {err}") from None
        scene = sample["record"].get("scene")
        pixels = {k: item[k] for k in ("pixel_values", *PIXEL_EXTRAS) if k in item}
        grid = self.preprocess.token_grid(pixels)
        try:
            square = self.preprocess.pads_to_square
            evidence = object_patches(scene, sample["image"].size, grid, square) if scene else None
            objects = object_tokens(scene, sample["image"].size, grid, square) if scene else None
        except Exception as err:
            raise BadQuestion(CORRUPT_SAMPLE, f"bad 'scene' ({type(err).__name__}: {err})") from None
        return Question(
            question_id=item["id"],
            prompt=item["question"],
            prompt_ids=item["prompt_ids"],
            reference=item["answer"],
            kind=item["kind"],
            evidence=evidence,
            objects=objects,
            scene=scene,
            grid=self.preprocess.picture_grid(pixels),
            **pixels,
        )


def _decode(raw: dict[str, Any]) -> dict[str, Any]:
    """:func:`decode_sample`, with any failure (no or bad JSON, an image PIL cannot read) a :class:`BadQuestion`."""
    try:
        sample = decode_sample(raw)
    except Exception as err:  # json, UnicodeDecodeError, PIL's many types
        raise BadQuestion(CORRUPT_SAMPLE, image_error(err)) from None
    if not isinstance(sample["record"], dict):
        raise BadQuestion(CORRUPT_SAMPLE, f"the json member is not an object but {type(sample['record']).__name__}")
    return sample


class QuestionFile:
    """A LLaVA question JSONL (``question_id``, ``image``, ``text``) with its image folder.

    A line that cannot be asked (not UTF-8, not JSON, not an object, a field missing or of the wrong
    type, a duplicate ``question_id``, an image that is missing or unreadable, a prompt too long) is
    skipped and listed in ``skipped`` with its 1-based physical line number (blank lines counted);
    ``skipped`` is rebuilt by every pass. ``data.limit`` counts the questions asked, not the lines.
    """

    def __init__(
        self,
        path: str | Path,
        image_folder: str | Path | None,
        processor: Any,
        limit: int | None = None,
        max_length: int | None = None,
        adapter: Any = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data.questions={str(path)!r} does not exist")
        self.image_folder = Path(image_folder) if image_folder else self.path.parent
        self.limit = limit
        self.tokenizer = processor.tokenizer
        self.max_length = max_length or self.tokenizer.model_max_length
        self.preprocess = make_preprocessor(processor, self.max_length, adapter)
        self.skipped: list[dict[str, Any]] = []

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """Non-blank lines with their 1-based physical line numbers (JSONL lines end at ``\\n`` only)."""
        with self.path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, line

    def __iter__(self) -> Iterator[Question]:
        state = _Pass(str(self.path))
        self.skipped = state.skipped
        count = 0
        for number, line in self.lines():
            if self.limit is not None and count >= self.limit:
                return
            question_id = None
            try:
                record = parse_question_line(line)
                question_id = record.get("question_id")
                check_question_record(record)
                state.claim(question_id, f"line {number}")
                question = self._question(record)
            except BadQuestion as bad:
                state.skip(str(self.path), {"line": number}, question_id, bad)
                continue
            count += 1
            yield question

    def _question(self, record: dict[str, Any]) -> Question:
        image = load_image(self.image_folder / record["image"])
        return image_question(
            self.preprocess, record["question_id"], image, record["text"],
            reference=record.get("answers", record.get("answer")), kind=str(record.get("category", "all")),
        )


def image_question(
    preprocess: SamplePreprocessor, question_id: Any, image: Image.Image, text: str,
    reference: str | list[str] | None = None, kind: str = "all",
) -> Question:
    """One question about one image, asked as LLaVA's ``model_vqa_loader.py`` asks a question-file line:
    one human turn ``<image>\\n<text>`` (``text`` as is when it already holds ``<image>``), in the family's
    chat template, ending where the answer starts. :class:`BadQuestion` (``too_long``) when the prompt
    does not fit ``max_length``."""
    value = text if "<image>" in text else f"<image>\n{text}"
    turns = [{"from": "human", "value": value}]
    pixels = preprocess.pixel_inputs(image)
    try:
        ids = preprocess.encode(turns, preprocess.image_tokens(pixels), for_generation=True)
    except ImageSpanTruncated as err:
        raise BadQuestion(TOO_LONG, f"{err} (max_length)") from None
    return Question(
        question_id=question_id,
        prompt=text,
        prompt_ids=ids.input_ids,
        reference=reference,
        kind=kind,
        grid=preprocess.picture_grid(pixels),
        **pixels,
    )


def parse_question_line(line: bytes) -> dict[str, Any]:
    """One question-file line -> its JSON object, or :class:`BadQuestion` (not UTF-8, not JSON, not an object)."""
    try:
        text = line.decode("utf-8-sig")  # -sig: a byte-order mark on the first line
    except UnicodeDecodeError as err:
        raise BadQuestion(NOT_UTF8, f"not valid UTF-8 at byte {err.start} of the line ({err.reason})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadQuestion(NOT_JSON, f"not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise BadQuestion(NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}")
    return record


def check_question_record(record: dict[str, Any]) -> None:
    """Fields present and typed as asking and scoring use them, else :class:`BadQuestion`."""
    missing = [k for k in ("question_id", "image", "text") if k not in record]
    if missing:
        raise BadQuestion(MISSING_FIELD, f"question record lacks {missing}")
    check_question_id(record["question_id"])
    for key in ("image", "text"):
        if not isinstance(record[key], str):
            raise BadQuestion(WRONG_TYPE, f"{key} must be a string, got {_show(record[key])}")
    if not record["image"]:
        raise BadQuestion(WRONG_TYPE, "image must name a file, got an empty string")
    if "answer" in record and not isinstance(record["answer"], str):
        raise BadQuestion(WRONG_TYPE, f"answer must be a string, got {_show(record['answer'])}")
    answers = record.get("answers")
    if "answers" in record and not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
        raise BadQuestion(WRONG_TYPE, f"answers must be a non-empty list of strings, got {_show(answers)}")


def load_image(path: Path) -> Image.Image:
    """The image at ``path`` as RGB, or :class:`BadQuestion` (missing, or not an image PIL can decode)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here
    except FileNotFoundError:
        raise BadQuestion(MISSING_IMAGE, f"{path} not found (data.image_folder)") from None
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise BadQuestion(UNREADABLE_IMAGE, f"{path}: {image_error(err)}") from None


def write_skipped(path: str | Path, skipped: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Write the skip list as JSONL (one record per skipped question; empty file when none); returns
    the count per reason."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for entry in skipped:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return skip_counts(skipped)


def skip_counts(skipped: Sequence[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in skipped:
        counts[entry["reason"]] = counts.get(entry["reason"], 0) + 1
    return dict(sorted(counts.items()))


def describe_skipped(skipped: Sequence[dict[str, Any]]) -> str:
    """One line for a log: how many, why, and the first one."""
    if not skipped:
        return "no question skipped"
    reasons = ", ".join(f"{n} {reason}" for reason, n in skip_counts(skipped).items())
    first = skipped[0]
    where = f"line {first['line']}" if "line" in first else f"key {first['key']}"
    return f"{len(skipped)} question(s) skipped ({reasons}); first: {first['source']} {where}: {first['detail']}"


def make_preprocessor(processor: Any, max_length: int | None, adapter: Any = None) -> SamplePreprocessor:
    """The family's sample preprocessor (``adapter``: the model's family; default LLaVA-1.5)."""
    if adapter is None:
        from dllava.families import adapter_for

        adapter = adapter_for("llava")
    return adapter.sample_preprocessor(processor, max_length or processor.tokenizer.model_max_length)


def question_source(data: dict[str, Any], processor: Any, adapter: Any = None) -> Iterable[Question]:
    """The source ``data`` (the ``data`` node of conf/eval.yaml) names: a question file, else shards;
    preprocessed the way ``adapter``'s family (the model's) wants (default LLaVA-1.5)."""
    limit = data.get("limit")
    max_length = data.get("max_length")
    if data.get("questions"):
        return QuestionFile(data["questions"], data.get("image_folder"), processor, limit, max_length, adapter)
    if not data.get("shards"):
        raise ValueError("set data.shards (webdataset shards) or data.questions (a LLaVA question JSONL)")
    return ShardQuestions(data["shards"], processor, data.get("answer_kinds"), limit, max_length, adapter)


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
    """Left-padded prompt ids and mask (B, N) and the batch's ``pixel_values`` (LLaVA: (B, 3, H, W)); the
    other pixel inputs of a family (Qwen's ``image_grid_thw``) come from :func:`collate_questions`."""
    ids, mask, images = collate_questions(batch, pad_id)
    return ids, mask, images["pixel_values"]


def collate_questions(batch: Sequence[Question], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Left-padded prompt ids and mask (B, N) and the batch's pixel inputs
    (:func:`~dllava.data.datamodule.collate_pixels`: stacked (B, 3, H, W), or patches + grids)."""
    width = max(len(q.prompt_ids) for q in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, q in enumerate(batch):
        n = len(q.prompt_ids)
        ids[i, width - n :] = torch.tensor(q.prompt_ids)
        mask[i, width - n :] = 1
    return ids, mask, collate_pixels([q.pixels for q in batch])


def pixels_to(images: dict[str, torch.Tensor], device: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Pixel inputs on ``device``, the floating ones in the model's ``dtype`` (grids and sizes stay integer)."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in images.items()}
