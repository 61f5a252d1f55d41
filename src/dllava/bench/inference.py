"""Prefill and decoding efficiency of Dynamic-LLaVA against dense, FastV and random keep, side by side.

Every arm runs through the same :class:`~dllava.inference.engine.SparseEngine` (same decoder layers,
same SDPA kernel with explicit masks), on the same prompt, interleaved round by round so drift hits
all arms alike; warm-up rounds are not timed. Reported per arm:

* prefill FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy of the
  model (on CPU tensors torch's fused SDPA kernel counts 0): on the image tokens plus the one
  predicting token (the paper's "image tokens only" convention, measured; Qwen: plus the vision
  start/end tokens) and on the whole bench prompt; the paper's analytic limit for comparison; the
  vision tower separately (the family's formula);
* prefill latency of the decoder (image features precomputed: the vision tower is the same in every
  arm and timed on its own);
* decoding: ``new_tokens`` greedy tokens with the sparse KV cache, tokens/s (decode steps only), KV
  bytes over all layers and valid tokens in a layer >= K, and peak memory on a GPU.

Every family goes through its adapter (:mod:`dllava.families`): the image is one fixed size per run
(``image_px``; LLaVA-1.5: its CLIP size, 336 px -> 576 tokens; Qwen: 1008x1008 px by default, which
HF's ``smart_resize`` keeps at 1008 for Qwen2.5-VL's 28 px tokens (36x36 = 1,296 tokens) and rounds
to 1024 for Qwen3-VL's 32 px tokens (32x32 = 1,024 tokens)); Qwen prompts wrap the image tokens in
``<|vision_start|>`` / ``<|vision_end|>``. Position ids (M-RoPE for Qwen) are the family's own,
computed once on the host from the CPU prompt (HF's ``get_rope_index`` reads the ids' values) and
given to every arm. On the meta device the image features are built directly with the known
per-image counts and grids (and Qwen3-VL's DeepStack additions), and the vision tower's FLOPs come
from the adapter's ``vision_flops`` formula, which tests check against ``FlopCounterMode`` at real
size (tests/inference/test_vision_flops.py, test_flops.py): the Qwen towers cannot run on meta as HF
calls them (they ``.tolist()`` grid-derived tensors).

A model too large for this machine's RAM runs on the meta device: FLOPs are counted on the real
module graph (shapes only), the KV cache of the decode is accounted from token counts, timings are
null. Random-weight predictors decide text by a fixed rate
(``text_keep_rate``) since their threshold means nothing.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from dllava.families import FamilyAdapter, ImageFeatures
from dllava.inference import flops
from dllava.inference.engine import SparseEngine
from dllava.inference.selection import text_rate_keep
from dllava.inference.vision_flops import qwen3_vl_deepstack_layers
from dllava.model.loading import ModelSource, load_base_model
from dllava.sparse.config import SparsityConfig
from dllava.sparse.model import DynamicVLM

log = logging.getLogger(__name__)
BASELINES = ("fastv", "random")


def choose_device(requested: str, parameters: int, bytes_per_param: int, cpu_max_gib: float) -> str:
    """``auto``: cuda when present; else cpu when the weights fit in ``cpu_max_gib``; else meta."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if parameters * bytes_per_param <= cpu_max_gib * 2**30 else "meta"


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(
    model_cfg: dict[str, Any], sparsity: dict[str, Any], predictors: str | None, device: str, cpu_max_gib: float
) -> tuple[DynamicVLM, str]:
    """The DynamicVLM to benchmark, on the chosen device (built on meta first to size it)."""
    model_cfg = dict(model_cfg)
    predictor = model_cfg.pop("predictor", None)
    source = ModelSource(**model_cfg)
    with torch.device("meta"):
        probe = load_base_model(ModelSource(**{**source.to_dict(), "random_init": True}))
    size = parameter_count(probe)
    chosen = choose_device(device, size, torch.empty(0, dtype=source.torch_dtype).element_size(), cpu_max_gib)
    log.info("model %s: %.2f B parameters, running on %s", source.name, size / 1e9, chosen)
    if chosen == "meta":
        if not source.random_init:
            raise ValueError("a pretrained model cannot run on the meta device: set model.random_init=true or bench.device=cpu")
        llava = probe
    else:
        llava = load_base_model(source).to(chosen)
    model = DynamicVLM(llava, SparsityConfig(**sparsity), predictor).to(chosen).eval()
    if predictors:
        model.load_predictors(predictors)
    return model, chosen


@dataclass(frozen=True)
class BenchImage:
    """The one image every bench prompt holds: its pixel size and the tokens it becomes.

    ``patches`` is the (t, h, w) patch grid of a flattened-patch family (Qwen: ``image_grid_thw``'s
    row), None for a family with square pixel tensors (LLaVA)."""

    px: tuple[int, int]
    grid: tuple[int, int]  # (rows, cols) of image tokens (anyres: the crop grid, in patches)
    tokens: int
    patches: tuple[int, int, int] | None = None
    views: torch.Tensor | None = None  # anyres: each token's view, -1 at newlines (ImageFeatures.views)
    crops: int = 0  # anyres: views through the tower (base + crops)

    def kept(self, method: str, keep: float, budget: str = "global") -> int:
        """Image tokens one prompt keeps after prefill under ``method`` (newlines always kept)."""
        features = ImageFeatures(torch.empty(self.tokens, 1, device="meta"), [self.tokens], [self.grid], views=self.views)
        return features.kept_counts(None if method == "dense" else keep, budget)[0]


def flattened_patches(adapter: FamilyAdapter) -> bool:
    """Whether the family takes flattened patches plus ``image_grid_thw`` (Qwen) rather than (B, 3, S, S)."""
    return "image_grid_thw" in adapter.pixel_keys


def anyres(adapter: FamilyAdapter) -> bool:
    """Whether the family takes anyres crops plus ``image_sizes`` (LLaVA-NeXT / OneVision)."""
    return "image_sizes" in adapter.pixel_keys


def bench_image(adapter: FamilyAdapter, config: Any, image_px: int | None = None) -> BenchImage:
    """The bench image of the family of ``config``: a square ``image_px`` side (None: the family's
    default, the CLIP size for LLaVA, 1008 px for Qwen, 672 px for the anyres families: NeXT-7B's full
    layout, 576 base + 4 x 576 crop tokens + 48 newlines), sized the way the family's processor would."""
    vision = config.vision_config
    if anyres(adapter):
        from dllava.families.llava_next import anyres_layout

        px = 672 if image_px is None else int(image_px)
        layout = anyres_layout(config, (px, px))
        rows, cols = layout.crops
        return BenchImage((px, px), (rows * layout.side, cols * layout.side), int(layout.views.shape[0]),
                          views=layout.views, crops=1 + rows * cols)
    if not flattened_patches(adapter):
        side = vision.image_size
        if image_px not in (None, side):
            raise ValueError(f"bench.image_size={image_px}: this family's vision tower takes {side}x{side} px images only (set null)")
        grid = side // vision.patch_size
        return BenchImage((side, side), (grid, grid), int(config.image_seq_length))
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    px = 1008 if image_px is None else int(image_px)
    unit = vision.patch_size * vision.spatial_merge_size  # one merged image token, in px
    # the released processors' pixel limits (3136..12845056 for Qwen2.5-VL, 65536..16777216 for Qwen3-VL)
    # do not bind near 1008 px; here only the rounding to whole tokens applies
    height, width = smart_resize(px, px, factor=unit, min_pixels=unit * unit, max_pixels=2**62)
    rows, cols = height // unit, width // unit
    merge = vision.spatial_merge_size
    return BenchImage((height, width), (rows, cols), rows * cols, (1, rows * merge, cols * merge))


def bench_pixels(image: BenchImage, config: Any, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random pixel inputs of ``batch`` copies of ``image`` in the family's layout (on CPU)."""
    if image.views is not None:
        size = config.vision_config.image_size
        return {
            "pixel_values": torch.randn(batch, image.crops, 3, size, size, generator=generator),
            "image_sizes": torch.tensor([list(image.px)] * batch),
        }
    if image.patches is None:
        return {"pixel_values": torch.randn(batch, 3, *image.px, generator=generator)}
    vision = config.vision_config
    t, h, w = image.patches
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return {
        "pixel_values": torch.randn(batch * t * h * w, width, generator=generator),
        "image_grid_thw": torch.tensor([list(image.patches)] * batch),
    }


def meta_features(image: BenchImage, config: Any, batch: int, hidden: int) -> ImageFeatures:
    """Image features of ``batch`` copies of ``image`` on the meta device (shapes only), with one
    DeepStack addition per tap of a Qwen3-VL tower (the same keys its ``encode_images`` gives)."""
    flat = torch.empty(batch * image.tokens, hidden, device="meta")
    taps = qwen3_vl_deepstack_layers(config.vision_config) if hasattr(config.vision_config, "deepstack_visual_indexes") else []
    additions = {i: torch.empty_like(flat) for i in range(len(taps))}
    views = None if image.views is None else image.views.repeat(batch)
    return ImageFeatures(flat, [image.tokens] * batch, [image.grid] * batch, additions, views=views)


def make_prompt(
    config: Any, image: BenchImage, batch: int, text_tokens: int, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` prompts: half the text tokens, the image block, the other half (at least one after).
    Text ids are drawn below the image token and the family's other vision ids; the image block is
    wrapped in the family's vision start and end tokens where it has them (Qwen)."""
    g = torch.Generator().manual_seed(seed)
    before = text_tokens // 2
    after = max(1, text_tokens - before)
    start, end = getattr(config, "vision_start_token_id", None), getattr(config, "vision_end_token_id", None)
    vision_ids = [config.image_token_id, getattr(config, "video_token_id", None), start, end]
    low, high = 3, min([getattr(config, "text_config", config).vocab_size, *[i for i in vision_ids if i is not None]]) - 1
    text = torch.randint(low, high, (batch, before + after), generator=g)
    block = [config.image_token_id] * image.tokens
    if start is not None and end is not None:
        block = [start, *block, end]
    image_ids = torch.tensor(block)[None].expand(batch, -1)
    ids = torch.cat([text[:, :before], image_ids, text[:, before:]], dim=1)
    return ids.to(device), torch.ones_like(ids).to(device)


def prompt_positions(model: DynamicVLM, prompt: tuple[torch.Tensor, torch.Tensor], image: BenchImage, batch: int) -> torch.Tensor:
    """The family's (R, B, N) position ids of a CPU ``prompt`` (HF's ``get_rope_index`` for Qwen
    reads the ids' values, so they are computed on the host even for a meta model)."""
    images = {} if image.patches is None else {"image_grid_thw": torch.tensor([list(image.patches)] * batch)}
    return model.adapter.prompt_positions(model.base, *prompt, images)


def count_flops(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def sync_device(device: str) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op elsewhere)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_rounds(arms: dict[str, Callable[[], Any]], device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per arm, the arms interleaved in each round."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for round_index in range(warmup + repeats):
        for name, fn in arms.items():
            sync_device(device)
            start = time.perf_counter()
            fn()
            sync_device(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def arm_engines(model: DynamicVLM, keep: float, text_rate: float | None, seed: int) -> dict[str, SparseEngine]:
    """One engine per arm; the text policy only matters once decoding starts (prefill drops image tokens only)."""
    dynamic_text: str | float = "learned" if text_rate is None else text_rate
    arms = {"dense": ("dense", "off"), "dynamic": ("dynamic", dynamic_text), "fastv": ("fastv", "off"), "random": ("random", "off")}
    return {name: SparseEngine(model, method=method, keep=keep, text=text, seed=seed) for name, (method, text) in arms.items()}


def run_bench(
    model: DynamicVLM,
    device: str,
    keep: float,
    batch_size: int = 1,
    text_tokens: int = 32,
    new_tokens: int = 256,
    text_keep_rate: float | None = 0.5,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    image_px: int | None = None,
) -> dict[str, Any]:
    """Measure every arm; returns the ``bench.json`` record (see the module docstring).
    ``image_px``: the side of the square bench image (None: the family's default)."""
    config = model.base.config
    adapter = model.adapter
    shape = flops.DecoderShape.from_config(adapter.text_config(config))
    image = bench_image(adapter, config, image_px)
    n_image = image.tokens
    layer = model.sparsity.layer

    # FLOPs, on a meta copy (shapes only, exact counts); positions from the same prompts on the host
    meta_model = model if device == "meta" else copy.deepcopy(model).to("meta")
    meta_engines = arm_engines(meta_model, keep, text_keep_rate, seed)
    features_meta = meta_features(image, config, batch_size, shape.hidden)
    prompts = {"image_tokens": make_prompt(config, image, batch_size, 1, "cpu", seed),
               "prompt": make_prompt(config, image, batch_size, text_tokens, "cpu", seed)}
    on_meta = {
        key: (ids.to("meta"), mask.to("meta"), prompt_positions(model, (ids, mask), image, batch_size).to("meta"))
        for key, (ids, mask) in prompts.items()
    }
    prefill_flops = {}
    for name, engine in meta_engines.items():
        prefill_flops[name] = {
            key: count_flops(partial(engine.start, ids, mask, image_features=features_meta, position_ids=positions))
            for key, (ids, mask, positions) in on_meta.items()
        }
    vision = adapter.vision_flops(config, features_meta)

    # Latency and decoding
    engines = meta_engines if device == "meta" else arm_engines(model, keep, text_keep_rate, seed)
    ids, mask = make_prompt(config, image, batch_size, text_tokens, "cpu", seed)
    positions = prompt_positions(model, (ids, mask), image, batch_size).to(device)
    ids, mask = ids.to(device), mask.to(device)
    dtype = next(model.parameters()).dtype
    if device == "meta":
        features = features_meta
        latency = vision_s = None
    else:
        pixels = bench_pixels(image, config, batch_size, torch.Generator().manual_seed(seed))
        pixels = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in pixels.items()}
        with torch.no_grad():
            features = model.encode_images(pixels)
        prefill_arms = {
            name: (lambda e=e: e.start(ids, mask, image_features=features, position_ids=positions)) for name, e in engines.items()
        }
        latency = timed_rounds(prefill_arms, device, warmup, repeats)
        vision_s = timed_rounds({"vision": lambda: model.encode_images(pixels)}, device, warmup, repeats)["vision"]

    if device == "meta":
        decode = {name: decode_accounting(engine, ids, new_tokens, dtype, image) for name, engine in engines.items()}
    else:
        for engine in engines.values():  # warm-up: the first decode of a process pays for allocations
            decode_arm(engine, ids, mask, features, min(8, new_tokens), device, positions)
        decode = {name: decode_arm(engine, ids, mask, features, new_tokens, device, positions) for name, engine in engines.items()}

    return report(
        model, device, keep, text_keep_rate, shape, image, layer, prefill_flops, vision, latency, vision_s, decode,
        batch_size, text_tokens, new_tokens,
    )


@torch.no_grad()
def decode_arm(
    engine: SparseEngine, ids: torch.Tensor, mask: torch.Tensor, features: ImageFeatures, new_tokens: int, device: str,
    positions: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Prefill once, then ``new_tokens - 1`` cached decode steps (timed; no EOS: every step runs)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    logits, state = engine.start(ids, mask, image_features=features, position_ids=positions)
    token = logits.argmax(-1)
    sync_device(device)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = engine.step(state, token).argmax(-1)
    sync_device(device)
    seconds = time.perf_counter() - start
    result = engine.summarize(state, token[:, None], [new_tokens] * ids.shape[0])
    return {
        "seconds": seconds,
        "tokens_per_s": ids.shape[0] * (new_tokens - 1) / seconds,
        "kv_bytes": sum(result.kv_bytes),
        "kv_bytes_allocated": state.cache.allocated_bytes(),
        "kv_tokens_sparse_layer": statistics.mean(result.kv_tokens_sparse_layer),
        "kv_tokens_dense_layer": statistics.mean(result.kv_tokens_dense_layer),
        "text_tokens_kept": statistics.mean(result.text_tokens_kept),
        "text_tokens_fed": statistics.mean(result.text_tokens_fed),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
    }


def decode_accounting(engine: SparseEngine, ids: torch.Tensor, new_tokens: int, dtype: torch.dtype, image: BenchImage) -> dict[str, Any]:
    """The cache a ``new_tokens`` decode would leave, from token counts (meta device: running 7B
    layers on meta costs ~0.7 s per step in fake kernels). The same counts the cache is tested
    against (tests/inference/test_engine.py); needs a fixed text rate or text off."""
    if engine.text == "learned":
        raise ValueError("on the meta device text decisions cannot be read: set bench.text_keep_rate")
    shape = flops.DecoderShape.from_config(engine.model.text_config)
    prompt, fed = ids.shape[1], new_tokens - 1
    n_image = image.tokens
    kept_images = image.kept(engine.method, engine.keep, engine.budget)
    kept_text = fed if engine.text == "off" else sum(text_rate_keep(t, engine.text) for t in range(fed))
    dense_tokens, sparse_tokens = flops.cache_tokens(prompt, n_image, kept_images, fed, kept_text)
    size = torch.empty(0, dtype=dtype).element_size()
    return {
        "seconds": None,
        "tokens_per_s": None,
        "kv_bytes": ids.shape[0] * flops.kv_bytes(shape, engine.layer, dense_tokens, sparse_tokens, size),
        "kv_bytes_allocated": None,
        "kv_tokens_sparse_layer": sparse_tokens,
        "kv_tokens_dense_layer": dense_tokens,
        "text_tokens_kept": kept_text,
        "text_tokens_fed": fed,
        "peak_memory_bytes": None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def report(
    model, device, keep, text_rate, shape, image, layer, prefill_flops, vision, latency, vision_s, decode,
    batch_size, text_tokens, new_tokens,
) -> dict[str, Any]:
    """Assemble the ``bench.json`` record: the dynamic arm against dense, and each baseline likewise."""
    dense_flops = prefill_flops["dense"]
    n_image = image.tokens

    def arm(name: str) -> dict[str, Any]:
        return {
            "prefill": {
                "flops": prefill_flops[name]["image_tokens"],
                "flops_ratio": _ratio(prefill_flops[name]["image_tokens"], dense_flops["image_tokens"]),
                "flops_prompt": prefill_flops[name]["prompt"],
                "flops_prompt_ratio": _ratio(prefill_flops[name]["prompt"], dense_flops["prompt"]),
                "latency_s": None if latency is None else latency[name],
                "latency_ratio": None if latency is None else _ratio(latency[name], latency["dense"]),
            },
            "decode": {
                **decode[name],
                "kv_ratio": _ratio(decode[name]["kv_tokens_sparse_layer"], decode["dense"]["kv_tokens_sparse_layer"]),
                "kv_bytes_ratio": _ratio(decode[name]["kv_bytes"], decode["dense"]["kv_bytes"]),
            },
        }

    dynamic = arm("dynamic")
    kept = image.kept("dynamic", keep, model.sparsity.budget)
    return {
        "model": getattr(model.base.config, "_name_or_path", None) or "random-init",
        "device": device,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batch_size": batch_size,
        "prompt": {"image_tokens": n_image, "image_tokens_kept": kept, "text_tokens": text_tokens,
                   "image_px": list(image.px), "image_grid": list(image.grid),
                   "newline_tokens": 0 if image.views is None else int((image.views < 0).sum())},
        "budget": model.sparsity.budget,
        "layers": shape.layers,
        "sparse_layer": layer,
        "vision_keep": keep,
        "text_keep": text_rate if text_rate is not None else "learned",
        "prefill": {
            "flops_dense": dense_flops["image_tokens"],
            "flops_dynamic": dynamic["prefill"]["flops"],
            "flops_ratio": dynamic["prefill"]["flops_ratio"],
            "flops_ratio_limit": flops.paper_ratio_limit(shape.layers, layer, n_image, keep, shape.hidden, kept),
            "flops_paper_dense": flops.paper_prefill_flops([n_image] * shape.layers, shape.hidden, batch_size),
            "flops_paper_dynamic": flops.paper_prefill_flops(
                flops.image_tokens_per_layer(shape.layers, layer, n_image, kept), shape.hidden, batch_size,
            ),
            "flops_prompt_dense": dense_flops["prompt"],
            "flops_prompt_dynamic": dynamic["prefill"]["flops_prompt"],
            "flops_prompt_ratio": dynamic["prefill"]["flops_prompt_ratio"],
            "flops_vision": vision,
            "latency_dense_s": None if latency is None else latency["dense"],
            "latency_dynamic_s": dynamic["prefill"]["latency_s"],
            "latency_ratio": dynamic["prefill"]["latency_ratio"],
            "latency_vision_s": vision_s,
        },
        "decode": {
            "new_tokens": new_tokens,
            "kv_bytes_dense": decode["dense"]["kv_bytes"],
            "kv_bytes_dynamic": decode["dynamic"]["kv_bytes"],
            "kv_ratio": dynamic["decode"]["kv_ratio"],
            "kv_bytes_ratio": dynamic["decode"]["kv_bytes_ratio"],
            "tokens_per_s_dense": decode["dense"]["tokens_per_s"],
            "tokens_per_s_dynamic": decode["dynamic"]["tokens_per_s"],
            "text_tokens_kept": decode["dynamic"]["text_tokens_kept"],
            "text_tokens_fed": decode["dynamic"]["text_tokens_fed"],
            "peak_memory_dense": decode["dense"]["peak_memory_bytes"],
            "peak_memory_dynamic": decode["dynamic"]["peak_memory_bytes"],
        },
        "baselines": {name: arm(name) for name in BASELINES},
    }


def format_table(record: dict[str, Any]) -> str:
    """A plain-text table of the arms (ratios against dense)."""
    rows = [("arm", "prefill FLOPs ratio", "prompt FLOPs ratio", "latency ratio", "KV ratio (>=K)", "tokens/s")]
    p, d = record["prefill"], record["decode"]

    def fmt(x: Any, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    rows.append(("dense", "1.000", "1.000", "1.000", "1.000", fmt(d["tokens_per_s_dense"], ".1f")))
    rows.append(("dynamic", fmt(p["flops_ratio"]), fmt(p["flops_prompt_ratio"]), fmt(p["latency_ratio"]), fmt(d["kv_ratio"]), fmt(d["tokens_per_s_dynamic"], ".1f")))
    for name, arm in record["baselines"].items():
        rows.append((name, fmt(arm["prefill"]["flops_ratio"]), fmt(arm["prefill"]["flops_prompt_ratio"]), fmt(arm["prefill"]["latency_ratio"]), fmt(arm["decode"]["kv_ratio"]), fmt(arm["decode"]["tokens_per_s"], ".1f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    prompt = record["prompt"]
    if "image_px" in prompt:
        (h, w), (rows, cols) = prompt["image_px"], prompt["image_grid"]
        if prompt.get("newline_tokens"):
            lines.append(f"image {h}x{w} px -> base view + crops ({rows}x{cols} patches) = {prompt['image_tokens']} image "
                         f"tokens per prompt, {prompt['newline_tokens']} of them newlines (never dropped); "
                         f"{record['budget']} budget keeps {prompt['image_tokens_kept']}")
        else:
            lines.append(f"image {h}x{w} px -> {rows}x{cols} = {prompt['image_tokens']} image tokens per prompt")
    lines.append(f"paper-convention limit for keep {record['vision_keep']}: {p['flops_ratio_limit']:.4f}; "
                 f"dense prefill {p['flops_dense'] / 1e12:.3f} TFLOPs (image tokens), vision tower {p['flops_vision'] / 1e12:.3f} TFLOPs")
    return "\n".join(lines)


def write_json(record: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
