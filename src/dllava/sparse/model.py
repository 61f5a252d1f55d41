"""Dynamic-LLaVA around an unmodified HF multimodal model of any supported family.

The base model (LLaVA-1.5, Qwen2.5-VL, Qwen3-VL, ...) is reached only through its family adapter
(:mod:`dllava.families`). The forward pass is an explicit loop over the HF decoder layers (PAPER.md
section 12, no fork of a modeling file): embed text, scatter in the projected image features, run
layers 0..K-1 normally (adding any per-layer image features the family has, e.g. DeepStack),
score tokens with the predictors on the hidden states entering layer K, and pass the resulting keep gate
to layers K..L-1, whose attention is :mod:`dllava.sparse.attention`. Nothing is removed here; the gate
masks keys inside the softmax, which is what training needs and what the physically pruned inference
engine must reproduce.

Image-token counts may differ per sample (dynamic resolution): the image predictor runs on each
sample's tokens padded to the batch's largest count, with the padding masked.

Saved layout (``save_pretrained``): the stock HF files (so the family's HF class ``from_pretrained``
still loads the dense model) plus ``predictors.safetensors`` and ``sparsity.json``. The latter two alone
(``export_predictors``) attach to any checkpoint of the same family and hidden size.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dllava.families import FamilyAdapter, ImageFeatures, adapter_for, get_adapter, next_positions
from dllava.families.llava import positions_from_mask  # noqa: F401  (re-exported: its former home)
from dllava.sparse.attention import ATTENTION_NAME, register_gated_attention
from dllava.sparse.config import PredictorConfig, SparsityConfig
from dllava.sparse.decisions import (
    budget_errors,
    budget_loss,
    group_keep_ratio,
    gumbel_keep,
    image_columns,
    keep_ratio,
    threshold_keep,
    topk_keep,
)
from dllava.sparse.log_gate import GateMasks
from dllava.sparse.predictors import (
    IMAGE_PREDICTOR_CLASSES,
    ImagePredictor,
    InstructionAwareImagePredictor,
    TextPredictor,
    init_predictor_weights,
)

PREDICTORS_FILE = "predictors.safetensors"
SPARSITY_FILE = "sparsity.json"
IGNORE_INDEX = -100
CROSS_PREFIX = "image_predictor.cross."  # the instruction-aware image predictor's own parameters
MODES = ("train", "eval", "generate", "all")

log = logging.getLogger(__name__)


@dataclass
class DynamicOutput:
    """One forward pass: logits, the LM loss (if labels), and what the predictors decided.

    Ratios are per sample. ``text_eligible`` marks samples whose final answer was text-sparsified;
    ``text_keep`` is 0 for the others. Budget losses are unweighted (multiply by lambda).
    """

    logits: torch.Tensor
    lm_loss: torch.Tensor | None = None
    image_keep: torch.Tensor | None = None  # (B, n_image) 0/1 decisions (0 in a sample's padding slots)
    image_valid: torch.Tensor | None = None  # (B, n_image) bool: real image tokens (counts may differ)
    vision_keep: torch.Tensor | None = None  # (B,) realised by the decisions this mode applies
    vision_keep_threshold: torch.Tensor | None = None  # (B,) share whose keep logit wins
    vision_keep_expected: torch.Tensor | None = None  # (B,) mean keep probability
    text_keep: torch.Tensor | None = None  # (B,)
    text_eligible: torch.Tensor | None = None  # (B,) bool
    vision_budget_error: torch.Tensor | None = None  # (B,) each sample's vision budget term (its mean is the loss)
    budget_loss_vision: torch.Tensor | None = None
    budget_loss_text: torch.Tensor | None = None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over supervised positions, in fp32 (HF's causal-LM loss)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def causal_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, N, N) mask: 0 where query i may see key j (j <= i and j is not padding)."""
    n = attention_mask.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class DynamicVLM(nn.Module):
    """An HF multimodal model plus the image and output-text predictors, with the gated training forward.

    ``base`` is the HF ``...ForConditionalGeneration`` of any family with an adapter
    (:mod:`dllava.families`); ``self.adapter`` is that family's. Checkpoints written when this class was
    ``DynamicLlava`` (keys ``llava.*``) load unchanged: the prefix is mapped to ``base.*`` on load.
    """

    def __init__(
        self,
        base: nn.Module,
        sparsity: SparsityConfig | dict[str, Any] | None = None,
        predictor: PredictorConfig | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.sparsity = sparsity if isinstance(sparsity, SparsityConfig) else SparsityConfig(**(sparsity or {}))
        text_config = self.adapter.text_config(base.config)
        self.image_predictor: ImagePredictor | None = None
        self.text_predictor: TextPredictor | None = None
        self.predictor_config: PredictorConfig | None = None
        self.register_load_state_dict_pre_hook(_rename_llava_prefix)
        if not self.sparsity.enabled:
            return
        if predictor is None:
            raise ValueError(
                "model.predictor (predictor sizes) is missing: use a Dynamic-LLaVA model config "
                "(model=tiny, model=dllava_7b, ...) or stage=dense"
            )
        self.sparsity.check_layers(text_config.num_hidden_layers)
        self.predictor_config = predictor if isinstance(predictor, PredictorConfig) else PredictorConfig(**predictor)
        hidden = text_config.hidden_size
        dtype = next(base.parameters()).dtype
        if self.sparsity.vision:
            image_class = IMAGE_PREDICTOR_CLASSES[self.sparsity.image_predictor]
            self.image_predictor = image_class(hidden, self.predictor_config).to(dtype)
        if self.sparsity.text:
            self.text_predictor = TextPredictor(hidden, self.predictor_config).to(dtype)
        init_predictor_weights(self.predictors())
        register_gated_attention()
        text_config._attn_implementation = ATTENTION_NAME

    # -- structure -------------------------------------------------------------------------------
    @property
    def adapter(self) -> FamilyAdapter:
        """The base model's family adapter (stateless; found from ``config.model_type``)."""
        return get_adapter(self.base)

    @property
    def llava(self) -> nn.Module:
        """The base model under its former name (kept for code written against ``DynamicLlava``)."""
        return self.base

    def predictors(self) -> nn.ModuleDict:
        """The predictor modules present, by their state-dict prefix."""
        found = {"image_predictor": self.image_predictor, "text_predictor": self.text_predictor}
        return nn.ModuleDict({k: v for k, v in found.items() if v is not None})

    @property
    def text_config(self) -> Any:
        return self.adapter.text_config(self.base.config)

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    def encode_images(self, images: dict[str, torch.Tensor]) -> ImageFeatures:
        """The projected image tokens of a batch (one image per sample), as the family's HF model
        computes them: flat features, per-sample counts and grids, any per-layer additions."""
        return self.adapter.encode_images(self.base, images)

    def image_features(self, pixel_values: torch.Tensor, **image_inputs: torch.Tensor) -> torch.Tensor:
        """Image features padded per sample, (B, n_image, H) (LLaVA: exactly ``LlavaModel``'s)."""
        return self.encode_images({"pixel_values": pixel_values, **image_inputs}).padded()

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        answer_span: torch.Tensor | None = None,
        mode: str = "train",
        tau: float = 1.0,
        generated_from: int | None = None,
        image_features: torch.Tensor | ImageFeatures | None = None,
        keep: float | None = None,
        position_ids: torch.Tensor | None = None,
        **image_inputs: torch.Tensor,
    ) -> DynamicOutput:
        """Gated forward over the whole sequence.

        ``mode``: ``train`` samples Gumbel decisions for image tokens and for final answers of at least
        ``text_min_len`` tokens (``answer_span`` (B, 2)); ``eval`` applies the inference policy to the
        same tokens: top ``int(n * keep)`` of each sample's ``n`` droppable image tokens (per view under
        ``sparsity.budget=per_view``; never-dropped tokens such as LLaVA-NeXT's newlines kept),
        thresholded text; ``generate`` keeps the same image tokens and thresholds every token from
        ``generated_from`` on; ``all`` keeps everything (the gated path with G = 1). Without sparsity
        this is the plain HF forward. ``image_inputs`` are the family's other pixel inputs (Qwen:
        ``image_grid_thw``); ``position_ids`` (R, B, N) default to the family's for the whole sequence.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        images = {k: v for k, v in {"pixel_values": pixel_values, **image_inputs}.items() if v is not None}
        if not self.sparsity.enabled:
            extra = self.adapter.hf_inputs(self.base.config, input_ids) if images else {}
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, **images, **extra)
            return DynamicOutput(logits=out.logits, lm_loss=None if labels is None else lm_loss(out.logits, labels))
        adapter = self.adapter
        decoder = adapter.decoder(self.base)
        hidden = decoder.embed_tokens(input_ids)
        image_mask = input_ids == adapter.image_token_id(self.base.config)
        if generated_from is not None:  # a generated image-token id is text, not a placeholder
            image_mask[:, generated_from:] = False
        if isinstance(image_features, torch.Tensor):
            image_features = ImageFeatures.from_stacked(image_features)
        if image_features is None and "pixel_values" in images:
            image_features = self.encode_images(images)
        if image_features is not None:
            found = int(image_mask.sum())
            if found != image_features.flat.shape[0]:
                raise ValueError(f"image features and image tokens do not match: {found} tokens, "
                                 f"{image_features.flat.shape[0]} features")
            hidden = hidden.masked_scatter(image_mask[..., None], image_features.flat.to(hidden.dtype))
        if position_ids is None:
            position_ids = adapter.prompt_positions(self.base, input_ids, attention_mask, images)
        # no padding: None is causal to every attention path, and lets SDPA use its causal kernels
        mask = None if bool(attention_mask.all()) else causal_padding_mask(attention_mask, hidden.dtype)
        position_embeddings = adapter.rotary(self.base, hidden, position_ids)
        additions = {} if image_features is None else image_features.layer_additions
        out = DynamicOutput(logits=hidden)
        policy = gate_masks = None
        for index, layer in enumerate(decoder.layers):
            if index == self.sparsity.layer:
                policy = self._decide(
                    hidden, image_mask, attention_mask, answer_span, mode, tau, generated_from, keep, out, image_features,
                    labels,
                )
                gate_masks = GateMasks(policy, mask, key_valid=attention_mask)  # mask = causal + these keys
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                policy=policy,
                sparse_layer=self.sparsity.layer,
                gate_attention=self.sparsity.attention,
                gate_masks=gate_masks,
            )
            if index in additions:
                hidden = add_at(hidden, image_mask, additions[index])
        out.logits = adapter.lm_head(self.base)(decoder.norm(hidden))
        if labels is not None:
            out.lm_loss = lm_loss(out.logits, labels)
        return out

    def _decide(
        self,
        hidden: torch.Tensor,
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        answer_span: torch.Tensor | None,
        mode: str,
        tau: float,
        generated_from: int | None,
        keep: float | None,
        out: DynamicOutput,
        image_features: ImageFeatures | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The (B, N) keep gate for layers >= K; fills the decisions and budget losses into ``out``.

        Image tokens the features mark as never dropped (LLaVA-NeXT's newlines) keep gate 1 and count in
        no ratio; budgets follow ``sparsity.budget`` (per sample, or per view). An instruction-aware image
        predictor also reads :func:`instruction_tokens` (never an answer token)."""
        batch, length = image_mask.shape
        policy = hidden.new_ones(batch, length, dtype=torch.float32)
        if self.image_predictor is not None and image_mask.any():
            counts = image_mask.sum(-1)
            columns = image_columns(image_mask, int(counts.max()))
            valid = torch.arange(columns.shape[1], device=columns.device)[None] < counts[:, None]
            ragged = not bool(valid.all())
            image_hidden = hidden.gather(1, columns[..., None].expand(-1, -1, hidden.shape[-1]))
            words = words_valid = None
            if self.sparsity.image_predictor == "instruction_aware":
                words, words_valid = instruction_tokens(
                    hidden, image_mask, attention_mask, labels=labels, answer_span=answer_span,
                    generated_from=generated_from,
                )
            logits = self.image_predictor(
                image_hidden, valid=valid if ragged else None, instruction=words, instruction_valid=words_valid
            )
            budget = self.sparsity.budget
            if image_features is not None:
                groups = image_features.groups(budget, hidden.device)
            else:
                groups = torch.where(valid, 0, -1)
            droppable = valid & (groups >= 0)
            if mode == "train":
                kept = torch.where(droppable, gumbel_keep(logits, tau), 1.0)
            elif mode in ("eval", "generate"):
                kept = topk_keep(logits, self.sparsity.keep if keep is None else keep, valid, groups)
            else:
                kept = torch.ones_like(logits[..., 0])
            kept = kept * valid
            policy = policy.scatter(1, columns, torch.where(valid, kept.float(), policy.gather(1, columns)))
            out.image_keep = kept
            out.image_valid = valid
            out.vision_keep = keep_ratio(kept, droppable)
            with torch.no_grad():
                out.vision_keep_threshold = keep_ratio(threshold_keep(logits), droppable)
                out.vision_keep_expected = keep_ratio(logits.float().softmax(-1)[..., 0], droppable)
            if budget == "per_view":
                view_ratio, present = group_keep_ratio(kept, groups, valid)
                out.vision_budget_error = budget_errors(view_ratio, self.sparsity.keep, present)
            else:
                out.vision_budget_error = budget_errors(out.vision_keep, self.sparsity.keep)
            out.budget_loss_vision = out.vision_budget_error.mean()
        if self.text_predictor is not None:
            text_mask, eligible = self._text_positions(attention_mask, answer_span, mode, generated_from)
            # In training the predictor also runs when no answer is eligible (its budget term is then 0):
            # FSDP reduce-scatters only gradients that exist, so every rank must reach the same parameters.
            if text_mask is not None and (mode == "train" or text_mask.any()):
                logits = self.text_predictor(hidden)
                kept = gumbel_keep(logits, tau) if mode == "train" else threshold_keep(logits)
                if mode == "all":
                    kept = torch.ones_like(kept)
                policy = torch.where(text_mask, kept, policy)
                out.text_keep = keep_ratio(kept, text_mask)
                out.text_eligible = eligible
                out.budget_loss_text = budget_loss(out.text_keep, self.sparsity.text_keep, eligible)
        return policy

    def _text_positions(
        self, attention_mask: torch.Tensor, answer_span: torch.Tensor | None, mode: str, generated_from: int | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Which positions the text predictor may drop, and which samples are text-sparsified."""
        positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)[None]
        if generated_from is not None:
            text_mask = (positions >= generated_from) & attention_mask.bool()
            return text_mask, text_mask.any(-1)
        if answer_span is None:
            return None, None
        start, end = answer_span[:, :1], answer_span[:, 1:]
        eligible = (end - start).squeeze(-1) >= self.sparsity.text_min_len
        text_mask = (positions >= start) & (positions < end) & eligible[:, None]
        return text_mask, eligible

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_greedy(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        keep: float | None = None,
        **image_inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy decoding without KV cache on the gated forward (left-padded prompts).

        Image tokens: top ``int(n * keep)`` per sample (or per view), never-dropped ones kept; generated tokens: the text predictor's
        threshold; positions continue from the full prompt's (never from the pruned one). Returns
        the new tokens (B, T) and the per-sample count of kept image tokens (None without predictors).
        A finished sample continues with ``pad_token_id``, as HF ``generate`` does.
        """
        images = {k: v for k, v in {"pixel_values": pixel_values, **image_inputs}.items() if v is not None}
        features = self.encode_images(images)
        positions = self.adapter.prompt_positions(self.base, input_ids, attention_mask, images)
        prompt_len = input_ids.shape[1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        kept_images = None
        for _ in range(max_new_tokens):
            out = self(
                input_ids, attention_mask, image_features=features, mode="generate",
                generated_from=prompt_len, keep=keep, position_ids=positions,
            )
            if kept_images is None and out.image_keep is not None:
                kept_images = out.image_keep.sum(-1).round().long()
            token = out.logits[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            if eos_token_id is not None:
                done |= token == eos_token_id
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(token.shape[0], 1)], dim=1)
            positions = torch.cat([positions, next_positions(positions)], dim=-1)
            if bool(done.all()):
                break
        return input_ids[:, prompt_len:], kept_images

    # -- persistence -----------------------------------------------------------------------------
    def sparsity_record(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity.to_dict(),
            "predictor": None if self.predictor_config is None else self.predictor_config.to_dict(),
            "hidden_size": self.text_config.hidden_size,
        }

    def export_predictors(self, directory: str | Path) -> Path:
        """Write ``predictors.safetensors`` and ``sparsity.json`` (a few MB for 7B) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.predictors().state_dict().items()}
        if not tensors:
            raise ValueError("this model has no predictors to export (sparsity disabled)")
        save_file(tensors, str(directory / PREDICTORS_FILE), metadata={"format": "pt"})
        (directory / SPARSITY_FILE).write_text(json.dumps(self.sparsity_record(), indent=2) + "\n")
        return directory

    def save_pretrained(self, directory: str | Path) -> Path:
        """HF files of the base model (dense-loadable) plus the predictors and sparsity config."""
        directory = Path(directory)
        text_config = self.text_config
        saved_impl = text_config._attn_implementation
        text_config._attn_implementation = "sdpa"  # a stock loader must not need our registration
        try:
            self.base.save_pretrained(directory)
        finally:
            text_config._attn_implementation = saved_impl
        if self.sparsity.enabled:
            self.export_predictors(directory)
        return directory

    def load_predictors(self, directory: str | Path) -> None:
        """Load exported predictor weights (strict: every predictor of this model must be present).

        One exception: an instruction-aware image predictor may start from an original one's export
        (``sparsity.image_predictor=instruction_aware`` on a checkpoint trained with ``original``). Only
        its cross-attention (``image_predictor.cross.*``) is then missing; it keeps its fresh init, whose
        zero output makes the predictor compute what the original did until it is trained."""
        path = Path(directory) / PREDICTORS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {PREDICTORS_FILE} in {directory}")
        state = load_file(str(path))
        missing, unexpected = self.predictors().load_state_dict(state, strict=False)
        fresh = [k for k in missing if k.startswith(CROSS_PREFIX)]
        if fresh and len(fresh) == len(missing) and isinstance(self.image_predictor, InstructionAwareImagePredictor):
            log.info("%s holds an original image predictor: its instruction cross-attention starts fresh "
                     "(zero output, so it starts as the original)", path)
            missing = []
        if missing:
            raise ValueError(f"{path} lacks predictor weights: {missing[:4]}...")
        if unexpected:
            raise ValueError(f"{path} holds weights for predictors this model does not have: {unexpected[:4]}...")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        predictors: str | Path | None = None,
        sparsity: SparsityConfig | dict[str, Any] | None = None,
        **hf_kwargs: Any,
    ) -> "DynamicVLM":
        """Load a saved Dynamic-LLaVA, or a stock HF checkpoint of a supported family with ``predictors``
        attached (the family comes from the saved config's ``model_type``).

        ``predictors`` names a directory written by :meth:`export_predictors` (default: ``directory``
        itself). ``sparsity`` overrides the saved targets (sizes always come from the saved record).
        """
        source = Path(predictors) if predictors is not None else Path(directory)
        record_path = source / SPARSITY_FILE
        if not record_path.is_file():
            raise FileNotFoundError(f"{record_path} not found: not a Dynamic-LLaVA save or predictor export")
        record = json.loads(record_path.read_text())
        from transformers import AutoConfig

        adapter = adapter_for(AutoConfig.from_pretrained(str(directory)).model_type)
        base = adapter.model_class().from_pretrained(str(directory), **hf_kwargs)
        hidden = adapter.text_config(base.config).hidden_size
        if hidden != record["hidden_size"]:
            raise ValueError(
                f"predictors in {source} expect hidden size {record['hidden_size']}, "
                f"the model in {directory} has {hidden}"
            )
        model = cls(base, sparsity if sparsity is not None else record["sparsity"], record["predictor"])
        model.load_predictors(source)
        return model


DynamicLlava = DynamicVLM  # the name before the family seam; same class


def _rename_llava_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: keys ``<prefix>llava.*`` (written as ``DynamicLlava``) -> ``<prefix>base.*``."""
    old = prefix + "llava."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "base." + key[len(old):]] = state_dict.pop(key)


def instruction_tokens(
    hidden: torch.Tensor,
    image_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    answer_span: torch.Tensor | None = None,
    generated_from: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The instruction an instruction-aware image predictor reads: each sample's valid (non-padding)
    tokens after its last image token and before its first answer token, left-aligned and padded to the
    batch's longest (at least one column): ``(words (B, m, H), words_valid (B, m) bool)``, gathered from
    ``hidden`` (the hidden states entering layer K).

    The first answer token is the first supervised position after the image (``labels != -100``; training),
    else the ``answer_span`` (B, 2) start, and ``generated_from`` bounds it too (generated text). At
    inference without any of them: every valid token after the image, i.e. the prompt's text after the
    image, as the inference engine reads it. Stopping at the *first* answer (not only skipping supervised
    tokens) is what keeps every answer out: a later question token's hidden state has attended to the
    earlier answers of a multi-turn sample, so a multi-turn sample's instruction in training is its first
    question. (Text before the image is seen by the image tokens themselves, in either predictor.)
    A stable sort (like :func:`image_columns`), so shapes never depend on data beyond the host width."""
    length = image_mask.shape[-1]
    positions = torch.arange(length, device=image_mask.device)[None]
    last_image = torch.where(image_mask, positions, -1).max(-1, keepdim=True).values
    after = (positions > last_image) & attention_mask.bool()
    if labels is not None:
        answer = (labels != IGNORE_INDEX) & (positions > last_image)
        after &= positions < torch.where(answer, positions, length).min(-1, keepdim=True).values
    elif answer_span is not None:
        after &= positions < answer_span[:, :1]
    if generated_from is not None:
        after &= positions < generated_from
    width = max(int(after.sum(-1).max()), 1)
    columns = torch.sort((~after).to(torch.uint8), dim=-1, stable=True).indices[:, :width]
    words = hidden.gather(1, columns[..., None].expand(-1, -1, hidden.shape[-1]))
    return words, after.gather(1, columns)


def add_at(hidden: torch.Tensor, mask: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``hidden`` plus ``flat`` (T, H) at the True positions of ``mask`` (B, N), row by row (DeepStack)."""
    addition = torch.zeros_like(hidden).masked_scatter(mask[..., None], flat.to(hidden.dtype))
    return hidden + addition
