"""The vicuna_v1 template and its label masking, checked on strings and against HF's LlavaProcessor."""

import pytest

from dllava.data.conversation import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    encode_conversation,
    final_exchange,
    normalize_conversations,
    render_prompt,
)

RECORD = [
    {"from": "human", "value": "what shape is at row one column two ?\n<image>"},
    {"from": "gpt", "value": "circle"},
    {"from": "human", "value": "describe the image in detail ."},
    {"from": "gpt", "value": "there are two shapes ."},
]


def test_image_placeholder_moves_to_front_of_its_turn():
    turns = normalize_conversations(RECORD)
    assert turns[0] == ("USER", "<image>\nwhat shape is at row one column two ?")
    assert turns[1] == ("ASSISTANT", "circle")


def test_prompt_matches_llava_vicuna_v1_layout():
    text, spans = render_prompt(normalize_conversations(RECORD), eos_token="</s>")
    assert text == (
        f"{SYSTEM_PROMPT} USER: <image>\nwhat shape is at row one column two ? ASSISTANT: circle</s>"
        "USER: describe the image in detail . ASSISTANT: there are two shapes .</s>"
    )
    assert [text[s:e] for s, e in spans] == ["circle</s>", "there are two shapes .</s>"]


def test_generation_prompt_ends_with_assistant_colon():
    text, spans = render_prompt(normalize_conversations(RECORD[:3]), add_generation_prompt=True)
    assert text.endswith("USER: describe the image in detail . ASSISTANT:")
    assert len(spans) == 1


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "empty"),
        ([{"from": "gpt", "value": "hi"}], "turn 0 must be from 'human'"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "turn 1 must be from 'gpt'"),
        ([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}], "one <image>"),
        ([{"from": "human"}], "no text"),
    ],
)
def test_malformed_conversations_are_rejected_with_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        normalize_conversations(bad)


def test_labels_supervise_only_answers_and_eos(tiny_processor):
    tok = tiny_processor.tokenizer
    enc = encode_conversation(RECORD, tok, num_image_tokens=64)
    supervised = [tok.convert_ids_to_tokens(i) for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX]
    assert supervised == ["circle", "</s>", "there", "are", "two", "shapes", ".", "</s>"]
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(enc.input_ids, enc.labels))
    assert enc.input_ids[0] == tok.bos_token_id and enc.labels[0] == IGNORE_INDEX


def test_spans_locate_image_and_final_answer(tiny_processor):
    tok = tiny_processor.tokenizer
    enc = encode_conversation(RECORD, tok, num_image_tokens=64)
    start, end = enc.image_span
    assert end - start == 64
    assert set(enc.input_ids[start:end]) == {tok.convert_tokens_to_ids("<image>")}
    a, b = enc.answer_span
    assert tok.convert_ids_to_tokens(enc.input_ids[a:b]) == ["there", "are", "two", "shapes", ".", "</s>"]
    assert b == len(enc.input_ids)


def test_generation_encoding_equals_hf_llava_processor(tiny_processor, tiny_image):
    """Our prompt ids are exactly what HF's own LlavaProcessor produces for the same text."""
    tok = tiny_processor.tokenizer
    enc = encode_conversation(RECORD, tok, num_image_tokens=64, for_generation=True)
    text, _ = render_prompt(normalize_conversations(RECORD[:3]), add_generation_prompt=True)
    reference = tiny_processor(text=text, images=tiny_image, return_tensors="pt")["input_ids"][0].tolist()
    assert enc.input_ids == reference
    assert enc.answer_span == (len(enc.input_ids), len(enc.input_ids))
    assert all(l == IGNORE_INDEX for l in enc.labels[: enc.image_span[0]])


def test_truncation_never_cuts_the_image(tiny_processor):
    tok = tiny_processor.tokenizer
    full = encode_conversation(RECORD, tok, num_image_tokens=64)
    short = encode_conversation(RECORD, tok, num_image_tokens=64, max_length=full.image_span[1] + 2)
    assert len(short.input_ids) == full.image_span[1] + 2
    with pytest.raises(ValueError, match="without cutting the image"):
        encode_conversation(RECORD, tok, num_image_tokens=64, max_length=full.image_span[1] - 1)


def test_final_exchange_returns_last_question_and_answer():
    assert final_exchange(RECORD) == ("describe the image in detail .", "there are two shapes .")
