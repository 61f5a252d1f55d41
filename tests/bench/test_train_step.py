"""The training-step benchmark: one sparse arm per gated-softmax implementation beside dense, at a
chosen sequence length on a random model of a chosen decoder size (its numbers are not checked here:
benchmarks report, tests do not time)."""

import json

import pytest

from dllava.bench.train_step import arm_names, long_batch, main
from dllava.model.tiny import save_tiny_llava

SMALL = '{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2}'


@pytest.mark.slow
def test_writes_ratios_per_attention_arm(tmp_path):
    out = tmp_path / "bench.json"
    result = main(["--text-config", SMALL, "--seq-len", "120", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                   "--repeats", "1", "--attention", "eager,sdpa", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert list(result["arms"]) == ["dense", "sparsify_eager", "sparsify_sdpa"]
    assert result["sequence_length"] == 120 and result["tokens_per_batch"] == 240
    for arm in ("sparsify_eager", "sparsify_sdpa"):
        assert result["arms"][arm]["step_time_ratio"] > 0 and "peak_memory_ratio" in result["arms"][arm]
    assert result["text_config"]["hidden_size"] == 64


def test_long_batches_hold_the_image_and_an_answer_span(tmp_path):
    model = save_tiny_llava(tmp_path / "m", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2)
    batch = long_batch(str(model), 3, 150, seed=0)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    assert batch["input_ids"].shape == (3, 150)
    assert (batch["input_ids"] == config.image_token_id).sum(-1).tolist() == [config.image_seq_length] * 3
    assert batch["answer_span"].tolist() == [[113, 150]] * 3
    assert (batch["labels"][:, :113] == -100).all() and (batch["labels"][:, 113:] >= 0).all()
    with pytest.raises(ValueError, match="--seq-len must be at least"):
        long_batch(str(model), 1, 20, seed=0)


def test_unknown_attention_arm_fails_before_running(tmp_path):
    with pytest.raises(SystemExit, match="--attention takes"):
        main(["--attention", "eager,flash", "--out", str(tmp_path / "x.json")])
    assert arm_names(["sdpa"]) == ["dense", "sparsify_sdpa"]
