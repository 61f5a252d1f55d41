"""Training step time and peak memory: ``stage=sparsify`` against ``stage=dense``, side by side.

    python -m dllava.bench.train_step --model data/tiny_base --attention eager,sdpa --out bench_train_step.json
    python -m dllava.bench.train_step --text-config '{"hidden_size": 512, "intermediate_size": 1376,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8}' \
        --seq-len 3000 --batch-size 1 --steps 3 --attention eager,sdpa --out bench_3000.json

Both arms train the same model on the same fixed batches (forward, backward, AdamW step) through
:class:`dllava.training.module.DynamicLitModule`, the code ``train.py`` runs. The sparse arm runs once per
gated-softmax implementation in ``--attention`` (``sparsity.attention``: eager, sdpa, flex). Each arm runs
in its own fresh process, in turn with the others for ``--repeats`` rounds, so none inherits another's
allocator state; the table reports medians and each sparse arm's ratios to dense. Peak memory is CUDA's
``max_memory_allocated`` on a GPU (after the warm-up steps) and, on CPU, the growth of the process's peak
resident set (VmHWM, reset through ``/proc/self/clear_refs``) over its size before the first warm-up step:
measured after warm-up, the resident set would already hold what malloc kept from those steps, and the
growth over it is noise (a dense step whose saved tensors alone are 362 MiB read as 36 MiB). Both include
the optimizer state, allocated in the first step. Warm-up steps are not timed.

Batches: the synthetic task's records (``--model``'s processor), or with ``--seq-len N`` sequences of
exactly N tokens (the image's tokens, then random text; the last quarter is the answer, so the text
predictor has work). ``--text-config`` (JSON of ``LlamaConfig`` fields) benchmarks a randomly initialised
LLaVA with the tiny CLIP tower and that decoder instead of ``--model`` (a "mid-size" model whose
attention, not its vision tower, dominates at long sequences).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DENSE = "dense"
ARMS = {
    DENSE: {"sparsity": {"vision": False, "text": False}, "trainable": ["projector", "llm"]},
    "sparsify": {"sparsity": {}, "trainable": ["projector", "llm", "predictors"]},
}


def arm_names(attentions: list[str]) -> list[str]:
    """``dense`` then one ``sparsify_<attention>`` arm per gated-softmax implementation."""
    return [DENSE] + [f"sparsify_{name}" for name in attentions]


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def make_batches(
    model_dir: str, batch_size: int, count: int, text_min_len: int, seq_len: int | None = None
) -> list[dict[str, Any]]:
    """``count`` collated batches: synthetic training records (a fixed, seeded set), or with ``seq_len``
    sequences of that many tokens (see the module docstring)."""
    if seq_len is not None:
        return [long_batch(model_dir, batch_size, seq_len, seed) for seed in range(count)]
    from dllava.data.datamodule import SamplePreprocessor, collate, count_image_tokens
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


def long_batch(model_dir: str, batch_size: int, seq_len: int, seed: int) -> dict[str, Any]:
    """``batch_size`` sequences of ``seq_len`` tokens: BOS, the image's tokens, random words; labels and
    the answer span on the last quarter."""
    from transformers import AutoConfig

    from dllava.model.loading import load_processor

    processor = load_processor(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    n_image = config.image_seq_length
    if seq_len < n_image + 8:
        raise ValueError(f"--seq-len must be at least {n_image + 8} (the image's {n_image} tokens and some text)")
    g = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    ids = torch.randint(10, vocab, (batch_size, seq_len), generator=g)
    ids[ids == config.image_token_id] = 10
    ids[:, 0] = processor.tokenizer.bos_token_id
    ids[:, 1 : 1 + n_image] = config.image_token_id
    answer_from = seq_len - seq_len // 4
    labels = ids.clone()
    labels[:, :answer_from] = -100
    size = processor.image_processor.crop_size["height"]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "answer_span": torch.tensor([[answer_from, seq_len]] * batch_size),
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=g),
    }


def run_arm(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``args.steps`` optimizer steps of one arm in this process."""
    from dllava.training.module import DynamicLitModule

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, attention = arm.partition("_")
    spec = ARMS[kind]
    sparsity = spec["sparsity"]
    if kind != DENSE:
        sparsity = {**sparsity, "keep": args.keep, "text_min_len": args.text_min_len, "attention": attention}
    module = DynamicLitModule(
        model={"pretrained": args.model, "predictor": json.loads(args.predictor)},
        optim={"lr": 1e-4, "predictor_lr": 1e-3}, sparsity=sparsity, trainable=spec["trainable"],
    )
    module.configure_model()
    module.to(device)
    optimizer = torch.optim.AdamW(module.parameter_groups())
    batches = make_batches(args.model, args.batch_size, 2, args.text_min_len, args.seq_len)
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]

    def step(batch: dict[str, Any]) -> None:
        optimizer.zero_grad(set_to_none=True)
        module.total_loss(module(batch, mode="train")).backward()
        optimizer.step()

    if device.type == "cpu":  # before any step: memory a step freed stays in the process (malloc keeps it)
        _reset_peak_rss()
        base = _proc_status("VmRSS")
    for i in range(args.warmup):
        step(batches[i % 2])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
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
        "sequence_length": int(batches[0]["input_ids"].shape[1]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="data/tiny_base", help="from_pretrained directory")
    parser.add_argument("--text-config", help="JSON LlamaConfig fields: a random LLaVA with this decoder instead of --model")
    parser.add_argument("--seq-len", type=int, help="sequences of exactly this many tokens instead of the task's records")
    parser.add_argument("--attention", default="eager,sdpa", help="comma-separated sparsity.attention arms")
    parser.add_argument("--predictor", default='{"d_model": 64, "heads": 4, "ff": 256, "layers": 2}')
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all arms in turn")
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--text-min-len", type=int, default=16)
    parser.add_argument("--out", default="bench_train_step.json")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args.arm, args)))
        return {}
    from dllava.sparse.attention import ATTENTION_CHOICES

    attentions = [a for a in args.attention.split(",") if a]
    unknown = [a for a in attentions if a not in ATTENTION_CHOICES or a == "auto"]
    if unknown or not attentions:
        raise SystemExit(f"--attention takes a comma-separated subset of eager,sdpa,flex; got {args.attention!r}")
    with tempfile.TemporaryDirectory(prefix="bench_model_") as scratch:
        model = args.model
        if args.text_config:
            from dllava.model.tiny import save_tiny_llava

            model = str(save_tiny_llava(Path(scratch) / "model", **json.loads(args.text_config)))
        child_args = [
            "--model", model, "--predictor", args.predictor, "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--keep", str(args.keep),
            "--text-min-len", str(args.text_min_len),
        ] + ([] if args.seq_len is None else ["--seq-len", str(args.seq_len)])
        runs = _run_arms(arm_names(attentions), args.repeats, child_args)
    return _report(args, runs)


def _run_arms(arms: list[str], repeats: int, child_args: list[str]) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for round_ in range(repeats):
        for arm in arms:
            print(f"round {round_ + 1}/{repeats}: {arm}", file=sys.stderr, flush=True)
            out = subprocess.run(
                [sys.executable, "-m", "dllava.bench.train_step", *child_args, "--arm", arm],
                check=False, capture_output=True, text=True,
            )
            if out.returncode:
                raise RuntimeError(f"arm {arm} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            runs[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def _report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary = {
        arm: {
            "step_s": statistics.median(r["step_s"] for r in rs),
            "peak_bytes_over_start": statistics.median(r["peak_bytes_over_start"] for r in rs),
            "runs": rs,
        }
        for arm, rs in runs.items()
    }
    dense = summary[DENSE]
    for arm, s in summary.items():
        if arm != DENSE:
            s["step_time_ratio"] = s["step_s"] / dense["step_s"]
            s["peak_memory_ratio"] = s["peak_bytes_over_start"] / max(1, dense["peak_bytes_over_start"])
    first = runs[DENSE][0]
    result = {
        "model": args.model,
        "text_config": json.loads(args.text_config) if args.text_config else None,
        "batch_size": args.batch_size,
        "sequence_length": first["sequence_length"],
        "tokens_per_batch": first["tokens_per_batch"],
        "keep": args.keep,
        "device": first["device"],
        "arms": summary,
    }
    print(f"{'arm':<16} {'step (ms)':>10} {'peak mem over start (MiB)':>26} {'time / dense':>13} {'memory / dense':>15}")
    for arm, s in summary.items():
        ratios = f"{s['step_time_ratio']:>13.2f} {s['peak_memory_ratio']:>15.2f}" if arm != DENSE else f"{'':>13} {'':>15}"
        print(f"{arm:<16} {1000 * s['step_s']:>10.1f} {s['peak_bytes_over_start'] / 2**20:>26.1f} {ratios}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
