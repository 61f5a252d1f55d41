"""The decoding half of Dynamic-LLaVA measured (the paper's Table 3 on the synthetic task):
``python eval.py ckpt_path=<checkpoint> compare.decode=true``.

Long answers (the ``detail`` kind by default: 150-270 words, half of them the last round of a 7-8
round chat) are generated greedily with the sparse KV cache, image tokens pruned by the learned method
at the checkpoint's trained keep in every row, while the generated tokens are kept or dropped by:

* ``dense``: every generated token stays (the reference row);
* ``dynamic``: the trained text predictor (its realised share ``r`` of staying tokens sets the budget of
  the rows below);
* ``every_other``: the structured pattern at ``r`` (drop every other token at ``r = 0.5``, the
  paper's "structure" row);
* ``random``, ``streaming`` (StreamingLLM: attention sinks + recent window), ``h2o`` (heavy hitters by
  accumulated attention + recent window): exactly ``floor((t + 1) r)`` generated tokens stay after
  token ``t`` (:mod:`dllava.inference.text_policies`).

Per row (``decode_table.md`` / ``.csv``, ``decode.json``, each arm's answers in ``arms/<row>/``):

* ``generated_tokens``: answer tokens (EOS included), mean per question; ``computing_tokens``: the most
  generated tokens one decoding step ran with in layers >= K (the paper's "Total -> Computing");
* ``decode_flops``: decoder FLOPs of decoding the answer **without** cache (every step re-runs the whole
  sequence, pruned the same way; :func:`dllava.inference.flops.nocache_decode_flops`, text predictor
  included for ``dynamic``, H2O's scoring not counted); ``decode_flops_ratio`` against ``dense``;
* ``kv_bytes``: K/V bytes of the generated tokens left in the cache at the end (all layers: every
  token in layers < K, the staying ones in layers >= K); ``kv_ratio`` against ``dense``. Its floor is
  ``K/L + (1 - K/L) r``: 0.67 at ``r = 0.5`` for the tiny model's K = 2 of 6 layers, 0.53 for 7B's 2 of 32;
* ``ppl``: perplexity of the **reference** answer (EOS included), teacher-forced through the same policy
  with the cache (each reference token is fed and faces the policy, so what is dropped is absent for
  the tokens after it); per question ``exp(mean NLL)``, averaged over questions (the paper's protocol);
  ``ppl_ratio`` against ``dense``;
* ``object_precision`` / ``object_recall`` / ``object_f1``: objects read from the generated text by
  :func:`dllava.metrics.descriptions.parse_description` against the scene, micro-averaged;
  ``object_f1_ratio`` against ``dense``; ``count_accuracy`` (the stated number of shapes),
  ``quadrant_accuracy`` and ``relation_accuracy`` (``detail`` sentences of correctly read objects);
* ``rouge_l`` and ``bleu`` (BLEU-4, corpus) of the generated text against the reference, torchmetrics.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from dllava.eval.answers import answer_record, write_answer_file
from dllava.eval.loading import LoadedModel
from dllava.eval.plots import fmt as _fmt, write_rows
from dllava.eval.questions import Question, batches, collate_questions, pixels_to
from dllava.inference import flops
from dllava.inference.engine import SparseEngine
from dllava.inference.text_policies import check_share
from dllava.metrics.descriptions import (
    aggregate_attribute_accuracy,
    aggregate_object_scores,
    attribute_accuracy,
    object_scores,
    parse_description,
    text_overlap,
)

log = logging.getLogger(__name__)

ROWS = ("dense", "dynamic", "every_other", "random", "streaming", "h2o")
BASELINES = ROWS[2:]
DECODE_COLUMNS = (
    "method", "text_policy", "text_keep", "generated_tokens", "computing_tokens", "decode_flops", "decode_flops_ratio",
    "kv_bytes", "kv_ratio", "ppl", "ppl_ratio", "object_precision", "object_recall", "object_f1", "object_f1_ratio",
    "count_accuracy", "quadrant_accuracy", "relation_accuracy", "rouge_l", "bleu", "samples",
)


def check_rows(rows: Sequence[str]) -> list[str]:
    """The rows to run, in table order; ``dense`` and ``dynamic`` always (the reference and the budget)."""
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise ValueError(f"decode.methods: unknown {unknown}; choose from {list(ROWS)}")
    return [r for r in ROWS if r in set(rows) | {"dense", "dynamic"}]


def row_policy(row: str, share: float | None) -> str | float:
    """The engine's text policy for a table row (``share``: the dynamic row's realised one)."""
    return {"dense": "off", "dynamic": "learned", "every_other": share}.get(row, row)


@dataclass
class DecodeSample:
    """One question's answer and costs under one row's policy."""

    question: Question
    text: str
    tokens: int
    fed: int
    kept: int
    computing: list[int]
    prompt: int
    prompt_sparse: int
    nll: float
    reference_tokens: int


def decode_arm(
    loaded: LoadedModel,
    questions: Sequence[Question],
    row: str,
    share: float | None,
    max_new_tokens: int,
    batch_size: int,
    sinks: int,
    seed: int,
    progress: bool = True,
) -> list[DecodeSample]:
    """Generate every answer and score every reference under ``row``'s policy."""
    model, tokenizer, device = loaded.model, loaded.processor.tokenizer, loaded.device
    policy = row_policy(row, share)
    engine = SparseEngine(model, method="dynamic", text=policy, seed=seed,
                          text_keep=share if row in BASELINES else None, sinks=sinks)
    dtype = next(model.parameters()).dtype
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    samples: list[DecodeSample] = []
    bar = tqdm(total=len(questions), desc=f"decode {row}", unit="q", disable=not progress)
    for batch in batches(iter(questions), batch_size):
        ids, mask, images = collate_questions(batch, pad)
        ids, mask = ids.to(device), mask.to(device)
        images = pixels_to(images, device, dtype)
        result = engine.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **images)
        texts = tokenizer.batch_decode(
            [r[:n].tolist() for r, n in zip(result.sequences, result.lengths)], skip_special_tokens=True
        )
        references = [reference_ids(tokenizer, q.reference) for q in batch]
        nll = engine.reference_nll(ids, mask, references, **images)
        prompts = mask.sum(-1).tolist()
        for i, question in enumerate(batch):
            samples.append(DecodeSample(
                question=question, text=texts[i].strip(), tokens=result.lengths[i], fed=result.text_tokens_fed[i],
                kept=result.text_tokens_kept[i], computing=result.text_computing[i], prompt=prompts[i],
                prompt_sparse=result.prompt_tokens_sparse[i], nll=nll[i].nll, reference_tokens=nll[i].tokens,
            ))
        bar.update(len(batch))
    bar.close()
    return samples


def reference_ids(tokenizer: Any, reference: Any) -> list[int]:
    """The reference answer's token ids as the model would emit them, EOS last."""
    if not isinstance(reference, str) or not reference.strip():
        raise ValueError(f"decoding needs a text reference per question, got {reference!r}")
    return tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def summarize_arm(
    loaded: LoadedModel, samples: Sequence[DecodeSample], row: str, share: float | None, cell: int
) -> dict[str, Any]:
    """One table row from an arm's samples (ratios are added against the dense row later)."""
    model = loaded.model
    shape = flops.DecoderShape.from_config(model.text_config)
    layer = model.sparsity.layer
    element = next(model.parameters()).element_size()
    extra = flops.text_predictor_flops(shape.hidden, model.predictor_config, 1) if row == "dynamic" else 0
    decode_flops = [
        flops.nocache_decode_flops(shape, layer, s.prompt, s.prompt_sparse, s.computing, extra) for s in samples
    ]
    kv = [flops.kv_bytes(shape, layer, s.fed, s.kept, element) for s in samples]
    scored = [(parse_description(s.text), s.question.scene) for s in samples if s.question.scene is not None]
    objects = aggregate_object_scores([object_scores(p.objects, scene) for p, scene in scored]) if scored else {}
    attributes = (
        aggregate_attribute_accuracy([attribute_accuracy(p.objects, scene, cell) for p, scene in scored]) if scored else {}
    )
    overlap = text_overlap([s.text for s in samples], [s.question.reference for s in samples])
    fed, kept = sum(s.fed for s in samples), sum(s.kept for s in samples)
    return {
        "method": row,
        "text_policy": row_policy(row, share),
        "text_keep": kept / fed if fed else None,
        "generated_tokens": statistics.fmean(s.tokens for s in samples),
        "computing_tokens": statistics.fmean(max(s.computing, default=0) for s in samples),
        "decode_flops": statistics.fmean(decode_flops),
        "kv_bytes": statistics.fmean(kv),
        "ppl": statistics.fmean(math.exp(s.nll / s.reference_tokens) for s in samples),
        "object_precision": objects.get("precision"),
        "object_recall": objects.get("recall"),
        "object_f1": objects.get("f1"),
        "count_accuracy": statistics.fmean(p.count == len(scene) for p, scene in scored) if scored else None,
        "quadrant_accuracy": attributes.get("quadrant_accuracy"),
        "relation_accuracy": attributes.get("relation_accuracy"),
        "rouge_l": overlap["rouge_l"],
        "bleu": overlap["bleu"],
        "samples": len(samples),
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``*_ratio`` columns against the dense row."""
    dense = next(r for r in rows if r["method"] == "dense")
    for row in rows:
        for key, ratio in (("decode_flops", "decode_flops_ratio"), ("kv_bytes", "kv_ratio"), ("ppl", "ppl_ratio"),
                           ("object_f1", "object_f1_ratio")):
            row[ratio] = row[key] / dense[key] if row[key] is not None and dense[key] else None


def run_decode_comparison(
    loaded: LoadedModel,
    questions: Sequence[Question],
    out_dir: str | Path,
    methods: Sequence[str] = ROWS,
    max_new_tokens: int = 400,
    batch_size: int = 32,
    sinks: int = 4,
    cell: int = 24,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every row (``dense`` and ``dynamic`` first), write the table, the plot and each arm's
    answers; returns ``{"rows": [...], "share": r, "paths": {...}}``."""
    if loaded.model.text_predictor is None:
        raise ValueError(f"{loaded.name} has no text predictor (trained with sparsity.text=false): nothing to compare")
    out_dir = Path(out_dir)
    rows, share = [], None
    for row in check_rows(methods):
        samples = decode_arm(loaded, questions, row, share, max_new_tokens, batch_size, sinks, seed, progress)
        summary = summarize_arm(loaded, samples, row, share, cell)
        if row == "dynamic":
            share = check_share(summary["text_keep"]) if summary["text_keep"] else None
            if share is None:
                raise ValueError("the text predictor kept no generated token: the baselines have no budget to match")
        write_arm(out_dir / "arms" / row, loaded, samples, summary)
        rows.append(summary)
        log.info("decode %s: F1 %s, PPL %.3f, text keep %s", row, summary["object_f1"], summary["ppl"], summary["text_keep"])
    add_ratios(rows)
    paths = {
        "csv": write_rows(out_dir / "decode_table.csv", rows, DECODE_COLUMNS),
        "markdown": out_dir / "decode_table.md",
        "plot": out_dir / "decode_pareto.png",
    }
    paths["markdown"].write_text(markdown(rows, share) + "\n")
    decode_plot(rows, paths["plot"])
    return {"rows": rows, "share": share, "paths": {k: str(v) for k, v in paths.items()}}


def write_arm(folder: Path, loaded: LoadedModel, samples: Sequence[DecodeSample], summary: dict[str, Any]) -> None:
    """The arm's answers (LLaVA answer-file format, costs in ``metadata``) and its summary."""
    model_id = f"{loaded.name}:decode-{summary['method']}"
    records = [
        answer_record(s.question.question_id, s.question.prompt, s.text, model_id, {
            "text_policy": summary["text_policy"], "reference": s.question.reference, "tokens": s.tokens,
            "text_tokens_fed": s.fed, "text_tokens_kept": s.kept, "reference_nll": s.nll,
            "reference_tokens": s.reference_tokens, "kind": s.question.kind,
        })
        for s in samples
    ]
    write_answer_file(folder / "answers.jsonl", records)
    (folder / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")


def markdown(rows: Sequence[dict[str, Any]], share: float | None) -> str:
    header = ["method", "text keep", "gen tok", "computing tok", "no-cache FLOPs", "FLOPs ratio", "KV bytes", "KV ratio",
              "PPL", "PPL ratio", "object F1", "F1 ratio", "count acc", "quadrant acc", "relation acc", "ROUGE-L", "BLEU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["method"], _fmt(r["text_keep"], ".3f"), _fmt(r["generated_tokens"], ".1f"),
                 _fmt(r["computing_tokens"], ".1f"), _fmt(r["decode_flops"], ".3g"), _fmt(r["decode_flops_ratio"], ".3f"),
                 _fmt(r["kv_bytes"], ".3g"), _fmt(r["kv_ratio"], ".3f"), _fmt(r["ppl"], ".3f"), _fmt(r["ppl_ratio"], ".3f"),
                 _fmt(r["object_f1"], ".4f"), _fmt(r["object_f1_ratio"], ".3f"), _fmt(r["count_accuracy"], ".3f"),
                 _fmt(r["quadrant_accuracy"], ".3f"), _fmt(r["relation_accuracy"], ".3f"), _fmt(r["rouge_l"], ".4f"),
                 _fmt(r["bleu"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    samples = rows[0]["samples"] if rows else 0
    note = (f"\n{samples} questions per row; image tokens pruned by the learned method at the trained keep in every "
            f"row. The baselines keep exactly floor((t+1) r) generated tokens after token t, r = {_fmt(share, '.3f')} "
            "(the dynamic row's realised share). FLOPs: decoding without cache; KV: bytes of the generated tokens "
            "left in the cache; PPL: the reference answer teacher-forced through the same policy.")
    return "\n".join(lines) + "\n" + note


def decode_plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Object F1 against the generated tokens' KV bytes, one labelled point per row."""
    from matplotlib.figure import Figure

    ax = Figure(figsize=(6.5, 4.2)).subplots()
    points = [r for r in rows if r["object_f1"] is not None]
    for r in points:
        ax.scatter(r["kv_bytes"], r["object_f1"], s=140 if r["method"] in ("dense", "dynamic") else 60,
                   marker="*" if r["method"] == "dynamic" else "o", zorder=3)
        ax.annotate(r["method"], (r["kv_bytes"], r["object_f1"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("KV bytes of the generated tokens per answer (with cache)")
    ax.set_ylabel("object F1 of the generated description")
    ax.set_title("Decoding: quality against KV memory at an equal budget")
    ax.grid(alpha=0.3)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=150)
    return Path(path)
