"""LLaVA-NeXT (``llava_next``) and LLaVA-OneVision (``llava_onevision``): anyres images.

One image becomes a base view (the whole image resized to the tower's size) plus a grid of crops of the
best-fitting resolution in ``image_grid_pinpoints``. HF's ``pack_image_features`` lays the tokens out as
the base view's patches, then the crops stitched into one grid, unpadded to the image's aspect ratio
(OneVision: bilinearly shrunk when it holds more than ``anyres_max_N`` crops' worth), with the learned
``image_newline`` after every row of that grid. Every one of them is an image-token position.

What dllava must not get wrong here, and where it is handled:

* counts differ per sample (aspect ratio): :func:`anyres_views` gives each token's view, computed with
  HF's own geometry (``get_anyres_image_grid_shape``, ``unpad_image``) applied to a map of view ids, so
  it cannot drift from the packing (the conformance suite checks the count and the newline positions
  against HF's forward);
* newline tokens are never dropped and never counted in a budget (view -1 in ``ImageFeatures.views``);
* the budget convention (``sparsity.budget``): ``global`` or ``per_view`` (base view and every crop
  keeps its own share). Where OneVision shrinks the crop grid bilinearly, a token blends up to four
  source tokens; its view is the crop with the largest weight (the first on a tie);
* positions are 1-D (Llama / Qwen2 decoders): LLaVA-1.5's rules apply.

HF's ``LlavaOnevisionProcessor`` cannot be built without torchvision (its video processor), so
:class:`AnyresProcessor` stands in for both families' processors, as ``ImageTextProcessor`` does for Qwen.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dllava.families.base import ImageFeatures, image_statistics
from dllava.families.llava import LlavaAdapter

# names a preprocessor_config.json may give; the PIL twins preprocess as the torchvision ones do
_IMAGE_PROCESSORS = {
    "llava_next": ("LlavaNextImageProcessorPil", "LlavaNextImageProcessor", "LlavaNextImageProcessorFast"),
    "llava_onevision": ("LlavaOnevisionImageProcessorPil", "LlavaOnevisionImageProcessor",
                        "LlavaOnevisionImageProcessorFast"),
}


def view_side(config: Any) -> int:
    """Patches per side of one view (the tower's image size over its patch size)."""
    return int(config.vision_config.image_size) // int(config.vision_config.patch_size)


@dataclass(frozen=True)
class AnyresLayout:
    """Where one image's tokens come from, in HF's packed order (base view, stitched crops, newlines).

    ``views`` (n,): 0 for the base view, 1 + r * cols + c for the crop in crop row r, column c, -1 for
    the newline after each stitched row; ``crops`` (rows, cols) of crops; ``window`` (top, left, height,
    width) in patches of the padded crop grid that HF's unpadding keeps; ``stitched`` (rows, cols) of
    the stitched grid as packed (after OneVision's shrinking; newline column excluded; (0, 0) when the
    unpadding leaves no row of a very wide or tall image)."""

    views: torch.Tensor
    side: int
    crops: tuple[int, int]
    window: tuple[int, int, int, int]
    stitched: tuple[int, int]


def anyres_layout(config: Any, image_size: Sequence[int]) -> AnyresLayout:
    """The :class:`AnyresLayout` of an image of ``image_size`` (height, width), computed with HF's own
    geometry (``get_anyres_image_grid_shape``, ``unpad_image``, the same bilinear shrink) applied to
    one-hot maps of the views and to the patch coordinates, so it cannot drift from the packing."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    size = [int(v) for v in image_size]
    side = view_side(config)
    rows, cols = (int(v) for v in get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size))
    y = torch.arange(rows * side)[:, None] // side
    x = torch.arange(cols * side)[None, :] // side
    onehot = nn.functional.one_hot(1 + y * cols + x, 1 + rows * cols).permute(2, 0, 1).float()  # (views, H, W)
    coords = torch.stack(torch.meshgrid(torch.arange(rows * side), torch.arange(cols * side), indexing="ij")).float()
    kept = unpad_image(torch.cat([onehot, coords]), size)
    onehot, coords = kept[:-2], kept[-2:]
    window = (int(coords[0].min()), int(coords[1].min()), *coords.shape[1:]) if coords.numel() else (0, 0, 0, 0)
    ratio_text = getattr(config, "vision_aspect_ratio", None)
    height, width = onehot.shape[1:]
    if ratio_text is not None and height * width:  # OneVision: shrink above anyres_max_N crops' worth, as HF does
        ratio = math.sqrt(height * width / (int(ratio_text.strip("anyres_max_")) * side**2))
        if ratio > 1.1:
            onehot = nn.functional.interpolate(onehot[None], [int(height // ratio), int(width // ratio)], mode="bilinear")[0]
    grid = onehot.argmax(0) if onehot.numel() else torch.zeros(onehot.shape[1:], dtype=torch.long)  # largest weight, first on a tie
    grid = torch.cat([grid, torch.full((grid.shape[0], 1), -1, dtype=torch.long)], dim=-1)
    views = torch.cat([torch.zeros(side * side, dtype=torch.long), grid.flatten()])
    stitched = (grid.shape[0], grid.shape[1] - 1) if grid.shape[0] else (0, 0)
    return AnyresLayout(views, side, (rows, cols), window, stitched)


def anyres_views(config: Any, image_size: Sequence[int]) -> torch.Tensor:
    """(n,) long: the view of each of one image's tokens (:class:`AnyresLayout`)."""
    return anyres_layout(config, image_size).views


def anyres_token_count(config: Any, image_size: Sequence[int]) -> int:
    """Image tokens of one image (base view, unpadded crop grid, newlines): what the prompt must hold."""
    return int(anyres_views(config, image_size).shape[0])


def picture_panels(config: Any, image_size: Sequence[int]) -> Any:
    """The overlay layout of one image's tokens: its base view's patch grid, then (when the unpadding
    left any) the stitched crops with their newline column (:class:`~dllava.eval.overlay.PanelGrid`)."""
    from dllava.eval.overlay import PanelGrid

    layout = anyres_layout(config, image_size)
    rows, cols = layout.stitched
    return PanelGrid(((layout.side, layout.side),) + (((rows, cols + 1),) if rows else ()))


def anyres_picture(config: Any, pixels: torch.Tensor, image_size: Sequence[int], stats: dict[str, Any], unit: int = 12) -> Any:
    """One picture of what the model saw, laid out as :func:`picture_panels`: the base view, the crops
    stitched and cut to the unpadded window, and a grey strip for the newline column; ``pixels`` are the
    image's (crops, 3, s, s) normalised views, ``unit`` px per stitched token."""
    from PIL import Image

    from dllava.eval.overlay import pixels_to_image

    layout = anyres_layout(config, image_size)
    base = pixels_to_image(pixels[0], **stats)
    grid_rows, grid_cols = layout.stitched
    if not grid_rows:  # nothing of the crops survived unpadding: the base view alone
        return base.resize((layout.side * unit, layout.side * unit))
    tall = grid_rows * unit
    out = Image.new("RGB", (tall + (grid_cols + 1) * unit, tall), (128, 128, 128))
    out.paste(base.resize((tall, tall)), (0, 0))
    if grid_cols:  # (a very tall image can keep its rows but no column: newlines only)
        px, patch = int(config.vision_config.image_size), int(config.vision_config.patch_size)
        rows, cols = layout.crops
        canvas = Image.new("RGB", (cols * px, rows * px))
        for k in range(rows * cols):
            canvas.paste(pixels_to_image(pixels[1 + k], **stats), ((k % cols) * px, (k // cols) * px))
        top, left, height, width = layout.window
        region = canvas.crop((left * patch, top * patch, (left + width) * patch, (top + height) * patch))
        out.paste(region.resize((grid_cols * unit, tall)), (tall, 0))
    return out


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: CLIP (CLS dropped), anyres crops with newlines, Llama/Mistral decoder, 1-D RoPE."""

    model_type = "llava_next"
    pixel_keys = ("pixel_values", "image_sizes")
    part_prefixes = {
        "projector": ("model.multi_modal_projector.", "model.image_newline"),
        "vision": ("model.vision_tower.",),
    }
    vision_cls = True  # the tower prepends a CLS token (CLIP); SigLIP has none

    def model_class(self) -> type[nn.Module]:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def config_class(self) -> type:
        from transformers import LlavaNextConfig

        return LlavaNextConfig

    def _feature_kwargs(self, config: Any) -> dict[str, Any]:
        return {
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
        }

    def encode_images(self, model: nn.Module, images: dict[str, torch.Tensor]) -> ImageFeatures:
        """HF's packed features (base view, unpadded crops, newlines) with each token's view."""
        config = model.config
        sizes = images["image_sizes"]
        out = model.model.get_image_features(
            pixel_values=images["pixel_values"], image_sizes=sizes, return_dict=True, **self._feature_kwargs(config)
        )
        per_image = list(out.pooler_output)
        layouts = [anyres_layout(config, s) for s in sizes.tolist()]
        grids = [(rows * lay.side, cols * lay.side) for lay in layouts for rows, cols in [lay.crops]]
        views = torch.cat([lay.views for lay in layouts])
        return ImageFeatures(torch.cat(per_image), [f.shape[0] for f in per_image], grids, views=views)

    def _pack_kwargs(self, config: Any) -> dict[str, Any]:
        """What this family's ``pack_image_features`` takes besides features, sizes and newline."""
        return {"vision_feature_select_strategy": config.vision_feature_select_strategy}

    # -- VisionZip --------------------------------------------------------------------------------
    def vision_saliency(self, model: nn.Module, images: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """VisionZip's inputs, one row per packed image token (:meth:`encode_images`' order): the
        attention the token receives in the vision layer whose output the projector reads
        (``vision_feature_layer``) (T,) and that layer's keys, mean over heads (T, d). Float32.

        Per crop (the base view and every anyres crop run through the tower separately):

        * LLaVA-NeXT (CLIP, with CLS): the CLS query's softmax row over the crop's tokens, summed over
          heads, as :meth:`LlavaAdapter.vision_saliency` (the CLS column dropped under the ``default``
          strategy, as the projector's input drops it);
        * LLaVA-OneVision (SigLIP, no CLS): the attention each patch *receives*: the probabilities of
          every query of the same crop on it, mean over heads, summed over the queries (the CLS-less
          rule of ../shared/BASELINES.md). It is read in the projected layer, not the tower's last block:
          LLaVA models project an intermediate layer's output (OneVision's checkpoints: ``-1`` of a
          SigLIP whose last block was cut off, so the two coincide there), and that layer's features are
          what the LLM sees (Qwen reads the last block because its merger reads the last block).

        The per-crop rows go to the packed order through HF's own ``pack_image_features`` of the model,
        given (crops, patches, 1 + d) "features" (score, then keys) and a zero newline vector of that
        width: base view first, crops stitched and unpadded, OneVision's bilinear shrink, a newline after
        every row; the geometry is HF's. Newline tokens get score 0 and zero keys (they are never dropped:
        view -1). Where OneVision shrinks the stitched grid, a token blends up to four source tokens
        bilinearly, and so do its score and key (the same weights as its feature).

        The layer's input (after its ``layer_norm1``) is taken by a pre-hook on its attention module
        during one run of HF's ``get_image_features`` as :meth:`encode_images` runs it (so the crops are
        the ones HF selects from the padded ``pixel_values``); q/k come from the module's own
        projections. OneVision's probabilities are taken one crop at a time (heads x patches^2 at once).
        """
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = model.config
        chosen = config.vision_feature_layer
        if not isinstance(chosen, int):
            raise NotImplementedError("method=visionzip with several vision_feature_layer values")
        layers = self.vision_layers(model)
        index = chosen % (len(layers) + 1) - 1  # hidden_states[i] is the output of layer i - 1
        if index < 0:
            raise NotImplementedError("method=visionzip reads a vision layer's attention; vision_feature_layer selects the embeddings")
        attn = layers[index].self_attn
        seen: list[tuple[torch.Tensor, Any]] = []

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            seen.append((hidden, mask))

        sizes = images["image_sizes"]
        handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                model.model.get_image_features(
                    pixel_values=images["pixel_values"], image_sizes=sizes, return_dict=True, **self._feature_kwargs(config)
                )
        finally:
            handle.remove()
        if len(seen) != 1 or seen[0][1] is not None:
            raise NotImplementedError("method=visionzip expects one unmasked run of the vision layer's attention")
        hidden = seen[0][0]
        with torch.no_grad():
            crops, n, _ = hidden.shape
            query = attn.q_proj(hidden).view(crops, n, -1, attn.head_dim).transpose(1, 2).float()  # (crops, heads, n, d)
            key = attn.k_proj(hidden).view(crops, n, -1, attn.head_dim).transpose(1, 2).float()
            if self.vision_cls:  # the CLS row, summed over heads
                score = (query[:, :, :1] @ key.transpose(-1, -2) * attn.scale).softmax(-1)[:, :, 0].sum(1)
            else:  # received: mean over heads, summed over the crop's queries
                score = torch.stack([
                    (q @ k.transpose(-1, -2) * attn.scale).softmax(-1).mean(0).sum(0) for q, k in zip(query, key)
                ]) if crops else query.new_zeros(0, n)
            first = 1 if config.vision_feature_select_strategy == "default" else 0
            rows = torch.cat([score[..., None], key.mean(1)], -1)[:, first:].contiguous()  # (crops, patches, 1 + d)
            patches = [
                image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
                for s in sizes.tolist()
            ]
            if sum(patches) != crops:
                raise ValueError(f"the vision layer ran on {crops} crops, the image sizes give {sum(patches)}")
            packed, _ = model.model.pack_image_features(
                list(torch.split(rows, patches)), sizes, image_newline=rows.new_zeros(rows.shape[-1]),
                **self._pack_kwargs(config),
            )
            flat = torch.cat(packed)
        return flat[:, 0].contiguous(), flat[:, 1:].contiguous()

    def vision_flops(self, config: Any, features: ImageFeatures) -> int:
        """The tower on the base view and every crop (``grids`` hold each image's crop grid in patches)."""
        from dllava.inference.vision_flops import llava_vision_flops

        side = view_side(config)
        passes = sum(1 + (rows // side) * (cols // side) for rows, cols in features.grids)
        return llava_vision_flops(config.vision_config, config.text_config.hidden_size, batch=passes, cls=self.vision_cls)

    # -- data ------------------------------------------------------------------------------------
    def load_processor(self, path: str) -> Any:
        return AnyresProcessor.from_pretrained(path, self)

    def sample_preprocessor(self, processor: Any, max_length: int) -> Any:
        """vicuna_v1 template (the llava-v1.6-vicuna checkpoints), anyres pixels, per-image counts."""
        from dllava.data.datamodule import AnyresSamplePreprocessor

        return AnyresSamplePreprocessor(processor, max_length, chat=False)

    # -- pictures --------------------------------------------------------------------------------
    def images_for_pictures(self, images: dict[str, torch.Tensor], image_processor: Any = None) -> list[Any]:
        """Each image as the model saw it: base view | stitched crops (unpadded) | newline strip
        (:func:`anyres_picture`). ``image_processor`` must be the :class:`AnyresProcessor` (it holds the
        model config the layout needs)."""
        from dllava.eval.overlay import CLIP_MEAN, CLIP_STD

        config = getattr(image_processor, "config", None)
        if config is None:
            raise ValueError("LLaVA-NeXT / OneVision pictures need the family's AnyresProcessor (it holds the model config)")
        pixels, sizes = images["pixel_values"], images["image_sizes"].reshape(-1, 2)
        if pixels.ndim == 4:  # one question's crops
            pixels = pixels[None]
        stats = image_statistics(image_processor, (CLIP_MEAN, CLIP_STD))
        return [anyres_picture(config, p, s.tolist(), stats) for p, s in zip(pixels, sizes)]

    def token_grids(self, config: Any, images: dict[str, torch.Tensor]) -> list[Any]:
        """Each image's :func:`picture_panels`: base view grid, then stitched crops with the newline column."""
        return [picture_panels(config, s.tolist()) for s in images["image_sizes"].reshape(-1, 2)]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: SigLIP without CLS, anyres_max_N shrinking, Qwen2 decoder, ChatML."""

    model_type = "llava_onevision"
    vision_cls = False

    def model_class(self) -> type[nn.Module]:
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def config_class(self) -> type:
        from transformers import LlavaOnevisionConfig

        return LlavaOnevisionConfig

    def _feature_kwargs(self, config: Any) -> dict[str, Any]:
        return {**super()._feature_kwargs(config), "vision_aspect_ratio": config.vision_aspect_ratio}

    def _pack_kwargs(self, config: Any) -> dict[str, Any]:
        return {"vision_aspect_ratio": config.vision_aspect_ratio}

    def sample_preprocessor(self, processor: Any, max_length: int) -> Any:
        """The processor's chat template (ChatML), anyres pixels, per-image counts."""
        from dllava.data.datamodule import AnyresSamplePreprocessor

        return AnyresSamplePreprocessor(processor, max_length, chat=True)


class AnyresProcessor:
    """Tokenizer, PIL image processor and chat template of a NeXT / OneVision checkpoint, without
    torchvision: calling it does what HF's processors do (pixel crops, ``image_sizes``, each ``<image>``
    expanded to :func:`anyres_token_count` tokens of the model's config)."""

    def __init__(self, tokenizer: Any, image_processor: Any, config: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)

    @property
    def image_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(self.config.image_token_id))

    def pixel_inputs(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """(B, crops, 3, s, s) pixels (zero-padded to the most crops) and (B, 2) ``image_sizes``."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    def image_tokens(self, image_size: Sequence[int]) -> int:
        return anyres_token_count(self.config, image_size)

    def __call__(self, text: str | Sequence[str], images: Sequence[Any] = (), **tokenizer_kwargs: Any) -> dict[str, Any]:
        from dllava.families.qwen_processor import tokenize_with_images

        data: dict[str, Any] = {}
        counts: list[int] = []
        if images:
            data.update(self.pixel_inputs(images))
            counts = [self.image_tokens(s) for s in data["image_sizes"].tolist()]
        data.update(tokenize_with_images(self.tokenizer, text, counts, self.image_token, **tokenizer_kwargs))
        return data

    def save_pretrained(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        if self.chat_template:
            (out / "chat_template.json").write_text(json.dumps({"chat_template": self.chat_template}))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, adapter: LlavaNextAdapter) -> AnyresProcessor:
        """Load tokenizer, the allow-listed PIL image processor and the processor's chat template (a
        ``chat_template.json`` / ``.jinja`` beside them, else the tokenizer's); no remote code."""
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        local = Path(path).expanduser()
        if not (local / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"{local / 'preprocessor_config.json'} not found: not a saved image processor")
        name = json.loads((local / "preprocessor_config.json").read_text()).get("image_processor_type")
        allowed = _IMAGE_PROCESSORS[adapter.model_type]
        if name not in allowed:
            raise ValueError(f"{local} names image processor {name!r}; expected one of {list(allowed)}")
        image_processor = getattr(transformers, allowed[0]).from_pretrained(str(local))
        tokenizer = AutoTokenizer.from_pretrained(str(local), trust_remote_code=False)
        template = None
        if (local / "chat_template.json").is_file():
            template = json.loads((local / "chat_template.json").read_text()).get("chat_template")
        elif (local / "chat_template.jinja").is_file():
            template = (local / "chat_template.jinja").read_text()
        config = AutoConfig.from_pretrained(str(local), trust_remote_code=False)
        return cls(tokenizer, image_processor, config, template)
