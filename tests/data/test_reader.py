"""Reading converted LLaVA shards: rank/worker splits, equal epochs, bad data skipped and counted."""

import io
import json
import shutil
from types import SimpleNamespace

import hydra
import pytest

from dllava.data.conversation import IGNORE_INDEX, encode_conversation
from dllava.data.datamodule import LlavaDataModule, count_image_tokens
from dllava.data.reader import COUNT_KEYS
from dllava.data.shards import convert
from tests.data.llava_set import Q, jpeg_bytes, multi_turn, turn, write_bad_cases, write_good_set
from tests.helpers import compose


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """16 valid records (JPEG and PNG, a third multi-turn) in 4 shards of 4."""
    root = tmp_path_factory.mktemp("llava")
    path, images, records = write_good_set(root, 16)
    convert(path, images, root / "shards", samples_per_shard=4, progress=False)
    return root / "shards", records


def _dm(tiny_model_dir, train, val=None, world_size=1, rank=0, **kw):
    dm = LlavaDataModule(
        train_urls=train, val_urls=val or train, processor=str(tiny_model_dir),
        batch_size=kw.pop("batch_size", 2), num_workers=kw.pop("num_workers", 0),
        epoch_samples=kw.pop("epoch_samples", 8), **kw,
    )
    dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)  # what Lightning sets
    dm.setup("fit")
    return dm


def _as_rank(monkeypatch, rank, world_size=2):
    """webdataset reads the rank from RANK/WORLD_SIZE when both are set (forked workers inherit them)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


def _total_counts(batches):
    return {k: sum(b["data_counts"][k] for b in batches) for k in COUNT_KEYS}


def _ids_per_rank(dm, world_size):
    """The real sample ids and the number of batches and rows each rank's loader yields."""
    seen = {}
    for rank in range(world_size):
        dm.trainer.global_rank = rank
        batches = list(dm.val_dataloader())
        ids = [i for b in batches for i, ok in zip(b["ids"], b["valid"].tolist()) if ok]
        seen[rank] = {"ids": ids, "batches": len(batches), "rows": sum(len(b["ids"]) for b in batches)}
    return seen


def test_exact_mode_two_ranks_two_workers_read_disjoint_sets_covering_the_split(shards, tiny_model_dir):
    out, records = shards
    dm = _dm(tiny_model_dir, f"{out}/shard-{{000000..000003}}.tar", num_workers=2, eval_batch_size=3,
             world_size=2)
    seen = _ids_per_rank(dm, 2)
    assert not set(seen[0]["ids"]) & set(seen[1]["ids"])
    assert sorted(seen[0]["ids"] + seen[1]["ids"]) == sorted(r["id"] for r in records)  # each exactly once
    assert len(seen[0]["ids"]) == len(seen[1]["ids"]) == 8
    dm.trainer.global_rank = 0
    assert [i for batch in dm.val_dataloader() for i in batch["ids"]] == seen[0]["ids"]  # deterministic order


@pytest.mark.parametrize("num_workers", [0, 1, 3])
@pytest.mark.parametrize("world_size", [2, 3])
def test_exact_mode_splits_samples_not_shards_with_equal_batches_on_every_rank(
    tmp_path, tiny_model_dir, world_size, num_workers
):
    """9 samples in 3 shards (4, 4, 1): fewer shards than ranks x workers, and an odd total. Each rank
    yields ceil(9 / world) rows, padding marked invalid, and the same number of batches."""
    path, images, records = write_good_set(tmp_path, 9)
    convert(path, images, tmp_path / "out", samples_per_shard=4, progress=False)
    dm = _dm(tiny_model_dir, f"{tmp_path}/out/shard-*.tar", num_workers=num_workers, eval_batch_size=2,
             world_size=world_size)
    seen = _ids_per_rank(dm, world_size)
    ids = [i for rank in seen.values() for i in rank["ids"]]
    assert sorted(ids) == sorted(r["id"] for r in records)  # every sample exactly once
    assert {rank["rows"] for rank in seen.values()} == {-(-9 // world_size)}
    assert len({rank["batches"] for rank in seen.values()}) == 1, seen


def test_exact_mode_with_one_shard_gives_every_rank_work(shards, tiny_model_dir):
    """One shard over two ranks: today's shard split gave rank 1 no batch (a hang under FSDP)."""
    out, records = shards
    dm = _dm(tiny_model_dir, f"{out}/shard-000000.tar", world_size=2, eval_batch_size=4)
    seen = _ids_per_rank(dm, 2)
    assert seen[0]["batches"] == seen[1]["batches"] == 1
    assert sorted(seen[0]["ids"] + seen[1]["ids"]) == sorted(r["id"] for r in records[:4])


def test_padding_rows_are_marked_invalid_and_supervise_nothing(shards, tiny_model_dir):
    out, _ = shards
    dm = _dm(tiny_model_dir, f"{out}/shard-000000.tar", world_size=3, rank=0, eval_batch_size=4)
    (batch,) = list(dm.val_dataloader())  # 4 over 3 ranks: 2 slots each, rank 0 owns 1 sample
    assert batch["valid"].tolist() == [True, False]
    assert (batch["labels"][1] == IGNORE_INDEX).all() and (batch["labels"][0] != IGNORE_INDEX).any()
    assert batch["pixel_values"].shape[0] == 2 and batch["kinds"][1] == "padding"


def test_dropped_samples_are_replaced_by_padding_so_counts_stay_equal(tmp_path, tiny_model_dir):
    """A corrupt image on rank 0 only: rank 0 pads for it, both ranks still yield the same rows."""
    import tarfile

    path, images, records = write_good_set(tmp_path, 4)
    convert(path, images, tmp_path / "ok", samples_per_shard=4, progress=False)
    (tmp_path / "bad").mkdir()
    with tarfile.open(tmp_path / "ok" / "shard-000000.tar") as src, \
            tarfile.open(tmp_path / "bad" / "shard-000000.tar", "w") as dst:
        for n, member in enumerate(src.getmembers()):
            data = src.extractfile(member).read()
            if n == 0:
                data = b"not an image"
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    dm = _dm(tiny_model_dir, f"{tmp_path}/bad/shard-000000.tar", world_size=2, eval_batch_size=8)
    with pytest.warns(UserWarning, match=r"dropped sample '000000000' of shard .*bad/shard-000000.tar \(skipped\): UnreadableImage: its jpg"):
        seen = _ids_per_rank(dm, 2)
    assert seen[0]["ids"] == ["r001"] and seen[1]["ids"] == ["r002", "r003"]
    assert seen[0]["rows"] == seen[1]["rows"] == 2


def test_count_samples_reads_headers_like_the_reader_groups_members(shards, tmp_path):
    from dllava.data.reader import count_samples

    out, _ = shards
    assert count_samples(str(out / "shard-000000.tar")) == 4
    assert count_samples(f"pipe:cat {out / 'shard-000001.tar'}") == 4  # streamed, not seeked
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    assert count_samples(str(tmp_path / "junk.tar")) == 0


def test_resampled_mode_gives_every_rank_the_same_number_of_full_batches(tmp_path, tiny_model_dir, monkeypatch):
    path, images, _ = write_good_set(tmp_path, 9)
    convert(path, images, tmp_path / "out", samples_per_shard=4, progress=False)  # shards of 4, 4 and 1
    dm = _dm(tiny_model_dir, f"{tmp_path}/out/shard-*.tar", num_workers=2, batch_size=2, epoch_samples=24,
             world_size=2)
    assert dm.train_batches_per_worker() == 3  # ceil(ceil(24 / (2 x 2)) / 2)
    ids = {}
    for rank in (0, 1):
        _as_rank(monkeypatch, rank)
        batches = list(dm.train_dataloader())
        assert len(batches) == 6 and all(len(b["ids"]) == 2 for b in batches)
        ids[rank] = [i for b in batches for i in b["ids"]]
    assert ids[0] != ids[1]  # each rank draws its own shards


def test_resampled_stream_is_reproducible_from_its_seed(shards, tiny_model_dir):
    out, _ = shards
    first = [i for b in _dm(tiny_model_dir, f"{out}/shard-*.tar", seed=3).train_dataloader() for i in b["ids"]]
    again = [i for b in _dm(tiny_model_dir, f"{out}/shard-*.tar", seed=3).train_dataloader() for i in b["ids"]]
    other = [i for b in _dm(tiny_model_dir, f"{out}/shard-*.tar", seed=4).train_dataloader() for i in b["ids"]]
    assert first == again and first != other


def _truncate(src_dir, dst_dir, name):
    shutil.copytree(src_dir, dst_dir)
    data = (dst_dir / name).read_bytes()
    (dst_dir / name).write_bytes(data[: len(data) // 2 + 100])  # in the middle of a member


def test_shard_truncated_in_the_middle_is_skipped_with_a_count(shards, tiny_model_dir, tmp_path):
    out, records = shards
    _truncate(out, tmp_path / "cut", "shard-000001.tar")
    dm = _dm(tiny_model_dir, f"{tmp_path}/cut/shard-*.tar", eval_batch_size=3)
    with pytest.warns(UserWarning, match=r"skipped the rest of shard .*shard-000001.tar"):
        batches = list(dm.val_dataloader())
    ids = [i for b in batches for i, ok in zip(b["ids"], b["valid"].tolist()) if ok]
    intact = [r["id"] for n, r in enumerate(records) if n // 4 != 1]
    assert set(intact) <= set(ids) and 12 <= len(ids) < 16  # shard 1 gives only what precedes the cut
    assert _total_counts(batches) == {"skipped": 1, "too_long": 0, "text_only": 0}


def test_training_continues_past_a_truncated_shard(shards, tiny_model_dir, tmp_path):
    out, _ = shards
    _truncate(out, tmp_path / "cut", "shard-000001.tar")
    dm = _dm(tiny_model_dir, f"{tmp_path}/cut/shard-*.tar", batch_size=2, epoch_samples=40, shuffle_buffer=4)
    with pytest.warns(UserWarning, match="skipped the rest of shard"):
        batches = list(dm.train_dataloader())
    assert len(batches) == 20 and all(len(b["ids"]) == 2 for b in batches)
    assert _total_counts(batches)["skipped"] >= 1


def test_corrupt_samples_are_counted_across_worker_processes(shards, tiny_model_dir, tmp_path):
    """Each of two workers meets one unreadable image; the batches' counts add up to both."""
    import tarfile

    out, _ = shards
    (tmp_path / "bad").mkdir()
    for name in ("shard-000000.tar", "shard-000002.tar"):
        with tarfile.open(out / name) as src, tarfile.open(tmp_path / "bad" / name, "w") as dst:
            for n, member in enumerate(src.getmembers()):
                data = src.extractfile(member).read()
                if n == 0:  # the first sample's image (members are sorted: .jpg/.png before .json)
                    data = b"not an image"
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
    dm = _dm(tiny_model_dir, f"{tmp_path}/bad/shard-*.tar", num_workers=2, eval_batch_size=2)
    batches = list(dm.val_dataloader())
    assert sum(int(b["valid"].sum()) for b in batches) == 6
    assert _total_counts(batches) == {"skipped": 2, "too_long": 0, "text_only": 0}


def test_sample_whose_image_span_would_be_truncated_is_dropped_and_counted(tmp_path, tiny_model_dir, tiny_processor):
    """Truncation may cut text, never the image: a late image past max_length drops its sample."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes(96, 64, 0))
    late = {
        "id": "late-image", "image": "a.jpg",
        "conversations": [turn("human", "how many shapes are there ?"), turn("gpt", "two"),
                          turn("human", "describe the image in detail ."), turn("gpt", "there are two shapes ."),
                          turn("human", f"{Q} <image>"), turn("gpt", "red")],
    }
    early = multi_turn("early-image", "a.jpg")
    (tmp_path / "mix.json").write_text(json.dumps([early, late]))
    convert(tmp_path / "mix.json", images, tmp_path / "out", progress=False)
    tokens = count_image_tokens(tiny_processor)
    early_end = encode_conversation(early["conversations"], tiny_processor.tokenizer, tokens).image_span[1]
    late_end = encode_conversation(late["conversations"], tiny_processor.tokenizer, tokens).image_span[1]
    assert early_end + 4 < late_end
    dm = _dm(tiny_model_dir, f"{tmp_path}/out/shard-000000.tar", max_length=early_end + 4)
    with pytest.warns(UserWarning, match="too_long"):
        batches = list(dm.val_dataloader())
    assert [i for b in batches for i, ok in zip(b["ids"], b["valid"].tolist()) if ok] == ["early-image"]
    assert batches[0]["input_ids"].shape[1] == early_end + 4  # truncated, image intact
    assert _total_counts(batches) == {"skipped": 0, "too_long": 1, "text_only": 0}


def test_text_only_samples_are_counted_apart_from_corrupt_ones(tmp_path, tiny_model_dir):
    path, images, _, _ = write_bad_cases(tmp_path)
    convert(path, images, tmp_path / "out", progress=False)  # keeps the text-only record
    dm = _dm(tiny_model_dir, f"{tmp_path}/out/shard-*.tar")
    with pytest.warns(UserWarning, match=r"dropped sample '[^']+' of shard .*shard-000000.tar \(text_only\)"):
        batches = list(dm.val_dataloader())
    assert [i for b in batches for i, ok in zip(b["ids"], b["valid"].tolist()) if ok] == ["ok-jpg", "multi-png"]
    assert _total_counts(batches) == {"skipped": 0, "too_long": 0, "text_only": 1}


def test_multi_turn_record_is_preprocessed_as_llava_1_5(shards, tiny_model_dir):
    """Image first in its turn, every answer supervised, pixels square at the processor's size."""
    out, records = shards
    dm = _dm(tiny_model_dir, f"{out}/shard-000000.tar", eval_batch_size=4)
    batch = next(iter(dm.val_dataloader()))
    row = batch["ids"].index(records[0]["id"])  # record 0 is multi-turn, <image> after its question
    tok = dm.processor.tokenizer
    start, end = batch["image_span"][row].tolist()
    ids = batch["input_ids"][row].tolist()
    assert tok.convert_ids_to_tokens(ids[start - 2 : start]) == ["USER", ":"]
    assert tok.convert_ids_to_tokens(ids[end : end + 3]) == ["what", "color", "is"]
    labels = batch["labels"][row].tolist()
    supervised = tok.convert_ids_to_tokens([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert supervised == ["red", "</s>", "two", "</s>", "there", "are", "two", "shapes", ".", "</s>"]
    assert batch["pixel_values"].shape[1:] == (3, 96, 96)


def test_a_stream_of_nothing_but_errors_fails_instead_of_spinning(tmp_path, tiny_model_dir):
    (tmp_path / "shard-000000.tar").write_bytes(b"this is not a tar file" * 100)
    dm = _dm(tiny_model_dir, f"{tmp_path}/shard-000000.tar")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="in a row gave nothing"):
        next(iter(dm.train_dataloader()))


def test_llava_shards_config_streams_converted_shards(shards, tiny_model_dir, tmp_path):
    out, _ = shards
    cfg = compose("train", [
        "data=llava_shards", f"model.pretrained={tiny_model_dir}",
        f"data.train_urls='{out}/shard-{{000000..000002}}.tar'",  # Hydra needs braces quoted
        f"data.val_urls={out}/shard-000003.tar",
        "data.num_workers=0", "data.batch_size=2", "data.eval_batch_size=4",
    ], output_dir=tmp_path)
    assert cfg.data.test_urls == cfg.data.val_urls and cfg.data.max_length == 2048
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and set(batch["data_counts"]) == set(COUNT_KEYS)
    assert sum(len(b["ids"]) for b in dm.test_dataloader()) == 4


def test_training_stream_pickles_for_spawned_workers_and_keeps_one_counter(shards, tiny_model_dir):
    import pickle

    out, _ = shards
    dataset = _dm(tiny_model_dir, f"{out}/shard-*.tar").train_dataloader().dataset
    restored = pickle.loads(pickle.dumps(dataset))
    batch = next(iter(restored))
    assert len(batch["ids"]) == 2 and set(batch["data_counts"]) == set(COUNT_KEYS)
    # the stages built at each iter() all count into the dataset's one counter
    restored.counts(ValueError("bad sample"))
    assert next(iter(restored))["data_counts"]["skipped"] == 1


def test_warnings_stop_after_a_few_per_kind_but_counting_goes_on():
    import warnings

    from dllava.data.reader import WARNINGS_PER_KIND, DataCounts, TextOnlySample

    counts = DataCounts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(WARNINGS_PER_KIND + 5):
            counts(TextOnlySample(f"sample {n}"))
            counts.good()
    assert len(caught) == WARNINGS_PER_KIND and "only counted" in str(caught[-1].message)
    assert counts.take() == {"skipped": 0, "too_long": 0, "text_only": WARNINGS_PER_KIND + 5}
    assert counts.take() == {"skipped": 0, "too_long": 0, "text_only": 0}


def test_max_length_that_leaves_no_room_past_the_image_fails_at_setup(shards, tiny_model_dir):
    out, _ = shards
    with pytest.raises(ValueError, match=r"data.max_length must exceed \d+ \(system prompt \+ 64 image tokens"):
        _dm(tiny_model_dir, f"{out}/shard-*.tar", max_length=64)


def test_an_eval_pass_without_samples_fails_and_one_that_drops_many_warns():
    import warnings

    from dllava.data.reader import check_eval_pass

    urls = ["/d/val-000000.tar", "/d/val-000001.tar"]
    with pytest.raises(RuntimeError, match=r"data.val_urls: the val pass used no sample \(40 counted in /d/val-000000.tar, /d/val-000001.tar\)"):
        check_eval_pass("val", urls, expected=40, real=0, max_skip_share=0.05)
    with pytest.warns(UserWarning, match=r"data.test_urls: the test pass dropped 3 of 40 samples \(7.5% > data.max_skip_share=0.05\)"):
        check_eval_pass("test", urls, expected=40, real=37, max_skip_share=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_eval_pass("val", urls, expected=40, real=38, max_skip_share=0.05)  # 5%: not more than the share


def test_datamodule_judges_only_a_complete_pass(shards, tiny_model_dir):
    out, _ = shards
    dm = _dm(tiny_model_dir, f"{out}/shard-*.tar", world_size=2)
    dm.val_dataloader()
    dm.check_eval_pass("val", real=10, rows=15)  # a partial pass (limit_val_batches): not judged
    with pytest.raises(RuntimeError, match="the val pass used no sample"):
        dm.check_eval_pass("val", real=0, rows=16)
    with pytest.raises(ValueError, match=r"data.max_skip_share must be a number in \[0, 1\], got 2"):
        _dm(tiny_model_dir, f"{out}/shard-*.tar", max_skip_share=2)


def test_training_warnings_name_the_shard_and_the_sample_key(tmp_path, tiny_model_dir):
    path, images, _, _ = write_bad_cases(tmp_path)
    convert(path, images, tmp_path / "out", progress=False)  # keeps the text-only record
    dm = _dm(tiny_model_dir, f"{tmp_path}/out/shard-*.tar", batch_size=1, epoch_samples=6, shuffle_buffer=1)
    with pytest.warns(UserWarning, match=r"dropped sample '\d+' of shard .*out/shard-000000.tar \(text_only\)"):
        list(dm.train_dataloader())


# -- resuming the training stream: epochs from the caller, consumed samples skipped ----------------------
@pytest.fixture(scope="module")
def shards_with_drops(shards, tmp_path_factory):
    """The 16 good samples in 4 shards plus 4 shards of 2 good samples and a text-only one, which training drops."""
    out, _ = shards
    root = tmp_path_factory.mktemp("drops")
    path, images, _, _ = write_bad_cases(root)
    convert(path, images, root / "bad", progress=False)  # ok-jpg, multi-png, text-only
    shutil.copytree(out, root / "train")
    for n in range(4):  # drawn often enough that every epoch drops some
        shutil.copy(next((root / "bad").glob("shard-*.tar")), root / "train" / f"shard-bad{n}.tar")
    return f"{root}/train/shard-*.tar"


def _resumable_dm(tiny_model_dir, urls):
    dm = _dm(tiny_model_dir, urls, num_workers=2, batch_size=2, epoch_samples=16, shuffle_buffer=8)
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0)
    return dm


def _train_pass(dm, loader, stop_after=None):
    """One pass as Lightning makes it: each batch's position recorded as it is handed to training."""
    batches, state = [], None
    for batch in loader:
        batches.append(dm.on_before_batch_transfer(batch, 0))
        if len(batches) == stop_after:
            state = dm.state_dict()
    return batches, state


def _fingerprint(batches):
    return [(b["ids"], b["input_ids"].tolist(), b["data_counts"]) for b in batches]


def test_each_training_epoch_is_a_function_of_its_index_not_of_earlier_passes(shards_with_drops, tiny_model_dir):
    """Epoch 2 read after epochs 0 and 1 in the same process equals epoch 2 read first by a new process
    (today's workers count their own epochs and start at 0 again)."""
    dm = _resumable_dm(tiny_model_dir, shards_with_drops)
    loader = dm.train_dataloader()
    epochs = [_train_pass(dm, loader)[0] for _ in range(3)]
    assert len(epochs[2]) == 8 and _fingerprint(epochs[1]) != _fingerprint(epochs[2])
    state = dm.state_dict()
    assert state["train_position"]["epoch"] == 2

    fresh = _resumable_dm(tiny_model_dir, shards_with_drops)
    fresh.load_state_dict({"train_position": {**state["train_position"], "epoch": 1}})  # epoch 1 finished
    assert _fingerprint(_train_pass(fresh, fresh.train_dataloader())[0]) == _fingerprint(epochs[2])
    again = _resumable_dm(tiny_model_dir, shards_with_drops)
    assert _fingerprint(_train_pass(again, again.train_dataloader())[0]) == _fingerprint(epochs[0])


@pytest.mark.parametrize("trained", [1, 3, 4, 7])
def test_resumed_epoch_skips_the_consumed_raw_samples_and_yields_exactly_the_rest(shards_with_drops, tiny_model_dir, trained):
    """Two workers; after ``trained`` batches of epoch 1 (odd: the other worker's batch is next) a new
    loader restored from the recorded position yields the uninterrupted epoch's remaining batches, and
    the drops they report add up to the uninterrupted epoch's."""
    dm = _resumable_dm(tiny_model_dir, shards_with_drops)
    loader = dm.train_dataloader()
    _train_pass(dm, loader)
    whole, state = _train_pass(dm, loader, stop_after=trained)
    assert state["train_position"]["epoch"] == 1
    assert sum(_total_counts(whole).values()) > 0  # the text-only sample was drawn and dropped

    resumed = _resumable_dm(tiny_model_dir, shards_with_drops)
    resumed.load_state_dict(state)
    rest, _ = _train_pass(resumed, resumed.train_dataloader())
    assert _fingerprint(rest) == _fingerprint(whole[trained:])
    assert resumed.state_dict() == dm.state_dict()  # the resumed pass ends where the whole one did


def test_a_position_recorded_under_another_layout_warns_and_restarts_its_epoch(shards_with_drops, tiny_model_dir):
    dm = _resumable_dm(tiny_model_dir, shards_with_drops)
    loader = dm.train_dataloader()
    _train_pass(dm, loader)
    whole, state = _train_pass(dm, loader, stop_after=3)  # epoch 1, mid-way
    other = _dm(tiny_model_dir, shards_with_drops, num_workers=1, batch_size=2, epoch_samples=16, shuffle_buffer=8)
    other.trainer = SimpleNamespace(world_size=1, global_rank=0)
    other.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"data.num_workers.*resume exactly"):
        batches, end = _train_pass(other, other.train_dataloader(), stop_after=1)
    assert end["train_position"]["epoch"] == 1 and len(batches) == 8  # all of epoch 1, from its start
