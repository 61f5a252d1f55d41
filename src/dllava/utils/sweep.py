"""``sweep_summary.csv``: one row per job of a Hydra multirun (its overrides, status, final metrics).

:class:`SweepSummary` is a Hydra callback (``conf/hydra/default.yaml``) that writes the table when the
sweep ends. It reads what each job left in its directory, so it works the same for the local launcher
and for SLURM (submitit), where jobs run on other machines:

* ``<job>/summary.json`` (train.py): status (completed, diverged, failed, interrupted: see
  :mod:`dllava.utils.run`), overrides, metrics, or the error of a job that did not complete;
* ``<job>/.hydra/overrides.yaml`` (Hydra): the overrides of a job that died without a summary
  (killed, out of memory); its row says ``failed`` with ``no summary.json``.

Metric cells are numbers, or ``nan``/``inf``/``-inf`` for a non-finite metric (``summary.json`` keeps them
as those strings; ``float()`` and pandas read them back). A job that did not complete fails the sweep.

The table can be rebuilt at any time, e.g. while a SLURM sweep is still running or after a launcher
error: ``python -m dllava.utils.sweep <sweep dir>``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dllava.utils.files import atomic_write_text

log = logging.getLogger(__name__)

SUMMARY_FILE = "sweep_summary.csv"
FIXED_COLUMNS = ("job", "status", "overrides", "error", "ckpt_path", "run_dir")


class SweepFailed(SystemExit):
    """Some jobs of a sweep failed (all jobs ran; the table says which). A ``SystemExit`` because Hydra
    turns exceptions from callbacks into warnings: this one ends the process with status 1 and its message."""


def _job_key(path: Path) -> tuple[int, Any]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Job directories directly under ``sweep_dir`` (Hydra's default ``subdir: ${hydra.job.num}``)."""
    sweep_dir = Path(sweep_dir)
    found = {p.parent for p in sweep_dir.glob("*/summary.json")}
    found |= {p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")}
    return sorted(found, key=_job_key)


def job_row(job_dir: Path) -> dict[str, Any]:
    """One job's row: fixed columns plus ``metric`` columns named as logged (``val/loss``)."""
    summary_path = job_dir / "summary.json"
    overrides_path = job_dir / ".hydra" / "overrides.yaml"
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            summary = {"status": "failed", "error": f"unreadable summary.json: {err}"}
    overrides = summary.get("overrides")
    if overrides is None and overrides_path.is_file():
        overrides = list(OmegaConf.to_container(OmegaConf.load(overrides_path)))
    row: dict[str, Any] = {
        "job": job_dir.name,
        "status": summary.get("status", "completed" if summary else "failed"),
        "overrides": " ".join(overrides or []),
        "error": summary.get("error", "" if summary else "no summary.json (the job died or never finished)"),
        "ckpt_path": summary.get("ckpt_path") or "",
        "run_dir": str(job_dir),
    }
    row.update(summary.get("metrics", {}))
    return row


def write_sweep_summary(sweep_dir: str | Path, filename: str = SUMMARY_FILE) -> tuple[Path, list[dict[str, Any]]]:
    """Write ``<sweep_dir>/<filename>`` (atomically) and return its path and rows."""
    sweep_dir = Path(sweep_dir)
    rows = [job_row(d) for d in job_dirs(sweep_dir)]
    metrics = sorted({k for r in rows for k in r} - set(FIXED_COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*FIXED_COLUMNS, *metrics], restval="")
    writer.writeheader()
    writer.writerows(rows)
    path = atomic_write_text(sweep_dir / filename, buffer.getvalue())
    return path, rows


class SweepSummary(Callback):
    """Hydra callback: write ``sweep_summary.csv`` into the sweep dir when a multirun ends.

    ``fail_on_job_failure``: after writing the table, exit with :class:`SweepFailed` if any job failed,
    so ``python train.py -m ...`` exits non-zero although every job ran.
    """

    def __init__(self, filename: str = SUMMARY_FILE, fail_on_job_failure: bool = True) -> None:
        self.filename = filename
        self.fail_on_job_failure = fail_on_job_failure

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path, rows = write_sweep_summary(config.hydra.sweep.dir, self.filename)
        failed = [f"{r['job']} ({r['status']})" for r in rows if r["status"] != "completed"]
        log.info("sweep summary: %s (%d jobs, %d failed)", path, len(rows), len(failed))
        if failed and self.fail_on_job_failure:
            raise SweepFailed(f"{len(failed)} of {len(rows)} sweep jobs failed (jobs {', '.join(failed)}); see {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dllava.utils.sweep", description="(Re)build sweep_summary.csv from a Hydra sweep directory.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--filename", default=SUMMARY_FILE)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        what = "is not a directory" if args.sweep_dir.exists() else "does not exist"
        parser.exit(2, f"{parser.prog}: error: sweep directory {str(args.sweep_dir)!r} {what}; give the sweep dir of a "
                       "multirun (hydra.sweep.dir, e.g. logs/train/multiruns/<time>)\n")
    path, rows = write_sweep_summary(args.sweep_dir, args.filename)
    counts = Counter(r["status"] for r in rows if r["status"] != "completed")
    detail = f" ({', '.join(f'{n} {status}' for status, n in sorted(counts.items()))})" if counts else ""
    print(f"{path}: {len(rows)} jobs, {sum(counts.values())} failed{detail}")


if __name__ == "__main__":
    main()
