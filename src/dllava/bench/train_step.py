"""Training step time and peak memory: ``stage=sparsify`` against ``stage=dense``, side by side.

    python -m dllava.bench.train_step --model data/tiny_base --batch-size 32 --steps 20 --out bench_train_step.json

Both arms train the same model on the same fixed synthetic batches (forward, backward, AdamW step)
through :class:`dllava.training.module.DynamicLitModule`, the code ``train.py`` runs. Each arm runs in its
own fresh process, alternating dense/sparse for ``--repeats`` rounds, so neither inherits the other's
allocator state; the table reports medians and the sparse/dense ratios. Peak memory is CUDA's
``max_memory_allocated`` on a GPU and, on CPU, the growth of the process's peak resident set (VmHWM,
reset through ``/proc/self/clear_refs``) over its size before the first step. Warm-up steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ARMS = {
    "dense": {"sparsity": {"vision": False, "text": False}, "trainable": ["projector", "llm"]},
    "sparsify": {"sparsity": {}, "trainable": ["projector", "llm", "predictors"]},
}


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def make_batches(model_dir: str, batch_size: int, count: int, text_min_len: int) -> list[dict[str, Any]]:
    """``count`` collated batches of synthetic training records (a fixed, seeded set)."""
    from dllava.data.datamodule import SamplePreprocessor, count_image_tokens, collate
    from dllava.data.synthetic import make_record
    from dllava.model.loading import load_processor

    processor = load_processor(model_dir)
    preprocess = SamplePreprocessor(processor, count_image_tokens(processor), max_length=512)
    batches = []
    for b in range(count):
        samples = []
        for i in range(batch_size):
            record, image = make_record("train", b * batch_size + i, seed=0)
            samples.append(preprocess({"key": str(i), "image": image, "record": record}))
        batches.append(collate(samples, processor.tokenizer.pad_token_id))
    return batches


def run_arm(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``args.steps`` optimizer steps of one arm in this process."""
    from dllava.training.module import DynamicLitModule

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = ARMS[arm]
    sparsity = {**spec["sparsity"], "keep": args.keep, "text_min_len": args.text_min_len} if arm == "sparsify" else spec["sparsity"]
    module = DynamicLitModule(
        model={"pretrained": args.model, "predictor": json.loads(args.predictor)},
        optim={"lr": 1e-4, "predictor_lr": 1e-3}, sparsity=sparsity, trainable=spec["trainable"],
    )
    module.configure_model()
    module.to(device)
    optimizer = torch.optim.AdamW(module.parameter_groups())
    batches = make_batches(args.model, args.batch_size, 2, args.text_min_len)
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]

    def step(batch: dict[str, Any]) -> None:
        optimizer.zero_grad(set_to_none=True)
        module.total_loss(module(batch, mode="train")).backward()
        optimizer.step()

    for i in range(args.warmup):
        step(batches[i % 2])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _proc_status("VmRSS")
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        step(batches[i % 2])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_status("VmHWM")
    return {
        "arm": arm,
        "device": device.type,
        "step_s": statistics.median(times),
        "peak_bytes_over_start": peak - base,
        "tokens_per_batch": int(batches[0]["attention_mask"].sum()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="data/tiny_base", help="from_pretrained directory")
    parser.add_argument("--predictor", default='{"d_model": 64, "heads": 4, "ff": 256, "layers": 2}')
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="alternating dense/sparse rounds")
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--text-min-len", type=int, default=16)
    parser.add_argument("--out", default="bench_train_step.json")
    parser.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args.arm, args)))
        return {}
    child_args = list(argv if argv is not None else sys.argv[1:])
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm in ARMS:
            out = subprocess.run(
                [sys.executable, "-m", "dllava.bench.train_step", *child_args, "--arm", arm],
                check=True, capture_output=True, text=True,
            )
            runs[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {
        arm: {
            "step_s": statistics.median(r["step_s"] for r in rs),
            "peak_bytes_over_start": statistics.median(r["peak_bytes_over_start"] for r in rs),
            "runs": rs,
        }
        for arm, rs in runs.items()
    }
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "keep": args.keep,
        "device": runs["dense"][0]["device"],
        "arms": summary,
        "step_time_ratio": summary["sparsify"]["step_s"] / summary["dense"]["step_s"],
        "peak_memory_ratio": summary["sparsify"]["peak_bytes_over_start"] / max(1, summary["dense"]["peak_bytes_over_start"]),
    }
    print(f"{'arm':<10} {'step (ms)':>10} {'peak mem over start (MiB)':>26}")
    for arm, s in summary.items():
        print(f"{arm:<10} {1000 * s['step_s']:>10.1f} {s['peak_bytes_over_start'] / 2**20:>26.1f}")
    print(f"sparsify/dense: step time x{result['step_time_ratio']:.2f}, peak memory x{result['peak_memory_ratio']:.2f}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
