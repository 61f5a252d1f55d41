"""LLaVA records through a tokenizer's own ChatML template: ids equal HF's apply_chat_template (with the
image pad expanded), labels equal HF's assistant-token mask, spans and truncation as for vicuna."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dllava.data import synthetic
from dllava.data.chat import chat_messages, encode_chat, render_chat
from dllava.data.conversation import IGNORE_INDEX, ImageSpanTruncated

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", "assistant", "Be", "brief"]

# Written here in the layout of Qwen2.5-VL's template: a default system prompt, images as
# <|vision_start|><|image_pad|><|vision_end|> before the text, each turn closed by <|im_end|>\n.
# {% generation %} marks what HF's return_assistant_tokens_mask reports (the answer and its <|im_end|>).
QWEN25_STYLE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{% for part in parts %}{{ part['text'] }}{% endfor %}<|im_end|>{% endgeneration %}\n"
    "{% else %}"
    "{% for part in parts %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL's layout differs by adding no system prompt.
QWEN3_STYLE = QWEN25_STYLE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}", ""
)


def _tokenizer(template: str) -> PreTrainedTokenizerFast:
    vocab: dict[str, int] = {}
    for word in SPECIALS + WORDS + list(synthetic.WORDS) + ["<unk>"]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
        additional_special_tokens=SPECIALS[1:],
    )
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module", params=[QWEN25_STYLE, QWEN3_STYLE], ids=["qwen2_5_style", "qwen3_style"])
def tokenizer(request) -> PreTrainedTokenizerFast:
    return _tokenizer(request.param)


CONV = [
    {"from": "human", "value": "what color is the shape at row one column two ?\n<image>"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "how many shapes are there ?"},
    {"from": "gpt", "value": "there are three shapes ."},
]


def _reference_messages(conv: list[dict]) -> list[dict]:
    """The conversation as a Qwen user would write it for HF's processor (image item first)."""
    messages = []
    for turn in conv:
        if "<image>" in turn["value"]:
            text = turn["value"].replace("<image>", "").strip()
            messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
        else:
            messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": turn["value"]})
    return messages


def _expand(values: list[int], at: list[int], count: int, fill: int | None = None) -> list[int]:
    """Repeat the element at the single index in ``at`` ``count`` times (or ``fill`` when given)."""
    (i,) = at
    return values[:i] + [values[i] if fill is None else fill] * count + values[i + 1:]


@pytest.mark.parametrize("count", [1, 6, 24])
def test_ids_and_labels_equal_hf_template_and_assistant_mask(tokenizer, count):
    reference = tokenizer.apply_chat_template(
        _reference_messages(CONV), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    at = [i for i, t in enumerate(reference["input_ids"]) if t == pad]
    ids = _expand(list(reference["input_ids"]), at, count)
    mask = _expand(list(reference["assistant_masks"]), at, count, fill=0)
    encoded = encode_chat(CONV, tokenizer, count)
    assert encoded.input_ids == ids
    assert encoded.labels == [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    assert sum(mask) == 1 + 5 + 2  # "red", "there are three shapes .", two <|im_end|>


def test_labels_cover_answers_and_im_end_only(tokenizer):
    encoded = encode_chat(CONV, tokenizer, 4)
    supervised = tokenizer.convert_ids_to_tokens([t for t in encoded.labels if t != IGNORE_INDEX])
    assert supervised == ["red", "<|im_end|>", "there", "are", "three", "shapes", ".", "<|im_end|>"]
    start, end = encoded.answer_span
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids[start:end]) == supervised[2:]
    assert end == len(encoded.input_ids)  # the word-level tokenizer has no token for the trailing "\n"
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids[start - 2:start]) == ["<|im_start|>", "assistant"]


@pytest.mark.parametrize("count", [1, 9])
def test_image_span_is_the_pad_tokens_between_vision_start_and_end(tokenizer, count):
    encoded = encode_chat(CONV, tokenizer, count)
    start, end = encoded.image_span
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert end - start == count and tokens[start:end] == ["<|image_pad|>"] * count
    assert tokens[start - 1] == "<|vision_start|>" and tokens[end] == "<|vision_end|>"
    assert tokens[end + 1:end + 3] == ["what", "color"]  # the image comes before the turn's text


def test_generation_prompt_ends_with_assistant_header_and_equals_hf(tokenizer):
    prompt = encode_chat(CONV, tokenizer, 5, for_generation=True)
    reference = tokenizer.apply_chat_template(_reference_messages(CONV[:-1]), tokenize=True, add_generation_prompt=True)
    ids = list(reference["input_ids"]) if isinstance(reference, dict) or hasattr(reference, "keys") else list(reference)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert prompt.input_ids == _expand(ids, [i for i, t in enumerate(ids) if t == pad], 5)
    assert tokenizer.convert_ids_to_tokens(prompt.input_ids[-2:]) == ["<|im_start|>", "assistant"]
    assert prompt.answer_span == (len(prompt.input_ids), len(prompt.input_ids))
    supervised = tokenizer.convert_ids_to_tokens([t for t in prompt.labels if t != IGNORE_INDEX])
    assert supervised == ["red", "<|im_end|>"]  # earlier answers stay labelled, as in the vicuna path
    train = encode_chat(CONV, tokenizer, 5)
    assert train.input_ids[:len(prompt.input_ids)] == prompt.input_ids  # the prompt is a prefix of training ids


def test_system_prompt_is_the_templates_unless_given():
    qwen25, qwen3 = _tokenizer(QWEN25_STYLE), _tokenizer(QWEN3_STYLE)
    text25, _ = render_chat(chat_messages([("USER", "<image>\nhi")]), qwen25)
    text3, _ = render_chat(chat_messages([("USER", "<image>\nhi")]), qwen3)
    assert text25.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text3.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>")
    own = encode_chat(CONV, qwen3, 2, system="Be brief")
    assert qwen3.convert_ids_to_tokens(own.input_ids[:5]) == ["<|im_start|>", "system", "Be", "brief", "<|im_end|>"]
    supervised = qwen3.convert_ids_to_tokens([t for t in own.labels if t != IGNORE_INDEX])
    assert supervised[:2] == ["red", "<|im_end|>"]


def test_truncation_keeps_the_image_or_refuses(tokenizer):
    full = encode_chat(CONV, tokenizer, 8)
    cut = encode_chat(CONV, tokenizer, 8, max_length=full.image_span[1] + 3)
    assert cut.input_ids == full.input_ids[:full.image_span[1] + 3] and cut.labels == full.labels[:len(cut.input_ids)]
    assert cut.image_span == full.image_span and cut.answer_span[1] <= len(cut.input_ids)
    with pytest.raises(ImageSpanTruncated, match="without cutting the image"):
        encode_chat(CONV, tokenizer, 8, max_length=full.image_span[1] - 1)


def test_text_only_record_has_an_empty_image_span(tokenizer):
    conv = [{"from": "human", "value": "how many shapes are there ?"}, {"from": "gpt", "value": "two"}]
    encoded = encode_chat(conv, tokenizer, 0)
    assert encoded.image_span == (0, 0)
    assert tokenizer.convert_ids_to_tokens([t for t in encoded.labels if t != IGNORE_INDEX]) == ["two", "<|im_end|>"]


def test_synthetic_records_encode_with_their_own_token_counts(tokenizer):
    for index in range(20):
        record = synthetic.make_conversation("train", index, seed=0)
        count = 12 + index % 5
        encoded = encode_chat(record["conversations"], tokenizer, count)
        assert encoded.image_span[1] - encoded.image_span[0] == count
        final = record["conversations"][-1]["value"].split() + ["<|im_end|>"]
        start, end = encoded.answer_span
        assert tokenizer.convert_ids_to_tokens(encoded.input_ids[start:end]) == final


def test_bad_templates_and_counts_are_named():
    text_only = _tokenizer("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match="rendered 0 '<\\|image_pad\\|>'"):
        encode_chat(CONV, text_only, 4)
    no_eot = _tokenizer(QWEN3_STYLE.replace("{% endfor %}<|im_end|>{% endgeneration %}", "{% endfor %}{% endgeneration %}"))
    with pytest.raises(ValueError, match="followed by the answer and '<\\|im_end\\|>'"):
        encode_chat(CONV, no_eot, 4)
    none = _tokenizer(QWEN3_STYLE)
    none.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        encode_chat(CONV, none, 4)
    # a template passed in (a processor's) serves a tokenizer without one
    assert encode_chat(CONV, none, 4, chat_template=QWEN3_STYLE) == encode_chat(CONV, _tokenizer(QWEN3_STYLE), 4)
    with pytest.raises(ValueError, match="num_image_tokens must be >= 1"):
        encode_chat(CONV, _tokenizer(QWEN3_STYLE), 0)
