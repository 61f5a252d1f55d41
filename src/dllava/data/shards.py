"""LLaVA JSON/JSONL + image folders -> webdataset shards, one sample per record (the converter CLI).

``python -m dllava.data.shards llava_v1_5_mix665k.json --image-root playground/data --out
data/llava_v1_5_mix665k --requires-image --workers 8`` (also installed as ``dllava-shards``).

Each sample is ``<key>.json`` (the record as given) plus ``<key>.<ext>`` (the image file's bytes as
stored, ext = the file's own extension). The key is the record's index in the input (``000012345``):
unique and dot-free even where LLaVA ids repeat. Rejected records go to ``rejected.jsonl`` with their
reason (:mod:`dllava.data.records`); ``manifest.json`` is written last and counts
``written + rejected == records`` exactly.

Resuming. Records are assigned to shards by a plan made in a first pass and saved as ``plan.json``:
``--samples-per-shard`` consecutive records per shard, and with ``--max-shard-bytes`` fewer, so that the
tar's size estimated from ``os.stat`` of each image (512-byte headers and padding included) stays
under the limit. A shard is written under a dot-prefixed temporary name and renamed when complete,
after its own stats file (``.stats/<shard>.json``); a re-run reuses the saved plan (so size-dependent
plans do not shift when files change) and skips every shard whose tar and stats exist. A plan made
with other options or another input is never mixed with this one: the error says what differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Sequence

import webdataset as wds
from tqdm import tqdm

from dllava.data.records import Malformed, Rejected, check_record, read_records

PLAN_VERSION = 1
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to whole 10 KiB records
SHARD_MTIME = 0  # fixed member times: a re-converted shard is byte-identical


# -- planning ----------------------------------------------------------------------------------------
def member_bytes(size: int) -> int:
    """Bytes a tar member of ``size`` bytes occupies: one header block plus its data padded to blocks."""
    return TAR_BLOCK + math.ceil(size / TAR_BLOCK) * TAR_BLOCK


def record_bytes(record: Any, image_root: Path) -> int:
    """Estimated tar bytes of one record's sample (0 image bytes when the image is missing)."""
    size = member_bytes(len(encode_json(record))) if isinstance(record, dict) else 0
    image = record.get("image") if isinstance(record, dict) else None
    if isinstance(image, str) and image:
        try:
            size += member_bytes(os.stat(image_root / image).st_size)
        except OSError:
            pass
    return size


def plan_shards(
    records: Sequence[Any], image_root: Path, samples_per_shard: int, max_shard_bytes: int | None = None
) -> list[tuple[int, int]]:
    """``[start, stop)`` record ranges, one per shard, in input order.

    Without a byte limit the ranges depend only on the record count. With one, a shard closes before
    the record that would take it past ``max_shard_bytes`` (archive end padding included); a single
    record larger than the limit gets a shard of its own.
    """
    if max_shard_bytes is None:
        return [(s, min(s + samples_per_shard, len(records))) for s in range(0, len(records), samples_per_shard)]
    ranges: list[tuple[int, int]] = []
    start, size = 0, 0
    for index, record in enumerate(records):
        nbytes = record_bytes(record, image_root)
        full = index - start >= samples_per_shard or size + nbytes + 2 * TAR_BLOCK + TAR_RECORD > max_shard_bytes
        if index > start and full:
            ranges.append((start, index))
            start, size = index, 0
        size += nbytes
    if start < len(records):
        ranges.append((start, len(records)))
    return ranges


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.tar"


def encode_json(record: Any) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


# -- writing one shard -------------------------------------------------------------------------------
def write_shard(task: tuple[Path, int, int, list[Any], Path, bool]) -> dict[str, Any]:
    """Write one shard (temporary name, then rename); returns its stats, also saved beside it.

    Never raises for a bad record: each one is rejected with its reason.
    """
    out, shard, start, records, image_root, requires_image = task
    name = shard_name(shard)
    tmp = out / f".{name}.{os.getpid()}.tmp"  # dot-prefixed: shard globs never match it
    rejected: list[dict[str, Any]] = []
    written = text_only = 0
    with wds.TarWriter(str(tmp), mtime=SHARD_MTIME) as sink:
        for offset, record in enumerate(records):
            index = start + offset
            try:
                checked = check_record(record, image_root, requires_image)
            except Rejected as err:
                rejected.append(_rejection(index, record, err.reason, err.detail))
                continue
            except Exception as err:  # a bug or an odd record must not lose the shard
                rejected.append(_rejection(index, record, "error", f"{type(err).__name__}: {err}"))
                continue
            sample = {"__key__": f"{index:09d}", "json": encode_json(checked.record)}
            if checked.image is not None:
                sample[checked.image_key] = checked.image
            else:
                text_only += 1
            sink.write(sample)
            written += 1
    stats = {
        "shard": name, "start": start, "stop": start + len(records), "written": written,
        "text_only": text_only, "rejected": rejected, "bytes": tmp.stat().st_size,
    }
    _write_json_atomic(out / ".stats" / f"{name}.json", stats)
    os.replace(tmp, out / name)  # last: the tar's presence (with its stats) means complete
    return stats


def _rejection(index: int, record: Any, reason: str, detail: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": index, "reason": reason, "detail": detail}
    if isinstance(record, dict):
        entry["id"] = record.get("id")
        if "image" in record:
            entry["image"] = record.get("image")
    elif isinstance(record, Malformed):
        entry["line"] = record.line
    return entry


def _write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# -- the whole conversion ----------------------------------------------------------------------------
def _load_plan(out: Path, expected: dict[str, Any]) -> list[tuple[int, int]] | None:
    """The saved plan's ranges when it was made for the same input and options; None when there is none."""
    path = out / "plan.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    differs = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if differs:
        detail = ", ".join(f"{k}: planned {a!r}, now {b!r}" for k, (a, b) in differs.items())
        raise ValueError(
            f"{out} holds shards of another conversion ({detail}). Use a new --out, or delete {out} to start over."
        )
    return [tuple(r) for r in saved["shards"]]


def _complete(out: Path, name: str) -> dict[str, Any] | None:
    stats = out / ".stats" / f"{name}.json"
    if (out / name).exists() and stats.exists():
        return json.loads(stats.read_text())
    return None


def convert(
    input_path: str | Path,
    image_root: str | Path,
    out: str | Path,
    samples_per_shard: int = 1000,
    max_shard_bytes: int | None = None,
    requires_image: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert ``input_path`` into shards under ``out``; returns the manifest (also written there)."""
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"--max-shard-bytes must be >= 1, got {max_shard_bytes}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    image_root, out = Path(image_root).resolve(), Path(out)
    if not image_root.is_dir():
        raise FileNotFoundError(f"--image-root {image_root} is not a directory")
    records, data = read_records(input_path)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {
        "version": PLAN_VERSION,
        "input_sha256": hashlib.sha256(data).hexdigest(),
        "records": len(records),
        "image_root": str(image_root),
        "samples_per_shard": samples_per_shard,
        "max_shard_bytes": max_shard_bytes,
        "requires_image": requires_image,
    }
    ranges = _load_plan(out, fingerprint)  # raises, touching nothing, for another conversion's folder
    for stale in out.glob(".shard-*.tmp"):  # left by an interrupted run
        stale.unlink()
    (out / "manifest.json").unlink(missing_ok=True)  # present only when complete
    if ranges is None:
        ranges = plan_shards(records, image_root, samples_per_shard, max_shard_bytes)
        _write_json_atomic(out / "plan.json", {**fingerprint, "input": str(input_path), "shards": ranges})
    names = [shard_name(i) for i in range(len(ranges))]
    stats: dict[str, dict[str, Any]] = {}
    todo = []
    for shard, (start, stop) in enumerate(ranges):
        done = _complete(out, names[shard])
        if done is not None:
            stats[names[shard]] = done
        else:
            todo.append((out, shard, start, records[start:stop], image_root, requires_image))
    skipped = sum(s["stop"] - s["start"] for s in stats.values())
    with tqdm(total=len(records), initial=skipped, desc=f"shards -> {out}", unit="rec", disable=not progress) as bar:
        if workers > 1 and len(todo) > 1:
            with Pool(min(workers, len(todo))) as pool:
                for result in pool.imap_unordered(write_shard, todo):
                    stats[result["shard"]] = result
                    bar.update(result["stop"] - result["start"])
        else:
            for task in todo:
                result = write_shard(task)
                stats[result["shard"]] = result
                bar.update(result["stop"] - result["start"])
    return _write_manifest(out, names, stats, fingerprint, len(records))


def _write_manifest(
    out: Path, names: list[str], stats: dict[str, dict[str, Any]], fingerprint: dict[str, Any], records: int
) -> dict[str, Any]:
    rejected = [entry for name in names for entry in stats[name]["rejected"]]
    reasons: dict[str, int] = {}
    for entry in rejected:
        reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
    tmp = out / f".rejected.jsonl.{os.getpid()}.tmp"
    with tmp.open("w") as sink:
        for entry in rejected:
            sink.write(json.dumps(entry, ensure_ascii=False) + "\n")
    os.replace(tmp, out / "rejected.jsonl")
    manifest = {
        "records": records,
        "written": sum(stats[n]["written"] for n in names),
        "rejected": len(rejected),
        "text_only": sum(stats[n]["text_only"] for n in names),
        "reasons": dict(sorted(reasons.items())),
        "shards": names,
        "shard_samples": [stats[n]["written"] for n in names],
        "bytes": sum(stats[n]["bytes"] for n in names),
        **{k: fingerprint[k] for k in ("input_sha256", "samples_per_shard", "max_shard_bytes", "requires_image")},
    }
    _write_json_atomic(out / "manifest.json", manifest)
    return manifest


# -- CLI ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dllava-shards",
        description="Convert LLaVA instruction data (JSON list or JSONL + image folders) into webdataset shards.",
    )
    parser.add_argument("input", help="llava_v1_5_mix665k.json or a JSONL file of the same records")
    parser.add_argument("--image-root", required=True, help="folder the records' 'image' paths are relative to")
    parser.add_argument("--out", required=True, help="output folder: shards, manifest.json, rejected.jsonl")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="records per shard (default 1000)")
    parser.add_argument("--max-shard-bytes", type=int, default=None, help="also close a shard before this size")
    parser.add_argument("--requires-image", action="store_true", help="drop text-only records (as the paper does)")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards (default 1)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Convert, then print the manifest's counts; bad options exit with status 2 and the reason."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        manifest = convert(
            args.input, args.image_root, args.out, args.samples_per_shard, args.max_shard_bytes,
            args.requires_image, args.workers,
        )
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    summary = {k: manifest[k] for k in ("records", "written", "rejected", "text_only", "reasons")}
    print(json.dumps({**summary, "shards": len(manifest["shards"]), "out": str(args.out)}), file=sys.stdout)


if __name__ == "__main__":
    main()
