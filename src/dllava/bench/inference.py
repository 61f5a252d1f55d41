"""Prefill and decoding efficiency of Dynamic-LLaVA against dense and the training-free methods, side by side.

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
* the training-free arms are ``bench.baselines`` (default FastV and random; every method of
  :mod:`dllava.inference.selection` at the same budget). DART, DivPrune, CDPruner and VisionZip choose
  from the features' values, so they need a real device: their FLOPs are counted on the real run
  (SDPA's math kernel), selection matmuls included (what ``flops.selection_flops`` states); VisionZip's
  FLOPs and latency include the second vision-tower pass that reads its attention (the official code
  reads it from the one pass);
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

Long decoding (``decode_lengths``, the paper's Table 4; :func:`run_decode_long`): dense,
Dynamic-LLaVA and FastV each generate T forced tokens (a fixed random text sequence, EOS ignored:
the prefill gives the first, then T - 1 tokens are fed back), for every T asked, and report the
no-cache decoding FLOPs (the T - 1 steps, each re-running the whole pruned sequence), the KV cache
with cache at the end (bytes, bytes per generated token), peak memory and tokens/s where the decode
actually runs, and both ratios against dense.

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
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from dllava.eval.questions import pixels_to
from dllava.families import FamilyAdapter, ImageFeatures
from dllava.inference import flops
from dllava.inference.engine import SparseEngine
from dllava.inference.text_policies import TextMembership, decide_newest, text_rate_keep
from dllava.inference.vision_flops import qwen3_vl_deepstack_layers
from dllava.model.loading import ModelSource, load_base_model
from dllava.sparse.config import SparsityConfig
from dllava.sparse.model import DynamicVLM
from dllava.utils.checks import describe, is_int

log = logging.getLogger(__name__)
BASELINES = ("fastv", "random")  # the default training-free arms beside dense and dynamic (bench.baselines)
# methods whose choice reads the features' values (greedy set selection, vision attention): they cannot
# run on the meta device, so their prefill FLOPs are counted on the bench's own device
READS_VALUES = ("dart", "divprune", "cdpruner", "visionzip")


def check_baselines(baselines: Sequence[str], device: str) -> tuple[str, ...]:
    """The training-free arms to run: methods other than dense and dynamic, each once, and on the meta
    device only those whose choice needs no values."""
    from dllava.inference.selection import IMAGE_METHODS

    allowed = [m for m in IMAGE_METHODS if m not in ("dense", "dynamic")]
    unknown = [m for m in baselines if m not in allowed]
    if unknown or len(set(baselines)) != len(baselines):
        raise ValueError(f"bench.baselines must be distinct methods of {allowed}, got {list(baselines)}")
    on_meta = [m for m in baselines if m in READS_VALUES]
    if device == "meta" and on_meta:
        raise ValueError(
            f"bench.baselines {on_meta} choose tokens from the features' values, which the meta device does not have: "
            "run the bench on cpu or cuda (bench.device), or leave them out"
        )
    return tuple(baselines)


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


def count_real_flops(fn: Callable[[], Any]) -> int:
    """:func:`count_flops` of a run on real tensors, with SDPA on its math backend (a fused CPU kernel has
    no FLOP formula and would count 0; the math backend's two matmuls are what the meta count sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return count_flops(fn)


def prompt_on(prompt: tuple[torch.Tensor, torch.Tensor], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return prompt[0].to(device), prompt[1].to(device)


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


def arm_engines(
    model: DynamicVLM, keep: float, text_rate: float | None, seed: int, baselines: Sequence[str] = BASELINES
) -> dict[str, SparseEngine]:
    """One engine per arm; the text policy only matters once decoding starts (prefill drops image tokens only)."""
    dynamic_text: str | float = "learned" if text_rate is None else text_rate
    arms = {"dense": ("dense", "off"), "dynamic": ("dynamic", dynamic_text), **{name: (name, "off") for name in baselines}}
    return {name: SparseEngine(model, method=method, keep=keep, text=text, seed=seed) for name, (method, text) in arms.items()}


def _pixels_for(engine: SparseEngine, pixels: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The pixel inputs an arm needs beside the precomputed features: VisionZip reads the tower's
    attention (a second tower pass, timed as part of its prefill)."""
    return pixels if engine.method == "visionzip" and pixels else {}


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
    decode_lengths: Sequence[int] = (),
    decode_device: str = "auto",
    baselines: Sequence[str] = BASELINES,
) -> dict[str, Any]:
    """Measure every arm; returns the ``bench.json`` record (see the module docstring).
    ``baselines``: the training-free arms beside dense and dynamic (:func:`check_baselines`).
    ``image_px``: the side of the square bench image (None: the family's default).
    ``decode_lengths``: generated-token counts of the long-decoding comparison (:func:`run_decode_long`;
    empty: skipped, and the record has no ``decode_long`` keys); ``decode_device``: where that decode
    runs (:func:`resolve_decode_device`)."""
    decode_lengths = check_decode_lengths(decode_lengths, getattr(model.text_config, "max_position_embeddings", None))
    if decode_lengths:  # a wrong setting fails here, not after the rest of the bench
        decode_device = resolve_decode_device(decode_device, device, text_keep_rate is None)
    config = model.base.config
    adapter = model.adapter
    shape = flops.DecoderShape.from_config(adapter.text_config(config))
    image = bench_image(adapter, config, image_px)
    layer = model.sparsity.layer

    # FLOPs, on a meta copy (shapes only, exact counts); positions from the same prompts on the host
    baselines = check_baselines(baselines, device)
    if device == "meta" and getattr(model.sparsity, "image_predictor", "original") == "instruction_aware":
        raise ValueError(
            "the instruction-aware image predictor reads the prompt's text after the image, which the meta device "
            "has no values for: run the bench on cpu or cuda (bench.device)"
        )
    meta_model = model if device == "meta" else copy.deepcopy(model).to("meta")
    meta_engines = arm_engines(meta_model, keep, text_keep_rate, seed, [b for b in baselines if b not in READS_VALUES])
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
    engines = meta_engines if device == "meta" else arm_engines(model, keep, text_keep_rate, seed, baselines)
    ids, mask = make_prompt(config, image, batch_size, text_tokens, "cpu", seed)
    positions = prompt_positions(model, (ids, mask), image, batch_size).to(device)
    ids, mask = ids.to(device), mask.to(device)
    dtype = next(model.parameters()).dtype
    pixels = None
    if device == "meta":
        features = features_meta
        latency = vision_s = None
    else:
        pixels = bench_pixels(image, config, batch_size, torch.Generator().manual_seed(seed))
        pixels = pixels_to(pixels, device, dtype)
        with torch.no_grad():
            features = model.encode_images(pixels)
        for name in baselines:  # choices that read values: FLOPs of the real run (SDPA's math kernel, counted)
            if name in READS_VALUES:
                engine = engines[name]
                prefill_flops[name] = {
                    key: count_real_flops(partial(
                        engine.start, *prompt_on(prompts[key], device), image_features=features,
                        position_ids=prompt_positions(model, prompts[key], image, batch_size).to(device),
                        **_pixels_for(engine, pixels),
                    ))
                    for key in prompts
                }
        prefill_arms = {
            name: (lambda e=e: e.start(ids, mask, image_features=features, position_ids=positions, **_pixels_for(e, pixels)))
            for name, e in engines.items()
        }
        latency = timed_rounds(prefill_arms, device, warmup, repeats)
        vision_s = timed_rounds({"vision": lambda: model.encode_images(pixels)}, device, warmup, repeats)["vision"]

    if device == "meta":
        decode = {name: decode_accounting(engine, ids, new_tokens, dtype, image) for name, engine in engines.items()}
    else:
        for engine in engines.values():  # warm-up: the first decode of a process pays for allocations
            decode_arm(engine, ids, mask, features, min(8, new_tokens), device, positions, _pixels_for(engine, pixels))
        decode = {
            name: decode_arm(engine, ids, mask, features, new_tokens, device, positions, _pixels_for(engine, pixels))
            for name, engine in engines.items()
        }

    record = report(
        model, device, keep, text_keep_rate, shape, image, layer, prefill_flops, vision, latency, vision_s, decode,
        batch_size, text_tokens, new_tokens, baselines,
    )
    if decode_lengths:
        # the long decode compares dense, Dynamic-LLaVA and FastV whatever bench.baselines lists
        decode_meta = {**arm_engines(meta_model, keep, text_keep_rate, seed, ["fastv"]), **meta_engines}
        decode_engines = decode_meta if device == "meta" else {**arm_engines(model, keep, text_keep_rate, seed, ["fastv"]), **engines}
        record.update(run_decode_long(
            model, device, decode_meta, decode_engines, image, (ids, mask), positions, features, decode_lengths,
            decode_device, seed,
        ))
    return record


@torch.no_grad()
def decode_arm(
    engine: SparseEngine, ids: torch.Tensor, mask: torch.Tensor, features: ImageFeatures, new_tokens: int, device: str,
    positions: torch.Tensor | None = None, pixels: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Prefill once, then ``new_tokens - 1`` cached decode steps (timed; no EOS: every step runs)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    logits, state = engine.start(ids, mask, image_features=features, position_ids=positions, **(pixels or {}))
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
    batch_size, text_tokens, new_tokens, baselines=BASELINES,
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
        "baselines": {name: arm(name) for name in baselines},
    }


# -- long decoding: the paper's Table 4 ---------------------------------------------------------------
DECODE_ARMS = ("dense", "dynamic", "fastv")
KV_RATIO_DEFINITION = (
    "kv_ratio: K/V bytes of the whole cache at the end (prompt, pruned image tokens included, plus generated "
    "tokens; every layer) of the arm / dense; kv_ratio_generated: the same for the generated tokens only"
)
NOCACHE_DEFINITION = (
    "nocache_flops: the T - 1 decoding steps without cache (step s re-runs the prompt plus s fed tokens, "
    "pruned as the engine prunes them: every column in layers < K, the kept ones in layers >= K), prefill "
    "excluded; FlopCounterMode on meta, per step from exact quadratics in the token counts (see NoCacheFlops)"
)


def check_decode_lengths(lengths: Any, max_positions: int | None = None) -> list[int]:
    """``bench.decode_lengths`` as a sorted list: generated-token counts >= 1, none twice, none beyond
    the decoder's ``max_position_embeddings`` (when given); None or empty: skip the comparison."""
    key = "bench.decode_lengths"
    if lengths is None:
        return []
    if isinstance(lengths, (str, bytes, dict)) or not isinstance(lengths, Sequence):
        raise TypeError(f"{key} must be a list of generated-token counts >= 1 (empty: skip), got {describe(lengths)}")
    values = list(lengths)
    for value in values:
        if not is_int(value):
            raise TypeError(f"{key} must hold integer token counts >= 1, got {describe(value)}")
        if value < 1:
            raise ValueError(f"{key} must hold token counts >= 1, got {value}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise ValueError(f"{key} lists {', '.join(map(str, twice))} more than once: {values}")
    if max_positions is not None and values and max(values) > max_positions:
        raise ValueError(
            f"{key}: {max(values)} generated tokens exceed the decoder's max_position_embeddings ({max_positions})"
        )
    return sorted(values)


def resolve_decode_device(requested: str, device: str, learned_text: bool) -> str:
    """Where the long decode runs, ``bench.decode_device``: ``meta`` accounts the cache from token
    counts (no timing, no memory measurement); the bench's own device runs the cached decode for real
    (timed; peak memory on a GPU). ``auto``: the bench's device on a GPU; on CPU, meta (the mid model
    decodes ~10 tokens/s per arm on one core: 4K tokens x 3 arms would take ~25 min), except with learned
    text decisions, which only a real run can read."""
    key = "bench.decode_device"
    kind = torch.device(device).type
    if requested == "auto":
        return device if kind == "cuda" or (kind == "cpu" and learned_text) else "meta"
    if requested == "meta":
        if learned_text:
            raise ValueError(f"{key}=meta cannot read learned text decisions: set bench.text_keep_rate, or {key}={device}")
        return "meta"
    if kind == "meta" or torch.device(requested).type != kind:
        raise ValueError(f"{key}={requested}: the model runs on {device}; use auto, meta or {device}")
    return device


@dataclass(frozen=True)
class Quadratic:
    """``c0 + c1 m + c2 m^2`` with exact rational coefficients, evaluated to an exact int."""

    c0: Fraction
    c1: Fraction
    c2: Fraction

    @classmethod
    def through(cls, points: Sequence[tuple[int, int]]) -> Quadratic:
        """The quadratic through three (m, value) points (Newton's divided differences, exact)."""
        (x0, y0), (x1, y1), (x2, y2) = points
        if len({x0, x1, x2}) != 3:
            raise ValueError(f"three distinct points needed, got {[x0, x1, x2]}")
        d01 = Fraction(y1 - y0, x1 - x0)
        d012 = (Fraction(y2 - y1, x2 - x1) - d01) / (x2 - x0)
        return cls(y0 - d01 * x0 + d012 * x0 * x1, d01 - d012 * (x0 + x1), d012)

    def __call__(self, m: int) -> int:
        value = self.c0 + self.c1 * m + self.c2 * m * m
        if value.denominator != 1:
            raise ArithmeticError(f"{self} is not integral at {m}")
        return int(value)


def fit_quadratic(count: Callable[[int], int], low: int, high: int, name: str = "block") -> tuple[Quadratic, list[int]]:
    """The exact quadratic of ``count`` (an int function of a token count), fitted at three points
    spanning [low, high] and checked at a fourth; raises if the check differs (``count`` is not a
    quadratic, so the per-step sum would be wrong). Returns the quadratic and the points counted."""
    fit = sorted({low, (low + high) // 2, max(high, low + 2)})
    if len(fit) < 3:
        fit = [low, low + 1, low + 2]
    check = next(m for m in (low + (fit[-1] - low) // 4, low + 3 * (fit[-1] - low) // 4, fit[-1] + 1) if m not in fit)
    quadratic = Quadratic.through([(m, count(m)) for m in fit])
    counted = count(check)
    if quadratic(check) != counted:
        raise RuntimeError(
            f"no-cache FLOPs of the {name} are not a quadratic in its token count: fitted at {fit}, "
            f"{quadratic(check)} predicted at {check}, {counted} counted"
        )
    return quadratic, [*fit, check]


def _counted(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops()


class NoCacheFlops:
    """FLOPs of one no-cache decoding step of ``engine`` (a meta-device engine), from token counts.

    A no-cache step (``SparseEngine.step`` without cache) re-runs the whole sequence: layers 0..K-1 on
    all ``N`` columns (prompt plus fed tokens); the learned text decision on the newest token's layer-K
    input (the text predictor on one position; the fixed rate and ``off`` run no predictor); layers
    K..L-1 on the ``n`` columns taking part (the pruned prompt, the fed tokens the policy left in and the
    newest; the image selection was made once at prefill, so no image predictor or FastV scoring runs
    again); the final norm and LM head on one position. Each part is counted by ``FlopCounterMode`` on
    meta running the engine's own blocks (its decoder layers, rotary embedding, mask shapes, text
    predictor and logits) on ``m`` columns: ``dense(N) + text + sparse(n)``.

    Counting every one of 4K steps that way costs ~0.2 s a step for the mid model, so ``dense`` and
    ``sparse`` are each counted at three token counts and the exact quadratic through them is used:
    every op ``FlopCounterMode`` counts is a matmul or attention whose count is a product of at most two
    token dimensions (the queries and the keys). :func:`fit_quadratic` checks each at a fourth count
    and raises otherwise; tests/bench/test_decode_long.py checks the per-step values against
    ``FlopCounterMode`` on the real engine's no-cache steps on CPU, extrapolating far from the fitted counts.
    """

    def __init__(self, engine: SparseEngine, batch: int, dense_range: tuple[int, int], sparse_range: tuple[int, int]) -> None:
        if next(engine.model.parameters()).device.type != "meta":
            raise ValueError("NoCacheFlops counts on a meta-device engine")
        self.engine, self.batch = engine, batch
        self.points: dict[str, list[int]] = {}
        self.dense, self.points["dense"] = fit_quadratic(self.count_dense, *dense_range, name=f"layers < {engine.layer}")
        self.sparse, self.points["sparse"] = fit_quadratic(
            self.count_sparse, *sparse_range, name=f"layers >= {engine.layer} + LM head"
        )
        self.text = self.count_text() if engine.text == "learned" else 0

    # the engine's blocks on m columns, counted on meta
    def _hidden(self, m: int) -> torch.Tensor:
        dtype = next(self.engine.model.parameters()).dtype
        return torch.empty(self.batch, m, self.engine.model.text_config.hidden_size, device="meta", dtype=dtype)

    def _layers(self, first: int, last: int, m: int) -> torch.Tensor:
        engine = self.engine
        hidden = self._hidden(m)
        order = torch.arange(m, device="meta")[None].expand(self.batch, m)
        rotary = engine.adapter.rotary(engine.model.base, hidden, order[None].expand(engine.adapter.rope_rows, -1, -1))
        mask = SparseEngine._mask(torch.ones(self.batch, m, dtype=torch.bool, device="meta"), order)
        return engine._layers(first, last, hidden, mask, rotary, None)

    def count_dense(self, m: int) -> int:
        return _counted(lambda: self._layers(0, self.engine.layer, m))

    def count_sparse(self, m: int) -> int:
        engine = self.engine
        return _counted(lambda: engine._logits(self._layers(engine.layer, len(engine.lm.layers), m)[:, -1]))

    def count_text(self) -> int:
        """The learned decision of one step: the text predictor on the newest token (B, 1, H)."""
        return _counted(lambda: self.engine.model.text_predictor(self._hidden(1)))

    def step(self, dense_tokens: int, sparse_tokens: int) -> int:
        """One no-cache step: ``dense_tokens`` columns in layers < K, ``sparse_tokens`` in layers >= K."""
        return self.dense(dense_tokens) + self.text + self.sparse(sparse_tokens)


def nocache_step_tokens(prompt_len: int, sparse_prompt: Sequence[int], computing: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(columns in layers < K, columns in layers >= K) of no-cache steps 1..len(computing[0]) as
    ``SparseEngine`` prunes them: step s runs ``prompt_len + s`` columns, then per sample its pruned
    prompt (``sparse_prompt[b]``: the prompt's columns minus its dropped image tokens) plus the generated
    tokens taking part (``computing[b][s - 1]``, ``GenerationResult.text_computing``: those the text
    policy left in, the newest included); the batch runs its largest count."""
    steps = len(computing[0]) if computing else 0
    return [(prompt_len + s, max(p + c[s - 1] for p, c in zip(sparse_prompt, computing))) for s in range(1, steps + 1)]


def simulated_text(engine: SparseEngine, fed: int, batch: int) -> TextMembership:
    """The text policy's membership after ``fed`` forced tokens, replayed on the host with the engine's
    own rule (:func:`decide_newest`): for policies that read nothing from the model (``off``, a fixed
    rate, ``random``, ``streaming``), what a real decode of any tokens leaves."""
    if engine.text in ("learned", "h2o"):
        raise ValueError(f"text={engine.text!r} decisions read the model: they need a real decode, not the meta device")
    members = TextMembership(batch)
    generator = torch.Generator().manual_seed(engine.seed)
    for t in range(fed):
        decide_newest(engine.text, members, t, None, engine.text_share, engine.sinks, generator)
    return members


def forced_tokens(config: Any, batch: int, count: int, seed: int = 0) -> torch.Tensor:
    """(B, count) the tokens the long decode feeds back, whatever the model predicts: random text ids
    drawn as :func:`make_prompt` draws them (below the image token and the family's other vision ids)."""
    vision_ids = [config.image_token_id, getattr(config, "video_token_id", None),
                  getattr(config, "vision_start_token_id", None), getattr(config, "vision_end_token_id", None)]
    high = min([getattr(config, "text_config", config).vocab_size, *[i for i in vision_ids if i is not None]]) - 1
    return torch.randint(3, high, (batch, count), generator=torch.Generator().manual_seed(seed + 1))


@torch.no_grad()
def decode_long_arm(
    engine: SparseEngine, ids: torch.Tensor, mask: torch.Tensor, features: ImageFeatures, positions: torch.Tensor | None,
    forced: torch.Tensor, lengths: Sequence[int], device: str,
) -> dict[int, dict[str, Any]]:
    """The cached decode of ``max(lengths)`` forced tokens (``forced`` (B, T): token t is fed at step
    t + 1; EOS ignored), run for real; at each length T: seconds and tokens/s of the T - 1 decode steps
    (accounting excluded), the engine's cache accounting (``GenerationResult``), the cache's allocated
    bytes and the GPU's peak memory so far (CUDA only)."""
    cuda = device.startswith("cuda")
    if cuda:
        sync_device(device)
        torch.cuda.reset_peak_memory_stats()
    _, state = engine.start(ids, mask, image_features=features, position_ids=positions)
    wanted, out = set(lengths), {}
    batch = ids.shape[0]
    sync_device(device)
    seconds, start = 0.0, time.perf_counter()
    for fed in range(max(lengths)):
        if fed:
            engine.step(state, forced[:, fed - 1])
        if fed + 1 in wanted:
            sync_device(device)
            seconds += time.perf_counter() - start
            result = engine.summarize(state, forced[:, : fed + 1], [fed + 1] * batch)
            out[fed + 1] = {
                "seconds": seconds,
                "tokens_per_s": batch * fed / seconds if fed and seconds > 0 else None,
                "kv_bytes": sum(result.kv_bytes),
                "kv_bytes_allocated": state.cache.allocated_bytes(),
                "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                "text_tokens_kept": result.text_tokens_kept,
                "text_computing": result.text_computing,
                "kv_tokens_dense_layer": result.kv_tokens_dense_layer,
                "kv_tokens_sparse_layer": result.kv_tokens_sparse_layer,
            }
            start = time.perf_counter()
    return out


def peak_memory(decode_device: str, run: dict[str, Any]) -> dict[str, Any]:
    """``peak_memory_bytes`` of one long decode and what it measures (see :func:`run_decode_long`)."""
    if decode_device.startswith("cuda"):
        return {"peak_memory_bytes": run["peak_memory_bytes"], "peak_memory_measure": "cuda_max_memory_allocated"}
    if decode_device == "meta":
        return {"peak_memory_bytes": run["kv_bytes"], "peak_memory_measure": "kv_cache_accounted"}
    return {"peak_memory_bytes": run["kv_bytes_allocated"], "peak_memory_measure": "kv_cache_allocated"}


def run_decode_long(
    model: DynamicVLM,
    device: str,
    meta_engines: dict[str, SparseEngine],
    engines: dict[str, SparseEngine],
    image: BenchImage,
    prompt: tuple[torch.Tensor, torch.Tensor],
    positions: torch.Tensor | None,
    features: ImageFeatures,
    lengths: Sequence[int],
    decode_device: str,
    seed: int = 0,
) -> dict[str, Any]:
    """Dense, Dynamic-LLaVA and FastV generating each of ``lengths`` forced tokens: the ``decode_long``
    (keyed by the token count as a string, then by arm) and ``decode_long_setup`` entries of bench.json.

    Per arm and length T (T - 1 fed tokens, the cache's content at the end):

    * ``nocache_flops`` / ``nocache_flops_ratio``: decoding FLOPs without cache (:class:`NoCacheFlops`:
      the T - 1 steps, each re-running the pruned sequence, with the generated tokens taking part in
      each step as the cached decode's text policy left them, ``GenerationResult.text_computing``: the
      no-cache path makes the same decisions, tests/inference/test_text_policies.py), and the columns
      its last step runs in layers < K and >= K;
    * ``kv_bytes`` / ``kv_ratio``: K/V bytes of the whole cache (prompt with the arm's image pruning and
      the generated tokens, all layers, the batch) at the end / dense; ``kv_bytes_generated`` /
      ``kv_ratio_generated``: the generated tokens' part; ``kv_bytes_per_token``: its growth per
      generated token of one sample;
    * ``peak_memory_bytes`` with ``peak_memory_measure``: ``cuda_max_memory_allocated`` (weights,
      activations and cache, a real GPU run), ``kv_cache_allocated`` (CPU run: torch's CPU allocator
      keeps no peak, so only the cache's buffers as allocated, padded and grown in chunks) or
      ``kv_cache_accounted`` (meta: the K/V bytes from token counts);
    * ``seconds`` / ``tokens_per_s`` of the cached decode steps, only when it ran (not on meta).

    ``decode_device`` ``meta`` accounts the cache from token counts (:func:`decode_accounting`, fixed
    text rate or off); otherwise the cached decode runs on the bench's device, one arm after another.
    """
    config = model.base.config
    shape = flops.DecoderShape.from_config(model.text_config)
    lengths = sorted(lengths)
    ids, mask = prompt
    batch, prompt_len = ids.shape
    longest = max(lengths)
    dtype = next(model.parameters()).dtype
    size = torch.empty(0, dtype=dtype).element_size()
    max_positions = getattr(model.text_config, "max_position_embeddings", None)
    beyond = max_positions is not None and prompt_len + longest - 1 > max_positions
    if beyond:
        log.warning("decode_long: the prompt (%d tokens) plus %d generated tokens run past the decoder's "
                    "max_position_embeddings (%d): positions beyond its trained range (as the paper's 4K rows do "
                    "on LLaVA-1.5)", prompt_len, longest, max_positions)

    forced = forced_tokens(config, batch, max(longest - 1, 1), seed)

    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for name in DECODE_ARMS:
        if decode_device == "meta":
            engine = meta_engines[name]
            members = simulated_text(engine, longest - 1, batch)
            runs[name] = {}
            for T in lengths:
                acc = decode_accounting(engine, ids, T, dtype, image)
                kept = [members.staying_after[b][T - 2] if T > 1 else 0 for b in range(batch)]
                if kept != [acc["text_tokens_kept"]] * batch:
                    raise RuntimeError(f"{name}: the replayed text policy keeps {kept}, the accounting {acc['text_tokens_kept']}")
                runs[name][T] = {
                    "seconds": None, "tokens_per_s": None, "kv_bytes": acc["kv_bytes"], "kv_bytes_allocated": None,
                    "peak_memory_bytes": None, "text_tokens_kept": kept,
                    "text_computing": [c[: T - 1] for c in members.computing],
                    "kv_tokens_dense_layer": [acc["kv_tokens_dense_layer"]] * batch,
                    "kv_tokens_sparse_layer": [acc["kv_tokens_sparse_layer"]] * batch,
                }
        else:
            log.info("decode_long: %s, %d forced tokens on %s", name, longest, decode_device)
            runs[name] = decode_long_arm(engines[name], ids, mask, features, positions, forced.to(ids.device), lengths, decode_device)

    # the pruned prompt of each arm (per sample, padding columns included: they stay columns, masked as keys)
    counts = features.counts
    sparse_prompt = {
        name: [prompt_len - c + k for c, k in zip(counts, features.kept_counts(meta_engines[name].image_keep_share,
                                                                             meta_engines[name].budget))]
        for name in DECODE_ARMS
    }
    steps = {name: nocache_step_tokens(prompt_len, sparse_prompt[name], runs[name][longest]["text_computing"])
             for name in DECODE_ARMS}
    # the blocks are the same modules in every arm: one counter per text policy kind (learned adds the predictor)
    counters: dict[str, NoCacheFlops] = {}
    if longest > 1:
        taking_part = [n for name in DECODE_ARMS for _, n in steps[name]]
        for name in DECODE_ARMS:
            kind = "learned" if meta_engines[name].text == "learned" else "fixed"
            if kind not in counters:
                counters[kind] = NoCacheFlops(meta_engines[name], batch, (prompt_len + 1, prompt_len + longest - 1),
                                              (min(taking_part), max(taking_part)))
    per_step = {
        name: [counters["learned" if meta_engines[name].text == "learned" else "fixed"].step(N, n) for N, n in steps[name]]
        for name in DECODE_ARMS
    }

    out: dict[str, Any] = {}
    for T in lengths:
        fed = T - 1
        arms = {}
        for name in DECODE_ARMS:
            run = runs[name][T]
            kept_text = run["text_tokens_kept"]
            layer = meta_engines[name].layer
            generated = sum(flops.kv_bytes(shape, layer, fed, k, size) for k in kept_text)
            last = steps[name][fed - 1] if fed else None
            arms[name] = {
                "new_tokens": T,
                "fed_tokens": fed,
                "nocache_flops": sum(per_step[name][:fed]),
                "nocache_tokens_last_step": None if last is None else {"layers_lt_k": last[0], "layers_ge_k": last[1]},
                "kv_bytes": run["kv_bytes"],
                "kv_bytes_generated": generated,
                "kv_bytes_per_token": generated / (batch * fed) if fed else None,
                "kv_tokens_dense_layer": statistics.mean(run["kv_tokens_dense_layer"]),
                "kv_tokens_sparse_layer": statistics.mean(run["kv_tokens_sparse_layer"]),
                "image_tokens_kept": statistics.mean(features.kept_counts(meta_engines[name].image_keep_share, meta_engines[name].budget)),
                "text_tokens_kept": statistics.mean(kept_text),
                "kv_bytes_allocated": run["kv_bytes_allocated"],
                **peak_memory(decode_device, run),
                "seconds": run["seconds"],
                "tokens_per_s": run["tokens_per_s"],
            }
        dense = arms["dense"]
        for arm in arms.values():
            arm["nocache_flops_ratio"] = _ratio(arm["nocache_flops"], dense["nocache_flops"])
            arm["kv_ratio"] = _ratio(arm["kv_bytes"], dense["kv_bytes"])
            arm["kv_ratio_generated"] = _ratio(arm["kv_bytes_generated"], dense["kv_bytes_generated"])
        out[str(T)] = arms

    setup = {
        "device": decode_device,
        "batch_size": batch,
        "prompt_tokens": prompt_len,
        "image_tokens": statistics.mean(counts),
        "sparse_layer": meta_engines["dynamic"].layer,
        "layers": shape.layers,
        "arms": {name: {"method": meta_engines[name].method, "image_keep": meta_engines[name].image_keep_share,
                        "text": meta_engines[name].text} for name in DECODE_ARMS},
        "tokens": "forced: a fixed random text sequence, EOS ignored; T new tokens = the prefill's + T - 1 fed back",
        "kv_ratio": KV_RATIO_DEFINITION,
        "nocache_flops": NOCACHE_DEFINITION,
        "nocache_flops_counted_at": {f"{key}:{part}": points for key, c in counters.items() for part, points in c.points.items()},
        "nocache_text_decision_flops": {key: c.text for key, c in counters.items()},
        "max_position_embeddings": max_positions,
        "positions_beyond_max": beyond,
    }
    return {"decode_long": out, "decode_long_setup": setup}


def format_decode_long(record: dict[str, Any]) -> str:
    """The long-decoding table: per length and arm, no-cache FLOPs, KV bytes, memory and tokens/s."""
    setup = record["decode_long_setup"]
    rows = [("tokens", "arm", "no-cache TFLOPs", "FLOPs ratio", "KV MiB", "KV ratio", "KV gen ratio", "KV B/token",
             "peak MiB", "tokens/s")]

    def fmt(x: Any, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    for length, arms in record["decode_long"].items():
        for name, arm in arms.items():
            rows.append((length, name, fmt(arm["nocache_flops"] / 1e12, ".4g"), fmt(arm["nocache_flops_ratio"]),
                         fmt(arm["kv_bytes"] / 2**20, ".1f"), fmt(arm["kv_ratio"]), fmt(arm["kv_ratio_generated"]),
                         fmt(arm["kv_bytes_per_token"], ".0f"),
                         fmt(None if arm["peak_memory_bytes"] is None else arm["peak_memory_bytes"] / 2**20, ".1f"),
                         fmt(arm["tokens_per_s"], ".1f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    peak = {"cuda_max_memory_allocated": "GPU max_memory_allocated (weights + activations + cache)",
            "kv_cache_allocated": "the KV cache's allocated buffers (CPU: no allocator peak)",
            "kv_cache_accounted": "the KV bytes from token counts (meta: nothing runs)"}
    measure = next(iter(next(iter(record["decode_long"].values())).values()))["peak_memory_measure"]
    lines.append(f"long decoding on {setup['device']}, batch {setup['batch_size']}, prompt {setup['prompt_tokens']} tokens; "
                 f"no-cache FLOPs = the T-1 decode steps re-running the pruned sequence (prefill excluded); "
                 f"KV = the whole cache (prompt + generated, all layers); peak = {peak[measure]}")
    return "\n".join(lines)


def format_table(record: dict[str, Any]) -> str:
    """A plain-text table of the arms (ratios against dense)."""
    rows = [("arm", "prefill FLOPs ratio", "prompt FLOPs ratio", "latency ratio", "KV ratio (>=K)", "KV bytes ratio", "tokens/s")]
    p, d = record["prefill"], record["decode"]

    def fmt(x: Any, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    rows.append(("dense", "1.000", "1.000", "1.000", "1.000", "1.000", fmt(d["tokens_per_s_dense"], ".1f")))
    rows.append(("dynamic", fmt(p["flops_ratio"]), fmt(p["flops_prompt_ratio"]), fmt(p["latency_ratio"]), fmt(d["kv_ratio"]),
                 fmt(d["kv_bytes_ratio"]), fmt(d["tokens_per_s_dynamic"], ".1f")))
    for name, arm in record["baselines"].items():
        rows.append((name, fmt(arm["prefill"]["flops_ratio"]), fmt(arm["prefill"]["flops_prompt_ratio"]), fmt(arm["prefill"]["latency_ratio"]),
                     fmt(arm["decode"]["kv_ratio"]), fmt(arm["decode"]["kv_bytes_ratio"]), fmt(arm["decode"]["tokens_per_s"], ".1f")))
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
    if record.get("decode_long"):
        lines += ["", format_decode_long(record)]
    return "\n".join(lines)


def write_json(record: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
