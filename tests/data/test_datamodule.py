"""Shards -> batches: decoding without pickle, padding, spans, epochs, exact-once evaluation."""

import io
import json
import tarfile

import pytest

from dllava.data.conversation import IGNORE_INDEX
from dllava.data.datamodule import LlavaDataModule, decode_sample, expand_to_square, iter_records, resolve_urls


def _datamodule(synthetic_dir, tiny_model_dir, **kw):
    dm = LlavaDataModule(
        train_urls=f"{synthetic_dir}/train-*.tar",
        val_urls=f"{synthetic_dir}/val-*.tar",
        test_urls=f"{synthetic_dir}/test-*.tar",
        processor=str(tiny_model_dir),
        batch_size=8,
        num_workers=kw.pop("num_workers", 0),
        epoch_samples=kw.pop("epoch_samples", 32),
        **kw,
    )
    dm.setup("fit")
    return dm


def test_brace_patterns_and_globs_expand_to_existing_shards(synthetic_dir):
    by_glob = resolve_urls(f"{synthetic_dir}/train-*.tar")
    by_brace = resolve_urls(f"{synthetic_dir}/train-{{000000..000003}}.tar")
    assert by_glob == by_brace and len(by_glob) == 4


def test_missing_shards_name_the_key_and_how_to_create_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.val_urls.*python -m dllava.data.synthetic"):
        resolve_urls(str(tmp_path / "val-000000.tar"), "data.val_urls", synthetic=True)


@pytest.mark.parametrize("synthetic, tool, not_tool", [
    (None, "dllava-shards", "dllava.data.synthetic"),
    ({"out": "unused", "train": 8, "val": 8, "test": 8}, "python -m dllava.data.synthetic", "dllava-shards"),
])
def test_missing_shards_point_to_the_tool_that_makes_this_kind_of_data(tmp_path, synthetic, tool, not_tool):
    """Real data (data.synthetic null, e.g. data=llava_shards) is made by the converter, not the generator."""
    dm = LlavaDataModule(train_urls=str(tmp_path / "mix/shard-{000000..000003}.tar"), val_urls=str(tmp_path / "v-*.tar"),
                         processor="unused", num_workers=0, synthetic=synthetic)
    with pytest.raises(FileNotFoundError) as error:
        dm.train_dataloader()
    message = str(error.value)
    assert message.startswith("data.train_urls: no shard at") and tool in message and not_tool not in message
    assert f"--out {tmp_path / 'mix'}" in message


def test_training_batches_are_right_padded_with_masked_labels(synthetic_dir, tiny_model_dir):
    dm = _datamodule(synthetic_dir, tiny_model_dir)
    batch = next(iter(dm.train_dataloader()))
    pad = dm.processor.tokenizer.pad_token_id
    assert batch["pixel_values"].shape == (8, 3, 96, 96)
    lengths = batch["attention_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["input_ids"][row, n:] == pad).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        start, end = batch["image_span"][row].tolist()
        assert end - start == 64
        a, b = batch["answer_span"][row].tolist()
        assert b == n and (batch["labels"][row, a:b] == batch["input_ids"][row, a:b]).all()


def test_generation_prompts_are_left_padded_and_end_with_assistant(synthetic_dir, tiny_model_dir):
    dm = _datamodule(synthetic_dir, tiny_model_dir)
    batch = next(iter(dm.val_dataloader()))
    tok = dm.processor.tokenizer
    assert batch["prompt_mask"][:, -1].all()
    assert tok.convert_ids_to_tokens(batch["prompt_ids"][:, -2:].reshape(-1).tolist())[:2] == ["ASSISTANT", ":"]


def test_train_epoch_has_fixed_length_per_worker(synthetic_dir, tiny_model_dir):
    dm = _datamodule(synthetic_dir, tiny_model_dir, num_workers=2, epoch_samples=48)
    assert dm.train_batches_per_worker() == 3
    assert sum(1 for _ in dm.train_dataloader()) == 6


def test_validation_reads_every_record_exactly_once(synthetic_dir, tiny_model_dir):
    dm = _datamodule(synthetic_dir, tiny_model_dir, num_workers=2)
    ids = [i for batch in dm.val_dataloader() for i in batch["ids"]]
    expected = [r["id"] for r in iter_records(resolve_urls(f"{synthetic_dir}/val-*.tar"))]
    assert sorted(ids) == sorted(expected) and len(ids) == 64


def test_decoder_refuses_nothing_but_never_unpickles(tmp_path):
    """A .pyd member (webdataset would unpickle it) is ignored; only json and image bytes are read."""
    import pickle

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buf, format="PNG")
    sample = {"__key__": "k", "png": buf.getvalue(), "json": json.dumps({"id": "k"}).encode(), "pyd": pickle.dumps(1)}
    out = decode_sample(sample)
    assert out["record"] == {"id": "k"} and out["image"].size == (8, 6) and "pyd" not in out


def test_corrupt_sample_is_skipped_not_fatal(tmp_path, synthetic_dir, tiny_model_dir):
    """A sample with unreadable image bytes is dropped with a warning; the rest stream on."""
    good = resolve_urls(f"{synthetic_dir}/val-*.tar")[0]
    bad = tmp_path / "val-000000.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for n, member in enumerate(src.getmembers()):
            data = src.extractfile(member).read()
            if n == 0 and member.name.endswith(".jpg"):
                data = b"not a jpeg"
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    dm = LlavaDataModule(train_urls=str(bad), val_urls=str(bad), processor=str(tiny_model_dir), batch_size=8,
                         num_workers=0)
    dm.setup("validate")
    with pytest.warns(UserWarning, match=r"dropped sample 'val-0000000' of shard .*val-000000.tar \(skipped\)"):
        batches = list(dm.val_dataloader())
    ids = [i for batch in batches for i, ok in zip(batch["ids"], batch["valid"].tolist()) if ok]
    assert len(ids) == 63 and sum(len(batch["ids"]) for batch in batches) == 64  # one padding row


def test_expand_to_square_pads_with_fill_colour():
    from PIL import Image

    square = expand_to_square(Image.new("RGB", (20, 10), (255, 0, 0)), (1, 2, 3))
    assert square.size == (20, 20)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((10, 10)) == (255, 0, 0)


def test_existing_generation_with_other_settings_is_not_overwritten(synthetic_dir):
    from dllava.data.datamodule import ensure_synthetic

    info = ensure_synthetic(str(synthetic_dir), train=256, val=64, test=64, seed=0, samples_per_shard=64)
    assert info["splits"]["train"]["records"] == 256
    with pytest.raises(ValueError, match=r"data.synthetic: .* \(train: on disk 256, configured 999\)"):
        ensure_synthetic(str(synthetic_dir), train=999, val=64, test=64, seed=0, samples_per_shard=64)
    same = ensure_synthetic(str(synthetic_dir), train=256, val=64, test=64, seed=0, samples_per_shard=64,
                            kinds=["describe", "color", "shape", "count", "exist"])  # order does not matter
    assert same == info
    with pytest.raises(ValueError, match=r"kinds: on disk \['color', .*\], configured \['shape'\]"):
        ensure_synthetic(str(synthetic_dir), train=256, val=64, test=64, seed=0, samples_per_shard=64, kinds=["shape"])


def test_runs_started_together_generate_the_synthetic_task_once(tmp_path):
    """A sparse run and its dense twin started together on a fresh checkout: one process generates,
    the other waits for it and reads the same shards (without the lock both wrote the same files)."""
    import subprocess
    import sys

    out = tmp_path / "synthetic"
    code = ("import sys; from dllava.data.datamodule import ensure_synthetic; "
            "info = ensure_synthetic(sys.argv[1], train=600, val=32, test=0, seed=0, samples_per_shard=100); "
            "print('records', info['splits']['train']['records'])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in results]
    assert all("records 600" in stdout for stdout, _ in results)
    generated = sum("synthetic ->" in err for _, err in results)  # generate's progress bar
    assert generated == 1, [err[-300:] for _, err in results]
    assert sorted(p.name for p in out.glob("train-*.tar")) == [f"train-{i:06d}.tar" for i in range(6)]


def test_a_tokenizer_without_the_words_of_the_kinds_drawn_fails_naming_them():
    """A word-level tokenizer made before the detail kind (or without rows five and six) would turn those
    words into <unk> and train on them silently."""
    from dllava.data.datamodule import check_tokenizer_knows
    from dllava.model.tiny import build_tiny_tokenizer

    classic, full = build_tiny_tokenizer(), build_tiny_tokenizer(full=True)
    check_tokenizer_knows(classic, {"kinds": ["color", "describe"]}, "classic")
    with pytest.raises(ValueError, match=r"'above'.*detail.*--extend"):
        check_tokenizer_knows(classic, {"kinds": ["color", "detail"]}, "classic")
    with pytest.raises(ValueError, match=r"\['five', 'six'\]"):
        check_tokenizer_knows(classic, {"kinds": ["color"], "grid_sizes": [[4, 6]]}, "classic")
    check_tokenizer_knows(full, {"kinds": ["color", "detail"], "grid_sizes": [[6, 6]]}, "full")
