"""The training recipe: a (Dynamic-)LLaVA, its losses, optimizer groups, and generation-based validation.

``sparsity`` switches between dense fine-tuning (``stage=dense``: the plain HF forward and ``generate``)
and Dynamic-LLaVA (:class:`dllava.sparse.model.DynamicLlava`: LM loss + lambda x budget losses, Gumbel
decisions at the temperature set by :class:`dllava.training.callbacks.GumbelTauSchedule`). ``trainable``
names the parts that learn (``stage=`` presets). The model is created in ``configure_model`` (not
``__init__``) so sharded strategies can build it under their init context; under ``trainer=fsdp2`` it
is then sharded with FSDP2 (:mod:`dllava.training.sharding`) before the optimizer is built.

Resumability: a step's randomness (the Gumbel noise) is seeded from (seed, optimizer step, micro-batch,
rank), the temperature follows the global step, and checkpoints carry the W&B run id, so a run
resumed from a checkpoint continues the uninterrupted run's trajectory and its W&B run.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric

from dllava.data.conversation import IGNORE_INDEX
from dllava.data.reader import COUNT_KEYS
from dllava.metrics.answers import exact_match
from dllava.model.loading import ModelSource, load_base_model, load_processor
from dllava.sparse.attention import resolve_attention
from dllava.sparse.config import PredictorConfig, SparsityConfig
from dllava.sparse.decisions import budget_loss
from dllava.sparse.model import PREDICTORS_FILE, DynamicVLM
from dllava.training.sharding import empty_base_model, is_sharded, shard_fsdp2
from dllava.utils.checks import check_float, check_int, check_mapping, check_str_list, describe
from dllava.utils.run import RUN_KEY, TrainingDiverged

log = logging.getLogger(__name__)

# Parameter-name prefixes (inside DynamicVLM) of the predictors; the base model's parts come from its
# family adapter (``part_prefixes``), and the rest is the LLM.
PREDICTOR_PREFIXES = ("image_predictor.", "text_predictor.")
BASE_PREFIXES = ("base.", "llava.")  # DynamicVLM's attribute, and its name before the family seam


def part_prefixes(adapter: Any = None) -> tuple[tuple[str, str], ...]:
    """(part, parameter-name prefix) pairs for a family (default LLaVA-1.5), projector before vision."""
    from dllava.families import adapter_for

    adapter = adapter or adapter_for("llava")
    found = [(part, base + prefix) for part in ("projector", "vision")
             for prefix in adapter.part_prefixes.get(part, ()) for base in BASE_PREFIXES]
    return tuple(found) + tuple(("predictors", prefix) for prefix in PREDICTOR_PREFIXES)


PARTS = part_prefixes()
PART_NAMES = ("vision", "projector", "llm", "predictors")


def check_trainable(trainable: Any) -> list[str]:
    """``module.trainable``: a list of part names (a bare string would be read letter by letter)."""
    if isinstance(trainable, (str, bytes, dict)) or not isinstance(trainable, Sequence):
        raise TypeError(f"module.trainable must be a list of parts from {list(PART_NAMES)}, got {describe(trainable)}")
    unknown = sorted({str(part) for part in trainable} - set(PART_NAMES))
    if unknown:
        raise ValueError(f"module.trainable: unknown parts {unknown}; choose from {list(PART_NAMES)}")
    return list(trainable)


def part_of(name: str, adapter: Any = None) -> str:
    """Which trainable part a DynamicVLM parameter belongs to (``adapter``: its family, default LLaVA)."""
    parts = PARTS if adapter is None else part_prefixes(adapter)
    return next((part for part, prefix in parts if name.startswith(prefix)), "llm")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay, one learning rate per part of the model."""

    lr: float = 1e-4
    projector_lr: float | None = None
    vision_lr: float | None = None
    predictor_lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        self.lr = check_float("optim.lr", self.lr, low=0, low_open=True)
        for key in ("projector_lr", "vision_lr", "predictor_lr"):  # null: optim.lr
            setattr(self, key, check_float(f"optim.{key}", getattr(self, key), low=0, low_open=True, optional=True))
        self.weight_decay = check_float("optim.weight_decay", self.weight_decay, low=0)
        self.betas = check_betas("optim.betas", self.betas)
        self.eps = check_float("optim.eps", self.eps, low=0, low_open=True)
        self.warmup_ratio = check_float("optim.warmup_ratio", self.warmup_ratio, low=0, high=1, high_open=True)
        self.min_lr_ratio = check_float("optim.min_lr_ratio", self.min_lr_ratio, low=0, high=1)

    def group_lr(self, group: str) -> float:
        specific = {"projector": self.projector_lr, "vision": self.vision_lr, "predictors": self.predictor_lr}.get(group)
        return self.lr if specific is None else specific


def check_betas(key: str, value: Any) -> tuple[float, float]:
    """AdamW's (beta1, beta2): two numbers in [0, 1)."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{key} must be a list of two numbers in [0, 1), e.g. [0.9, 0.999], got {describe(value)}")
    return tuple(check_float(f"{key}[{i}]", b, low=0, high=1, high_open=True) for i, b in enumerate(value))


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear 0->1 over ``warmup`` steps, then cosine 1->``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# vision_keep is realised by the decisions applied (Gumbel samples in training, the inference top-k in
# val/test); vision_keep_threshold is the share the predictor itself keeps (keep logit wins) and
# vision_keep_expected its mean keep probability, which the budget loss trains in expectation.
def step_seed(base: int, step: int, micro_batch: int, rank: int) -> int:
    """The RNG seed of one training micro-batch: a pure function of its position in the run."""
    seed = base % (2**61 - 1)
    for part in (step, micro_batch, rank):
        seed = (seed * 1_000_003 + part + 1) % (2**61 - 1)
    return seed


# Checkpoint key of the best validation answer accuracy so far (MaxMetric states are not in state_dict).
BEST_KEY = "dllava_best"
ATTENTION_KEY = "dllava_gated_attention"

SPARSE_METRICS = (
    "lm_loss", "budget_loss_vision", "budget_loss_text", "vision_keep", "vision_keep_threshold",
    "vision_keep_expected", "text_keep",
)


class DynamicLitModule(L.LightningModule):
    """Fine-tunes a (Dynamic-)LLaVA and scores its greedy answers."""

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any] | None = None,
        sparsity: dict[str, Any] | None = None,
        trainable: Sequence[str] = ("projector", "llm", "predictors"),
        max_new_tokens: int = 4,
        answer_kinds: Sequence[str] | None = ("color", "shape", "count", "exist"),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        model = dict(model)
        self.predictor_sizes = model.pop("predictor", None)
        if self.predictor_sizes is not None:  # checked now, used when the model is built
            PredictorConfig(**check_mapping("model.predictor", self.predictor_sizes))
        self.source = ModelSource(**model)
        self.optim = OptimConfig(**(optim or {}))
        self.sparsity = SparsityConfig(**(sparsity or {"vision": False, "text": False}))
        self.trainable = tuple(check_trainable(trainable))
        self.max_new_tokens = check_int("module.max_new_tokens", max_new_tokens, low=1)
        self.answer_kinds = check_str_list("module.answer_kinds", answer_kinds, optional=True)
        self.model: DynamicVLM | None = None
        self.tokenizer: Any = None
        self.gumbel_tau = self.sparsity.tau_start
        kinds = self.answer_kinds or []
        sparse = list(SPARSE_METRICS) if self.sparsity.enabled else []
        self.eval_metrics = nn.ModuleDict(
            {
                split: nn.ModuleDict(
                    {
                        "loss": MeanMetric(),
                        "answer_acc": MeanMetric(),
                        **{f"acc_{k}": MeanMetric() for k in kinds},
                        **{name: MeanMetric() for name in sparse},
                    }
                )
                for split in ("val", "test")
            }
        )
        self.val_acc_best = MaxMetric()
        self._resumed_best: float | None = None
        # per split, this rank's [scored samples, rows incl. padding, *COUNT_KEYS drops] of the pass
        self._eval_tally = {split: [0] * (2 + len(COUNT_KEYS)) for split in ("val", "test")}
        self._step_started = 0.0
        self._base_seed = 0
        self._sharded: bool | None = None

    # -- model -----------------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module | None:
        """The HF base model inside (None before ``configure_model``)."""
        return None if self.model is None else self.model.base

    llava = base  # its name before the family seam

    def configure_model(self) -> None:
        if self.model is not None:
            return
        # trainer=fsdp (sync_module_states): only rank 0 loads the weights; the others build an empty
        # (meta) model that FSDP materialises and fills from rank 0's while sharding it
        receives_weights = self._trainer is not None and self.global_rank != 0 and bool(
            getattr(self.trainer.strategy, "kwargs", {}).get("sync_module_states")
        )
        base = (empty_base_model(self.source) if receives_weights else load_base_model(self.source)).train()
        self.model = DynamicVLM(base, self.sparsity, self.predictor_sizes)
        adapter = self.model.adapter
        pretrained = Path(self.source.pretrained) if self.source.pretrained else None
        saved_predictors = pretrained is not None and (pretrained / PREDICTORS_FILE).is_file()
        if self.sparsity.enabled and saved_predictors and not receives_weights:
            self.model.load_predictors(pretrained)
            log.info("loaded trained predictors from %s", pretrained)
        for name, param in self.model.named_parameters():
            param.requires_grad_(part_of(name, adapter) in self.trainable)
        if "vision" not in self.trainable:
            adapter.vision_tower(base).eval()
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(f"module.trainable={list(self.trainable)} leaves nothing to train in this model")
        mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy (trainer=fsdp2)
        if mesh is not None:
            strategy = self._trainer.strategy if self._trainer is not None else None
            checkpointing = bool(getattr(strategy, "activation_checkpointing", False))
            shard_fsdp2(self.model, mesh["data_parallel"], activation_checkpointing=checkpointing)
        if self.source.pretrained is not None:
            try:  # decodes generated answers; without a tokenizer only the loss is scored
                self.tokenizer = load_processor(self.source.pretrained).tokenizer
            except OSError as err:
                log.warning("no tokenizer for %s (%s): answer accuracy is not computed", self.source.pretrained, err)

    def forward(self, batch: dict[str, Any], mode: str = "train") -> Any:
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **self.model.adapter.pixel_inputs(batch, self.dtype_of_model),
            labels=batch["labels"],
            answer_span=batch.get("answer_span"),
            mode=mode,
            tau=self.gumbel_tau,
        )

    def total_loss(self, out: Any) -> torch.Tensor:
        """LM loss + lambda x (vision budget + text budget)."""
        loss = out.lm_loss
        for budget in (out.budget_loss_vision, out.budget_loss_text):
            if budget is not None:
                loss = loss + self.sparsity.loss_weight * budget
        return loss

    def sparse_metrics(self, out: Any) -> dict[str, torch.Tensor]:
        """Batch means of the sparsity metrics present in ``out`` (text_keep over eligible samples)."""
        if not self.sparsity.enabled:
            return {}
        found = {"lm_loss": out.lm_loss}
        for name in ("budget_loss_vision", "budget_loss_text"):
            if getattr(out, name) is not None:
                found[name] = getattr(out, name)
        for name in ("vision_keep", "vision_keep_threshold", "vision_keep_expected"):
            if getattr(out, name) is not None:
                found[name] = getattr(out, name).mean()
        if out.text_keep is not None and out.text_eligible is not None and bool(out.text_eligible.any()):
            found["text_keep"] = out.text_keep[out.text_eligible].mean()
        return {k: v.detach().float() for k, v in found.items()}

    @property
    def dtype_of_model(self) -> torch.dtype:
        return next(self.base.parameters()).dtype

    # -- training --------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # seed_everything (train.py) and the strategies' reset_seed set this identically on every
        # process and again on resume; without cfg.seed it is random and runs are not reproducible
        self._base_seed = torch.initial_seed()
        if self.sparsity.enabled:
            resolved = self.gated_attention()
            log.info("gated softmax: %s (sparsity.attention=%s on %s)", resolved, self.sparsity.attention, self.device.type)
            for logger in self.loggers:
                logger.log_hyperparams({"sparsity/attention_resolved": resolved})

    def gated_attention(self) -> str:
        """The gated-softmax implementation this module trains and validates with."""
        return resolve_attention(self.sparsity.attention)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()
        torch.manual_seed(step_seed(self._base_seed, self.trainer.global_step, batch_idx, self.global_rank))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch, mode="train")
        loss = self.total_loss(out)
        self.stop_if_diverged(loss)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in self.sparse_metrics(out).items():
            self.log(f"train/{name}", value, prog_bar=name == "vision_keep", batch_size=batch_size)
        # Samples the loader dropped since its previous batch (corrupt, too long, text-only), summed
        # over batches, workers and ranks into per-epoch totals (dllava.data.reader).
        for name, value in batch.get("data_counts", {}).items():
            self.log(f"data/{name}", float(value), reduce_fx="sum", on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
        return loss

    def stop_if_diverged(self, loss: torch.Tensor) -> None:
        """Raise :class:`TrainingDiverged` on every rank when some rank's loss is NaN or inf, before its
        backward. One scalar all-reduce per step (the ranks decide together, so none is left waiting in a
        collective); only a diverged step gathers the losses for the error message."""
        finite = torch.isfinite(loss.detach()).all().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        if bool(finite):
            return
        losses = [float(v) for v in self.all_gather(loss.detach().float()).flatten().tolist()]
        metrics = {**self.trainer.callback_metrics, "train/loss": next(v for v in losses if not math.isfinite(v))}
        raise TrainingDiverged(self.trainer.global_step, losses, metrics)

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        tokens = float(batch["attention_mask"].sum())
        self.log("train/tokens_per_s", tokens / max(elapsed, 1e-9), batch_size=1)
        for group in self.optimizers().param_groups:
            self.log(f"lr/{group['name']}", group["lr"], batch_size=1)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters grouped by part of the model (name prefix), each with its own lr."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                groups.setdefault(part_of(name, self.model.adapter), []).append(param)
        return [
            {"name": g, "params": ps, "lr": self.optim.group_lr(g), "weight_decay": self.optim.weight_decay}
            for g, ps in groups.items()
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.parameter_groups()
        low = sorted({str(p.dtype) for g in groups for p in g["params"] if p.dtype != torch.float32})
        if low and "mixed" in str(self.trainer.precision):
            log.warning(
                "trainable weights are %s under trainer.precision=%s: the optimizer then updates low-precision "
                "weights, and small steps (lr 5e-6) are rounded away. Set model.dtype=float32 (fp32 master "
                "weights; bf16-mixed still computes in bf16).", ", ".join(low), self.trainer.precision,
            )
        optimizer = torch.optim.AdamW(groups, betas=self.optim.betas, eps=self.optim.eps)
        total = int(self.trainer.estimated_stepping_batches)
        if not 0 < total < 10**9:
            raise ValueError("trainer.max_steps must be set: the cosine schedule needs the number of steps")
        warmup = int(self.optim.warmup_ratio * total)
        ratio = self.optim.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation ------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        # The sanity-check validation ran before this and must not count; a resumed run continues from
        # the best of the validations before its checkpoint (on_load_checkpoint).
        self.val_acc_best.reset()
        if self._resumed_best is not None:
            self.val_acc_best.update(self._resumed_best)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self._eval_step(batch, "val")
        if batch_idx == 0:
            self.log_kept_patches(batch, out)

    def log_kept_patches(self, batch: dict[str, Any], out: Any, count: int = 8) -> None:
        """Kept (outlined) vs dropped (greyed) patches of the first validation batch, as the W&B image
        ``val/kept_patches`` (PAPER.md's inference top-k, the decisions val metrics use). Each sample's
        image comes back from its pixel inputs through the family adapter and its keep row, cut to its
        own token count (``out.image_valid``), is drawn on its own token grid."""
        from lightning.pytorch.loggers import WandbLogger

        from dllava.eval.overlay import kept_patch_panel

        loggers = [lg for lg in self.loggers if isinstance(lg, WandbLogger)]
        if out.image_keep is None or not loggers or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        processor = getattr(getattr(self.trainer, "datamodule", None), "processor", None)
        adapter = self.model.adapter
        count = min(count, out.image_keep.shape[0])
        pixels = adapter.select_rows(adapter.pixel_inputs(batch), list(range(count)))
        keep = out.image_keep[:count].detach().cpu()
        valid = out.image_valid[:count].cpu() if out.image_valid is not None else torch.ones_like(keep, dtype=torch.bool)
        panel = kept_patch_panel(
            adapter.images_for_pictures(pixels, processor), [k[v] for k, v in zip(keep, valid)],
            captions=batch["questions"][:count], grids=adapter.token_grids(self.model.base.config, pixels),
        )
        loggers[0].log_image("val/kept_patches", [panel], step=self.global_step)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], split: str) -> Any:
        """Score one validation/test batch. Every real sample counts once and padding rows (``valid``
        False, which fill an exact pass so every rank runs the same forwards) never: the loss is the
        mean over supervised tokens (padding has none), the other metrics are means over samples, so a
        split scores the same however it is cut into batches and ranks."""
        metrics = self.eval_metrics[split]
        out = self(batch, mode="eval")
        valid = batch.get("valid")
        if valid is None:
            valid = torch.ones(batch["input_ids"].shape[0], dtype=torch.bool)
        valid = valid.to(batch["input_ids"].device)
        self._tally(split, batch, valid)
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if tokens:  # an all-padding batch has no supervised token: its lm_loss is 0/0
            metrics["loss"].update(out.lm_loss.detach().float(), weight=tokens)
        for name, (value, weight) in self.eval_sparse_metrics(out, valid, tokens).items():
            metrics[name].update(value, weight=weight)
        if self.tokenizer is None:
            return out
        scored = [
            i for i, k in enumerate(batch["kinds"])
            if bool(valid[i]) and (self.answer_kinds is None or k in self.answer_kinds)
        ]
        # sharded, generation is a collective: every rank generates every batch, padding included
        rows = list(range(len(batch["kinds"]))) if self.sharded else scored
        if not rows:
            return out
        predictions = dict(zip(rows, self.generate_answers(batch, rows)))
        for i in scored:
            hit = float(exact_match(predictions[i], batch["answers"][i]))
            metrics["answer_acc"].update(hit)
            kind_metric = f"acc_{batch['kinds'][i]}"
            if kind_metric in metrics:
                metrics[kind_metric].update(hit)
        return out

    def _tally(self, split: str, batch: dict[str, Any], valid: torch.Tensor) -> None:
        tally = self._eval_tally[split]
        tally[0] += int(valid.sum())
        tally[1] += int(valid.numel())
        for n, name in enumerate(COUNT_KEYS):
            tally[2 + n] += int(batch.get("data_counts", {}).get(name, 0))

    def eval_sparse_metrics(self, out: Any, valid: torch.Tensor, tokens: int) -> dict[str, tuple[torch.Tensor, int]]:
        """``name -> (value, weight)`` of the sparsity metrics over the batch's real samples: per-sample
        ratios and budget errors (as :func:`budget_loss` averages them), lm_loss per supervised token."""
        if not self.sparsity.enabled:
            return {}
        found: dict[str, tuple[torch.Tensor, int]] = {}
        if tokens:
            found["lm_loss"] = (out.lm_loss, tokens)
        real = int(valid.sum())
        if real:
            for name in ("vision_keep", "vision_keep_threshold", "vision_keep_expected"):
                if getattr(out, name) is not None:
                    found[name] = (getattr(out, name)[valid].mean(), real)
            if out.budget_loss_vision is not None and out.vision_budget_error is not None:
                found["budget_loss_vision"] = (out.vision_budget_error[valid].mean(), real)
            if out.budget_loss_text is not None and out.text_keep is not None:
                eligible = out.text_eligible[valid]
                found["budget_loss_text"] = (budget_loss(out.text_keep[valid], self.sparsity.text_keep, eligible), real)
            elif self.sparsity.text:  # no eligible answer in the batch (text predictor skipped): each adds 0
                found["budget_loss_text"] = (torch.zeros((), device=valid.device), real)
        if out.text_keep is not None and out.text_eligible is not None:
            chosen = out.text_eligible & valid
            if bool(chosen.any()):
                found["text_keep"] = (out.text_keep[chosen].mean(), int(chosen.sum()))
        return {k: (v.detach().float(), w) for k, (v, w) in found.items()}

    @property
    def sharded(self) -> bool:
        """Parameters are sharded over several processes (FSDP): every rank must run the same forwards."""
        if self._sharded is None:
            self._sharded = self._trainer is not None and self.trainer.world_size > 1 and is_sharded(self.model)
        return self._sharded

    @torch.no_grad()
    def generate_answers(self, batch: dict[str, Any], rows: Sequence[int]) -> list[str]:
        """Greedy answers for the selected rows of ``batch`` (left-padded generation prompts)."""
        index = torch.tensor(list(rows), device=batch["prompt_ids"].device)
        prompt_ids = batch["prompt_ids"].index_select(0, index)
        prompt_mask = batch["prompt_mask"].index_select(0, index)
        adapter = self.model.adapter
        images = adapter.select_rows(adapter.pixel_inputs(batch, self.dtype_of_model), list(rows))
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        if self.sparsity.enabled:  # top-k image tokens, thresholded generated tokens (no KV cache)
            # Sharded: a rank that stopped early at EOS would leave the others waiting in an all-gather,
            # so every rank decodes max_new_tokens (EOS id -1 never matches) and cuts at EOS afterwards.
            new_tokens, _ = self.model.generate_greedy(
                prompt_ids, prompt_mask, max_new_tokens=self.max_new_tokens,
                eos_token_id=-1 if self.sharded else eos, pad_token_id=pad, **images,
            )
            if self.sharded:
                new_tokens = cut_after_eos(new_tokens, eos, pad)
        else:
            output = self.base.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, **images,
                **adapter.hf_inputs(self.base.config, prompt_ids),
                max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos,
                synced_gpus=self.sharded,
            )
            new_tokens = output[:, prompt_ids.shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def _updated_on_any_rank(self, split: str) -> dict[str, bool]:
        """Which metrics some rank updated. ``compute`` syncs across ranks, so every rank must call it
        for the same metrics, including one whose answer kind never reached this rank's batches."""
        metrics = self.eval_metrics[split]
        flags = torch.tensor([float(m.update_called) for m in metrics.values()], device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags, reduce_op="max")
        return {name: bool(flag) for name, flag in zip(metrics.keys(), flags.tolist())}

    def _log_eval(self, split: str, updated: dict[str, bool] | None = None) -> None:
        updated = self._updated_on_any_rank(split) if updated is None else updated
        for name, metric in self.eval_metrics[split].items():
            if updated[name]:
                self.log(f"{split}/{name}", metric.compute(), sync_dist=False)
            metric.reset()
        self._log_eval_counts(split)

    def _log_eval_counts(self, split: str) -> None:
        """Log the pass's scored samples and dropped data (``<split>/samples``, ``<split>/data_<kind>``)
        summed over ranks, and let the datamodule judge the pass (no sample: fail; many dropped: warn)."""
        tally = torch.tensor(self._eval_tally[split], dtype=torch.float64, device=self.device)
        self._eval_tally[split] = [0] * len(self._eval_tally[split])
        if self._trainer is not None and self.trainer.world_size > 1:
            tally = self.trainer.strategy.reduce(tally, reduce_op="sum")
        real, rows, *drops = (int(v) for v in tally.tolist())
        self.log(f"{split}/samples", float(real), sync_dist=False)
        for name, value in zip(COUNT_KEYS, drops):
            self.log(f"{split}/data_{name}", float(value), sync_dist=False)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        check = getattr(datamodule, "check_eval_pass", None)
        if check is not None and not self.trainer.sanity_checking:
            check(split, real, rows)

    def on_validation_epoch_end(self) -> None:
        updated = self._updated_on_any_rank("val")
        if updated["answer_acc"]:
            self.val_acc_best(self.eval_metrics["val"]["answer_acc"].compute())
            self.log("val/answer_acc_best", self.val_acc_best.compute())
        self._log_eval("val", updated)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        wandb_ids = [logger.version for logger in self.loggers if isinstance(logger, WandbLogger)]
        checkpoint[RUN_KEY] = {"wandb_id": wandb_ids[0] if wandb_ids and wandb_ids[0] else None}
        best = float(self.val_acc_best.max_value)  # the same on every rank: updated with synced accuracies
        checkpoint[BEST_KEY] = {"val/answer_acc_best": best if math.isfinite(best) else None}
        # hyper_parameters keep sparsity.attention as configured ("auto"); this is what it ran as
        checkpoint[ATTENTION_KEY] = self.gated_attention() if self.sparsity.enabled else None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_best = (checkpoint.get(BEST_KEY) or {}).get("val/answer_acc_best")

    def hparams_dict(self) -> dict[str, Any]:
        return {"model": self.source.to_dict(), "optim": asdict(self.optim), "sparsity": self.sparsity.to_dict()}


def cut_after_eos(tokens: torch.Tensor, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Replace every token after a row's first EOS with padding (what early stopping would produce)."""
    is_eos = (tokens == eos_token_id).long()
    after = (is_eos.cumsum(-1) - is_eos) > 0
    return tokens.masked_fill(after, pad_token_id)


LlavaLitModule = DynamicLitModule  # its name before the family seam (configs written then name it)
