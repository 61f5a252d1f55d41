"""Evaluate a (Dynamic-)LLaVA checkpoint: `python eval.py ckpt_path=... [method=...] [sparsity.keep=...]`.

Compose config -> load the checkpoint -> read the questions -> answer them with the sparse engine ->
answers.jsonl (LLaVA's answer-file format), eval.json, kept-patch overlays and summary.json in the run
dir. ``compare.enabled=true`` runs the equal-budget comparison (dynamic vs FastV vs random at every
``compare.keeps``, plus dense) in one process instead. Everything else lives in src/dllava/eval.

Examples:
    python eval.py ckpt_path=logs/train/runs/<run>/hf                            # learned, trained keep
    python eval.py ckpt_path=<run>/checkpoints/last.ckpt method=fastv sparsity.keep=0.2
    python eval.py -m ckpt_path=<run>/hf method=dynamic,fastv,random sparsity.keep=0.1,0.2   # sweep_summary.csv
    python eval.py ckpt_path=<run>/hf hydra.run.dir=<interrupted eval run> resume=true  # continue it
    python eval.py ckpt_path=<run>/hf compare.enabled=true compare.dense_ckpt_path=<dense run>/checkpoints/last.ckpt
    python eval.py ckpt_path=<run>/checkpoints/last.ckpt compare.decode=true       # learned text decisions vs H2O etc.
    python eval.py ckpt_path=<llava dir> data.questions=llava_vqav2_mscoco_test-dev2015.jsonl \\
        data.image_folder=<coco test2015> generation.max_new_tokens=128
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("DLLAVA_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig, OmegaConf

from dllava.eval.answers import AnswerAppender, read_partial_answer_file, write_answer_file
from dllava.eval.compare import plan_arms, run_comparison
from dllava.eval.decode import run_decode_comparison
from dllava.eval.loading import load_for_eval
from dllava.eval.overlay import kept_patch_overlay, tile
from dllava.eval.questions import describe_skipped, question_source, write_skipped
from dllava.eval.runner import NoQuestions, arm_for, evaluate_arm, flat_metrics
from dllava.startup import check_eval_config
from dllava.utils.resolvers import register_resolvers
from dllava.utils.run import task_wrapper, write_json_atomic, write_summary

register_resolvers()

log = logging.getLogger("eval")


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation ``cfg`` describes; returns the flat metrics written to summary.json."""
    check_eval_config(cfg)  # every value's type and range, named by its key, before any work
    out = Path(cfg.paths.output_dir)
    comparing = cfg.compare.enabled or cfg.compare.decode
    if comparing and cfg.resume:
        raise ValueError("resume=true continues a single evaluation; a comparison (compare.enabled / compare.decode) starts over")
    answered = None if comparing else earlier_answers(out / "answers.jsonl", cfg.resume)  # before the slow load
    loaded = load_for_eval(cfg.ckpt_path, cfg.device, cfg.dtype)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if cfg.compare.decode:
        data["answer_kinds"] = OmegaConf.to_container(cfg.decode.answer_kinds) if cfg.decode.answer_kinds else None
    questions = question_source(data, loaded.processor, loaded.model.adapter)
    settings = dict(batch_size=data["batch_size"], max_new_tokens=cfg.generation.max_new_tokens, seed=cfg.seed, progress=cfg.progress)
    if cfg.compare.decode:
        metrics = decode(cfg, loaded, questions, out, settings)
    elif cfg.compare.enabled:
        metrics = compare(cfg, loaded, questions, out, settings)
    else:
        metrics = single(cfg, loaded, questions, out, settings, answered)
    write_summary(out, metrics, str(cfg.ckpt_path))
    return metrics


def single(
    cfg: DictConfig, loaded: Any, questions: Any, out: Path, settings: dict[str, Any], answered: list[dict[str, Any]]
) -> dict[str, Any]:
    options = OmegaConf.to_container(cfg.method.options, resolve=True) if cfg.method.get("options") else {}
    arm = arm_for(loaded.model, cfg.method.name, cfg.sparsity.keep, cfg.method.text, cfg.sparsity.get("budget"),
                  options, cfg.method.get("prune_layer"))
    path = out / "answers.jsonl"
    try:
        with AnswerAppender(path) as append:  # each batch on disk as soon as it is answered
            result = evaluate_arm(loaded, questions, arm, examples=cfg.overlays, model_id=cfg.model_id,
                                  answered=answered, on_batch=append, **settings)
    finally:  # a failed run lists what it skipped too
        skipped = report_skipped(questions.skipped, out)
    answers = write_answer_file(path, result.records)  # in question order, earlier answers merged
    summary = {**result.summary, "skipped": sum(skipped.values()), "skipped_reasons": skipped}
    write_json_atomic(out / "eval.json", summary)
    if result.examples:
        write_overlays(result, out / "overlays", loaded.model.adapter, loaded.processor)
    s = summary
    latency = "no new answers" if s["latency_s"] is None else f"{1e3 * s['latency_s']:.2f} ms/question"
    print(f"{loaded.name} {arm.label}: accuracy {s['accuracy']}, VQA accuracy {s['vqa_accuracy']} over {s['scored']} "
          f"questions; kept {s['image_tokens_kept']:.1f}/{s['image_tokens']:g} image tokens; prefill "
          f"{s['prefill_flops']:.4g} FLOPs ({s['prefill_flops_ratio']:.3f} of dense); {latency}; "
          f"{s['skipped']} skipped")
    log.info("wrote %s and %s", answers, out / "eval.json")
    return {**flat_metrics(summary), **{f"eval/skipped_{reason}": n for reason, n in skipped.items()}}


def earlier_answers(path: Path, resume: bool) -> list[dict[str, Any]]:
    """The answers an interrupted run left in ``path`` when continuing it (``resume=true``); without
    ``resume`` an existing answer file is never overwritten."""
    if not resume:
        if path.exists() and path.stat().st_size:
            raise FileExistsError(
                f"{path} already holds answers: pass resume=true to continue that evaluation (answered "
                "questions are kept, the rest answered), or evaluate into a new run dir (a new hydra.run.dir)"
            )
        return []
    records, torn = read_partial_answer_file(path)
    if torn:
        log.warning("%s: dropped a half-written last line (%d bytes); its question is answered again", path, torn)
    log.info("resume=true: continuing with %d answers from %s", len(records), path)
    return records


def report_skipped(skipped: list[dict[str, Any]], out: Path) -> dict[str, int]:
    """Write ``skipped.jsonl`` (file and line, or shard and key, with the reason) and warn; counts per reason."""
    path = out / "skipped.jsonl"
    counts = write_skipped(path, skipped)
    if skipped:
        log.warning("%s; listed in %s", describe_skipped(skipped), path)
    return counts


def write_overlays(result: Any, folder: Path, adapter: Any, processor: Any = None) -> Path:
    """One PNG per drawn question plus ``overlays.png``, all of them in a grid. Each question's image
    comes back from its pixel inputs through the model's family ``adapter`` (un-normalised with
    ``processor``'s statistics), its keep row (cut to its own token count) on its own token grid."""
    folder.mkdir(parents=True, exist_ok=True)
    tiles = []
    for index, (question, keep, answer) in enumerate(result.examples):
        reference = question.reference if not isinstance(question.reference, list) else "/".join(question.reference)
        caption = (f"{question.prompt}\nanswer: {answer} | ref: {reference}\n"
                   f"{result.arm.label}: kept {int(keep.sum())}/{keep.numel()} patches")
        image = adapter.images_for_pictures(question.pixels, processor)[0]
        picture = kept_patch_overlay(image, keep, caption=caption, grid=question.grid)
        picture.save(folder / f"{index:03d}_{_slug(question.question_id)}.png")
        tiles.append(picture)
    panel = tile(tiles, columns=4)
    panel.save(folder.parent / "overlays.png")
    return folder


def budget_of(cfg: DictConfig, loaded: Any) -> str:
    """``sparsity.budget``, or the checkpoint's trained convention when null."""
    budget = cfg.sparsity.get("budget")
    return str(budget if budget is not None else loaded.model.sparsity.budget)


def compare(cfg: DictConfig, loaded: Any, source: Any, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    c = cfg.compare
    questions = list(source)  # read once for every arm
    skipped = report_skipped(source.skipped, out)
    if not questions:
        raise NoQuestions(f"no questions to evaluate; {describe_skipped(source.skipped)}")
    keeps = [float(k) for k in c.keeps]
    budget = budget_of(cfg, loaded)  # one convention for every arm, the dense-trained model's included
    runs = [(loaded, plan_arms(loaded, list(c.methods), keeps, budget))]
    if c.dense_ckpt_path:
        dense = load_for_eval(c.dense_ckpt_path, cfg.device, cfg.dtype)
        runs.append((dense, plan_arms(dense, list(c.dense_ckpt_methods), keeps, budget)))
    # the budget drawn side by side: overlay_keep, or the closest keep evaluated
    overlay_keep = None if c.overlay_keep is None else min(keeps, key=lambda k: abs(k - c.overlay_keep))
    report = run_comparison(runs, questions, out, overlay_keep=overlay_keep, overlays=cfg.overlays, **settings)
    print(Path(report["paths"]["markdown"]).read_text())
    write_json_atomic(out / "compare.json", report)
    log.info("wrote %s", ", ".join(report["paths"].values()))
    metrics: dict[str, Any] = {"compare/reference_accuracy": report["reference_accuracy"], "compare/skipped": sum(skipped.values())}
    for row in report["rows"]:
        name = f"compare/{_slug(row['model'])}/{row['method']}@{row['keep']:g}"
        metrics.update({f"{name}/accuracy": row["accuracy"], f"{name}/prefill_flops": row["prefill_flops"]})
    return metrics


def decode(cfg: DictConfig, loaded: Any, source: Any, out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The decoding comparison (``compare.decode=true``): decode_table.{md,csv}, decode_pareto.png, decode.json."""
    d = cfg.decode
    questions = list(source)
    skipped = report_skipped(source.skipped, out)
    if not questions:
        raise NoQuestions(f"no questions with answers of kinds {list(d.answer_kinds or [])}; {describe_skipped(source.skipped)}")
    report = run_decode_comparison(
        loaded, questions, out, methods=list(d.methods), max_new_tokens=d.max_new_tokens, batch_size=settings["batch_size"],
        sinks=d.sinks, cell=d.cell, seed=settings["seed"], progress=settings["progress"],
    )
    print(Path(report["paths"]["markdown"]).read_text())
    write_json_atomic(out / "decode.json", report)
    log.info("wrote %s", ", ".join(report["paths"].values()))
    metrics: dict[str, Any] = {"decode/share": report["share"], "decode/skipped": sum(skipped.values())}
    for row in report["rows"]:
        metrics.update({f"decode/{row['method']}/{k}": row[k] for k in ("object_f1", "ppl", "kv_ratio", "decode_flops_ratio")
                        if row[k] is not None})
    return metrics


def _slug(value: Any) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(value))


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    metrics = evaluate(cfg)
    value = metrics.get("eval/accuracy")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
