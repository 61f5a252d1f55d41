"""A real 2-process CPU DDP fit (gloo, the tiny LLaVA) on converted shards with truncated ones among them.

Resampled training gives both ranks the same number of batches, so the run finishes instead of
hanging; dropped data is counted on both ranks and, logged by the LightningModule,
sums across ranks.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from dllava.data.shards import convert
from tests.data.llava_set import write_good_set
from tests.helpers import CONF

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    from dllava.data.datamodule import LlavaDataModule
    from dllava.training.module import LlavaLitModule

    out, model_dir, train, val = sys.argv[1:5]

    class Recorder(L.Callback):
        def __init__(self):
            self.batches, self.counts = 0, {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches += 1
            for name, value in batch["data_counts"].items():
                self.counts[name] = self.counts.get(name, 0) + value

        def on_fit_end(self, trainer, pl_module):
            logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("data/")}
            result = {"batches": self.batches, "counts": self.counts, "logged": logged, "steps": trainer.global_step}
            with open(f"{out}/rank{trainer.global_rank}.json", "w") as sink:
                json.dump(result, sink)

    if __name__ == "__main__":
        data = LlavaDataModule(train_urls=train.split(","), val_urls=val.split(","), processor=model_dir,
                               batch_size=2, eval_batch_size=4, num_workers=2, epoch_samples=16,
                               shuffle_buffer=4, seed=0)
        module = LlavaLitModule(model={"name": "tiny", "pretrained": model_dir}, trainable=["projector", "llm"],
                        answer_kinds=None, max_new_tokens=2)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, max_epochs=-1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Recorder()])
        trainer.fit(module, datamodule=data)
    """
)


@pytest.mark.slow
def test_ddp_fit_on_cpu_finishes_with_equal_batches_and_counts_skipped_shards(tmp_path, tiny_model_dir):
    path, images, _ = write_good_set(tmp_path, 24)
    shards = tmp_path / "shards"
    manifest = convert(path, images, shards, samples_per_shard=4, progress=False)  # 6 shards of 4
    for name in manifest["shards"][1:4]:  # three of the four training shards cut in the middle
        data = (shards / name).read_bytes()
        (shards / name).write_bytes(data[: len(data) // 2 + 100])
    train = ",".join(str(shards / n) for n in manifest["shards"][:4])
    val = ",".join(str(shards / n) for n in manifest["shards"][4:])
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(tiny_model_dir), train, val],
        capture_output=True, text=True, timeout=240, cwd=CONF.parent,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == 4  # ceil(16 / (2 x 2)) per rank
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    skipped = sum(r["counts"]["skipped"] for r in ranks)
    assert skipped >= 1
    assert ranks[0]["logged"]["data/skipped"] == skipped  # sum over steps and ranks
