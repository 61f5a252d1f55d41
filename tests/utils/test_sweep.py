"""sweep_summary.csv: one row per job, failed jobs included."""

import csv
import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from dllava.utils.sweep import SweepFailed, SweepSummary, main, write_sweep_summary


def _job(sweep, num, overrides, summary=None):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if summary is not None:
        (job / "summary.json").write_text(json.dumps({"overrides": overrides, **summary}))


@pytest.fixture
def sweep(tmp_path):
    _job(tmp_path, 0, ["sparsity.keep=0.25"], {"status": "completed", "metrics": {"val/loss": 1.5}, "ckpt_path": "a"})
    _job(tmp_path, 1, ["sparsity.keep=1.5"], {"status": "failed", "metrics": {}, "error": "ValueError: sparsity.keep"})
    _job(tmp_path, 2, ["sparsity.keep=0.5"])  # died without a summary
    _job(tmp_path, 10, ["sparsity.keep=0.75"], {"status": "completed", "metrics": {"val/loss": 1.2, "val/answer_acc": 0.5}})
    return tmp_path


def test_summary_has_one_row_per_job_in_job_order(sweep):
    path, _ = write_sweep_summary(sweep)
    rows = list(csv.DictReader(path.open()))
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]
    assert [r["status"] for r in rows] == ["completed", "failed", "failed", "completed"]
    assert rows[0]["overrides"] == "sparsity.keep=0.25" and float(rows[0]["val/loss"]) == 1.5
    assert rows[1]["error"] == "ValueError: sparsity.keep" and rows[1]["val/loss"] == ""
    assert "no summary.json" in rows[2]["error"] and rows[2]["overrides"] == "sparsity.keep=0.5"
    assert float(rows[3]["val/answer_acc"]) == 0.5


def test_callback_writes_the_table_then_fails_the_sweep(sweep):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with pytest.raises(SweepFailed, match="2 of 4 sweep jobs failed"):
        SweepSummary().on_multirun_end(config)
    assert (sweep / "sweep_summary.csv").is_file()
    SweepSummary(filename="table.csv", fail_on_job_failure=False).on_multirun_end(config)
    assert (sweep / "table.csv").is_file()


def test_cli_rebuilds_the_table(sweep, capsys):
    main([str(sweep)])
    assert "4 jobs, 2 failed" in capsys.readouterr().out


def test_cli_on_a_missing_sweep_dir_says_so_and_writes_nothing(tmp_path):
    missing = tmp_path / "nope"
    result = subprocess.run([sys.executable, "-m", "dllava.utils.sweep", str(missing)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert f"sweep directory '{missing}' does not exist" in result.stderr and "Traceback" not in result.stderr
    assert not missing.exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "file")])
    assert err.value.code != 0 and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_diverged_job_keeps_its_non_finite_metrics_and_fails_the_sweep(tmp_path):
    _job(tmp_path, 0, ["optim.lr=1e-4"], {"status": "completed", "metrics": {"train/loss": 0.5}})
    _job(tmp_path, 1, ["optim.lr=1e9"], {"status": "diverged", "metrics": {"train/loss": "nan", "lr/llm": "inf"},
                                         "error": "TrainingDiverged: non-finite loss at step 1"})
    _job(tmp_path, 2, ["optim.lr=1e-3"], {"status": "interrupted", "metrics": {}, "error": "interrupted by SIGTERM"})
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SweepFailed, match=r"2 of 3 sweep jobs failed \(jobs 1 \(diverged\), 2 \(interrupted\)\)"):
        SweepSummary().on_multirun_end(config)
    rows = list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed", "diverged", "interrupted"]
    assert rows[1]["train/loss"] == "nan" and float(rows[1]["lr/llm"]) == float("inf")
    assert "step 1" in rows[1]["error"] and float(rows[0]["train/loss"]) == 0.5


def test_cli_counts_each_status(tmp_path, capsys):
    _job(tmp_path, 0, ["a=1"], {"status": "diverged", "metrics": {"train/loss": "nan"}})
    _job(tmp_path, 1, ["a=2"], {"status": "failed", "metrics": {}})
    _job(tmp_path, 2, ["a=3"])
    main([str(tmp_path)])
    assert "3 jobs, 3 failed (1 diverged, 2 failed)" in capsys.readouterr().out
