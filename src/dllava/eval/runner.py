"""Evaluate one arm (a method at a keep ratio) of a model: answers, accuracy and what each answer cost.

Every arm runs through :class:`~dllava.inference.engine.SparseEngine` (physically pruned prefill, sparse
KV cache), greedy, batched over left-padded prompts. Per question it records the answer and the
engine's counts; per arm (``eval.json``):

* ``accuracy`` (exact match after light normalisation, what validation logs as ``val/answer_acc``)
  and ``vqa_accuracy`` (:func:`dllava.eval.scoring.vqa_accuracy`), overall and per kind, over the
  questions that have a reference;
* realised keep ratios: ``vision_keep`` (kept / image tokens, both without the never-dropped ones:
  LLaVA-NeXT's newlines; the share training's ``val/vision_keep`` reports), ``text_keep`` (generated tokens kept in
  the caches of layers >= K / generated tokens fed back), ``object_recall``, the share of the
  patches that show an object which survive (questions whose record has a ``scene``, the synthetic
  task; None otherwise), and ``objects_seen``, the share of objects with at least one of the tokens
  their box covers kept (a large object needs one of its four, not its centre's);
* ``prefill_flops``: mean decoder prefill FLOPs per question by the full count of
  :mod:`dllava.inference.flops` with the realised token counts (the question's own unpadded prompt
  length in layers < K, the kept tokens after; predictor or FastV scoring included; vision tower
  apart in ``vision_flops``), and ``prefill_flops_paper``, the paper's image-tokens-only convention;
  each question with its own image-token count (Qwen's dynamic resolution gives every image its own;
  ``image_tokens`` is then their mean) and the vision tower by the family's formula on its own image
  grid (``adapter.vision_flops``);
* ``kv_bytes``: mean K/V bytes a question leaves in the cache (prompt + fed answer tokens);
* ``latency_s``: wall-clock of the batched ``generate`` calls (vision tower, prefill and decoding)
  divided by the number of questions this process answered; one untimed warm-up batch first
  (``warmup``).

Everything but the latency is computed from the answer records' ``metadata`` (:func:`summarize`), so a
continued evaluation scores the answers an interrupted run left exactly as if it had made them.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from tqdm import tqdm

from dllava.eval.answers import answer_record
from dllava.eval.loading import LoadedModel
from dllava.eval.questions import Question, batches, collate_questions, describe_skipped, pixels_to, question_key
from dllava.eval.scoring import exact_match_any, vqa_accuracy
from dllava.families import ImageFeatures
from dllava.inference import flops
from dllava.bench.inference import sync_device
from dllava.inference.engine import SparseEngine
from dllava.inference.selection import check_method, method_defaults, num_kept
from dllava.inference.text_policies import check_text_policy
from dllava.sparse.decisions import check_budget


@dataclass(frozen=True)
class Arm:
    """One evaluation setting: image-token method, keep ratio (1.0 for dense), generated-token policy,
    image-budget convention (``global`` / ``per_view``; the same decisions for one-view families)."""

    method: str
    keep: float = 1.0
    text: str | float = "off"
    budget: str = "global"
    options: dict[str, Any] = field(default_factory=dict)  # the method's settings (conf/method/<name>.yaml)
    prune_layer: int | None = None  # where a movable method cuts (None: its paper's place)

    def __post_init__(self) -> None:
        check_method(self.method)
        num_kept(1, self.keep)  # validates the range
        check_text_policy(self.text)
        check_budget(self.budget)
        if self.method == "dense" and self.keep != 1.0:
            raise ValueError(f"method=dense keeps every image token: sparsity.keep must be 1.0 (or null), got {self.keep}")

    @property
    def label(self) -> str:
        return "dense" if self.method == "dense" else f"{self.method}@{self.keep:g}"

    def engine(self, model: Any, seed: int = 0) -> SparseEngine:
        """The sparse engine that runs this arm on ``model`` (checks every setting against the model)."""
        return SparseEngine(model, method=self.method, keep=self.keep, text=self.text, seed=seed, budget=self.budget,
                            options=self.options, prune_layer=self.prune_layer)


def default_text(model: Any, method: str) -> str:
    """The learned method decodes with its text predictor when it has one; the baselines keep every token."""
    return "learned" if method == "dynamic" and getattr(model, "text_predictor", None) is not None else "off"


def arm_for(
    model: Any,
    method: str,
    keep: float | None = None,
    text: str | float | None = None,
    budget: str | None = None,
    options: dict[str, Any] | None = None,
    prune_layer: int | None = None,
) -> Arm:
    """The arm a checkpoint runs ``method`` with, unset settings filled from the checkpoint itself:
    ``keep`` its trained ``sparsity.keep`` (dense: 1.0), ``text`` :func:`default_text`, ``budget`` its
    trained convention. Shared by ``eval.py``'s single arm and the lmms-eval model (comparisons plan their arms in compare.py)."""
    text = "off" if text is False else text  # YAML's and lmms-eval's bare `off`
    if method == "dense":
        keep = 1.0
    elif keep is None:
        keep = model.sparsity.keep
    return Arm(
        method, float(keep), default_text(model, method) if text is None else text,
        str(model.sparsity.budget if budget is None else budget), options=dict(options or {}), prune_layer=prune_layer,
    )


@dataclass
class ArmResult:
    """What one arm produced: answer-file records, the ``eval.json`` summary, and keep masks of the
    first questions (for overlays)."""

    arm: Arm
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    examples: list[tuple[Question, torch.Tensor, str]] = field(default_factory=list)  # (question, keep, answer)


class CostModel:
    """FLOPs of one question from its own prompt length, image-token count and image grid (families
    with dynamic resolution give every question its own count; see the module docstring)."""

    def __init__(self, loaded: LoadedModel, arm: Arm, layer: int) -> None:
        model = loaded.model
        self.config = model.base.config
        self.adapter = model.adapter
        self.shape = flops.DecoderShape.from_config(model.text_config)
        self.layer = layer
        self.arm = arm
        self.predictor = model.predictor_config if arm.method == "dynamic" else None
        self.instruction_aware = getattr(model.sparsity, "image_predictor", "original") == "instruction_aware"

    def extra(
        self, prompt_len: int, n_image: int, per_layer: list[int] | None = None, instruction: int = 0,
        group_budgets: list[int] | None = None,
    ) -> int:
        """Predictor or training-free selection work of one prompt (none without image tokens: nothing is
        selected; :func:`~dllava.inference.flops.selection_flops`)."""
        if n_image == 0:
            return 0
        if self.arm.method == "dynamic" and self.predictor is not None:
            return flops.image_predictor_flops(
                self.shape.hidden, self.predictor, n_image, instruction_tokens=max(instruction, 1),
                instruction_aware=self.instruction_aware,
            )
        per_layer = per_layer if per_layer is not None else [n_image] * self.shape.layers
        return flops.selection_flops(
            self.arm.method, self.shape, prompt_len, n_image, per_layer, self.layer, instruction, group_budgets
        )

    def image_per_layer(self, n_image: int, kept: int | float, cuts: Sequence[Sequence[int]] | None = None) -> list[int]:
        """Image tokens each decoder layer runs for one question: from its ``cuts`` ([layer, tokens from
        there on] pairs, answer metadata ``image_cuts``), or (answers written before cuts were recorded)
        all of them below K and ``kept`` from K on."""
        if cuts is None:
            cuts = [] if kept == n_image else [(self.layer, int(kept))]
        at = dict((int(layer), int(tokens)) for layer, tokens in cuts)
        row, current = [], n_image
        for i in range(self.shape.layers):
            current = at.get(i, current)
            row.append(current)
        return row

    def prefill(
        self, prompt_len: int, kept: int | float, n_image: int, cuts: Sequence[Sequence[int]] | None = None,
        instruction: int = 0, group_budgets: list[int] | None = None,
    ) -> int:
        per_layer = self.image_per_layer(n_image, kept, cuts)
        return flops.prefill_flops_layers(
            self.shape, [prompt_len - n_image + t for t in per_layer],
            extra=self.extra(prompt_len, n_image, per_layer, instruction, group_budgets),
        )

    def prefill_dense(self, prompt_len: int) -> int:
        return flops.prefill_flops(self.shape, self.layer, prompt_len, prompt_len)

    def paper(self, kept: int | float, n_image: int, cuts: Sequence[Sequence[int]] | None = None) -> int:
        return flops.paper_prefill_flops(self.image_per_layer(n_image, kept, cuts), self.shape.hidden)

    def vision(self, n_image: int, grid: Sequence[int] | None = None) -> int:
        """The vision tower and projector on one question's image, by the family's formula
        (``adapter.vision_flops``); ``grid``: its (rows, cols) token grid (needed by families whose
        cost depends on the image's shape, Qwen; default: square, as LLaVA's)."""
        if n_image == 0:
            return 0
        flat = torch.empty(n_image, 1, device="meta")  # shapes only: the formulas read counts and grids
        features = ImageFeatures.from_stacked(flat[None]) if grid is None else ImageFeatures(flat, [n_image], [tuple(grid)])
        return self.adapter.vision_flops(self.config, features)


def _cuts(per_layer: list[int], n_image: int) -> list[list[int]]:
    """[layer, image tokens from there on] wherever a layer runs fewer image tokens than the one before
    it (layer 0: than the image has); empty when nothing was cut."""
    cuts, previous = [], n_image
    for i, n in enumerate(per_layer):
        if n != previous:
            cuts.append([i, n])
        previous = n
    return cuts


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _mean_or_common(values: Sequence[int]) -> int | float | None:
    """The value every question shares (an exact int, e.g. LLaVA's 576 image tokens), else the mean."""
    if not values:
        return None
    return values[0] if all(v == values[0] for v in values) else statistics.fmean(values)


class NoQuestions(ValueError):
    """Nothing to answer: every question was filtered out or skipped."""


def evaluate_arm(
    loaded: LoadedModel,
    questions: Iterable[Question],
    arm: Arm,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    examples: int = 0,
    model_id: str | None = None,
    seed: int = 0,
    warmup: bool = True,
    progress: bool = True,
    answered: Sequence[dict[str, Any]] = (),
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> ArmResult:
    """Answer every question with ``arm``; ``examples``: keep masks of the first questions to draw.

    Continuing: questions whose id has an answer in ``answered`` (an earlier, interrupted run of the
    same arm; see :func:`check_answered`) are not asked again; the summary scores all answers, earlier
    and new, and ``records`` holds them in question order. ``on_batch`` receives each batch's new
    answer records as soon as they exist (``eval.py`` appends them to answers.jsonl).
    """
    model, tokenizer, device = loaded.model, loaded.processor.tokenizer, loaded.device
    engine = arm.engine(model, seed)
    cost = CostModel(loaded, arm, engine.layer)
    dtype = next(model.parameters()).dtype
    model_id = model_id or f"{loaded.name}:{arm.label}"
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    check_answered(answered, model_id, arm, engine.prune_layer)
    earlier = {question_key(r["question_id"]): r for r in answered}

    order: list[str] = []  # every question's key, in question order
    by_key: dict[str, dict[str, Any]] = {}

    def unanswered() -> Iterator[Question]:
        for question in questions:
            key = question_key(question.question_id)
            order.append(key)
            if key in earlier:
                by_key[key] = earlier[key]
            else:
                yield question

    drawn: list[tuple[Question, torch.Tensor, str]] = []
    seconds, new = 0.0, 0
    total = len(questions) if hasattr(questions, "__len__") else None
    bar = tqdm(total=total, desc=f"eval {arm.label}", unit="q", disable=not progress)
    for batch in batches(unanswered(), batch_size):
        ids, mask, images = collate_questions(batch, pad)
        ids, mask = ids.to(device), mask.to(device)
        images = pixels_to(images, device, dtype)
        if warmup:  # the first call of a process pays for allocations and kernel selection
            engine.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **images)
            warmup = False
        sync_device(device)
        start = time.perf_counter()
        result = engine.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, **images)
        sync_device(device)
        seconds += time.perf_counter() - start
        texts = tokenizer.batch_decode(
            [row[:n].tolist() for row, n in zip(result.sequences, result.lengths)], skip_special_tokens=True
        )
        image_keep = result.image_keep.cpu()  # (B, n_image) bool: what this generate kept
        for i in range(min(len(batch), examples - len(drawn))):
            drawn.append((batch[i], image_keep[i, : result.image_tokens[i]], texts[i].strip()))  # its own tokens
        prompt_lens = mask.sum(-1).tolist()
        fresh = []
        for i, question in enumerate(batch):
            kept, n_image = result.image_tokens_kept[i], result.image_tokens[i]
            cuts = _cuts(result.image_tokens_per_layer[i], n_image)
            instruction = result.instruction_tokens[i] if result.instruction_tokens else 0
            group_budgets = result.image_group_budgets[i] if result.image_group_budgets else None
            grid = result.image_grids[i] if result.image_grids else None
            evidence_kept = int(image_keep[i, question.evidence].sum()) if question.evidence else None
            metadata = {
                "method": arm.method,
                "keep": arm.keep,
                "text": arm.text,
                "budget": arm.budget,
                "options": arm.options,
                "prune_layer": engine.prune_layer,
                "image_tokens": n_image,
                "image_tokens_fixed": result.image_tokens_fixed[i],
                "image_tokens_kept": kept,
                "image_cuts": cuts,  # [layer, image tokens from there on] (PDrop: several)
                "generated_tokens": result.lengths[i],  # EOS included
                "text_tokens_fed": result.text_tokens_fed[i],
                "text_tokens_kept": result.text_tokens_kept[i],
                "kv_bytes": result.kv_bytes[i] if result.kv_bytes else None,
                "prefill_flops": cost.prefill(prompt_lens[i], kept, n_image, cuts, instruction, group_budgets),
                "kind": question.kind,
                # what the summary needs besides the above, so that it can score a continued run's
                # earlier answers from the answer file alone
                "kv_bytes_dense": result.kv_bytes_dense[i] if result.kv_bytes_dense else None,
                "prefill_flops_dense": cost.prefill_dense(prompt_lens[i]),
                "prefill_flops_paper": cost.paper(kept, n_image, cuts),
                "vision_flops": cost.vision(n_image, grid),
            }
            if evidence_kept is not None:
                metadata.update(object_patches=len(question.evidence), object_patches_kept=evidence_kept)
            if question.objects:  # objects with at least one of their tokens kept
                seen = sum(bool(image_keep[i, tokens].any()) for tokens in question.objects)
                metadata.update(objects=len(question.objects), objects_seen=seen)
            if question.reference is not None:
                metadata.update(reference=question.reference, correct=bool(exact_match_any(texts[i], question.reference)))
            record = answer_record(question.question_id, question.prompt, texts[i], model_id, metadata)
            by_key[question_key(question.question_id)] = record
            fresh.append(record)
        if on_batch is not None:
            on_batch(fresh)
        new += len(batch)
        bar.update(len(batch))
    bar.close()
    unknown = [json.loads(key) for key in earlier.keys() - set(order)]
    if unknown:
        raise ValueError(
            f"{len(unknown)} earlier answer(s) are for questions this run does not ask (e.g. question_id "
            f"{unknown[0]!r}): the questions changed (data.*, or now skipped: see skipped.jsonl); "
            "evaluate into a new run dir instead of continuing this one"
        )
    records = [by_key[key] for key in order]
    if not records:
        skipped = getattr(questions, "skipped", [])
        why = f"; {describe_skipped(skipped)}" if skipped else ""
        raise NoQuestions(
            f"no questions to evaluate (check data.shards / data.questions, data.answer_kinds, data.limit){why}"
        )
    summary = {
        "model": loaded.name,
        "ckpt_path": loaded.path,
        "model_id": model_id,
        **asdict(arm),
        "arm": arm.label,
        **summarize(records, cost),
        "answered_earlier": len(records) - new,  # read back from an interrupted run's answers.jsonl
        "latency_s": seconds / new if new else None,  # of the questions answered by this process
        "seconds": seconds,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "sparse_layer": engine.layer,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
    }
    return ArmResult(arm=arm, records=records, summary=summary, examples=drawn)


def check_answered(answered: Sequence[dict[str, Any]], model_id: str, arm: Arm, prune_layer: int | None = None) -> None:
    """Earlier answers may be continued only by the same model and arm (method settings compared with
    their defaults filled in, and where the method cut): scoring a mix would be wrong."""
    defaults = method_defaults(arm.method)
    options = {**defaults, **arm.options}
    for record in answered:
        meta = record.get("metadata", {})
        if "prefill_flops_dense" not in meta:
            raise ValueError(
                f"answers.jsonl answer to question_id {record.get('question_id')!r} lacks the costs a summary needs "
                "(written by an older eval.py?): evaluate into a new run dir"
            )
        # answers written before budgets existed were all global
        found = (record.get("model_id"), meta.get("method"), meta.get("keep"), meta.get("text"), meta.get("budget", "global"),
                 {**defaults, **meta.get("options", {})})
        where = meta.get("prune_layer", prune_layer)  # answers written before cuts were recorded: the default
        if found != (model_id, arm.method, arm.keep, arm.text, arm.budget, options) or where != prune_layer:
            raise ValueError(
                f"answers.jsonl holds answers of model_id={found[0]!r} method={found[1]} keep={found[2]} "
                f"text={found[3]} budget={found[4]} options={found[5]} prune_layer={where}, not of model_id={model_id!r} "
                f"{arm.label} text={arm.text} budget={arm.budget} options={options} prune_layer={prune_layer}: continue "
                "with the same ckpt_path, method "
                "(and its settings), sparsity.keep and sparsity.budget, or evaluate into a new run dir"
            )


def summarize(records: Sequence[dict[str, Any]], cost: CostModel) -> dict[str, Any]:
    """The scores and costs of ``eval.json`` from answer records alone (their ``metadata``), so that a
    continued run scores earlier and new answers alike."""
    stats: dict[str, list[float]] = defaultdict(list)
    by_kind: dict[str, list[float]] = defaultdict(list)
    for record in records:
        meta = record["metadata"]
        kept, n_image = meta["image_tokens_kept"], meta["image_tokens"]
        stats["image_tokens"].append(n_image)
        # answers written before per-question vision FLOPs were recorded: square grids (LLaVA's)
        stats["vision_flops"].append(meta["vision_flops"] if "vision_flops" in meta else cost.vision(n_image))
        fixed = meta.get("image_tokens_fixed", 0)  # never dropped (newlines): not part of the share
        row = {
            "image_tokens_kept": kept,
            "vision_keep": (kept - fixed) / (n_image - fixed) if n_image > fixed else 1.0,
            "object_recall": meta["object_patches_kept"] / meta["object_patches"] if meta.get("object_patches") else None,
            "objects_seen": meta["objects_seen"] / meta["objects"] if meta.get("objects") else None,
            **{k: meta.get(k) for k in ("text_tokens_fed", "text_tokens_kept", "prefill_flops", "prefill_flops_dense",
                                        "prefill_flops_paper", "kv_bytes", "kv_bytes_dense")},
        }
        for key, value in row.items():
            if value is not None:
                stats[key].append(value)
        if meta.get("reference") is not None:
            hit = float(meta["correct"])
            stats["accuracy"].append(hit)
            stats["vqa_accuracy"].append(vqa_accuracy(record["text"], meta["reference"]))
            by_kind[meta["kind"]].append(hit)
    fed, kept_text = sum(stats["text_tokens_fed"]), sum(stats["text_tokens_kept"])
    prefill, prefill_dense = _mean(stats["prefill_flops"]), _mean(stats["prefill_flops_dense"])
    kv, kv_dense = _mean(stats["kv_bytes"]), _mean(stats["kv_bytes_dense"])
    return {
        "samples": len(records),
        "scored": len(stats["accuracy"]),
        "accuracy": _mean(stats["accuracy"]),
        "vqa_accuracy": _mean(stats["vqa_accuracy"]),
        "accuracy_by_kind": {k: statistics.fmean(v) for k, v in sorted(by_kind.items())},
        "image_tokens": _mean_or_common(stats["image_tokens"]),
        "image_tokens_kept": _mean(stats["image_tokens_kept"]),
        "vision_keep": _mean(stats["vision_keep"]),
        "object_recall": _mean(stats["object_recall"]),
        "objects_seen": _mean(stats["objects_seen"]),
        "text_tokens_fed": _mean(stats["text_tokens_fed"]),
        "text_tokens_kept": _mean(stats["text_tokens_kept"]),
        "text_keep": kept_text / fed if fed else None,
        "prefill_flops": prefill,
        "prefill_flops_dense": prefill_dense,
        "prefill_flops_ratio": prefill / prefill_dense if prefill_dense else None,
        "prefill_flops_paper": _mean(stats["prefill_flops_paper"]),
        "vision_flops": _mean_or_common(stats["vision_flops"]),
        "kv_bytes": kv,
        "kv_bytes_dense": kv_dense,
        "kv_ratio": kv / kv_dense if kv and kv_dense else None,
    }


def flat_metrics(summary: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The numeric entries of an ``eval.json`` summary as flat metric names (for ``summary.json``)."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        if key == "accuracy_by_kind":
            out.update({f"{prefix}acc_{k}": v for k, v in value.items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out
