"""dllava as an lmms-eval model: ``python -m lmms_eval --model dllava --model_args pretrained=<ckpt>,...``.

Every request runs through the same code as ``eval.py``: the checkpoint is loaded by
:func:`~dllava.eval.loading.load_for_eval` (a Lightning ``.ckpt``, a ``save_pretrained`` directory with
predictors, or a stock HF directory of any supported family, evaluated dense), the prompt is built as
``eval.py`` builds a LLaVA question-file line (:func:`~dllava.eval.questions.image_question`: one human
turn ``<image>\\n<context>`` in the family's chat template), and answers come from
:func:`~dllava.eval.runner.evaluate_arm`, batched through the sparse engine (physically pruned prefill,
sparse KV cache). So a task's accuracy here equals ``eval.py``'s on the same questions.

``--model_args`` (lmms-eval parses ``true``/``false``, integers and floats; everything else is a string):

* ``pretrained`` (required): the checkpoint, as lmms-eval's own HF wrappers name it;
* ``method``: any selection method of the engine (``dynamic``, ``dense``, ``fastv``, ``random``,
  ``dart``, ``divprune``, ``cdpruner``, ``visionzip``, ``pdrop``); default ``dynamic`` when the checkpoint
  has an image predictor, else ``dense``;
* ``keep`` (default: the checkpoint's trained keep), ``text`` (generated-token policy; default: the
  learned one for ``dynamic`` with a text predictor, else ``off``), ``budget`` (``global`` / ``per_view``),
  ``prune_layer`` (where a movable method cuts);
* ``batch_size``, ``device`` (``auto``), ``dtype`` (``float32`` / ``bfloat16`` / ``float16``; default the
  checkpoint's), ``max_length`` (prompt tokens), ``seed`` (``method=random``'s draws);
* ``stats_path``: also append every request's sparsifier statistics to this JSONL file;
* any other key is a setting of the method (``conf/method/<name>.yaml``'s ``options``, e.g.
  ``pivots=8`` for DART); a name the method does not have is refused.

Settings given in ``--model_args`` win over lmms-eval's ``--batch_size`` / ``--device`` flags (which it
always passes). A baseline on a checkpoint without a learned sparsifier needs ``keep`` (nothing was
trained to default to); ``method=dense`` with a ``keep`` below 1 and ``text=true`` are refused.

Decoding is greedy (as LLaVA's and lmms-eval's VQA protocols are); a request asking for sampling
(``do_sample``, or ``temperature > 0`` even without ``do_sample``, as lmms-eval's ``llava_hf`` reads
it) or beam search is refused rather than silently decoded greedily. ``until`` stop strings cut the
answer after generation (the counts below include the tokens cut). Each request takes exactly one
image (the engine prunes one image per prompt); a request with none or several is refused naming its
task and document. Questions are built batch by batch, so a large task never sits in memory.

Per-request statistics of ``generate_until`` (image tokens and how many were kept, generated tokens fed
back and kept, prefill FLOPs, KV bytes, each also dense) are returned as lmms-eval token counts
(:class:`SparsityCounts`), which lmms-eval writes into its ``samples_<task>.jsonl`` (``--log_samples``)
under ``token_counts``. Answers lmms-eval serves from its response cache (``--use_cache``) carry none
(the cache keeps only the text; it is keyed by the model arguments, so a checkpoint re-written at the
same path is served stale answers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.utils import simple_parse_args_string

from dllava.eval.loading import LoadedModel, load_for_eval
from dllava.eval.questions import (
    BadQuestion, Question, batches, collate_questions, image_question, make_preprocessor, pixels_to,
)
from dllava.eval.runner import Arm, arm_for, evaluate_arm

log = logging.getLogger(__name__)

# Generation settings a greedy decoder understands (others are logged as ignored).
_GREEDY_KEYS = ("max_new_tokens", "until", "temperature", "do_sample", "top_p", "top_k", "num_beams")
DEFAULT_MAX_NEW_TOKENS = 128  # what LLaVA's VQA evaluation scripts allow a free-form answer


@dataclass
class SparsityCounts(TokenCounts):
    """lmms-eval's per-request token counts plus what the sparsifier did (kept in its samples log)."""

    method: str | None = None
    keep: float | None = None
    image_tokens: int | None = None
    image_tokens_kept: float | None = None  # from the sparse layer on (PyramidDrop: the layer mean)
    text_tokens_fed: int | None = None
    text_tokens_kept: int | None = None
    prefill_flops: int | None = None
    prefill_flops_dense: int | None = None
    kv_bytes: int | None = None
    kv_bytes_dense: int | None = None

    def to_dict(self) -> dict[str, Any]:
        counts = super().to_dict()
        counts.update({name: getattr(self, name) for name in SPARSITY_FIELDS if getattr(self, name) is not None})
        return counts


# SparsityCounts' own fields, named as in the answer records' metadata
SPARSITY_FIELDS = tuple(f.name for f in fields(SparsityCounts) if f.name not in {g.name for g in fields(TokenCounts)})


def counts_from(metadata: dict[str, Any], prompt_tokens: int) -> SparsityCounts:
    """A request's :class:`SparsityCounts` from its answer record's ``metadata`` (:func:`evaluate_arm`)."""
    return SparsityCounts(
        input_tokens=prompt_tokens, output_tokens=metadata.get("generated_tokens"),
        **{key: metadata.get(key) for key in SPARSITY_FIELDS},
    )


def continuation_ids(tokenizer: Any, prompt_ids: Sequence[int], continuation: str, tail: int = 16) -> list[int]:
    """The token ids ``continuation`` has after the prompt: tokenised together with the prompt's last
    text (its last ``tail`` tokens after any special token, decoded), as lmms-eval's own HF models
    tokenise context and continuation jointly. Alone, a SentencePiece tokenizer splits ``" A"``
    differently from how it follows ``"ASSISTANT:"``; when the decoded tail does not tokenise back to
    the same ids, the continuation is tokenised alone."""
    special = set(tokenizer.all_special_ids)
    start = len(prompt_ids)
    while start > 0 and len(prompt_ids) - start < tail and prompt_ids[start - 1] not in special:
        start -= 1
    tail_ids = list(prompt_ids[start:])
    if tail_ids:
        joint = tokenizer(tokenizer.decode(tail_ids) + continuation, add_special_tokens=False).input_ids
        if joint[: len(tail_ids)] == tail_ids:
            return joint[len(tail_ids):]
    return tokenizer(continuation, add_special_tokens=False).input_ids


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the stop strings (lmms-eval's ``until``)."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


def greedy_length(gen_kwargs: dict[str, Any], where: str) -> tuple[int, tuple[str, ...]]:
    """``(max_new_tokens, until)`` of a request's generation settings; refuses sampling and beams."""
    unknown = sorted(set(gen_kwargs) - set(_GREEDY_KEYS))
    if unknown:
        log.warning("%s: generation settings %s are ignored (dllava decodes greedily)", where, unknown)
    sampling = gen_kwargs.get("do_sample") is True or (gen_kwargs.get("temperature") or 0) > 0
    if sampling or (gen_kwargs.get("num_beams") or 1) > 1:
        raise ValueError(
            f"{where}: dllava decodes greedily, but the task asks for "
            f"do_sample={gen_kwargs.get('do_sample')}, temperature={gen_kwargs.get('temperature')}, "
            f"num_beams={gen_kwargs.get('num_beams')}; evaluate a greedy task (temperature 0, do_sample false)"
        )
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    return int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), until


class DllavaLMM(lmms):
    """A dllava checkpoint behind lmms-eval's simple-model interface (module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str | None = None,
        keep: float | None = None,
        text: str | float | bool | None = None,
        budget: str | None = None,
        prune_layer: int | None = None,
        batch_size: int | str = 1,
        device: str = "auto",
        dtype: str | None = None,
        max_length: int | None = None,
        seed: int = 0,
        stats_path: str | None = None,
        progress: bool = True,
        loaded: LoadedModel | None = None,
        max_batch_size: int | None = None,  # lmms-eval passes it; batches are fixed-size here
        **options: Any,
    ) -> None:
        super().__init__()
        if (pretrained is None) == (loaded is None):
            raise ValueError("dllava needs pretrained=<checkpoint> (a .ckpt, a save_pretrained or a stock HF directory)")
        self.loaded = loaded or load_for_eval(str(pretrained), device, dtype)
        model = self.loaded.model
        if method is None:
            method = "dynamic" if model.image_predictor is not None else "dense"
        if method == "dense" and keep not in (None, 1, 1.0):
            raise ValueError(f"dllava: method=dense keeps every image token; drop keep={keep} or choose a pruning method")
        if keep is None and method not in ("dense", "dynamic") and model.image_predictor is None:
            raise ValueError(f"dllava: method={method} on a checkpoint without a learned sparsifier needs keep=<ratio> "
                             "(there is no trained keep to default to)")
        if text is True:
            raise ValueError("dllava: text=true is not a generated-token policy; use learned, off or a keep rate in (0, 1]")
        self.arm: Arm = arm_for(model, method, keep, text, budget, options, prune_layer)
        self.seed = int(seed)
        self.engine = self.arm.engine(model, self.seed)  # every setting checked now, not at request 1
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"dllava: batch_size must be an integer, got {batch_size!r}") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"dllava: batch_size must be >= 1, got {self.batch_size_per_gpu}")
        self.preprocess = make_preprocessor(self.loaded.processor, max_length, model.adapter)
        self.stats_path = Path(stats_path) if stats_path else None
        self.progress = bool(progress)
        self.model_id = f"{self.loaded.name}:{self.arm.label}"
        log.info("dllava: %s, method=%s keep=%g text=%s budget=%s", self.loaded.name, self.arm.method,
                 self.arm.keep, self.arm.text, self.arm.budget)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> "DllavaLMM":
        """``--model_args`` win over the CLI's ``--batch_size`` / ``--device`` (which lmms-eval always
        passes, ``--batch_size`` defaulting to 1): ``--model_args batch_size=8`` means batches of 8."""
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # -- requests -> questions ------------------------------------------------------------------------
    def _question(self, index: int, context: str, doc_to_visual: Any, doc_id: int, task: str, split: str) -> Question:
        where = f"task {task!r} ({split}) doc {doc_id}"
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) != 1:
            raise ValueError(f"{where}: dllava answers questions about exactly one image, this one has {len(visuals)}")
        image = visuals[0]
        if not hasattr(image, "convert"):
            raise ValueError(f"{where}: expected a PIL image, got {type(image).__name__} (video and audio are not supported)")
        try:
            return image_question(self.preprocess, index, image.convert("RGB"), context)
        except BadQuestion as bad:
            raise ValueError(f"{where}: {bad}") from None

    def _write_stats(self, requests: Sequence[Instance], counts: Sequence[SparsityCounts]) -> None:
        if self.stats_path is None:
            return
        self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        with self.stats_path.open("a") as handle:
            for request, count in zip(requests, counts):
                entry = {"task": request.metadata.get("task"), "doc_id": request.metadata.get("doc_id"),
                         "model_id": self.model_id, **count.to_dict()}
                handle.write(json.dumps(entry) + "\n")

    # -- lmms-eval's interface ------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Greedy answers, batched through the sparse engine; requests with the same generation settings
        run together (their order inside a batch does not change an answer: batch == alone)."""
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        for i, request in enumerate(requests):
            _, gen_kwargs, _, doc_id, task, _ = request.args
            setting = greedy_length(dict(gen_kwargs or {}), f"task {task!r} doc {doc_id}")
            groups.setdefault(setting, []).append(i)
        out: list[GenerationResult | None] = [None] * len(requests)
        for (max_new_tokens, until), members in groups.items():
            prompt_tokens: dict[int, int] = {}

            def questions(members: list[int] = members) -> Iterator[Question]:
                for i in members:  # built batch by batch as the engine asks: a big task never sits in memory
                    question = self._question(i, *_question_args(requests[i]))
                    prompt_tokens[i] = len(question.prompt_ids)
                    yield question

            result = evaluate_arm(
                self.loaded, questions(), self.arm, batch_size=self.batch_size_per_gpu, max_new_tokens=max_new_tokens,
                model_id=self.model_id, seed=self.seed, warmup=False, progress=self.progress,
            )
            counts = []
            for i, record in zip(members, result.records):
                count = counts_from(record["metadata"], prompt_tokens[i])
                counts.append(count)
                out[i] = GenerationResult(text=cut_at_stop(record["text"], until), token_counts=count)
            self._write_stats([requests[i] for i in members], counts)
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """How likely each continuation is after its context and image, teacher-forced through the same
        sparse engine (the image pruned as for generation; every continuation token fed back and facing
        the text policy), and whether greedy decoding would produce it.

        The value is what lmms-eval 0.7.3's own models return and its scoring expects, not the
        log-probability its base class describes: the **mean negative log-likelihood** per continuation
        token (HF's loss over the continuation; multiple-choice scoring takes the argmin). Each
        ``(loss, greedy)`` pair comes wrapped as a :class:`GenerationResult`'s ``text``: the evaluator
        turns a bare tuple into its string (``unwrap_generation_output``) and its multiple-choice scoring
        then fails; the wrapper is passed through as is."""
        device = self.loaded.device
        dtype = next(self.loaded.model.parameters()).dtype
        pad = self.loaded.processor.tokenizer.pad_token_id
        out: list[GenerationResult] = []
        for batch in batches(self._scored(requests), self.batch_size_per_gpu):
            ids, mask, images = collate_questions([q for q, _ in batch], pad)
            result = self.engine.reference_nll(ids.to(device), mask.to(device), [t for _, t in batch],
                                          **pixels_to(images, device, dtype))
            out.extend(GenerationResult(text=(score.nll / score.tokens, score.greedy)) for score in result)  # type: ignore[arg-type]
        return out

    def _scored(self, requests: list[Instance]) -> Iterator[tuple[Question, list[int]]]:
        """(prompt, continuation token ids) of each loglikelihood request, built as the engine asks."""
        tokenizer = self.loaded.processor.tokenizer
        for i, request in enumerate(requests):
            if len(request.args) != 6:  # acc_mutual_info's unconditional requests: (context, continuation)
                raise ValueError(f"task {request.metadata.get('task')!r} doc {request.metadata.get('doc_id')}: a "
                                 "loglikelihood request without an image (acc_mutual_info) is not supported")
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if callable(continuation):  # a task's doc_to_target
                continuation = continuation(self.task_dict[task][split][doc_id])
            question = self._question(i, context, doc_to_visual, doc_id, task, split)
            target = continuation_ids(tokenizer, question.prompt_ids, str(continuation))
            if not target:
                raise ValueError(f"task {task!r} doc {doc_id}: the continuation {continuation!r} has no tokens")
            yield question, target

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "dllava answers one round per request (generate_until); tasks whose output_type is "
            "generate_until_multi_round are not supported. Ask each round as its own question "
            "(eval.py asks a shard record's final question after its earlier rounds)."
        )


def _question_args(request: Instance) -> tuple[Any, ...]:
    context, _, doc_to_visual, doc_id, task, split = request.args
    return context, doc_to_visual, doc_id, task, split

