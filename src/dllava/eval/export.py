"""Export a Lightning checkpoint of ``train.py`` as a ``from_pretrained`` directory.

    python -m dllava.eval.export logs/train/runs/<run>/checkpoints/step_000400.ckpt <out dir>

``train.py export=true`` writes ``<run dir>/hf`` when a run finishes; this is for any other checkpoint
(a run stopped early, the best of several validations). The file is read as ``eval.py`` reads it
(:func:`dllava.eval.loading.read_lightning_checkpoint`: CRC-checked, ``weights_only``, nothing in it can
execute code), the model is saved with ``DynamicVLM.save_pretrained`` (the stock HF files, plus the
predictors and ``sparsity.json`` when it has predictors) and the processor of its ``model.pretrained``
beside it, so ``model.pretrained=<out dir>`` continues from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dllava.eval.loading import load_lightning_model


def export_checkpoint(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write the model and processor of the Lightning checkpoint ``ckpt_path`` into ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new directory for the export")
    model, processor = load_lightning_model(Path(ckpt_path))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt_path", help="a .ckpt file written by train.py")
    parser.add_argument("out", help="a new directory for the from_pretrained export")
    args = parser.parse_args(argv)
    print(export_checkpoint(args.ckpt_path, args.out))


if __name__ == "__main__":
    main()
