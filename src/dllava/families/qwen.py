"""Qwen2.5-VL (``qwen2_5_vl``) and Qwen3-VL (``qwen3_vl``): dynamic resolution and M-RoPE.

What the rest of dllava must not get wrong with these families, and where it is handled here:

* Image-token counts differ per sample (one LLM token per 2x2 group of 14 px / 16 px patches, so 28 or
  32 px). Pixel inputs are flattened patches of all images plus ``image_grid_thw`` (one (t, h, w) row
  per image, in patches); :meth:`QwenAdapter.select_rows` splits them per image.
* Positions are 3-D (M-RoPE). They are HF's own (``get_rope_index``) on the **unpruned** prompt; the
  engine gathers the kept columns and decodes from the prompt's last position + 1 in every row, as HF
  ``generate`` does (no ``rope_deltas`` kept on the module: the caller's request state holds the ids).
  ``get_rope_index`` groups tokens by ``mm_token_type_ids`` (1 at ``<|image_pad|>``), which is rebuilt
  here from the ids, so vision start/end tokens are text and are never dropped (they are not image
  tokens).
* Qwen3-VL: q/k RMS norms wherever q/k are recomputed (FastV), and DeepStack: features of three ViT
  layers added at the image positions after decoder layers 0, 1, 2 (``ImageFeatures.layer_additions``;
  the engine gathers them with the kept columns when tokens are dropped before layer 3).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from dllava.families.base import FamilyAdapter, ImageFeatures, image_statistics


class QwenAdapter(FamilyAdapter):
    """Qwen2.5-VL; :class:`Qwen3Adapter` adds what Qwen3-VL changes."""

    model_type = "qwen2_5_vl"
    pixel_keys = ("pixel_values", "image_grid_thw")
    part_prefixes = {"projector": ("model.visual.merger.",), "vision": ("model.visual.",)}
    rope_rows = 3

    def model_class(self) -> type[nn.Module]:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def config_class(self) -> type:
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.visual

    def vision_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.vision_tower(model).blocks

    def merge_size(self, config: Any) -> int:
        return int(config.vision_config.spatial_merge_size)

    # -- inputs ----------------------------------------------------------------------------------
    def select_rows(self, images: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
        grid = images["image_grid_thw"]
        patches = torch.split(images["pixel_values"], grid.prod(-1).tolist())
        return {
            "pixel_values": torch.cat([patches[r] for r in rows]),
            "image_grid_thw": grid[torch.tensor(rows, device=grid.device)],
        }

    def encode_images(self, model: nn.Module, images: dict[str, torch.Tensor]) -> ImageFeatures:
        """The merger's output per image, exactly as the HF model computes it (flat, batch order)."""
        out = model.model.get_image_features(
            pixel_values=images["pixel_values"], image_grid_thw=images["image_grid_thw"], return_dict=True
        )
        per_image = list(out.pooler_output)
        merge = self.merge_size(model.config)
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in images["image_grid_thw"].tolist()]
        additions = {
            layer: torch.cat(list(features))
            for layer, features in enumerate(getattr(out, "deepstack_features", None) or [])
        }
        return ImageFeatures(torch.cat(per_image), [f.shape[0] for f in per_image], grids, additions)

    def hf_inputs(self, config: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``mm_token_type_ids`` (1 at image tokens) as HF's processor returns it: HF Qwen2.5-VL's forward
        and every Qwen ``generate`` fall back to 1-D positions without it, silently."""
        from dllava.families.qwen_processor import mm_token_type_ids

        return {"mm_token_type_ids": mm_token_type_ids(input_ids, self.image_token_id(config))}

    def prompt_positions(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        images: dict[str, torch.Tensor] | None,
    ) -> torch.Tensor:
        """HF's ``get_rope_index`` on the whole sequence: (3, B, N); padding gets 0.

        Computed on the host (it walks token runs in Python) and moved to the ids' device, so a meta
        benchmark passes host ids."""
        grid = (images or {}).get("image_grid_thw")
        types = self.hf_inputs(model.config, input_ids)["mm_token_type_ids"]
        if not bool(types.any()):  # text only: M-RoPE's three rows are the 1-D positions
            text = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            return text[None].expand(3, -1, -1).contiguous()
        if grid is None:  # HF's Qwen2.5-VL would silently fall back to 1-D positions here
            raise ValueError("the prompts hold image tokens but no image_grid_thw was given: M-RoPE positions "
                             "need each image's grid (pass the processor's image_grid_thw)")
        positions, _ = model.model.get_rope_index(
            input_ids.cpu(), types.cpu(), image_grid_thw=grid.cpu(), attention_mask=attention_mask.cpu()
        )
        return positions.to(input_ids.device)

    # -- VisionZip --------------------------------------------------------------------------------
    def vision_saliency(self, model: nn.Module, images: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """VisionZip's inputs on a CLS-less tower: per merged token (rows in :meth:`encode_images`' order),
        the attention its patches receive in the tower's last block (T,) and that block's keys (T, d).

        Qwen's ViT has no CLS token, so the CLS-to-patch attention VisionZip ranks by is replaced (as
        ../shared/BASELINES.md says) by the attention each patch *receives* in the last block, a
        full-attention block in both families: the softmax probabilities of every query of the same image
        (its ``cu_seqlens`` segment, which is what the block attends over) on the patch, averaged over
        heads and summed over the queries. A merged token's score is the sum over its spatial-merge unit's
        patches (2x2), its key the mean of their keys; a key is the block's key after its vision rotary
        embedding (what its attention compares with the queries), averaged over heads.

        Nothing of the tower is re-implemented: a pre-hook on the last block's attention module takes its
        input (after ``norm1``), ``cu_seqlens`` and ``position_embeddings`` during one run of the tower as
        :meth:`encode_images` runs it; q/k come from the module's own ``qkv`` projection and HF's own
        ``apply_rotary_pos_emb_vision``. The tower's rows are merge units in its internal order, which
        :meth:`_unit_order` maps back to the merger's output order (Qwen2.5-VL un-does its window
        reordering; Qwen3-VL has none). Queries are taken in chunks, so memory stays bounded on large
        images (heads x chunk x patches probabilities at a time). Float32 results."""
        import importlib
        import itertools

        tower = self.vision_tower(model)
        blocks = self.vision_layers(model)
        last = len(blocks) - 1
        full = getattr(tower, "fullatt_block_indexes", None)  # Qwen2.5-VL: the others attend within windows
        if full is not None and last not in list(full):
            raise NotImplementedError(
                f"method=visionzip reads the last vision block's attention over the whole image, but block {last} "
                f"attends within windows (fullatt_block_indexes={list(full)})"
            )
        attn = blocks[last].attn
        seen: dict[str, Any] = {}

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["hidden"] = args[0] if args else kwargs["hidden_states"]
            seen["cu_seqlens"] = kwargs["cu_seqlens"]
            seen["position_embeddings"] = kwargs["position_embeddings"]

        grid = images["image_grid_thw"]
        handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                model.model.get_image_features(pixel_values=images["pixel_values"], image_grid_thw=grid, return_dict=True)
        finally:
            handle.remove()
        rotary = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb_vision  # HF's, of this family
        with torch.no_grad():
            hidden = seen["hidden"]
            n = hidden.shape[0]
            query, key, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = seen["position_embeddings"]
            query, key = rotary(query, key, cos, sin)  # (n, heads, d) each
            query, key = query.float().transpose(0, 1), key.float().transpose(0, 1)  # (heads, n, d)
            received = torch.zeros(n, dtype=torch.float32, device=hidden.device)
            bounds = seen["cu_seqlens"].tolist()
            for start, end in itertools.pairwise(bounds):
                k = key[:, start:end]
                chunk = max(1, (1 << 24) // max(1, attn.num_heads * (end - start)))
                for q0 in range(start, end, chunk):
                    q = query[:, q0 : min(q0 + chunk, end)]
                    probs = (q @ k.transpose(-1, -2) * attn.scaling).softmax(-1)  # (heads, queries, keys)
                    received[start:end] += probs.mean(0).sum(0)
            unit = tower.spatial_merge_unit
            score = received.reshape(-1, unit).sum(-1)
            keys = key.mean(0).reshape(-1, unit, key.shape[-1]).mean(1)
            order = self._unit_order(tower, grid)
            if order is not None:
                order = order.to(score.device)
                score, keys = score[order], keys[order]
        return score, keys

    def _unit_order(self, tower: nn.Module, grid: torch.Tensor) -> torch.Tensor | None:
        """Which of the tower's merge units (rows in its blocks' order) is each merged token of the merger's
        output, or None when the orders agree. Qwen2.5-VL's blocks run on units reordered into attention
        windows (``window_index``, HF's ``get_vision_window_index`` as the tower's forward calls it); its
        forward un-does that after the merger with ``argsort(window_index)``, and so does this."""
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid, spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size, patch_size=tower.patch_size
        )
        return torch.argsort(window_index)

    # -- cost ------------------------------------------------------------------------------------
    def vision_flops(self, config: Any, features: ImageFeatures) -> int:
        from dllava.inference.vision_flops import qwen2_5_vl_vision_flops

        return qwen2_5_vl_vision_flops(config.vision_config, self.patch_grids(config, features))

    def patch_grids(self, config: Any, features: ImageFeatures) -> list[tuple[int, int, int]]:
        """(t, h, w) in patches of each (still) image, from its token grid."""
        merge = self.merge_size(config)
        return [(1, h * merge, w * merge) for h, w in features.grids]

    # -- data ------------------------------------------------------------------------------------
    def load_processor(self, path: str) -> Any:
        """dllava's torchvision-free stand-in for HF's Qwen processors (HF's cannot be built here)."""
        from dllava.families.qwen_processor import ImageTextProcessor

        return ImageTextProcessor.from_pretrained(path)

    def sample_preprocessor(self, processor: Any, max_length: int) -> Any:
        """The tokenizer's ChatML template, images at their own size (flattened patches + grid)."""
        from dllava.data.datamodule import ChatSamplePreprocessor

        return ChatSamplePreprocessor(processor, max_length)

    # -- pictures --------------------------------------------------------------------------------
    # normalisation of the released checkpoints' processors, for pictures without an image processor
    @property
    def picture_statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        from dllava.eval.overlay import CLIP_MEAN, CLIP_STD

        return CLIP_MEAN, CLIP_STD

    def images_for_pictures(self, images: dict[str, torch.Tensor], image_processor: Any = None) -> list[Any]:
        """Each image rebuilt from its flattened patches at the size the processor resized it to (the
        first of the temporal patch's copies of a still image), un-normalised."""
        from dllava.eval.overlay import patches_to_images

        processor = getattr(image_processor, "image_processor", image_processor)
        return patches_to_images(
            images["pixel_values"],
            images["image_grid_thw"],
            patch_size=getattr(processor, "patch_size", None),
            merge_size=int(getattr(processor, "merge_size", None) or 2),
            temporal_patch_size=int(getattr(processor, "temporal_patch_size", None) or 2),
            **image_statistics(processor, self.picture_statistics),
        )

    def token_grids(self, config: Any, images: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        """(h, w) / merge_size of each ``image_grid_thw`` row: one token per merge_size x merge_size patches."""
        merge = self.merge_size(config)
        return [(int(h) // merge, int(w) // merge) for _, h, w in images["image_grid_thw"].reshape(-1, 3).tolist()]


class Qwen3Adapter(QwenAdapter):
    """Qwen3-VL: 16 px patches, interleaved M-RoPE, q/k norms, DeepStack."""

    model_type = "qwen3_vl"
    part_prefixes = {
        "projector": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
        "vision": ("model.visual.",),
    }

    picture_statistics = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def model_class(self) -> type[nn.Module]:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def config_class(self) -> type:
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig

    def query_key(self, attn: nn.Module, normed: torch.Tensor, query_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As HF's Qwen3-VL attention: RMS-normalise each head's q and k right after the projection."""
        batch, n, _ = normed.shape
        d = attn.head_dim
        query = attn.q_norm(attn.q_proj(normed[:, query_index:][:, :1]).view(batch, 1, -1, d))
        key = attn.k_norm(attn.k_proj(normed).view(batch, n, -1, d))
        return query.transpose(1, 2), key.transpose(1, 2)

    def _unit_order(self, tower: nn.Module, grid: torch.Tensor) -> torch.Tensor | None:
        """None: Qwen3-VL's blocks keep the processor's order of merge units (no window attention)."""
        return None

    def vision_flops(self, config: Any, features: ImageFeatures) -> int:
        from dllava.inference.vision_flops import qwen3_vl_vision_flops

        return qwen3_vl_vision_flops(config.vision_config, self.patch_grids(config, features))
