"""LLaVA instruction records (``llava_v1_5_mix665k.json`` schema): loading and per-record checks.

A record is ``{"id", "image": <path under the image root>, "conversations": [{"from", "value"}, ...]}``;
text-only records have no ``image``. :func:`check_record` decides whether one record can become a
training sample and says why not, so the converter can reject bad records one by one instead of
failing (or, worse, training on a record whose image never reaches the model).

Images are validated with PIL (``verify`` for structure and checksums, then a full ``load`` for
truncated data) but never re-encoded: the shard stores the file's bytes under the file's extension.
"""

from __future__ import annotations

import codecs
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from dllava.data.conversation import IMAGE_PLACEHOLDER, normalize_conversations

# Tar extension keys an image may be stored under; the reader decodes any of them with PIL by content.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")

# Why a record was rejected (the ``reason`` field of rejected.jsonl and the manifest's histogram).
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
NO_IMAGE_TOKEN = "no_image_token"
IMAGE_TOKEN_WITHOUT_IMAGE = "image_token_without_image"
MALFORMED_CONVERSATION = "malformed_conversation"
MALFORMED_RECORD = "malformed_record"
TEXT_ONLY = "text_only"


class Rejected(Exception):
    """A record that cannot become a sample; ``reason`` is one of the codes above."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Malformed:
    """Stands in for a JSONL line that is not valid JSON, so it is rejected with the others, in order."""

    line: int
    error: str


@dataclass(frozen=True)
class CheckedRecord:
    """A record that passed: its image bytes and tar key (``None`` for a text-only record)."""

    record: dict[str, Any]
    image: bytes | None
    image_key: str | None


def read_records(path: str | Path) -> tuple[list[Any], bytes]:
    """All records of a LLaVA JSON list or a JSONL file, and the file's bytes (for fingerprinting).

    A JSONL line that does not parse (bad JSON, or bytes that are not UTF-8) becomes a :class:`Malformed`
    entry in its place, numbered by its physical line; a JSON list that does not parse, or is not
    UTF-8, is a fatal error naming the file (there are no record boundaries to recover).
    """
    data = Path(path).read_bytes()
    head = data.removeprefix(codecs.BOM_UTF8).lstrip()[:1]
    if head == b"[":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path}: not valid UTF-8 at byte {err.start} ({err.reason}); a LLaVA JSON file must be UTF-8: "
                "re-encode it (e.g. iconv -t UTF-8), or give one record per line (JSONL) so that only bad lines are rejected"
            ) from None
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(records, list):  # pragma: no cover - "[" always opens a list
            raise ValueError(f"{path}: expected a JSON list of records")
        return records, data
    records: list[Any] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8-sig")))  # -sig: a leading byte-order mark
        except UnicodeDecodeError as err:
            records.append(Malformed(number, f"not valid UTF-8 at byte {err.start} of the line: {err.reason}"))
        except json.JSONDecodeError as err:
            records.append(Malformed(number, str(err)))
    return records, data


def check_record(record: Any, image_root: str | Path, requires_image: bool = False) -> CheckedRecord:
    """Validate one record and read its image; raises :class:`Rejected` with the reason."""
    if isinstance(record, Malformed):
        raise Rejected(MALFORMED_RECORD, f"line {record.line} is not JSON ({record.error})")
    if not isinstance(record, dict):
        raise Rejected(MALFORMED_RECORD, f"expected an object, got {type(record).__name__}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list):
        raise Rejected(MALFORMED_CONVERSATION, "no 'conversations' list")
    try:
        turns = normalize_conversations(conversations)
    except ValueError as err:
        raise Rejected(MALFORMED_CONVERSATION, str(err)) from None
    if turns[-1][0] != "ASSISTANT":
        raise Rejected(MALFORMED_CONVERSATION, "the last turn is not an answer")
    has_token = any(IMAGE_PLACEHOLDER in text for _, text in turns)
    image = record.get("image")
    if image is None:
        if requires_image:
            raise Rejected(TEXT_ONLY, "text-only record dropped (--requires-image)")
        if has_token:
            raise Rejected(IMAGE_TOKEN_WITHOUT_IMAGE, f"{IMAGE_PLACEHOLDER} in the conversation but no 'image'")
        return CheckedRecord(record, None, None)
    if not isinstance(image, str) or not image:
        raise Rejected(MALFORMED_RECORD, f"'image' must be a relative path, got {image!r}")
    if not has_token:
        raise Rejected(NO_IMAGE_TOKEN, f"record has image {image!r} but no {IMAGE_PLACEHOLDER} in its conversation")
    path = Path(image_root) / image
    key = path.suffix.lower().lstrip(".")
    if key not in IMAGE_KEYS:
        raise Rejected(UNREADABLE_IMAGE, f"{image}: unsupported extension (expected one of {IMAGE_KEYS})")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Rejected(MISSING_IMAGE, f"{path} does not exist") from None
    except OSError as err:
        raise Rejected(MISSING_IMAGE, f"{path}: {err}") from None
    check_image_bytes(data, str(path))
    return CheckedRecord(record, data, key)


class UnreadableImage(ValueError):
    """An image member PIL cannot read; its message is already stable (see :func:`image_error`)."""


def image_error(err: Exception) -> str:
    """A stable, readable description of a PIL failure: PIL's "cannot identify image file" message
    embeds the repr of the in-memory file (``<_io.BytesIO object at 0x...>``), which changes from run to
    run, so it is replaced by a fixed text; other PIL messages carry no addresses."""
    if isinstance(err, UnidentifiedImageError):
        return "cannot identify image file (not an image format PIL reads)"
    if isinstance(err, UnreadableImage):
        return str(err)
    return f"{type(err).__name__}: {err}"


def check_image_bytes(data: bytes, name: str) -> None:
    """Raise :class:`Rejected` unless PIL can open, verify and fully decode ``data`` (``name``: the
    image's path, for the reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.verify()  # structure and checksums (PNG CRCs); cheap
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # decodes every pixel: catches truncated JPEG data that verify() passes
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise Rejected(UNREADABLE_IMAGE, f"{name}: {image_error(err)}") from None
