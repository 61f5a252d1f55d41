"""Reader throughput: samples/s per DataLoader worker for read + decode + preprocess + tokenise + collate.

``python -m dllava.data.bench --image-size 336 --workers 0 1 2 --out bench.json`` measures the training
stream exactly as ``data=llava_shards`` builds it (resampled shards, shuffle of bytes, PIL decode,
expand-to-square, CLIP preprocessing, vicuna_v1 tokenisation of the training and generation prompts,
collate). Without ``--shards`` it first writes its own shards through the converter: ``--samples``
JPEGs of COCO's typical 640x480 with smooth content (about COCO's bytes per image; noise would be
larger and slower to decode than photographs) and multi-turn conversations of ~``--words`` words.
Without ``--processor`` it uses a CLIP processor at ``--image-size`` (OpenAI CLIP mean/std, 14 px
patches: 576 image tokens at 336 px) and the tiny word-level tokenizer; pass a llava-hf model directory
to time its own image processor and tokenizer.

From the 1-worker rate it derives how many workers keep one GPU fed:
``ceil(per_gpu_batch / step_time_s / samples_per_s_per_worker)``. Not a test: timings depend on the
machine, and the JSON records what it ran on.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import webdataset as wds
from PIL import Image

from dllava.data.datamodule import SamplePreprocessor, _Collate, count_image_tokens, decode_sample, resolve_urls
from dllava.data.reader import resampled_stream

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def photo_like_jpeg(rng: np.random.Generator, width: int = 640, height: int = 480) -> bytes:
    """A JPEG with smooth regions, edges and mild grain, so size and decode cost resemble a photograph."""
    field = Image.fromarray(rng.integers(0, 256, size=(height // 40, width // 40, 3), dtype=np.uint8))
    image = np.asarray(field.resize((width, height), Image.BICUBIC), dtype=np.int16)
    blocks = rng.integers(-40, 41, size=(height // 16, width // 16, 1))
    image = image + np.kron(blocks, np.ones((16, 16, 1), dtype=np.int16))  # edges
    image = image + rng.integers(-36, 37, size=image.shape)  # grain: ~160 KB per image, COCO's mean
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def conversation(rng: np.random.Generator, vocabulary: Sequence[str], words: int) -> list[dict[str, str]]:
    """3-5 rounds of random words totalling about ``words``, ``<image>`` in the first question."""
    rounds = int(rng.integers(3, 6))
    per_turn = max(1, words // (2 * rounds))
    turns = []
    for r in range(rounds):
        question = " ".join(rng.choice(vocabulary, size=per_turn))
        answer = " ".join(rng.choice(vocabulary, size=per_turn))
        turns.append({"from": "human", "value": f"<image>\n{question}" if r == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def write_bench_shards(out: Path, samples: int, words: int, samples_per_shard: int, seed: int = 0) -> list[str]:
    """``samples`` LLaVA records with photo-like JPEGs, converted into shards under ``out``."""
    from dllava.data.shards import convert
    from dllava.model.tiny import tiny_vocabulary

    rng = np.random.default_rng(seed)
    vocabulary = [w for w in tiny_vocabulary() if w.isalpha()]
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(samples):
        (images / f"{i:06d}.jpg").write_bytes(photo_like_jpeg(rng))
        records.append({"id": str(i), "image": f"{i:06d}.jpg", "conversations": conversation(rng, vocabulary, words)})
    (out / "records.json").write_text(json.dumps(records))
    manifest = convert(out / "records.json", images, out / "shards", samples_per_shard, progress=False)
    return [str(out / "shards" / name) for name in manifest["shards"]]


def build_processor(image_size: int, processor: str | None = None) -> Any:
    """The model's own processor, or CLIP at ``image_size`` (14 px patches) with the tiny tokenizer."""
    if processor is not None:
        from dllava.model.loading import load_processor

        return load_processor(processor)
    from transformers import CLIPImageProcessor, LlavaProcessor

    from dllava.model.tiny import build_tiny_tokenizer

    with warnings.catch_warnings():  # without torchvision transformers falls back to the PIL backend
        warnings.simplefilter("ignore")
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tiny_tokenizer(model_max_length=2048), patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def measure(
    urls: Sequence[str], processor: Any, workers: int, batch_size: int, batches_per_worker: int,
    shuffle_buffer: int, max_length: int,
) -> dict[str, Any]:
    """One epoch of the training stream with ``workers`` workers; steady rate excludes the first batches."""
    preprocess = SamplePreprocessor(processor, count_image_tokens(processor), max_length)
    stream = resampled_stream(
        urls, decode_sample, preprocess, _Collate(processor.tokenizer.pad_token_id), batch_size,
        batches_per_worker, shuffle_buffer, seed=0,
    )
    loader = wds.WebLoader(stream, batch_size=None, num_workers=workers)
    started = time.perf_counter()
    warm_at, samples, warm_samples, tokens = None, 0, 0, []
    for n, batch in enumerate(loader):
        samples += batch["input_ids"].shape[0]
        tokens.extend(batch["attention_mask"].sum(1).tolist())
        if n + 1 == max(1, workers):  # every worker has delivered once: start-up is over
            warm_at, warm_samples = time.perf_counter(), samples
    ended = time.perf_counter()
    steady = (samples - warm_samples) / (ended - warm_at) if warm_at and samples > warm_samples else float("nan")
    return {
        "workers": workers,
        "samples": samples,
        "seconds": ended - started,
        "samples_per_s": samples / (ended - started),
        "steady_samples_per_s": steady,
        "steady_samples_per_s_per_worker": steady / max(1, workers),
        "mean_tokens": float(np.mean(tokens)),
    }


def workers_needed(per_worker: float, per_gpu_batch: int, step_time_s: float) -> int:
    """Workers per GPU so that data arrives at least as fast as the GPU consumes it."""
    return math.ceil(per_gpu_batch / step_time_s / per_worker)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dllava-bench-") as tmp:
        if args.shards:
            urls = resolve_urls(args.shards, "--shards")
            image_bytes = None
        else:
            urls = write_bench_shards(Path(tmp), args.samples, args.words, args.samples_per_shard)
            image_bytes = float(np.mean([p.stat().st_size for p in (Path(tmp) / "images").glob("*.jpg")]))
        processor = build_processor(args.image_size, args.processor)
        rows = []
        for workers in args.workers:
            batches = max(2, args.samples // (args.batch_size * max(1, workers)))
            rows.append(measure(urls, processor, workers, args.batch_size, batches, args.shuffle_buffer,
                                args.max_length))
    single = next((r for r in rows if r["workers"] == 1), rows[0])
    per_worker = single["steady_samples_per_s_per_worker"]
    needed = args.per_gpu_batch / args.step_time
    return {
        "image_size": args.image_size,
        "image_tokens": count_image_tokens(processor),
        "image_processor": type(processor.image_processor).__name__,
        "tokenizer": type(processor.tokenizer).__name__,
        "mean_image_bytes": image_bytes,
        "batch_size": args.batch_size,
        "results": rows,
        "assumption": {"per_gpu_batch": args.per_gpu_batch, "step_time_s": args.step_time,
                       "samples_per_s_needed_per_gpu": needed},
        "samples_per_s_per_worker": per_worker,
        "workers_per_gpu": workers_needed(per_worker, args.per_gpu_batch, args.step_time),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dllava.data.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=None, help="shards to read (brace pattern or glob); default: generate")
    parser.add_argument("--processor", default=None, help="model directory with the processor; default: CLIP")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=256, help="samples per measurement (and generated)")
    parser.add_argument("--samples-per-shard", type=int, default=32)
    parser.add_argument("--words", type=int, default=120, help="words per generated conversation")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shuffle-buffer", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--per-gpu-batch", type=int, default=8, help="samples per GPU step (paper: 64 / 8 GPUs)")
    parser.add_argument("--step-time", type=float, default=1.25, help="assumed seconds per GPU step (7B, A100)")
    parser.add_argument("--out", default="bench.json")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, print a table, write the JSON."""
    args = _parser().parse_args(argv)
    report = run(args)
    print(f"{'workers':>7} {'samples':>7} {'s':>7} {'samples/s':>10} {'steady/s':>9} {'per worker':>10}")
    for r in report["results"]:
        print(f"{r['workers']:>7} {r['samples']:>7} {r['seconds']:>7.1f} {r['samples_per_s']:>10.1f} "
              f"{r['steady_samples_per_s']:>9.1f} {r['steady_samples_per_s_per_worker']:>10.1f}")
    a = report["assumption"]
    print(f"{report['image_size']} px, {report['image_processor']}, mean {report['results'][0]['mean_tokens']:.0f} "
          f"tokens; a GPU step of {a['per_gpu_batch']} samples every {a['step_time_s']} s needs "
          f"{a['samples_per_s_needed_per_gpu']:.1f} samples/s -> {report['workers_per_gpu']} worker(s) per GPU")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
