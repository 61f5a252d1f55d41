"""The tiny LLaVA's vocabulary: extending a trained model keeps every old id and its function."""
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from dllava.model.tiny import extend_vocabulary, save_tiny_llava, tiny_vocabulary


def test_the_full_vocabulary_extends_the_classic_one_after_the_image_token():
    classic, full = tiny_vocabulary(), tiny_vocabulary(full=True)
    assert full[: len(classic)] == classic and classic[-1] == "<image>"
    assert {"above", "corner", "five", "six"} <= set(full[len(classic):])
    assert len(set(full)) == len(full)


def test_the_short_answer_suffix_words_come_last_so_older_full_vocabularies_stay_prefixes():
    """LLaVA-1.5's "Answer the question using a single word or phrase." brought seven words (case-sensitive:
    "Answer" is new, "the" / "a" / "." were there); they follow five and six, so the 88-word tokenizer of the
    base before them keeps every id."""
    full = tiny_vocabulary(full=True)
    assert full[-9:] == ["five", "six", "Answer", "question", "using", "single", "word", "or", "phrase"]
    assert len(full) == 95 and full.index("<image>") == 65


def test_extending_keeps_the_models_outputs_over_its_old_vocabulary(tmp_path):
    old = save_tiny_llava(tmp_path / "old", seed=0, num_hidden_layers=2)
    new = extend_vocabulary(old, tmp_path / "new")
    a = LlavaForConditionalGeneration.from_pretrained(old).eval()
    b = LlavaForConditionalGeneration.from_pretrained(new).eval()
    assert b.config.text_config.vocab_size == len(tiny_vocabulary(full=True)) > a.config.text_config.vocab_size
    ids = torch.randint(4, 60, (2, 80), generator=torch.Generator().manual_seed(0))
    ids[:, 3:67] = a.config.image_token_index
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = a(input_ids=ids, pixel_values=pixels).logits
        after = b(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(before, after[..., : before.shape[-1]])


def test_extending_a_tokenizer_whose_ids_moved_is_refused(tmp_path):
    old = save_tiny_llava(tmp_path / "old", seed=0, num_hidden_layers=2)
    path = old / "tokenizer.json"
    path.write_text(path.read_text().replace('"chat": 5', '"chat": 999'))
    with pytest.raises(ValueError, match="not an extension.*chat"):
        extend_vocabulary(old, tmp_path / "new")
