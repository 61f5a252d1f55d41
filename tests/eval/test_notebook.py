"""notebooks/keep_sweep.ipynb runs headless on a tiny sweep and a tiny comparison table."""

from __future__ import annotations

import json
import os

import pytest

from dllava.eval.compare import TABLE_COLUMNS
from dllava.eval.plots import parse_overrides, sweep_rows, write_rows
from dllava.utils.sweep import write_sweep_summary
from tests.conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "keep_sweep.ipynb"


def _tiny_sweep(sweep_dir):
    """Three jobs as train.py leaves them (summary.json), one failed; the table by the real writer."""
    for job, (keep, acc, status) in enumerate([(0.2, 0.74, "completed"), (0.35, 0.76, "completed"), (0.5, None, "failed")]):
        job_dir = sweep_dir / str(job)
        job_dir.mkdir(parents=True)
        metrics = {} if acc is None else {"val/answer_acc": acc, "test/answer_acc": acc - 0.01, "val/vision_keep": keep}
        summary = {"status": status, "overrides": [f"sparsity.keep={keep}", "trainer.max_steps=10"], "metrics": metrics,
                   "ckpt_path": None, **({"error": "RuntimeError: boom"} if status == "failed" else {})}
        (job_dir / "summary.json").write_text(json.dumps(summary))
    return write_sweep_summary(sweep_dir)[0]


def _tiny_table(path):
    rows = [{"model": "sparse-trained (keep 0.2)", "method": "dense", "keep": 1.0, "accuracy": 0.75, "acc_vs_dense": 1.0,
             "prefill_flops": 3.5e8, "prefill_flops_ratio": 1.0, "kv_ratio": 1.0, "latency_ms": 2.0}]
    for method, base in (("dynamic", 0.74), ("fastv", 0.7), ("random", 0.6)):
        for keep in (0.1, 0.2, 0.5):
            rows.append({"model": "sparse-trained (keep 0.2)", "method": method, "keep": keep, "accuracy": base + 0.02 * keep,
                         "acc_vs_dense": (base + 0.02 * keep) / 0.75, "prefill_flops": 2.4e8 + 1e8 * keep,
                         "prefill_flops_ratio": 0.7 + 0.3 * keep, "kv_ratio": 0.7 + 0.3 * keep, "latency_ms": 1.5})
    return write_rows(path, rows, TABLE_COLUMNS)


def test_sweep_rows_read_keep_from_the_overrides(tmp_path):
    rows = sweep_rows(_tiny_sweep(tmp_path / "sweep"))
    assert [r["sparsity.keep"] for r in rows] == [0.2, 0.35, 0.5]
    assert [r["status"] for r in rows] == ["completed", "completed", "failed"]
    assert rows[0]["val/answer_acc"] == 0.74 and rows[2]["val/answer_acc"] is None
    assert parse_overrides("+a=1 b=x") == {"a": 1, "b": "x"}


@pytest.mark.slow
def test_keep_sweep_notebook_executes_headless(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    sweep_dir = tmp_path / "sweep"
    _tiny_sweep(sweep_dir)
    table = _tiny_table(tmp_path / "eval_table.csv")
    monkeypatch.setenv("KEEP_SWEEP_DIR", str(sweep_dir))
    monkeypatch.setenv("KEEP_SWEEP_EVAL_TABLE", str(table))
    monkeypatch.setenv("KEEP_SWEEP_OUT", str(tmp_path / "figures"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "failed jobs (not plotted): [0]" not in text and "failed jobs (not plotted): [2]" in text
    assert (tmp_path / "figures" / "keep_sweep.png").stat().st_size > 10_000
    assert (tmp_path / "figures" / "keep_tradeoff.png").stat().st_size > 10_000
