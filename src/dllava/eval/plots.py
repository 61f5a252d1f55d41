"""Tables and trade-off plots: the equal-budget comparison's Pareto plot and a keep sweep's curve.

Both read plain CSV rows (``eval_table.csv`` of the comparison, ``sweep_summary.csv`` of a training
sweep), so the notebook (``notebooks/keep_sweep.ipynb``) and the comparison draw with the same code.
Figures are built with matplotlib's object API (no pyplot, no backend switch): pass an ``ax`` to draw
into a notebook's figure, or a ``path`` to write a PNG headless.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from matplotlib.figure import Figure

METHOD_STYLE = {
    "dynamic": {"color": "tab:blue", "marker": "o"},
    "fastv": {"color": "tab:orange", "marker": "s"},
    "random": {"color": "tab:gray", "marker": "^"},
    "dense": {"color": "black", "marker": "*"},
}


def _number(text: str) -> Any:
    if text is None:
        return None
    text = text.strip()
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def fmt(value: Any, spec: str) -> str:
    """A table cell: ``value`` formatted, or "-" when missing."""
    return "-" if value is None else format(value, spec)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """A CSV file as dicts, numbers parsed and empty cells as None."""
    with Path(path).open(newline="") as handle:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Path:
    path = Path(path)
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``"sparsity.keep=0.2 trainer.max_steps=10"`` -> ``{"sparsity.keep": 0.2, "trainer.max_steps": 10}``."""
    out: dict[str, Any] = {}
    for item in (text or "").split():
        if "=" in item:
            key, value = item.split("=", 1)
            out[key.lstrip("+~")] = _number(value)
    return out


def sweep_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``sweep_summary.csv`` with each override as a column of its own (unless the file
    already has that column), so ``row["sparsity.keep"]`` works whatever wrote the table."""
    rows = []
    for row in read_rows(path):
        for key, value in parse_overrides(row.get("overrides")).items():
            if row.get(key) is None:
                row[key] = value
        rows.append(row)
    return rows


def sweep_plot(
    rows: Iterable[dict[str, Any]],
    x: str = "sparsity.keep",
    ys: Sequence[str] = ("val/answer_acc",),
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """Metric(s) against a swept key over the completed jobs; returns the axes."""
    rows = [r for r in rows if r.get("status", "completed") == "completed" and isinstance(r.get(x), (int, float))]
    if ax is None:
        ax = Figure(figsize=(5, 3.5)).subplots()
    for y in ys:
        points = sorted((r[x], r[y]) for r in rows if isinstance(r.get(y), (int, float)))
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=y)
    ax.set_xlabel(x)
    ax.set_ylabel(ys[0] if len(ys) == 1 else "metric")
    ax.grid(alpha=0.3)
    if len(ys) > 1:
        ax.legend()
    if title:
        ax.set_title(title)
    return ax


def pareto_plot(
    rows: Iterable[dict[str, Any]],
    path: str | Path | None = None,
    x: str = "prefill_flops",
    y: str = "accuracy",
    reference: float | None = None,
    title: str | None = None,
    ax: Any = None,
) -> Any:
    """Accuracy against prefill FLOPs: one line per (model, method) through its keep ratios (labelled),
    dense points as stars, and a dashed line at 97% of ``reference`` (the dense accuracy).
    Writes a PNG to ``path`` when given; returns the axes."""
    rows = [r for r in rows if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    ax = ax if ax is not None else Figure(figsize=(7, 4.5)).subplots()
    fig = ax.figure
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(str(row.get("model", "")), str(row["method"]))].append(row)
    models = list(dict.fromkeys(m for m, _ in groups))
    for (model, method), members in groups.items():
        style = dict(METHOD_STYLE.get(method, {"marker": "o"}))
        hollow = models.index(model) > 0  # a second model (e.g. the dense-trained one) in hollow markers
        label = method if len(models) == 1 else f"{method}, {model}"
        members = sorted(members, key=lambda r: r[x])
        xs, ys = [r[x] for r in members], [r[y] for r in members]
        if method == "dense":
            ax.scatter(xs, ys, s=160, label=label, zorder=3, color=style["color"], marker="*",
                       facecolors="none" if hollow else style["color"])
            continue
        ax.plot(xs, ys, label=label, linestyle="--" if hollow else "-", color=style.get("color"), marker=style["marker"],
                markerfacecolor="white" if hollow else style.get("color"))
        for r in members:
            ax.annotate(f"{r['keep']:g}", (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=style.get("color"))
    if reference is not None:
        ax.axhline(0.97 * reference, color="black", linestyle=":", linewidth=1, label="97% of dense")
    ax.set_xlabel("prefill FLOPs per sample (decoder, full count)" if x == "prefill_flops" else x)
    ax.set_ylabel("answer accuracy (exact match)" if y == "accuracy" else y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title)
    if path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=150)
    return ax
