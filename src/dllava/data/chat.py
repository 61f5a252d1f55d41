"""A LLaVA record rendered with a tokenizer's own chat template (Qwen-VL's ChatML and the like).

The shard record is family-neutral (LLaVA ``conversations``); only this rendering is per family. It
produces the same :class:`~dllava.data.conversation.EncodedConversation` as the vicuna path, so the rest
of the data pipeline does not care which template made it:

* the template is the tokenizer's (``apply_chat_template(..., tokenize=False)``), never a copy of it, so
  a model is trained and asked with the prompt format it was instruction-tuned with;
* ``<image>`` becomes an image content item (``{"type": "image"}`` before the turn's text, Qwen's
  order), which Qwen's templates render as ``<|vision_start|><|image_pad|><|vision_end|>``; the one
  ``<|image_pad|>`` is then expanded to the sample's own token count, as Qwen's processor does;
* labels come from character spans: each assistant answer's span is found by rendering the conversation
  up to that answer with the generation prompt (the answer starts right after it) and checking that the
  answer and the end-of-turn token follow verbatim; the whole text is tokenized once with offsets and a
  token is supervised when it starts inside a span. No per-round length arithmetic, so tokenizers that
  merge across boundaries cannot shift labels.

No system message is added: the template decides (Qwen2.5-VL's adds "You are a helpful assistant.",
Qwen3-VL's adds none); ``system`` passes one explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dllava.data.conversation import (
    ASSISTANT_ROLE,
    IMAGE_PLACEHOLDER,
    USER_ROLE,
    EncodedConversation,
    ImageSpanTruncated,
    labels_from_spans,
    normalize_conversations,
)

QWEN_IMAGE_TOKEN = "<|image_pad|>"
CHATML_END_OF_TURN = "<|im_end|>"
_CHAT_ROLES = {USER_ROLE: "user", ASSISTANT_ROLE: "assistant"}


def chat_messages(turns: Sequence[tuple[str, str]], system: str | None = None) -> list[dict[str, Any]]:
    """HF chat messages of normalized LLaVA turns: the ``<image>`` turn becomes ``[{"type": "image"},
    {"type": "text", "text": ...}]`` (no text item when nothing else is said), other turns plain strings."""
    messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
    for role, text in turns:
        content: Any = text
        if IMAGE_PLACEHOLDER in text:
            rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
            content = [{"type": "image"}] + ([{"type": "text", "text": rest}] if rest else [])
        messages.append({"role": _CHAT_ROLES[role], "content": content})
    return messages


def render_chat(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    add_generation_prompt: bool = False,
    end_of_turn: str = CHATML_END_OF_TURN,
    chat_template: str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The template's text and the character span of every assistant answer with its end-of-turn token.

    ``chat_template`` (e.g. a processor's, when the tokenizer has none) replaces the tokenizer's. Raises
    when there is no template, when it is not prefix-stable (rendering up to an answer does not begin the
    full text) or when it puts anything between the generation prompt and the answer: labels found that
    way would teach text the generation prompt never asks for."""
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat_template to render the conversation with")
    text = _apply(tokenizer, messages, add_generation_prompt, chat_template)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _apply(tokenizer, messages[:k], True, chat_template)
        answer = message["content"]
        if not isinstance(answer, str):
            raise TypeError(f"assistant message {k} must be plain text, got {type(answer).__name__}")
        if not text.startswith(head):
            raise ValueError(
                f"chat template is not prefix-stable: the conversation rendered up to assistant message {k} "
                "with the generation prompt does not begin the full rendering"
            )
        if not text.startswith(answer + end_of_turn, len(head)):
            raise ValueError(
                f"chat template does not render assistant message {k} as its generation prompt followed by "
                f"the answer and {end_of_turn!r}: found {text[len(head):len(head) + len(answer) + 40]!r}"
            )
        spans.append((len(head), len(head) + len(answer) + len(end_of_turn)))
    return text, spans


def _apply(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, chat_template: str | None) -> str:
    text = tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def encode_chat(
    conversations: Sequence[dict[str, Any]],
    tokenizer: Any,
    num_image_tokens: int,
    for_generation: bool = False,
    max_length: int | None = None,
    image_token: str = QWEN_IMAGE_TOKEN,
    end_of_turn: str = CHATML_END_OF_TURN,
    system: str | None = None,
    chat_template: str | None = None,
) -> EncodedConversation:
    """Tokenize one LLaVA record with the tokenizer's chat template into ids, labels and spans.

    ``num_image_tokens`` is this sample's count (Qwen images differ): the template's single
    ``image_token`` becomes that many copies, and ``image_span`` covers exactly those (not the vision
    start/end tokens around them, which are never dropped). Labels cover every assistant answer and its
    ``end_of_turn`` (not the newline after it, not the ``<|im_start|>assistant`` header);
    ``answer_span`` is the final one, ``(n, n)`` for a generation prompt. ``for_generation`` drops a final
    answer and ends the prompt with the template's generation prompt. Raises
    :class:`~dllava.data.conversation.ImageSpanTruncated` when ``max_length`` would cut the image.
    ``chat_template`` replaces the tokenizer's (a processor's template, when they differ).
    """
    turns = normalize_conversations(conversations)
    if for_generation and turns[-1][0] == ASSISTANT_ROLE:
        turns = turns[:-1]
    has_image = any(IMAGE_PLACEHOLDER in text for _, text in turns)
    if has_image and num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1 for a conversation with an image, got {num_image_tokens}")
    text, spans = render_chat(chat_messages(turns, system), tokenizer, for_generation, end_of_turn, chat_template)
    text, spans = _expand_image(text, spans, image_token, num_image_tokens if has_image else 0)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    labels, answer_span = labels_from_spans(ids, offsets, spans, for_generation)
    image_span = _image_span(ids, tokenizer, image_token, num_image_tokens if has_image else 0)
    encoded = EncodedConversation(ids, labels, image_span, answer_span)
    return encoded if max_length is None else truncate(encoded, max_length)


def _expand_image(
    text: str, spans: list[tuple[int, int]], image_token: str, count: int
) -> tuple[str, list[tuple[int, int]]]:
    """Replace the template's one ``image_token`` by ``count`` copies; shift the spans behind it."""
    found = text.count(image_token)
    if found != (1 if count else 0):
        raise ValueError(
            f"the chat template rendered {found} {image_token!r} for a conversation with "
            f"{'one image' if count else 'no image'}: it must render an image content item as one {image_token!r}"
        )
    if not count:
        return text, spans
    at = text.index(image_token)
    shift = len(image_token) * (count - 1)
    spans = [(s + shift, e + shift) if s > at else (s, e) for s, e in spans]
    return text[:at] + image_token * count + text[at + len(image_token):], spans


def _image_span(ids: list[int], tokenizer: Any, image_token: str, count: int) -> tuple[int, int]:
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if not count and not positions:
        return (0, 0)
    if len(positions) != count or positions[-1] + 1 - positions[0] != count:
        raise ValueError(
            f"expected {count} contiguous {image_token!r} tokens, found {len(positions)}: is {image_token!r} a "
            "special token of the tokenizer?"
        )
    return (positions[0], positions[-1] + 1)


def truncate(encoded: EncodedConversation, max_length: int) -> EncodedConversation:
    """Cut ids and labels to ``max_length`` tokens; raises :class:`ImageSpanTruncated` rather than cut the
    image span (the caller drops and counts such samples)."""
    if len(encoded.input_ids) <= max_length:
        return encoded
    if encoded.image_span[1] > max_length:
        raise ImageSpanTruncated(
            f"sample of {len(encoded.input_ids)} tokens cannot be truncated to {max_length} without cutting the image"
        )
    start, end = encoded.answer_span
    return EncodedConversation(
        encoded.input_ids[:max_length],
        encoded.labels[:max_length],
        encoded.image_span,
        (min(start, max_length), min(end, max_length)),
    )
