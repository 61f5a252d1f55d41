"""The LLaVA JSON -> webdataset converter: good records in, bad ones rejected with reasons, resumable."""

import json
import os

import pytest
import webdataset as wds

from dllava.data.records import check_record
from dllava.data.shards import convert, main, plan_shards
from tests.data.llava_set import write_bad_cases, write_good_set


def _read_back(out, manifest):
    """Every sample of the converted shards, read with webdataset's own reader (no decoding)."""
    urls = [str(out / name) for name in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_each_bad_record_is_rejected_with_its_reason_and_counts_are_exact(tmp_path):
    path, images, records, reasons = write_bad_cases(tmp_path)
    manifest = convert(path, images, tmp_path / "out", samples_per_shard=3, progress=False)
    assert manifest["records"] == 8 and manifest["written"] == 3 and manifest["rejected"] == 5
    assert manifest["text_only"] == 1
    assert manifest["reasons"] == {"malformed_conversation": 1, "missing_image": 1, "no_image_token": 1,
                                   "unreadable_image": 2}
    assert manifest["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert {r["index"]: r["reason"] for r in rejected} == reasons
    assert {r["id"] for r in rejected} == {records[i]["id"] for i in reasons}
    assert all(r["detail"] for r in rejected)


def test_written_samples_hold_the_stored_image_bytes_under_their_extension(tmp_path):
    path, images, records, _ = write_bad_cases(tmp_path)
    manifest = convert(path, images, tmp_path / "out", samples_per_shard=3, progress=False)
    samples = {s["__key__"]: s for s in _read_back(tmp_path / "out", manifest)}
    assert sorted(samples) == ["000000000", "000000001", "000000004"]
    jpg, png, text = samples["000000000"], samples["000000001"], samples["000000004"]
    assert jpg["jpg"] == (images / "coco" / "a.jpg").read_bytes() and "png" not in jpg
    assert png["png"] == (images / "gqa" / "b.png").read_bytes()
    assert json.loads(png["json"]) == records[1]  # the multi-turn record, verbatim
    assert len(json.loads(png["json"])["conversations"]) == 6
    assert {k for k in text if not k.startswith("__")} == {"json"}  # text-only: no image member


def test_requires_image_drops_text_only_records_as_rejected(tmp_path):
    path, images, _, reasons = write_bad_cases(tmp_path)
    manifest = convert(path, images, tmp_path / "out", samples_per_shard=3, requires_image=True, progress=False)
    assert manifest["written"] == 2 and manifest["rejected"] == 6 and manifest["text_only"] == 0
    assert manifest["reasons"]["text_only"] == 1
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert {r["index"]: r["reason"] for r in rejected} == {**reasons, 4: "text_only"}


def test_jsonl_input_with_a_broken_line_is_converted_around_it(tmp_path):
    path, images, records, _ = write_bad_cases(tmp_path)
    lines = [json.dumps(r) for r in records[:2]] + ["{not json"] + [json.dumps(records[4])]
    jsonl = tmp_path / "mix.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    manifest = convert(jsonl, images, tmp_path / "out", progress=False)
    assert (manifest["records"], manifest["written"], manifest["rejected"]) == (4, 3, 1)
    rejected = json.loads((tmp_path / "out" / "rejected.jsonl").read_text())
    assert rejected["reason"] == "malformed_record" and rejected["line"] == 3 and rejected["index"] == 2


def test_rerun_skips_finished_shards_and_redoes_only_the_missing_one(tmp_path):
    path, images, _ = write_good_set(tmp_path, 10)
    out = tmp_path / "out"
    first = convert(path, images, out, samples_per_shard=4, progress=False)
    before = {n: (out / n).read_bytes() for n in first["shards"]}
    os.utime(out / "shard-000000.tar", ns=(1, 1))
    (out / "shard-000001.tar").unlink()  # as if interrupted while writing it
    (out / ".shard-000001.tar.999.tmp").write_bytes(b"partial")
    second = convert(path, images, out, samples_per_shard=4, progress=False)
    assert second == first
    assert (out / "shard-000000.tar").stat().st_mtime_ns == 1  # not rewritten
    assert {n: (out / n).read_bytes() for n in second["shards"]} == before  # byte-identical redo
    assert not list(out.glob(".shard-*.tmp"))


def test_rerun_with_other_options_refuses_to_mix_conversions(tmp_path):
    path, images, _ = write_good_set(tmp_path, 4)
    convert(path, images, tmp_path / "out", samples_per_shard=2, progress=False)
    with pytest.raises(ValueError, match=r"samples_per_shard: planned 2, now 3.*new --out"):
        convert(path, images, tmp_path / "out", samples_per_shard=3, progress=False)
    assert (tmp_path / "out" / "manifest.json").exists()  # the finished conversion is left intact


def test_max_shard_bytes_keeps_shards_under_the_limit(tmp_path):
    path, images, records = write_good_set(tmp_path, 12)
    limit = 64 * 1024
    manifest = convert(path, images, tmp_path / "out", samples_per_shard=100, max_shard_bytes=limit, progress=False)
    sizes = [(tmp_path / "out" / n).stat().st_size for n in manifest["shards"]]
    assert len(sizes) > 1 and max(sizes) <= limit
    assert manifest["written"] == 12 and sum(manifest["shard_samples"]) == 12
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["shards"] == [list(r) for r in plan_shards(records, images.resolve(), 100, limit)]


def test_parallel_workers_write_the_same_bytes(tmp_path):
    path, images, _ = write_good_set(tmp_path, 8)
    one = convert(path, images, tmp_path / "one", samples_per_shard=2, workers=1, progress=False)
    two = convert(path, images, tmp_path / "two", samples_per_shard=2, workers=2, progress=False)
    for name in one["shards"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert {k: v for k, v in one.items()} == two


def test_cli_prints_counts_and_rejects_bad_options(tmp_path, capsys):
    path, images, _, _ = write_bad_cases(tmp_path)
    main([str(path), "--image-root", str(images), "--out", str(tmp_path / "out"), "--requires-image"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["records"], summary["written"], summary["rejected"], summary["shards"]) == (8, 2, 6, 1)
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--image-root", str(images), "--out", str(tmp_path / "o2"), "--samples-per-shard", "0"])
    assert exit_info.value.code == 2
    assert "--samples-per-shard must be >= 1" in capsys.readouterr().err


def test_a_record_that_is_not_an_object_is_rejected_not_fatal(tmp_path):
    from dllava.data.records import Rejected

    with pytest.raises(Rejected, match="malformed_record"):
        check_record(["not", "a", "dict"], tmp_path)
    with pytest.raises(Rejected, match="image_token_without_image"):
        check_record({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
                     tmp_path)


def test_rejection_reasons_are_readable_and_identical_across_conversions(tmp_path):
    # PIL's "cannot identify image file" message embeds the in-memory file's repr (an address): the
    # reason must name the image path instead, so two conversions of one input agree byte for byte
    path, images, _, _ = write_bad_cases(tmp_path)
    convert(path, images, tmp_path / "one", samples_per_shard=3, progress=False)
    convert(path, images, tmp_path / "two", samples_per_shard=3, workers=2, progress=False)
    first = (tmp_path / "one" / "rejected.jsonl").read_bytes()
    assert first == (tmp_path / "two" / "rejected.jsonl").read_bytes()
    details = {r["id"]: r["detail"] for r in map(json.loads, first.decode().splitlines())}
    assert details["garbage"] == f"{(images / 'coco' / 'garbage.jpg').resolve()}: cannot identify image file (not an image format PIL reads)"
    assert details["truncated"].startswith(f"{(images / 'coco' / 'truncated.jpg').resolve()}: ")
    assert not any("0x" in d or "object at" in d for d in details.values())


def test_a_jsonl_line_that_is_not_utf8_is_rejected_as_malformed_and_the_rest_converted(tmp_path):
    path, images, records, _ = write_bad_cases(tmp_path)
    good = [json.dumps(r).encode() for r in (records[0], records[1], records[4])]
    latin1 = json.dumps(records[0]).replace("ok-jpg", "caf\u00e9", 1).encode("latin-1")  # é as one byte 0xe9
    jsonl = tmp_path / "mix.jsonl"
    jsonl.write_bytes(b"\n".join([good[0], b"", latin1, good[1], good[2]]) + b"\n")  # blank line 2, bad line 3
    manifest = convert(jsonl, images, tmp_path / "out", progress=False)
    assert (manifest["records"], manifest["written"], manifest["rejected"]) == (4, 3, 1)
    rejected = json.loads((tmp_path / "out" / "rejected.jsonl").read_text())
    assert (rejected["reason"], rejected["line"], rejected["index"]) == ("malformed_record", 3, 1)
    assert "not valid UTF-8" in rejected["detail"]


def test_a_json_list_that_is_not_utf8_fails_with_a_clear_error(tmp_path, capsys):
    path, images, records, _ = write_bad_cases(tmp_path)
    path.write_bytes(json.dumps(records, ensure_ascii=False).replace("ok-jpg", "caf\u00e9", 1).encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}: not valid UTF-8 at byte \d+ .*re-encode"):
        convert(path, images, tmp_path / "out", progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--image-root", str(images), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "not valid UTF-8" in capsys.readouterr().err
