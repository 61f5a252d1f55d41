"""Grow a trained decoder deeper without changing what it computes (depth up-scaling).

A tiny base trained on CPU with 4 decoder layers plateaued on counting questions; training a deeper one
from nothing costs hours. Here each new layer is a copy of an existing layer with its two output
projections (``self_attn.o_proj`` and ``mlp.down_proj``) zeroed: its residual branch adds exactly
zero, so the grown model's logits equal the old one's, and training continues from the same function
with more capacity (the copy's other weights give its gradients a useful start). ``plan`` lists, for
every layer of the grown decoder, the old layer it copies; the first occurrence of an old layer is the
layer itself, every later one a zero-output copy. ``0,1,1,2,3,3`` turns 4 layers into 6 and, with
Dynamic-LLaVA's K = 2, puts 4 gated layers after the predictors instead of 2 (../shared/CALIBRATION.md:
a deeper toy LLM lets the choice of kept tokens matter).

    python -m dllava.model.grow_depth <model dir> <out dir> --plan 0,1,1,2,3,3

Works for every family whose decoder layers use Llama-style names (LLaVA's Llama, Qwen2 / Qwen2.5-VL /
Qwen3-VL text decoders); the model is loaded and saved with ``from_pretrained`` / ``save_pretrained``,
its tokenizer and processor files copied beside it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from dllava.families import get_adapter

ZERO_OUTPUTS = ("self_attn.o_proj.", "mlp.down_proj.")
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def check_plan(plan: Sequence[int], layers: int) -> list[int]:
    """A plan keeps every old layer, in order, once as itself; anything else would change the function."""
    plan = [int(p) for p in plan]
    if any(not 0 <= p < layers for p in plan):
        raise ValueError(f"plan entries must name old layers 0..{layers - 1}, got {plan}")
    firsts = [p for i, p in enumerate(plan) if p not in plan[:i]]
    if firsts != list(range(layers)):
        raise ValueError(f"plan must keep every old layer once and in order (first occurrences 0..{layers - 1}), got {plan}")
    if plan != sorted(plan):
        raise ValueError(f"a copy must sit after its original and before the next old layer, got {plan}")
    return plan


def grow_depth(model: nn.Module, plan: Sequence[int]) -> nn.Module:
    """A new model of the same family with ``len(plan)`` decoder layers, computing what ``model`` computes."""
    adapter = get_adapter(model)
    old_layers = adapter.decoder(model).layers
    plan = check_plan(plan, len(old_layers))
    config = model.config.__class__.from_dict(model.config.to_dict())
    text = adapter.text_config(config)
    text.num_hidden_layers = len(plan)
    if getattr(text, "layer_types", None) is not None:  # per-layer attention kinds follow their source layer
        text.layer_types = [text.layer_types[p] for p in plan]
    if getattr(text, "max_window_layers", None) is not None:
        text.max_window_layers = len(plan)
    grown = adapter.model_class()(config).to(next(model.parameters()).dtype).eval()
    prefix = _layers_prefix(model, old_layers)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    seen: set[int] = set()
    for new, old in enumerate(plan):
        for name, value in old_layers[old].state_dict().items():
            value = value.clone()
            if old in seen and name.startswith(ZERO_OUTPUTS):
                value.zero_()
            state[f"{prefix}{new}.{name}"] = value
        seen.add(old)
    missing, unexpected = grown.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"grown model's weights do not line up: missing {missing}, unexpected {unexpected}")
    grown.generation_config = model.generation_config
    return grown


def _layers_prefix(model: nn.Module, layers: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise ValueError("the decoder's layers are not a submodule of the model")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="save_pretrained directory of the model to grow")
    parser.add_argument("out", help="directory for the grown model (must not hold a model)")
    parser.add_argument("--plan", required=True, help="old layer of each new layer, e.g. 0,1,1,2,3,3")
    args = parser.parse_args(argv)
    source, out = Path(args.model), Path(args.out)
    if (out / "model.safetensors").exists():
        raise FileExistsError(f"{out} already holds a model")
    from dllava.model.loading import ModelSource, load_base_model

    model = load_base_model(ModelSource(pretrained=str(source))).eval()
    grown = grow_depth(model, [int(p) for p in args.plan.split(",")])
    grown.save_pretrained(out)
    for path in source.iterdir():  # tokenizer, processor, chat template; not the old weights or card
        if path.is_file() and path.name not in _MODEL_FILES and path.suffix in (".json", ".jinja", ".txt", ".model"):
            shutil.copy(path, out / path.name)
    with torch.no_grad():
        layers = len(get_adapter(grown).decoder(grown).layers)
    print(f"{out}: {layers} decoder layers")


if __name__ == "__main__":
    main()
