"""Dynamic-LLaVA around an unmodified HF ``LlavaForConditionalGeneration``.

The forward pass is an explicit loop over the HF decoder layers (PAPER.md section 12, no fork of the
Llama modeling file): embed text, scatter in the projected image features, run layers 0..K-1 normally,
score tokens with the predictors on the hidden states entering layer K, and pass the resulting keep gate
to layers K..L-1, whose attention is :mod:`dllava.sparse.attention`. Nothing is removed here; the gate
masks keys inside the softmax, which is what training needs and what the physically pruned inference
engine must reproduce.

Saved layout (``save_pretrained``): the stock HF files (so ``LlavaForConditionalGeneration.from_pretrained``
still loads the dense model) plus ``predictors.safetensors`` and ``sparsity.json``. The latter two alone
(``export_predictors``) attach to any llava-hf checkpoint of the same hidden size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlavaForConditionalGeneration

from dllava.sparse.attention import ATTENTION_NAME, register_gated_attention
from dllava.sparse.config import PredictorConfig, SparsityConfig
from dllava.sparse.decisions import budget_loss, gumbel_keep, keep_ratio, threshold_keep, topk_keep
from dllava.sparse.predictors import ImagePredictor, TextPredictor, init_predictor_weights

PREDICTORS_FILE = "predictors.safetensors"
SPARSITY_FILE = "sparsity.json"
IGNORE_INDEX = -100
MODES = ("train", "eval", "generate", "all")


@dataclass
class DynamicOutput:
    """One forward pass: logits, the LM loss (if labels), and what the predictors decided.

    Ratios are per sample. ``text_eligible`` marks samples whose final answer was text-sparsified;
    ``text_keep`` is 0 for the others. Budget losses are unweighted (multiply by lambda).
    """

    logits: torch.Tensor
    lm_loss: torch.Tensor | None = None
    image_keep: torch.Tensor | None = None  # (B, n_image) 0/1 decisions
    vision_keep: torch.Tensor | None = None  # (B,) realised by the decisions this mode applies
    vision_keep_threshold: torch.Tensor | None = None  # (B,) share whose keep logit wins
    vision_keep_expected: torch.Tensor | None = None  # (B,) mean keep probability
    text_keep: torch.Tensor | None = None  # (B,)
    text_eligible: torch.Tensor | None = None  # (B,) bool
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


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (as HF ``generate`` does); arange for right padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class DynamicLlava(nn.Module):
    """An HF LLaVA plus the image and output-text predictors, with the gated training forward."""

    def __init__(
        self,
        llava: LlavaForConditionalGeneration,
        sparsity: SparsityConfig | dict[str, Any] | None = None,
        predictor: PredictorConfig | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.llava = llava
        self.sparsity = sparsity if isinstance(sparsity, SparsityConfig) else SparsityConfig(**(sparsity or {}))
        text_config = llava.config.text_config
        self.image_predictor: ImagePredictor | None = None
        self.text_predictor: TextPredictor | None = None
        self.predictor_config: PredictorConfig | None = None
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
        dtype = next(llava.parameters()).dtype
        if self.sparsity.vision:
            self.image_predictor = ImagePredictor(hidden, self.predictor_config).to(dtype)
        if self.sparsity.text:
            self.text_predictor = TextPredictor(hidden, self.predictor_config).to(dtype)
        init_predictor_weights(self.predictors())
        register_gated_attention()
        text_config._attn_implementation = ATTENTION_NAME

    # -- structure -------------------------------------------------------------------------------
    def predictors(self) -> nn.ModuleDict:
        """The predictor modules present, by their state-dict prefix."""
        found = {"image_predictor": self.image_predictor, "text_predictor": self.text_predictor}
        return nn.ModuleDict({k: v for k, v in found.items() if v is not None})

    @property
    def num_layers(self) -> int:
        return self.llava.config.text_config.num_hidden_layers

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected CLIP features (B, n_image, H), exactly as ``LlavaModel`` computes them."""
        config = self.llava.config
        features = self.llava.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features

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
        image_features: torch.Tensor | None = None,
        keep: float | None = None,
    ) -> DynamicOutput:
        """Gated forward over the whole sequence.

        ``mode``: ``train`` samples Gumbel decisions for image tokens and for final answers of at least
        ``text_min_len`` tokens (``answer_span`` (B, 2)); ``eval`` applies the inference policy to the
        same tokens: top ``int(n_image * keep)`` image tokens, thresholded text; ``generate`` keeps the top ``int(n_image * keep)`` image tokens and thresholds every token from
        ``generated_from`` on; ``all`` keeps everything (the gated path with G = 1). Without sparsity
        this is the plain HF forward.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not self.sparsity.enabled:
            out = self.llava(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
            return DynamicOutput(logits=out.logits, lm_loss=None if labels is None else lm_loss(out.logits, labels))
        model = self.llava.model
        lm = model.language_model
        hidden = model.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.llava.config.image_token_id
        if generated_from is not None:  # a generated image-token id is text, not a placeholder
            image_mask[:, generated_from:] = False
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values)
        if image_features is not None:
            n_image = image_features.shape[0] * image_features.shape[1]
            if int(image_mask.sum()) != n_image:
                raise ValueError(f"image features and image tokens do not match: {int(image_mask.sum())} tokens, {n_image} features")
            hidden = hidden.masked_scatter(image_mask[..., None], image_features.to(hidden.dtype))
        position_ids = positions_from_mask(attention_mask)
        mask = causal_padding_mask(attention_mask, hidden.dtype)
        position_embeddings = lm.rotary_emb(hidden, position_ids)
        out = DynamicOutput(logits=hidden)
        policy = None
        for index, layer in enumerate(lm.layers):
            if index == self.sparsity.layer:
                policy = self._decide(hidden, image_mask, attention_mask, answer_span, mode, tau, generated_from, keep, out)
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                policy=policy,
                sparse_layer=self.sparsity.layer,
            )
        out.logits = self.llava.lm_head(lm.norm(hidden))
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
    ) -> torch.Tensor:
        """The (B, N) keep gate for layers >= K; fills the decisions and budget losses into ``out``."""
        batch, length = image_mask.shape
        policy = hidden.new_ones(batch, length, dtype=torch.float32)
        if self.image_predictor is not None and image_mask.any():
            per_sample = int(image_mask[0].sum())
            if not bool((image_mask.sum(-1) == per_sample).all()):
                raise ValueError("every sample in a batch must have the same number of image tokens")
            logits = self.image_predictor(hidden[image_mask].view(batch, per_sample, -1))
            if mode == "train":
                kept = gumbel_keep(logits, tau)
            elif mode in ("eval", "generate"):
                kept = topk_keep(logits, self.sparsity.keep if keep is None else keep)
            else:
                kept = torch.ones_like(logits[..., 0])
            policy = policy.masked_scatter(image_mask, kept.float())
            out.image_keep = kept
            out.vision_keep = keep_ratio(kept)
            with torch.no_grad():
                out.vision_keep_threshold = keep_ratio(threshold_keep(logits))
                out.vision_keep_expected = logits.float().softmax(-1)[..., 0].mean(-1)
            out.budget_loss_vision = budget_loss(out.vision_keep, self.sparsity.keep)
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
        pixel_values: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
        keep: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy decoding without KV cache on the gated forward (left-padded prompts).

        Image tokens: top ``int(n * keep)``; generated tokens: the text predictor's threshold. Returns
        the new tokens (B, T) and the per-sample count of kept image tokens (None without predictors).
        A finished sample continues with ``pad_token_id``, as HF ``generate`` does.
        """
        features = self.image_features(pixel_values)
        prompt_len = input_ids.shape[1]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        kept_images = None
        for _ in range(max_new_tokens):
            out = self(
                input_ids, attention_mask, image_features=features, mode="generate",
                generated_from=prompt_len, keep=keep,
            )
            if kept_images is None and out.image_keep is not None:
                kept_images = out.image_keep.sum(-1)
            token = out.logits[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            done |= token == eos_token_id
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(token.shape[0], 1)], dim=1)
            if bool(done.all()):
                break
        return input_ids[:, prompt_len:], kept_images

    # -- persistence -----------------------------------------------------------------------------
    def sparsity_record(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity.to_dict(),
            "predictor": None if self.predictor_config is None else self.predictor_config.to_dict(),
            "hidden_size": self.llava.config.text_config.hidden_size,
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
        """HF files of the LLaVA (dense-loadable) plus the predictors and sparsity config."""
        directory = Path(directory)
        text_config = self.llava.config.text_config
        saved_impl = text_config._attn_implementation
        text_config._attn_implementation = "sdpa"  # a stock loader must not need our registration
        try:
            self.llava.save_pretrained(directory)
        finally:
            text_config._attn_implementation = saved_impl
        if self.sparsity.enabled:
            self.export_predictors(directory)
        return directory

    def load_predictors(self, directory: str | Path) -> None:
        """Load exported predictor weights (strict: every predictor of this model must be present)."""
        path = Path(directory) / PREDICTORS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {PREDICTORS_FILE} in {directory}")
        state = load_file(str(path))
        missing, unexpected = self.predictors().load_state_dict(state, strict=False)
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
    ) -> "DynamicLlava":
        """Load a saved Dynamic-LLaVA, or a stock llava-hf checkpoint with ``predictors`` attached.

        ``predictors`` names a directory written by :meth:`export_predictors` (default: ``directory``
        itself). ``sparsity`` overrides the saved targets (sizes always come from the saved record).
        """
        source = Path(predictors) if predictors is not None else Path(directory)
        record_path = source / SPARSITY_FILE
        if not record_path.is_file():
            raise FileNotFoundError(f"{record_path} not found: not a Dynamic-LLaVA save or predictor export")
        record = json.loads(record_path.read_text())
        llava = LlavaForConditionalGeneration.from_pretrained(str(directory), **hf_kwargs)
        if llava.config.text_config.hidden_size != record["hidden_size"]:
            raise ValueError(
                f"predictors in {source} expect hidden size {record['hidden_size']}, "
                f"the model in {directory} has {llava.config.text_config.hidden_size}"
            )
        model = cls(llava, sparsity if sparsity is not None else record["sparsity"], record["predictor"])
        model.load_predictors(source)
        return model
