"""Inference efficiency of Dynamic-LLaVA against dense, FastV and random keep: `python bench.py [model=...]`.

Examples:
    python bench.py                                                   # the tiny model
    python bench.py model=mid                                         # a mid-size random model on CPU
    python bench.py model=dllava_7b model.random_init=true sparsity.keep=0.2   # 7B shapes (meta on CPU)
    python bench.py model=dllava_qwen2_5_vl_7b model.random_init=true sparsity.keep=0.2   # 1008x1008 px = 1,296 tokens
    python bench.py model=dllava_qwen3_vl_8b model.random_init=true sparsity.keep=0.2     # 1008 -> 1024 px = 1,024 tokens
    python bench.py bench.predictors=logs/train/runs/<run>/hf bench.text_keep_rate=null   # trained predictors
    python bench.py model=mid bench.decode_lengths=[1024,2048,4096]   # long decoding, the paper's Table 4
    python bench.py model=dllava_7b model.random_init=true bench.batch_size=8 \
        bench.baselines=[fastv,random,dart,divprune,cdpruner,visionzip,pdrop]   # every method (GPU: values needed)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("DLLAVA_ROOT", str(Path(__file__).resolve().parent))

import hydra
from omegaconf import DictConfig, OmegaConf

from dllava.bench.inference import build_model, format_table, run_bench, write_json
from dllava.startup import check_bench_config

log = logging.getLogger("bench")


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> dict:
    check_bench_config(cfg)  # every value's type and range, named by its key, before any work
    b = cfg.bench
    lengths = b.get("decode_lengths")
    decode_lengths = list(lengths) if lengths else []
    decode_device = b.get("decode_device", "auto")
    model, device = build_model(
        OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.sparsity, resolve=True),
        b.predictors, b.device, b.cpu_max_gib,
    )
    record = run_bench(
        model, device, keep=cfg.sparsity.keep, batch_size=b.batch_size, text_tokens=b.text_tokens,
        new_tokens=b.new_tokens, text_keep_rate=b.text_keep_rate, warmup=b.warmup, repeats=b.repeats, seed=cfg.seed,
        image_px=b.image_size, decode_lengths=decode_lengths, decode_device=decode_device,
        baselines=list(b.get("baselines") or []),
    )
    record["model"] = cfg.model.get("name") or record["model"]
    path = write_json(record, Path(cfg.paths.output_dir) / "bench.json")
    print(format_table(record))
    log.info("wrote %s", path)
    return record


if __name__ == "__main__":
    main()
