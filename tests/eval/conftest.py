"""Models to evaluate, built from the tiny fixtures: a Dynamic-LLaVA save, a Lightning checkpoint, a
dense directory. Untrained weights: the tests check plumbing and accounting, not accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

PREDICTOR = {"d_model": 32, "heads": 4, "ff": 64, "layers": 2}
SPARSITY = {"keep": 0.25, "layer": 2, "text_min_len": 16}


@pytest.fixture(scope="session")
def dynamic_dir(tiny_model_dir, tiny_processor, tmp_path_factory) -> Path:
    """``DynamicLlava.save_pretrained`` of the tiny model with (untrained) predictors, plus its processor."""
    from transformers import LlavaForConditionalGeneration

    from dllava.sparse.model import DynamicLlava

    torch.manual_seed(0)
    model = DynamicLlava(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), SPARSITY, PREDICTOR)
    out = tmp_path_factory.mktemp("dynamic") / "hf"
    model.save_pretrained(out)
    tiny_processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lightning_ckpt(tiny_model_dir, tmp_path_factory) -> Path:
    """A checkpoint file laid out as train.py's: LlavaLitModule's state_dict and hyper-parameters."""
    from dllava.training.module import LlavaLitModule

    torch.manual_seed(1)
    module = LlavaLitModule(
        model={"pretrained": str(tiny_model_dir), "predictor": PREDICTOR}, sparsity=SPARSITY, max_new_tokens=4
    )
    module.configure_model()
    with torch.no_grad():  # weights that differ from the base, so a load that ignored them would show
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "step_000010.ckpt"
    path.parent.mkdir(parents=True)
    hparams = {k: (dict(v) if isinstance(v, dict) else v) for k, v in module.hparams.items()}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "global_step": 10}, path)
    return path


def synthetic_question_lines(synthetic_dir: Path, image_folder: Path, count: int) -> list[dict]:
    """The first ``count`` questions of the synthetic test split as LLaVA question-file lines (ids
    1000, 1001, ..., the reference answer under ``answer``), their images saved into ``image_folder``."""
    import webdataset as wds

    from dllava.data.datamodule import decode_sample, resolve_urls

    image_folder.mkdir(parents=True, exist_ok=True)
    lines = []
    dataset = wds.WebDataset(resolve_urls(str(synthetic_dir / "test-*.tar")), shardshuffle=False, empty_check=False)
    for i, raw in enumerate(dataset):
        if i == count:
            break
        sample = decode_sample(raw)
        sample["image"].save(image_folder / f"{i}.png")
        conversation = sample["record"]["conversations"]
        question = conversation[0]["value"].replace("<image>", "").strip()
        lines.append({"question_id": 1000 + i, "image": f"{i}.png", "text": question, "answer": conversation[1]["value"]})
    return lines
