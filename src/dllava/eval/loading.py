"""Load a model to evaluate: a Lightning checkpoint (``.ckpt``) or a ``save_pretrained`` directory.

* ``.ckpt`` (written by ``train.py``): the model is built as :class:`~dllava.training.module.DynamicLitModule`
  builds it (``load_base_model`` of the hyper-parameters' ``model`` source, then ``DynamicVLM`` with their
  ``sparsity`` and predictor sizes), and the checkpoint's ``state_dict`` (keys ``model.*``) is loaded
  into it, strictly. The tokenizer and image processor come from ``model.pretrained``. The archive's
  CRCs are checked first (a damaged file is refused naming the member), then it is loaded with
  ``torch.load(weights_only=True)``: nothing in the file can execute code. A file that is no such
  checkpoint (``ckpt_path=README.md``) is refused saying what eval.py accepts.
* A directory with ``sparsity.json`` (``DynamicVLM.save_pretrained``, ``train.py export=true``):
  ``DynamicVLM.from_pretrained``; processor from the same directory.
* A directory without it (a stock llava-hf checkpoint, or a dense export): a dense model (no
  predictors), so ``method=dense``, ``fastv`` and ``random`` work and ``dynamic`` says what is missing.

Sharded (FSDP) checkpoint directories are not read here: export the run (``train.py export=true``) or
evaluate a single-file checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dllava.model.loading import DTYPES, ModelSource, load_base_model, load_processor
from dllava.sparse.config import SparsityConfig
from dllava.sparse.model import SPARSITY_FILE, DynamicVLM
from dllava.training.safe_load import CorruptCheckpointError, NotAnArchiveError, UnsafeCheckpointError, load_checkpoint_file

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready for the engine, its processor, and where it came from."""

    model: DynamicVLM
    processor: Any
    name: str  # short, for answer files and tables: "<run dir>/<checkpoint>" or the directory name
    path: str
    device: str


def choose_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def model_name(path: Path) -> str:
    """``<run dir>/<checkpoint stem>`` for ``<run>/checkpoints/x.ckpt``, ``<run dir>/hf`` for an
    export, else the last path component (LLaVA's ``get_model_name_from_path`` in spirit)."""
    path = path.resolve()
    if path.suffix == ".ckpt":
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return f"{run.name}/{path.stem}"
    if path.name in ("hf", "export") or path.name.startswith("checkpoint-"):
        return f"{path.parent.name}/{path.name}"
    return path.name


def load_for_eval(ckpt_path: str | Path, device: str = "auto", dtype: str | None = None) -> LoadedModel:
    """Load ``ckpt_path`` (see the module docstring) in eval mode on ``device``; ``dtype`` (float32,
    bfloat16, float16) overrides the checkpoint's."""
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r} does not exist (a .ckpt file or a save_pretrained directory)")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or null, got {dtype!r}")
    device = choose_device(device)
    if path.is_file():
        model, processor = load_lightning_model(path, dtype)
    elif (path / "config.json").is_file():
        model, processor = _from_directory(path, dtype)
    else:
        raise ValueError(
            f"ckpt_path={str(path)!r} is a directory without config.json: a sharded (FSDP) Lightning checkpoint? "
            "Export the run with `python train.py export=true ...` and evaluate <run dir>/hf, or give a .ckpt file."
        )
    model = model.to(device).eval()
    return LoadedModel(model=model, processor=processor, name=model_name(path), path=str(path), device=device)


ACCEPTED = (
    "eval.py takes a Lightning checkpoint written by train.py (a .ckpt file), a save_pretrained directory "
    "(<run dir>/hf from train.py export=true), or a stock llava-hf model directory (with config.json)"
)


def read_lightning_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint file at ``path``, CRC-checked and unpickled weights-only; anything else is refused
    saying what eval.py accepts (never by suggesting to load it with ``weights_only=False``)."""
    try:
        checkpoint = load_checkpoint_file(path, map_location="cpu")
    except CorruptCheckpointError as err:
        if not isinstance(err, NotAnArchiveError):
            raise  # a damaged checkpoint: the error names the file and member
        raise ValueError(f"ckpt_path={str(path)!r} is not a checkpoint of this project ({err}). {ACCEPTED}.") from None
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{err} Not a checkpoint of this project: {ACCEPTED}.") from None
    except RuntimeError as err:  # a zip archive that torch cannot read (no data.pkl, ...)
        raise ValueError(f"ckpt_path={str(path)!r} is not a checkpoint of this project ({err}). {ACCEPTED}.") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint of DynamicLitModule (no state_dict/hyper_parameters). {ACCEPTED}.")
    return checkpoint


def load_lightning_model(path: Path, dtype: str | None = None) -> tuple[DynamicVLM, Any]:
    """The model of a ``train.py`` checkpoint file (built from its hyper-parameters, its ``state_dict``
    loaded strictly) and the processor of its ``model.pretrained``."""
    checkpoint = read_lightning_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    source = dict(hparams["model"])
    predictor = source.pop("predictor", None)
    if dtype is not None:
        source["dtype"] = dtype
    source = ModelSource(**source)
    sparsity = SparsityConfig(**(hparams.get("sparsity") or {"vision": False, "text": False}))
    llava = load_base_model(source)
    model = DynamicVLM(llava, sparsity, predictor)
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model its hyper-parameters describe: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    model.to(source.torch_dtype)
    if source.pretrained is None:
        raise ValueError(f"{path}: model.pretrained is not set, so there is no tokenizer/processor to evaluate with")
    return model, load_processor(source.pretrained)


def _from_directory(path: Path, dtype: str | None) -> tuple[DynamicVLM, Any]:
    kwargs = {} if dtype is None else {"dtype": DTYPES[dtype]}
    if (path / SPARSITY_FILE).is_file():
        model = DynamicVLM.from_pretrained(path, **kwargs)
    else:
        log.info("%s has no %s: evaluating it as a dense LLaVA (no predictors)", path, SPARSITY_FILE)
        source = ModelSource(pretrained=str(path), dtype=dtype or "float32")
        model = DynamicVLM(load_base_model(source), SparsityConfig(vision=False, text=False))
    return model, load_processor(str(path))
