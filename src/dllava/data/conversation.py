"""LLaVA's vicuna_v1 conversation template, label masking and segment spans.

Pure functions over strings and a tokenizer, shared by every data path (synthetic shards, converted
LLaVA JSON, evaluation prompts) so the prompt a model is trained on is the prompt it is asked with.

Layout of one multi-turn sample (LLaVA-1.5 ``conv_vicuna_v1``)::

    <s>SYSTEM USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>

Only assistant answers and their ``</s>`` are supervised. Labels come from character spans: the whole
prompt is tokenized once with offsets and a token is supervised when it starts inside an answer span.
That avoids LLaVA's per-round length arithmetic, which breaks ("tokenization mismatch") whenever a
tokenizer merges across round boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
_ROLES = {"human": USER_ROLE, "gpt": ASSISTANT_ROLE}


class ImageSpanTruncated(ValueError):
    """Truncation to ``max_length`` would cut the image span: the sample must be dropped, not cut."""


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids of one sample plus where its parts sit.

    ``image_span`` and ``answer_span`` are ``[start, end)`` token positions. ``answer_span`` is the
    final assistant turn including ``</s>`` (empty, ``(n, n)``, for a generation prompt).
    """

    input_ids: list[int]
    labels: list[int]
    image_span: tuple[int, int]
    answer_span: tuple[int, int]


def normalize_conversations(conversations: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """Validate LLaVA ``conversations`` and return ``(role, text)`` pairs.

    Turns must alternate human/gpt starting with human. At most one ``<image>`` is allowed and it is
    moved to the front of its turn as ``<image>\\n`` (LLaVA's ``preprocess_multimodal``).
    """
    if not conversations:
        raise ValueError("conversation is empty")
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        expected = "human" if i % 2 == 0 else "gpt"
        if speaker != expected:
            raise ValueError(f"conversation turn {i} must be from {expected!r}, got {speaker!r}")
        if not isinstance(value, str):
            raise ValueError(f"conversation turn {i} has no text 'value'")
        turns.append((_ROLES[speaker], value))
    if sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns) > 1:
        raise ValueError("only one <image> per conversation is supported")
    for i, (role, text) in enumerate(turns):
        if IMAGE_PLACEHOLDER in text:
            rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
            turns[i] = (role, f"{IMAGE_PLACEHOLDER}\n{rest}")
    return turns


def render_prompt(
    turns: Sequence[tuple[str, str]], eos_token: str = "</s>", add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Render vicuna_v1 text and the character spans of every assistant answer (with its EOS).

    With ``add_generation_prompt`` the last turn must be the user's, and the text ends with
    ``"ASSISTANT:"`` so the model continues with the answer.
    """
    text = SYSTEM_PROMPT + " "
    spans: list[tuple[int, int]] = []
    for role, message in turns:
        if role == USER_ROLE:
            text += f"{USER_ROLE}: {message} "
        else:
            text += f"{ASSISTANT_ROLE}: "
            start = len(text)
            text += message + eos_token
            spans.append((start, len(text)))
    if add_generation_prompt:
        if not turns or turns[-1][0] != USER_ROLE:
            raise ValueError("a generation prompt must end with a user turn")
        text += f"{ASSISTANT_ROLE}:"
    return text, spans


def encode_conversation(
    conversations: Sequence[dict[str, Any]],
    tokenizer: Any,
    num_image_tokens: int,
    for_generation: bool = False,
    max_length: int | None = None,
) -> EncodedConversation:
    """Tokenize one LLaVA record into ids, labels and spans.

    ``<image>`` is expanded into ``num_image_tokens`` copies of the tokenizer's image token, as HF's
    ``LlavaProcessor`` does, so the model splices the projected patches in place. With
    ``for_generation`` the final assistant turn (if present) is removed and the prompt ends with
    ``ASSISTANT:``. Raises :class:`ImageSpanTruncated` (a ``ValueError``) when truncation to
    ``max_length`` would cut the image span (the caller drops and counts such samples).
    """
    turns = normalize_conversations(conversations)
    if for_generation and turns[-1][0] == ASSISTANT_ROLE:
        turns = turns[:-1]
    text, spans = render_prompt(turns, tokenizer.eos_token, add_generation_prompt=for_generation)
    text = text.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * num_image_tokens)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    # Spans were measured on the unexpanded text; shift those after the image by the expansion.
    shift = len(IMAGE_PLACEHOLDER) * (num_image_tokens - 1)
    image_at = text.find(IMAGE_PLACEHOLDER)
    spans = [(s + shift, e + shift) if image_at != -1 and s > image_at else (s, e) for s, e in spans]
    labels, answer_span = labels_from_spans(ids, offsets, spans, for_generation)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
        labels = [IGNORE_INDEX] + labels
        answer_span = (answer_span[0] + 1, answer_span[1] + 1)
    image_span = _image_span(ids, tokenizer, num_image_tokens)
    if max_length is not None and len(ids) > max_length:
        if image_span[1] > max_length:
            raise ImageSpanTruncated(
                f"sample of {len(ids)} tokens cannot be truncated to {max_length} without cutting the image"
            )
        ids, labels = ids[:max_length], labels[:max_length]
        answer_span = (min(answer_span[0], max_length), min(answer_span[1], max_length))
    return EncodedConversation(ids, labels, image_span, answer_span)


def labels_from_spans(
    ids: list[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], for_generation: bool
) -> tuple[list[int], tuple[int, int]]:
    """Labels supervising every token that starts inside an answer's character span, and the last
    answer's token span (``(n, n)`` for a generation prompt), from one tokenization with offsets."""
    labels = [IGNORE_INDEX] * len(ids)
    answer_span = (len(ids), len(ids))
    for k, (start, end) in enumerate(spans):
        inside = [i for i, (a, _) in enumerate(offsets) if start <= a < end]
        for i in inside:
            labels[i] = ids[i]
        if k == len(spans) - 1 and inside and not for_generation:
            answer_span = (inside[0], inside[-1] + 1)
    return labels, answer_span


def _image_span(ids: list[int], tokenizer: Any, num_image_tokens: int) -> tuple[int, int]:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if not positions:
        return (0, 0)
    start, end = positions[0], positions[-1] + 1
    if end - start != num_image_tokens or len(positions) != num_image_tokens:
        raise ValueError(f"expected {num_image_tokens} contiguous image tokens, found {len(positions)}")
    return (start, end)


def final_exchange(conversations: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """The last question and its reference answer, for evaluation."""
    turns = normalize_conversations(conversations)
    if len(turns) < 2 or turns[-1][0] != ASSISTANT_ROLE:
        raise ValueError("conversation has no final answer")
    question = turns[-2][1].replace(IMAGE_PLACEHOLDER, "").strip()
    return question, turns[-1][1]
