"""Equal-budget comparison: learned (dynamic) vs FastV vs random keep at the same image-token budgets.

One process, model(s) loaded once, questions read once: the trained checkpoint runs ``dense`` and
every ``method`` at every ``keep`` (each method keeps exactly ``int(n * keep)`` of each question's droppable
image tokens under one budget convention, ``sparsity.budget``, the dense-trained model's arms included, so
a keep value is the same budget for all); an optional dense-trained checkpoint (``stage=dense``) runs
``dense``, the reference accuracy, and the training-free baselines at the same budgets. Output, in the
run dir:

* ``eval_by_keep.md``: one row per (model, method), accuracy at every keep side by side;
* ``eval_table.csv`` / ``eval_table.md``: one row per (model, method, keep) with accuracy, accuracy
  relative to the reference dense accuracy, realised keep ratio, prefill FLOPs, KV bytes, latency;
* ``pareto.png``: accuracy against prefill FLOPs per sample;
* ``overlays_keep<k>.png``: the first questions' kept patches for each method at keep ``overlay_keep``;
* ``arms/<model>/<arm>/``: each arm's ``answers.jsonl`` (LLaVA format) and ``eval.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from dllava.eval.answers import write_answer_file
from dllava.eval.loading import LoadedModel
from dllava.eval.overlay import captioned, kept_patch_overlay, tile
from dllava.eval.plots import fmt as _fmt, pareto_plot, write_rows
from dllava.eval.questions import Question
from dllava.eval.runner import Arm, ArmResult, default_text, evaluate_arm
from dllava.inference.selection import unsupported

log = logging.getLogger(__name__)

TABLE_COLUMNS = (
    "model", "method", "keep", "accuracy", "vqa_accuracy", "acc_vs_dense", "vision_keep", "image_tokens_kept", "object_recall", "objects_seen",
    "text_keep", "prefill_flops", "prefill_flops_ratio", "prefill_flops_paper", "kv_bytes", "kv_ratio",
    "latency_ms", "samples", "ckpt_path",
)


def describe(loaded: LoadedModel) -> str:
    """Short model label for tables: how it was trained."""
    sparsity = loaded.model.sparsity
    return f"sparse-trained (keep {sparsity.keep:g})" if sparsity.enabled else "dense-trained"


def plan_arms(loaded: LoadedModel, methods: Sequence[str], keeps: Sequence[float], budget: str = "global") -> list[Arm]:
    """``dense`` first, then every method at every keep under one ``budget`` convention (methods the
    model cannot run are skipped)."""
    arms = [Arm("dense", budget=budget)]
    for method in methods:
        if method == "dense":
            continue
        if method == "dynamic" and loaded.model.image_predictor is None:
            log.warning("%s has no image predictor: skipping method=dynamic", loaded.name)
            continue
        missing = unsupported(method, loaded.model.adapter)
        if missing:
            log.warning("%s: skipping method=%s (%s)", loaded.name, method, missing)
            continue
        arms += [Arm(method, float(keep), default_text(loaded.model, method), budget) for keep in keeps]
    return arms


def run_comparison(
    runs: Sequence[tuple[LoadedModel, Sequence[Arm]]],
    questions: Sequence[Question],
    out_dir: str | Path,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    overlay_keep: float | None = 0.2,
    overlays: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every (model, arm), write the outputs listed in the module docstring; returns
    ``{"rows": [...], "reference_accuracy": ..., "paths": {...}}``. The reference is the last model's
    dense accuracy (the dense-trained checkpoint when one is given)."""
    out_dir = Path(out_dir)
    results: list[tuple[LoadedModel, ArmResult]] = []
    first = True
    for loaded, arms in runs:
        for arm in arms:
            draw = overlays if arm.method == "dense" or (overlay_keep is not None and arm.keep == overlay_keep) else 0
            result = evaluate_arm(
                loaded, questions, arm, batch_size=batch_size, max_new_tokens=max_new_tokens, examples=draw,
                seed=seed, warmup=first, progress=progress,
            )
            first = False
            arm_dir = out_dir / "arms" / _slug(describe(loaded)) / _slug(arm.label)
            write_answer_file(arm_dir / "answers.jsonl", result.records)
            (arm_dir / "eval.json").write_text(json.dumps(result.summary, indent=2) + "\n")
            results.append((loaded, result))
            s = result.summary
            log.info("%s %s: accuracy %s, prefill %.3g FLOPs, %.1f ms/sample", describe(loaded), arm.label,
                     _fmt(s["accuracy"], ".4f"), s["prefill_flops"], 1e3 * s["latency_s"])

    dense = [r for loaded, r in results if r.arm.method == "dense"]
    reference = dense[-1].summary["accuracy"] if dense else None
    rows = [table_row(describe(loaded), r.summary, reference) for loaded, r in results]
    paths = {
        "csv": write_rows(out_dir / "eval_table.csv", rows, TABLE_COLUMNS),
        "markdown": out_dir / "eval_table.md",
        "pareto": out_dir / "pareto.png",
    }
    paths["markdown"].write_text(markdown_table(rows, reference, describe(runs[-1][0])) + "\n")
    paths["by_keep"] = out_dir / "eval_by_keep.md"
    paths["by_keep"].write_text(by_keep_table(rows, overlay_keep) + "\n")
    pareto_plot(rows, paths["pareto"], reference=reference, title="Equal-budget comparison")
    if overlay_keep is not None and overlays:
        panel = overlay_panel(results, overlay_keep)
        if panel is not None:
            paths["overlays"] = out_dir / f"overlays_keep{overlay_keep:g}.png"
            panel.save(paths["overlays"])
    return {"rows": rows, "reference_accuracy": reference, "paths": {k: str(v) for k, v in paths.items()}}


def table_row(model: str, s: dict[str, Any], reference: float | None) -> dict[str, Any]:
    acc = s["accuracy"]
    return {
        "model": model,
        "method": s["method"],
        "keep": s["keep"],
        "accuracy": acc,
        "vqa_accuracy": s["vqa_accuracy"],
        "acc_vs_dense": acc / reference if acc is not None and reference else None,
        "vision_keep": s["vision_keep"],
        "image_tokens_kept": s["image_tokens_kept"],
        "object_recall": s["object_recall"],
        "objects_seen": s.get("objects_seen"),
        "text_keep": s["text_keep"],
        "prefill_flops": s["prefill_flops"],
        "prefill_flops_ratio": s["prefill_flops_ratio"],
        "prefill_flops_paper": s["prefill_flops_paper"],
        "kv_bytes": s["kv_bytes"],
        "kv_ratio": s["kv_ratio"],
        "latency_ms": 1e3 * s["latency_s"],
        "samples": s["scored"],
        "ckpt_path": s["ckpt_path"],
    }


def _si(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def markdown_table(rows: Sequence[dict[str, Any]], reference: float | None, reference_model: str) -> str:
    """The table as markdown (numbers rounded; the CSV has them in full)."""
    header = ["model", "method", "keep", "accuracy", "VQA acc", "acc / dense", "kept img tok", "objects kept", "text keep",
              "prefill FLOPs", "FLOPs ratio", "KV bytes", "KV ratio", "ms / sample"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["model"], r["method"], "1" if r["method"] == "dense" else f"{r['keep']:g}", _fmt(r["accuracy"], ".4f"),
            _fmt(r["vqa_accuracy"], ".4f"), _fmt(r["acc_vs_dense"], ".3f"), _fmt(r["image_tokens_kept"], ".1f"),
            _fmt(r["object_recall"], ".3f"), _fmt(r["text_keep"], ".2f"), _si(r["prefill_flops"]), _fmt(r["prefill_flops_ratio"], ".3f"),
            _si(r["kv_bytes"]), _fmt(r["kv_ratio"], ".3f"), _fmt(r["latency_ms"], ".2f"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    samples = rows[0]["samples"] if rows else 0
    note = (f"\n{samples} scored questions per row. acc / dense: accuracy over the {reference_model} model's dense "
            f"accuracy ({_fmt(reference, '.4f')}). FLOPs: decoder prefill per question, full count with the "
            "realised token counts (predictor / FastV scoring included). KV: bytes left in the cache per question. "
            "objects kept: share of the patches showing an object that survive (records with a scene).")
    return "\n".join(lines) + "\n" + note


def by_keep_table(rows: Sequence[dict[str, Any]], at: float | None = None) -> str:
    """One line per (model, method): accuracy and, in brackets, its share of the reference dense accuracy
    at every keep side by side, then the prefill FLOPs ratio, objects kept and latency at keep ``at`` (the
    overlays' keep; None: the smallest evaluated); objects seen: the share of objects with any of their
    tokens kept."""
    keeps = sorted({r["keep"] for r in rows if r["method"] != "dense"})
    at = at if at in keeps else (keeps[0] if keeps else None)
    header = ["model", "method", *[f"keep {k:g}" for k in keeps], f"FLOPs ratio @{at:g}" if at else "FLOPs ratio",
              f"objects seen @{at:g}" if at else "objects seen", f"ms / sample @{at:g}" if at else "ms / sample"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    arms: dict[tuple[str, str], dict[float, dict[str, Any]]] = {}
    for r in rows:
        arms.setdefault((r["model"], r["method"]), {})[r["keep"]] = r
    for (model, method), by in arms.items():
        if method == "dense":
            (r,) = by.values()
            cells = [f"{_fmt(r['accuracy'], '.4f')} ({_fmt(r['acc_vs_dense'], '.3f')})"] * len(keeps)
        else:
            r = by.get(at, {})
            cells = [f"{_fmt(by[k]['accuracy'], '.4f')} ({_fmt(by[k]['acc_vs_dense'], '.3f')})" if k in by else "-" for k in keeps]
        tail = [_fmt(r.get("prefill_flops_ratio"), ".3f"), _fmt(r.get("objects_seen"), ".3f"), _fmt(r.get("latency_ms"), ".1f")]
        lines.append("| " + " | ".join([model, method, *cells, *tail]) + " |")
    return "\n".join(lines) + "\n\nAccuracy (its share of the reference dense accuracy); dense rows repeat their one value."


def overlay_panel(results: Sequence[tuple[LoadedModel, ArmResult]], keep: float, size: int = 192):
    """Rows = questions, columns = the image and each method's kept patches at ``keep``."""
    columns = [(loaded, r) for loaded, r in results if r.arm.method != "dense" and r.arm.keep == keep and r.examples]
    if not columns:
        return None
    count = min(len(r.examples) for _, r in columns)
    dense = next((r for _, r in results if r.arm.method == "dense" and r.examples), None)
    tiles, header = [], ["input image\n(question, reference, dense answer)"]
    header += [f"{r.arm.label}\n{describe(l)}" for l, r in columns]
    loaded = columns[0][0]  # every compared model reads the same questions' pixels (one family)
    for i in range(count):
        question = columns[0][1].examples[i][0]
        reference = question.reference if isinstance(question.reference, str) or question.reference is None else "/".join(question.reference)
        image = loaded.model.adapter.images_for_pictures(question.pixels, loaded.processor)[0]
        answer = dense.examples[i][2] if dense is not None and i < len(dense.examples) else ""
        tiles.append(captioned(image, size, caption=f"{question.prompt}\nref: {reference} | dense: {answer}"))
        for _, r in columns:
            _, keep_mask, text = r.examples[i]
            tiles.append(kept_patch_overlay(image, keep_mask, size=size, caption=f"answer: {text}", grid=question.grid))
    return tile(tiles, columns=1 + len(columns), header=header)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._@-" else "_" for c in text).strip("_")
